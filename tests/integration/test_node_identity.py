"""`boneage-worker db new-identity`: a validation node set up from a copy of production's
database would have production's identity, and so make production's UIDs, the objects
of both taken for one by a PACS that gets both; the command gives the copy one of its
own, once no process of it runs, and says what it means for the images recorded.

A real database (SQLite, PostgreSQL) copied as an administrator copies it (SQLite's
backup, PostgreSQL's CREATE DATABASE … TEMPLATE), the command run as a command.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from pydicom import dcmread
from sqlalchemy import insert, select, update

from db.engine import get_engine, session_scope, sqlite_file
from db.schema import Delivery, Heartbeat, Instance, Node
from db.schema import utcnow as now
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from worker.cli import main as cli
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

PRODUCTION_PACS = "PRODPACS@127.0.0.1:10404"
VALIDATION_PACS = "TESTPACS@127.0.0.1:10405"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Production's database, on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'production.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def copy_of(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Copies a database as an administrator would; the copy's URL."""
    made: list[tuple[str, str]] = []

    def copy(url: str) -> str:
        path = sqlite_file(url)
        if path is not None:
            copied = tmp_path / "validation.db"
            with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(copied)) as to:
                source.backup(to)
            return f"sqlite:///{copied}"
        admin = str(request.getfixturevalue("postgres_server"))
        name = f"boneage_copy_{uuid.uuid4().hex[:12]}"
        get_engine(url).dispose()  # a template database takes no other connection
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{url.rsplit("/", 1)[1]}"')
        made.append((name, f"{url.rsplit('/', 1)[0]}/{name}"))
        return made[-1][1]

    yield copy
    for name, url in made:
        get_engine(url).dispose()
        admin = str(request.getfixturevalue("postgres_server"))
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_identity(url: str, *args: str, answer: str | None = None) -> Result:
    """`boneage-worker db new-identity` run on the node whose database is at ``url``,
    which sends to the validation PACS; ``answer`` typed at its question."""
    return CliRunner().invoke(
        cli,
        ["--database-url", url, "db", "new-identity", *args],
        input=answer,
        env={"BONEAGE_DESTINATIONS": VALIDATION_PACS},
    )


def identity(url: str) -> str:
    with session_scope(url) as session:
        return session.scalars(select(Node.device_observer_uid)).one()


def made_uids(rt: Runtime, instance_id: int) -> set[str]:
    """The SOP Instance UIDs of the SR and SC made of the instance."""
    with session_scope(rt.database_url) as session:
        uids = set(
            session.scalars(
                select(Delivery.sop_instance_uid).where(Delivery.instance_id == instance_id)
            )
        )
    assert len(uids) == 2, uids
    return uids


def test_a_validation_node_from_a_copy_of_productions_database_gets_an_identity_of_its_own(
    database_url: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    copy_of: Callable[[str], str],
) -> None:
    """The copy has production's identity; the command, refused while a process of
    the copy runs, and not given without a yes, gives it one of its own, saying what
    it means for the image production had assessed and that the deliveries recorded
    name production's PACS. Then the same new image at both nodes makes other objects
    under other UIDs; production's identity is as it was."""
    production = make_runtime(
        tmp_path / "production",
        tiny_checkpoint,
        database_url=database_url,
        destinations=PRODUCTION_PACS,
    )
    assert assess_instance(production, spool_instance(production)).state == "assessed"
    copy = copy_of(database_url)
    assert identity(copy) == identity(database_url)  # what the command is for

    with session_scope(copy) as session:  # a worker of the validation node runs
        session.execute(
            insert(Heartbeat).values(
                name="worker@validation/1a2b:7", role="worker", started_at=now(), seen_at=now()
            )
        )
    refused = new_identity(copy, "--yes")
    assert refused.exit_code == 1, refused.output
    assert (
        "identity unchanged: 1 process(es) of the node are running (worker@validation/1a2b:7)"
        in refused.output
    )
    assert identity(copy) == identity(database_url)
    with session_scope(copy) as session:  # stopped
        session.execute(update(Heartbeat).values(seen_at=now() - dt.timedelta(minutes=5)))

    declined = new_identity(copy, answer="n\n")
    assert declined.exit_code == 1, declined.output
    assert "identity unchanged: answer y to the question, or pass --yes" in declined.output
    assert identity(copy) == identity(database_url)
    unanswered = new_identity(copy)  # no terminal, no input
    assert unanswered.exit_code == 1 and identity(copy) == identity(database_url)
    said = declined.output
    assert f"the node's identity (its Device Observer UID) is {identity(copy)}" in said
    assert "1 image(s) have objects of ours recorded (of the node this" in said
    assert f"warning: objects of ours are recorded as sent to {PRODUCTION_PACS}, not" in said

    given = new_identity(copy, answer="y\n")
    assert given.exit_code == 0, given.output
    assert f"the node's identity is now {identity(copy)}: start the node's processes" in (
        given.output
    )
    assert identity(copy) != identity(database_url)
    assert identity(database_url) == production.device_observer_uid

    validation = make_runtime(
        tmp_path / "validation", tiny_checkpoint, database_url=copy, destinations=VALIDATION_PACS
    )
    assert validation.device_observer_uid == identity(copy)
    image_id = spool_instance(production, sex="M", attributes={"PatientID": "NEW-1"})
    with session_scope(database_url) as session:
        image = dcmread(session.get_one(Instance, image_id).spool_path)
    copy_id = spool_dataset(validation, image)
    assert assess_instance(production, image_id).state == "assessed"
    assert assess_instance(validation, copy_id).state == "assessed"
    assert made_uids(production, image_id).isdisjoint(made_uids(validation, copy_id))


def test_a_node_with_no_image_recorded_is_given_a_new_identity_without_a_warning(
    database_url: str, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A node that made nothing yet: nothing is said of images or destinations."""
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=database_url)
    before = rt.device_observer_uid
    given = new_identity(database_url, "--yes")
    assert given.exit_code == 0, given.output
    assert "image(s)" not in given.output and "warning" not in given.output
    assert identity(database_url) not in (before, "")
