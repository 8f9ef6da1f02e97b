"""The database schema comes from the Alembic migrations; they must build exactly what the
models describe, and a database from a newer crowdtrain is refused, not altered."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from crowdtrain.db import Base, Database, DatabaseError
from crowdtrain.db.database import DATABASE_FILE, alembic_config


def test_migrations_build_the_models_schema(tmp_path):
    db = Database.in_directory(tmp_path)
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, Base.metadata) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert context.get_current_revision() == head
    db.close()
    reopened = Database.in_directory(tmp_path)  # at head already: nothing to do, no error
    reopened.close()


def test_a_database_from_a_newer_crowdtrain_is_refused(tmp_path):
    Database.in_directory(tmp_path).close()
    with sqlite3.connect(tmp_path / DATABASE_FILE) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DatabaseError, match="schema revision 9999.*upgrade crowdtrain"):
        Database.in_directory(tmp_path)
