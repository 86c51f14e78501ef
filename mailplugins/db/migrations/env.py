"""Alembic environment: always run programmatically with a connection (see mailplugins.db.schema)."""

from alembic import context

from mailplugins.db.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
