"""Alembic environment: the engine comes from `Database` (never from an ini file holding a URL)."""

from alembic import context

from tuneplane.store.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
