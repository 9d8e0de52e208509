"""Alembic environment: the URL is the Config's (`trapq db upgrade` sets it, see
migrations.alembic_config) or, from the alembic command line, `-x url=URL`. Nothing else: a
migration run against a guessed database is worse than one refused."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from db.models import Base
from db.session import make_engine

config = context.config
if config.config_file_name and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def database_url() -> str:
    given = context.get_x_argument(as_dictionary=True).get("url", "")
    url = config.get_main_option("sqlalchemy.url") or given
    if not url:
        raise SystemExit(
            "no database URL: run `trapq db upgrade` (it uses TRAPQ_DATABASE_URL), or "
            "`alembic -x url=URL ...`"
        )
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
