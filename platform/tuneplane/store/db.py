"""Engine, sessions and migrations. SQLite (embedded default) and PostgreSQL behave alike here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x7475_6E66  # PostgreSQL advisory lock key held while migrating


class Database:
    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite and url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20)
        self.engine: Engine = create_engine(url, **kwargs)
        self._reader = self.engine
        if self.is_sqlite:
            # pysqlite's own transaction handling would start transactions lazily and never BEGIN IMMEDIATE;
            # take it over so a writer holds the lock from its first read (no lost update between API and
            # reconciler). Readers get a plain BEGIN on a second pool: in WAL mode they never wait for writers.
            self._reader = create_engine(url, **kwargs)
            for engine, begin in ((self.engine, "BEGIN IMMEDIATE"), (self._reader, "BEGIN")):
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", lambda conn, sql=begin: conn.exec_driver_sql(sql))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._reader, expire_on_commit=False)

    @contextmanager
    def session(self, readonly: bool = False) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on error. `readonly` sessions must not write."""
        with (self._read_sessions if readonly else self._sessions)() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        self._reader.dispose()

    def migrate(self) -> None:
        """Bring the schema to head. On PostgreSQL under an advisory lock: replicas starting together migrate
        one after the other (the later ones find nothing to do) instead of colliding."""
        from alembic import command

        cfg = self._alembic_config()
        if self.is_sqlite:
            command.upgrade(cfg, "head")
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()

    def at_head(self) -> bool:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        heads = set(ScriptDirectory.from_config(self._alembic_config()).get_heads())
        with self.engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads()) == heads

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["engine"] = self.engine
        return cfg


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # see the "begin" listener
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
