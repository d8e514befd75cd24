"""The throughput each worker announces in the DHT, as the coordinator's DHT watch last read it (the mesh page).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("announced_throughput", sa.Double, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:  # SQLite drops a column by rebuilding the table
        batch.drop_column("announced_throughput")
