"""One engine per process, a session scope per unit of work, migrations.

Engines are created once per process (``get_engine``) and disposed after a fork
(``dispose_after_fork``), as SQLAlchemy requires for pooled connections.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")
_lock = threading.Lock()
_engines: dict[str, tuple[Engine, sessionmaker[Session]]] = {}


class DatabaseNotReady(RuntimeError):
    """The database is unreachable or its schema is not at the expected revision."""


#: libpq's connection parameters. A connection that a firewall or NAT dropped without
#: closing (half-open) held a query (the listener's record of an image, the reconciler,
#: a worker's claim) until TCP gave up retransmitting, about 15 min. Now what was sent
#: and not acknowledged fails the connection after ``tcp_user_timeout`` (ms), and an idle
#: one is probed after 30 s (which also keeps it in the firewall's state table) and
#: closed once 3 probes 10 s apart go unanswered. The failure is psycopg's
#: OperationalError, which SQLAlchemy takes for a disconnect: the pool drops the
#: connection and the caller's own handling applies (the listener answers 0xA700, the
#: reconciler's next round tries again, a task is retried).
POSTGRESQL_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

#: Seconds after which a pooled PostgreSQL connection is replaced at its next checkout.
POOL_RECYCLE_SECONDS = 180


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the listener write while workers read; busy_timeout makes writers wait
    # for each other instead of failing; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the settings this service relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            path = Path(database)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Create it private: the database holds study UIDs and results.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        # SQLite serialises writers itself; a pool large enough for every listener
        # thread (up to 64 associations) means nobody also queues for a connection.
        engine = create_engine(
            url,
            connect_args={"timeout": 30},
            pool_size=16,
            max_overflow=64,
            pool_timeout=20,
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        # replaced at checkout once this old: never idle longer than a firewall or NAT
        # between here and the server keeps a connection's state (4 min on some clouds)
        pool_recycle=POOL_RECYCLE_SECONDS,
        connect_args=POSTGRESQL_CONNECT_ARGS if parsed.get_backend_name() == "postgresql" else {},
        hide_parameters=True,
    )


def get_engine(url: str) -> Engine:
    """The process-wide engine for ``url``."""
    return _get(url)[0]


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return _get(url)[1]


def _get(url: str) -> tuple[Engine, sessionmaker[Session]]:
    with _lock:
        if url not in _engines:
            engine = create_db_engine(url)
            _engines[url] = (engine, sessionmaker(engine, expire_on_commit=False))
        return _engines[url]


def dispose_after_fork() -> None:
    """Drop pooled connections inherited from a parent process (call in the child)."""
    with _lock:
        for engine, _ in _engines.values():
            engine.dispose(close=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    # '%' must be escaped for ConfigParser interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> str:
    """Migrate the database at ``url`` to ``revision``; returns the new revision."""
    _migrate(url, command.upgrade, revision)
    return current_revision(url) or ""


def downgrade(url: str, revision: str) -> str:
    """Migrate the database at ``url`` back to ``revision``; returns the new revision."""
    _migrate(url, command.downgrade, revision)
    return current_revision(url) or ""


def _migrate(url: str, step: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic command in one transaction.

    On SQLite, with foreign keys off: a migration that changes a constraint rebuilds the
    table (SQLite cannot alter one), and dropping the old table would cascade to every
    row that references it (the deliveries of the results, the results of the
    instances). The references are checked before the commit instead.

    On SQLite the transaction is opened by ``BEGIN IMMEDIATE``: the driver (pysqlite)
    opens one only before the first INSERT, UPDATE or DELETE, and DDL run before it
    was committed at once, so an upgrade that failed part-way (disk full, Ctrl-C, the
    check above) left the schema half-migrated under the old revision, and every later
    upgrade failed on it. Immediate: the write lock is taken first, not midway.
    """
    config = _alembic_config(url)
    with get_engine(url).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # outside any transaction, where SQLite does not ignore it
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if sqlite:
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                config.attributes["connection"] = connection
                step(config, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise DatabaseNotReady(
                            f"migration to {revision} would leave {len(broken)} row(s) "
                            "referring to rows that are gone; nothing was changed"
                        )
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config("sqlite://"))


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def _known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this version's migrations (not one of a newer
    version's, which a database migrated by it and then run by this one is at)."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite ``url`` names (None for another database, or one in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def check_schema(url: str) -> None:
    """Raise `DatabaseNotReady` with a sentence an administrator can act on.

    It creates nothing. A SQLite file that is not there is reported, not made: `status`
    run where BONEAGE_DATA_DIR does not point at the node's directory (another working
    directory, with the default ``./var/boneage``) would otherwise leave an empty
    database there, and send the administrator to `db upgrade` it.
    """
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise DatabaseNotReady(
            f"no database at {path.absolute()} (is BONEAGE_DATA_DIR right?); on a new "
            "node, where it is, 'boneage-worker db upgrade' creates it"
        )
    try:
        current = current_revision(url)
    except Exception as exc:  # any driver error: unreachable, auth, unreadable file
        raise DatabaseNotReady(f"cannot reach the database: {type(exc).__name__}") from exc
    head = head_revision()
    if current == head:
        return
    if current is not None and not _known_revision(current):
        # an image rolled back after a newer one migrated the database: upgrading from
        # here cannot help, and this version would misread the newer tables
        raise DatabaseNotReady(
            f"database schema is at {current}, newer than this version of boneage-worker "
            f"(which knows up to {head}): run the version that migrated it"
        )
    raise DatabaseNotReady(
        f"database schema is at {current or 'nothing'}, older than this version needs "
        f"({head}): run 'boneage-worker db upgrade'"
    )
