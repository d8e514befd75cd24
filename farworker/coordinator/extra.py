"""The coordinator's optional dependencies (the `coordinator` extra): a worker host installs without them."""

from __future__ import annotations

import importlib.util
import sys

import click

from farworker.config import EX_CONFIG

EXTRA_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "psycopg")
INSTALL_HINT = "pip install 'farworker[coordinator]'"


def missing_extra() -> str | None:
    """None when the coordinator can run here, else one line naming the extra and what is missing."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the coordinator needs the farworker[coordinator] extra ({', '.join(missing)} not installed): "
            f"{INSTALL_HINT}")


def require_extra() -> None:
    """Exit 78 (a configuration error: systemd does not retry it) with that one line when the extra is missing."""
    problem = missing_extra()
    if problem:
        click.echo(problem, err=True)
        sys.exit(EX_CONFIG)
