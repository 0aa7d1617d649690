"""Alembic environment: the engine comes from `Database` (never from an ini file holding a URL)."""

from alembic import context
from sqlalchemy.engine import Connection

from tuneplane.store.models import Base


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")  # held under the migration lock by Database.migrate
if given is not None:
    run(given)
    given.commit()
else:
    with context.config.attributes["engine"].connect() as connection:
        run(connection)
        connection.commit()
