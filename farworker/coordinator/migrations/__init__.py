"""The ledger's schema, versioned: Alembic migrations (versions/) brought to head on the store's start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent


def _config(connection: Connection) -> Config:
    config = Config()  # no alembic.ini: the package carries its scripts, the store hands its connection
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def upgrade_to_head(connection: Connection) -> None:
    """Apply every migration the database has not had, in the caller's transaction."""
    command.upgrade(_config(connection), "head")


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory(str(HERE)).get_current_head()
