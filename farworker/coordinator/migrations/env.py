"""Alembic's entry: runs the migrations on the connection the store (migrations.upgrade_to_head) hands over."""

from alembic import context

connection = context.config.attributes["connection"]
# render_as_batch: a migration that changes a constraint on SQLite rebuilds the table (copy, drop, rename), the
# procedure SQLite documents and the pre-Alembic store hand-rolled; on Postgres it is a plain ALTER TABLE.
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
