"""Leases (which replica runs the background loops: services/lease.py) and the pages' order index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),  # unix time; Postgres' REAL would be 4 bytes
    )
    # GET /v1/workers pages in registration order, then worker id (services/paging.py)
    op.create_index("workers_registered", "workers", ["registered_at", "worker_id"])


def downgrade() -> None:
    op.drop_index("workers_registered", "workers")
    op.drop_table("leases")
