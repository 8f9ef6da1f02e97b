"""Alembic environment: migrations run on the connection Database hands over (never a URL
from an ini file), against crowdtrain's own metadata."""

from __future__ import annotations

from alembic import context

from crowdtrain.db.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them; batch mode does that
)
with context.begin_transaction():
    context.run_migrations()
