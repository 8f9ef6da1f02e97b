"""The engine and sessions. SQLite (WAL, foreign keys on) in the data directory by default;
any SQLAlchemy URL (PostgreSQL) by setting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

DATABASE_FILE = "crowdtrain.db"
MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseError(RuntimeError):
    """The database cannot be used as it is (a newer schema, a broken file)."""


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed transaction survives a power cut
    cursor.execute("PRAGMA busy_timeout=30000")  # a second process waits for the write lock
    cursor.close()


class Database:
    def __init__(self, url: str):
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
        )
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._migrate()
        except SQLAlchemyError as error:
            raise DatabaseError(f"cannot open the database {self.describe()}: {error}") from None

    @classmethod
    def in_directory(cls, data_dir: Path) -> Database:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{(data_dir / DATABASE_FILE).resolve()}")

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _migrate(self) -> None:
        """Bring the schema to this crowdtrain's newest revision (creating it in a new
        database); refuse a database written by a newer crowdtrain."""
        config = alembic_config()
        script = ScriptDirectory.from_config(config)
        with self.engine.begin() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            if current is not None and current not in {r.revision for r in script.walk_revisions()}:
                raise DatabaseError(
                    f"the database {self.describe()} has schema revision {current}, which this "
                    f"crowdtrain does not know (it knows up to {script.get_current_head()}); "
                    "it was written by a newer crowdtrain: upgrade crowdtrain"
                )
            if current != script.get_current_head():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")

    def session(self) -> Session:
        return self._sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed together at the end, or not at all."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def alembic_config() -> Config:
    """Alembic's configuration without an ini file: the migrations ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
