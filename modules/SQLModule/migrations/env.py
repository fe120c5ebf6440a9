"""Alembic environment of the comap-reduce schema (docs/database.md#schema-migrations).

:mod:`modules.SQLModule.schema` runs Alembic with an open connection in
``config.attributes["connection"]`` (inside its locked transaction); the migrations then join that
transaction. Without one, the URL ``sqlalchemy.url`` of the Alembic config is opened with the
comap-reduce engine settings. Offline mode (``--sql``) writes the SQL instead of running it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import make_url

from modules.SQLModule.engine import make_engine
from modules.SQLModule.models import Base

config = context.config


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _configure(config.attributes["connection"])
else:
    engine = make_engine(make_url(config.get_main_option("sqlalchemy.url")))
    try:
        with engine.execution_options(comap_write=True).connect() as conn:
            _configure(conn)
            conn.commit()
    finally:
        engine.dispose()
