"""The schema and its guarantees, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select, event, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

import db.engine
from db.engine import (
    DatabaseNotReady,
    check_schema,
    current_revision,
    downgrade,
    get_engine,
    head_revision,
    session_scope,
    upgrade,
)
from db.schema import (
    FINISHED,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Model,
    Node,
    ObjectKind,
    Rejection,
    Result,
)
from tests.support import free_port, received
from worker.delivery import abandoned_note
from worker.listener import record_instance
from worker.logs import exception_text

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'boneage.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_upgrade_then_schema_check(database_url: str) -> None:
    with pytest.raises(DatabaseNotReady, match="boneage-worker db upgrade"):
        check_schema(database_url)
    assert upgrade(database_url) == head_revision()
    check_schema(database_url)
    assert upgrade(database_url) == head_revision()  # idempotent
    assert current_revision(database_url) == head_revision()


def test_same_sop_instance_uid_keeps_one_row(database_url: str) -> None:
    upgrade(database_url)
    first = record_instance(database_url, received())
    second = record_instance(database_url, received())
    assert first == second
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        row = session.get_one(Instance, first)
        assert row.times_received == 2
        assert row.state is InstanceState.RECEIVED
        assert row.received_at.tzinfo is not None


def test_one_result_per_instance_model_and_assessment(database_url: str) -> None:
    upgrade(database_url)
    instance_id = record_instance(database_url, received())
    with session_scope(database_url) as session:
        session.add(
            Model(
                id="a" * 64,
                name="m",
                version="1",
                architecture="resnet18",
                input_size=128,
                trained=False,
            )
        )

    def add_result(assessment: int = 1) -> None:
        with session_scope(database_url) as session:
            session.add(
                Result(
                    instance_id=instance_id,
                    model_id="a" * 64,
                    assessment=assessment,
                    bone_age_months=120.0,
                    male=True,
                    inference_seconds=0.1,
                    device="cpu",
                )
            )

    add_result()
    with pytest.raises(IntegrityError):
        add_result()
    add_result(assessment=2)  # assessed again: the first result stays
    with pytest.raises(IntegrityError):
        add_result(assessment=2)


def test_revision_0004_numbers_what_was_there_as_the_first_assessment(database_url: str) -> None:
    """Rows from before assessments were counted become assessment 1, with no inputs
    digest; going back to 0003 keeps the first assessment's results. On SQLite both
    rebuild a table: the rows that refer to it stay (with foreign keys on, dropping the
    old table cascaded to them)."""
    upgrade(database_url, "0003")
    row = _instance_row("1.2.826.0.1.3680043.8.498.4")
    with get_engine(database_url).begin() as connection:
        instance_id = connection.execute(
            text(
                f"INSERT INTO instances ({', '.join(row)}, times_received, attempts, "
                f"received_at) VALUES ({', '.join(':' + k for k in row)}, 1, 1, "
                "CURRENT_TIMESTAMP) RETURNING id"
            ),
            {**row, "state": InstanceState.ASSESSED.value},
        ).scalar_one()
        connection.execute(
            text(
                "INSERT INTO models (id, name, version, architecture, input_size, trained, "
                "metadata_json, first_used_at) VALUES "
                "(:id, 'm', '1', 'resnet18', 128, false, '{}', CURRENT_TIMESTAMP)"
            ),
            {"id": "b" * 64},
        )
        connection.execute(
            text(
                "INSERT INTO results (instance_id, model_id, bone_age_months, male, "
                "intervals, inference_seconds, device, created_at) VALUES "
                "(:instance, :model, 100.0, true, '{}', 0.1, 'cpu', CURRENT_TIMESTAMP)"
            ),
            {"instance": instance_id, "model": "b" * 64},
        )
        connection.execute(
            text(
                "INSERT INTO deliveries (instance_id, result_id, kind, destination, "
                "sop_instance_uid, path, state, attempts, created_at) VALUES "
                "(:instance, (SELECT id FROM results), 'sr', :destination, '1.2.3.9', "
                "'/nonexistent/sr.dcm', 'delivered', 1, CURRENT_TIMESTAMP)"
            ),
            {"instance": instance_id, "destination": f"PACS@127.0.0.1:{free_port()}"},
        )
    assert upgrade(database_url) == head_revision()
    with session_scope(database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.assessment, instance.inputs_sha256) == (1, None)
        [result] = session.scalars(select(Result))
        assert result.assessment == 1
        session.add(
            Result(
                instance_id=instance_id,
                model_id="b" * 64,
                assessment=2,
                bone_age_months=110.0,
                male=False,
                inference_seconds=0.1,
                device="cpu",
            )
        )
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 1
    assert downgrade(database_url, "0003") == "0003"
    with get_engine(database_url).connect() as connection:
        rows = connection.execute(text("SELECT bone_age_months FROM results")).all()
        assert [row[0] for row in rows] == [100.0]
        assert connection.execute(text("SELECT count(*) FROM deliveries")).scalar_one() == 1
        assert connection.execute(text("SELECT count(*) FROM instances")).scalar_one() == 1


def test_revision_0004_downgraded_never_leaves_a_superseded_delivery_to_send(
    database_url: str,
) -> None:
    """Below 0004 no state says "never send": a superseded delivery (an SR a later
    assessment replaced, an object the PACS rejected) goes, where making it failed had
    the older release's `retry-deliveries` send it. The others stay as they were."""
    upgrade(database_url)
    instance_id = record_instance(database_url, received("1.2.3.4"))
    states = [
        DeliveryState.SUPERSEDED,
        DeliveryState.FAILED,
        DeliveryState.DELIVERED,
        DeliveryState.PENDING,
        DeliveryState.SUPERSEDED,
    ]
    with session_scope(database_url) as session:
        for n, state in enumerate(states):
            session.add(
                Delivery(
                    instance_id=instance_id,
                    kind=ObjectKind.SR,
                    destination="PACS@127.0.0.1:104",
                    sop_instance_uid=f"1.2.3.{9 + n}",
                    path=f"/nonexistent/{n}.dcm",
                    state=state,
                )
            )
    assert downgrade(database_url, "0003") == "0003"
    with get_engine(database_url).connect() as connection:
        rows = connection.execute(
            text("SELECT sop_instance_uid, state FROM deliveries ORDER BY id")
        ).all()
    assert [tuple(row) for row in rows] == [
        ("1.2.3.10", "failed"),
        ("1.2.3.11", "delivered"),
        ("1.2.3.12", "pending"),
    ]


def test_a_database_error_is_logged_without_the_values_of_its_row(database_url: str) -> None:
    """Logs name an instance by a hash of its UID. SQLAlchemy leaves a statement's
    parameters out of its errors here; PostgreSQL's own message still quotes the key
    ("Key (sop_instance_uid)=(...) already exists"), so the log withholds the message
    of such an error (worker.logs.exception_text)."""
    upgrade(database_url)
    uid = "1.2.826.0.1.3680043.8.498.99999999999999999999"
    with session_scope(database_url) as session:
        session.add(Instance(**_instance_row(uid)))
    with pytest.raises(IntegrityError) as refused, session_scope(database_url) as session:
        session.add(Instance(**_instance_row(uid)))
    assert "SQL parameters hidden" in str(refused.value), str(refused.value)
    logged = exception_text(refused.value)
    assert "IntegrityError" in logged and uid not in logged, logged


def test_revision_0015_forgets_the_identities_0013_hashed(database_url: str) -> None:
    """0013 hashed name, ID, issuer and other IDs; the patient is now the Patient ID, whose
    hash never equals theirs: kept, every copy received again would be taken for another
    patient's. Emptied, each instance compares its Patient ID from its next assessment."""
    upgrade(database_url, "0014")
    row = _instance_row("1.2.826.0.1.3680043.8.498.15")
    with get_engine(database_url).begin() as connection:
        instance_id = connection.execute(
            text(
                f"INSERT INTO instances ({', '.join(row)}, times_received, attempts, "
                "received_at, identity_sha256) VALUES "
                f"({', '.join(':' + k for k in row)}, 1, 1, CURRENT_TIMESTAMP, :identity) "
                "RETURNING id"
            ),
            {**row, "state": InstanceState.ASSESSED.value, "identity": "c" * 64},
        ).scalar_one()
    assert upgrade(database_url) == head_revision()
    with session_scope(database_url) as session:
        assert session.get_one(Instance, instance_id).identity_sha256 is None


def _instance_row(uid: str) -> dict[str, object]:
    return {
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "modality": "DX",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "calling_ae_title": "PACS",
        "spool_path": "/nonexistent/x.dcm",
        "size_bytes": 10,
        "state": InstanceState.RECEIVED,
    }


def test_unreachable_database_is_named() -> None:
    with pytest.raises(DatabaseNotReady, match="cannot reach the database"):
        check_schema("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_migrations_match_the_schema(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.engine import get_engine
    from db.schema import Base

    upgrade(database_url)
    with get_engine(database_url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def _plan(database_url: str, statement: Select[*tuple[Any, ...]]) -> str:
    """The plan the database gives ``statement``. PostgreSQL is told to avoid reading
    whole tables where it can (the tables are nearly empty here, and a scan is what it
    would choose): its plan reads the table whole only where no index serves."""
    with get_engine(database_url).connect() as connection:
        compiled = statement.compile(connection, compile_kwargs={"literal_binds": True})
        if connection.dialect.name == "postgresql":
            connection.execute(text("SET enable_seqscan = off"))
            rows = connection.execute(text(f"EXPLAIN {compiled}")).all()
            return "\n".join(str(row[0]) for row in rows)
        rows = connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
        return "\n".join(str(row[-1]) for row in rows)


def test_the_reconciler_and_a_result_deleted_find_their_rows_by_index(database_url: str) -> None:
    """Revision 0021: the reconciler's copies received again and never compared, and the
    deliveries a deleted result's cascade removes, are found without reading every row."""
    upgrade(database_url)
    since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # as on a node: nearly every instance finished, a few received again; planned with
    # the statistics the database keeps of them
    rows = [
        {
            **_instance_row(f"1.2.3.{n}"),
            "state": InstanceState.ASSESSED,
            "received_again_at": since - dt.timedelta(days=1) if n % 100 == 0 else None,
        }
        for n in range(2000)
    ]
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(Instance), rows)
    with get_engine(database_url).begin() as connection:
        connection.execute(text("ANALYZE"))
    received_again = select(Instance.id).where(
        Instance.state.in_(FINISHED), Instance.received_again_at < since
    )
    plan = _plan(database_url, received_again)
    assert "ix_instances_received_again_at" in plan, plan
    # what the cascade of `DELETE FROM results` looks the deliveries up by
    plan = _plan(database_url, select(Delivery.id).where(Delivery.result_id == 1))
    assert "ix_deliveries_result_id" in plan, plan
    for column in (Instance.finished_at, Delivery.delivered_at):
        plan = _plan(database_url, select(column).where(column >= since))
        assert f"ix_{column.table.name}_{column.name}" in plan, plan


def test_the_scrapes_queries_read_the_hour_and_the_spool_by_index(database_url: str) -> None:
    """Revision 0024: the last hour's assessed images and the images still on disk, read
    at every scrape and every `status`, are found without reading every row; on SQLite
    with no statistics, as a node runs it (no ANALYZE: the index on state alone took the
    planner to every assessed row)."""
    upgrade(database_url)
    since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [
        {
            **_instance_row(f"1.2.3.{n}"),
            "state": InstanceState.ASSESSED,
            "finished_at": since - dt.timedelta(days=1),
            "files_removed_at": None if n % 100 == 0 else since,
        }
        for n in range(2000)
    ]
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(Instance), rows)
    if database_url.startswith("postgresql"):  # as its autovacuum keeps them
        with get_engine(database_url).begin() as connection:
            connection.execute(text("ANALYZE"))
    hour = select(Instance.received_at, Instance.finished_at).where(
        Instance.state == InstanceState.ASSESSED, Instance.finished_at >= since
    )
    plan = _plan(database_url, hour)  # either reaches the hour (PostgreSQL takes the one)
    assert re.search(r"ix_instances_(state_)?finished_at\b", plan), plan
    on_disk = select(func.count(), func.sum(Instance.size_bytes)).where(
        Instance.files_removed_at.is_(None)
    )
    plan = _plan(database_url, on_disk)
    assert "ix_instances_files_removed_at_size" in plan, plan


def _schema(database_url: str) -> dict[str, object]:
    """Each table's columns, indexes and foreign keys, as the database has them."""
    schema = inspect(get_engine(database_url))
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in schema.get_columns(table)],
            sorted((i["name"] or "", tuple(i["column_names"])) for i in schema.get_indexes(table)),
            sorted(str(sorted(k.items())) for k in schema.get_foreign_keys(table)),
        )
        for table in sorted(schema.get_table_names())
    }


def test_an_upgrade_that_fails_part_way_changes_nothing(database_url: str) -> None:
    """An upgrade across several revisions is one transaction, on SQLite too: one that
    fails (disk full, Ctrl-C) after some revisions' DDL leaves the revision and the
    schema as they were, and runs again once the trouble is gone."""
    assert upgrade(database_url, "0003") == "0003"
    before = _schema(database_url)

    def disk_full(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # 0011's data UPDATE, after its ALTER TABLE and the DDL of 0004 to 0010
        if statement.startswith("UPDATE instances SET last_received_again_at"):
            raise OSError(28, "No space left on device")

    engine = get_engine(database_url)
    event.listen(engine, "before_cursor_execute", disk_full)
    try:
        with pytest.raises(OSError, match="No space left"):
            upgrade(database_url)
    finally:
        event.remove(engine, "before_cursor_execute", disk_full)
    assert current_revision(database_url) == "0003"
    assert _schema(database_url) == before
    assert upgrade(database_url) == head_revision()


def test_an_upgrade_the_foreign_key_check_refuses_changes_nothing(tmp_path: Path) -> None:
    """SQLite: a row referring to one that is gone (left by the sqlite3 shell, whose
    foreign keys are off) makes the check after the migration refuse it; nothing was
    changed, as it says, and once the row is removed the upgrade runs."""
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    assert upgrade(url, "0019") == "0019"
    with sqlite3.connect(tmp_path / "boneage.db") as shell:
        shell.execute(
            "INSERT INTO deliveries (instance_id, kind, destination, sop_instance_uid, path,"
            " state, attempts, created_at) VALUES (999, 'sr', 'PACS@h:104', '1.2.3', '/x',"
            " 'delivered', 1, '2026-01-01 00:00:00.000000')"
        )
    shell.close()
    before = _schema(url)
    with pytest.raises(DatabaseNotReady, match="nothing was changed"):
        upgrade(url)
    assert current_revision(url) == "0019"
    assert _schema(url) == before
    with sqlite3.connect(tmp_path / "boneage.db") as shell:
        shell.execute("DELETE FROM deliveries WHERE instance_id = 999")
    shell.close()
    assert upgrade(url) == head_revision()


def test_the_node_is_one_row_whose_device_uid_is_made_once(database_url: str) -> None:
    """Revision 0010 makes the node's Device Observer UID at random, once: upgrading
    again keeps it; another database has another."""
    upgrade(database_url)
    with session_scope(database_url) as session:
        [node] = session.scalars(select(Node)).all()
        uid = node.device_observer_uid
    assert node.id == 1 and len(uid) <= 64
    assert re.fullmatch(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))+", uid), uid
    assert upgrade(database_url) == head_revision()
    with session_scope(database_url) as session:
        assert session.scalars(select(Node.device_observer_uid)).all() == [uid]
    assert downgrade(database_url, "0009") == "0009"
    assert upgrade(database_url) == head_revision()
    with session_scope(database_url) as session:
        assert session.scalars(select(Node.device_observer_uid)).all() != [uid]


def test_revision_0008_downgraded_leaves_what_0007_can_load(database_url: str) -> None:
    """A rejected image becomes not assessed, its reason kept; our rejection notes'
    deliveries, which 0007's code could neither load nor send, go; nothing else does."""
    upgrade(database_url)
    rejected = record_instance(database_url, received("1.2.3.4"))
    assessed = record_instance(database_url, received("1.2.3.5"))
    with session_scope(database_url) as session:
        session.get_one(Instance, assessed).state = InstanceState.ASSESSED
        image = session.get_one(Instance, rejected)
        image.state = InstanceState.REJECTED
        image.reason = "rejected by the PACS: Rejected for Quality Reasons"
        for kind, uid in ((ObjectKind.SR, "1.2.3.9"), (ObjectKind.KO, "1.2.3.10")):
            session.add(
                Delivery(
                    instance_id=rejected,
                    kind=kind,
                    destination="PACS@127.0.0.1:104",
                    sop_instance_uid=uid,
                    path=f"/nonexistent/{uid}.dcm",
                    state=DeliveryState.DELIVERED,
                )
            )
        session.add(Rejection(sop_instance_uid="1.2.3.4", code="113001", note_sop_instance_uid="9"))
    assert downgrade(database_url, "0007") == "0007"
    with get_engine(database_url).connect() as connection:
        states = connection.execute(text("SELECT id, state, reason FROM instances")).all()
        assert sorted(tuple(row) for row in states) == sorted(
            [
                (rejected, "not_assessed", "rejected by the PACS: Rejected for Quality Reasons"),
                (assessed, "assessed", None),
            ]
        )
        kinds = connection.execute(text("SELECT kind FROM deliveries")).scalars().all()
        assert kinds == ["sr"]
    assert upgrade(database_url) == head_revision()
    with session_scope(database_url) as session:
        assert session.scalars(select(Rejection)).all() == []


def test_revision_0022_records_a_rejection_per_study_and_downgrades_to_one_per_uid(
    database_url: str,
) -> None:
    """A row from before 0022 names no study (it rejects whatever image has the UID, as
    then); after it, one UID may be rejected in several studies, once in each.
    Downgraded, the first recorded of each UID stays, as 0021's key wants."""
    upgrade(database_url, "0021")
    with get_engine(database_url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO rejections (sop_instance_uid, code, note_sop_instance_uid, "
                "received_at) VALUES ('1.2.3.4', '113001', '9', CURRENT_TIMESTAMP)"
            )
        )
    assert upgrade(database_url) == head_revision()

    def rejected(study: str, code: str = "113038") -> None:
        with session_scope(database_url) as session:
            session.add(
                Rejection(
                    sop_instance_uid="1.2.3.4",
                    study_instance_uid=study,
                    series_instance_uid=f"{study}.1",
                    code=code,
                    note_sop_instance_uid="10",
                )
            )

    rejected("1.2.3")
    rejected("1.2.4")
    with pytest.raises(IntegrityError):
        rejected("1.2.3", "113001")
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Rejection.study_instance_uid, Rejection.code).order_by(Rejection.id)
        ).all()
    assert [tuple(r) for r in rows] == [(None, "113001"), ("1.2.3", "113038"), ("1.2.4", "113038")]

    assert downgrade(database_url, "0021") == "0021"
    with get_engine(database_url).connect() as connection:
        kept = connection.execute(text("SELECT sop_instance_uid, code FROM rejections")).all()
    assert [tuple(r) for r in kept] == [("1.2.3.4", "113001")]
    with pytest.raises(IntegrityError), get_engine(database_url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO rejections (sop_instance_uid, code, note_sop_instance_uid, "
                "received_at) VALUES ('1.2.3.4', '113038', '11', CURRENT_TIMESTAMP)"
            )
        )
    assert upgrade(database_url) == head_revision()


def test_revision_0018_downgraded_leaves_what_0017_can_load(database_url: str) -> None:
    """An abandoned delivery, a state 0017's code does not know (it passed its schema
    check and then failed on the row: `status`, the health check and /metrics broke),
    is failed again, its error, saying who gave it up and why, kept; no other row
    changes. Upgraded again, it is abandoned again (it stayed failed); one the older
    code sent again meanwhile is left as it is, as is a failed one never abandoned."""
    upgrade(database_url)
    instance_id = record_instance(database_url, received("1.2.3.4"))
    given_up = abandoned_note("me", dt.datetime(2026, 12, 6, tzinfo=dt.UTC), "gone")
    rows_made = [
        (DeliveryState.ABANDONED, f"{given_up} (it had failed: error 0)"),
        (DeliveryState.SUPERSEDED, "error 1"),
        (DeliveryState.DELIVERED, "error 2"),
        (DeliveryState.FAILED, "error 3"),
        (DeliveryState.ABANDONED, f"{given_up} (it had failed: error 4)"),
    ]
    with session_scope(database_url) as session:
        for n, (state, error) in enumerate(rows_made):
            session.add(
                Delivery(
                    instance_id=instance_id,
                    kind=ObjectKind.SR,
                    destination="PACS@127.0.0.1:104",
                    sop_instance_uid=f"1.2.3.{9 + n}",
                    path=f"/nonexistent/{n}.dcm",
                    state=state,
                    last_error=error,
                )
            )
    assert downgrade(database_url, "0017") == "0017"
    with get_engine(database_url).begin() as connection:
        rows = connection.execute(text("SELECT state, last_error FROM deliveries ORDER BY id"))
        assert [tuple(row) for row in rows] == [
            ("failed" if state is DeliveryState.ABANDONED else state.value, error)
            for state, error in rows_made
        ]
        # the older code's retry-deliveries sends the last one again: pending, its error kept
        connection.execute(
            text("UPDATE deliveries SET state = 'pending' WHERE sop_instance_uid = '1.2.3.13'")
        )
    assert upgrade(database_url, "0018") == "0018"
    with session_scope(database_url) as session:
        assert session.scalars(select(Delivery.state).order_by(Delivery.id)).all() == [
            DeliveryState.ABANDONED,
            DeliveryState.SUPERSEDED,
            DeliveryState.DELIVERED,
            DeliveryState.FAILED,
            DeliveryState.PENDING,
        ]


def test_a_release_from_before_revision_0019_refuses_a_database_this_one_migrated(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revision 0019 changes no schema: it marks the node's identity going into the UIDs
    of our objects. A release from before it (its migrations up to 0018), run beside
    this one or rolled back to, would make an image's later objects under pydicom's root
    in new series where its first ones are the node's: its schema check stops it. Down
    to 0018 and up again, nothing changes."""
    assert upgrade(database_url, "0019") == "0019"
    older = tmp_path / "migrations-0018"
    shutil.copytree(db.engine._MIGRATIONS, older, ignore=_revisions_after("0018"))
    with monkeypatch.context() as before:  # the release before: 0019 unknown to it
        before.setattr(db.engine, "_MIGRATIONS", older)
        assert head_revision() == "0018"
        with pytest.raises(DatabaseNotReady) as refused:
            check_schema(database_url)
    assert str(refused.value) == (
        "database schema is at 0019, newer than this version of boneage-worker (which "
        "knows up to 0018): run the version that migrated it"
    )
    tables = _tables(database_url)
    assert downgrade(database_url, "0018") == "0018"
    assert _tables(database_url) == tables
    assert upgrade(database_url) == head_revision()
    check_schema(database_url)


def _revisions_after(last: str) -> Callable[[str, list[str]], list[str]]:
    """For `shutil.copytree`: leave out the revisions after ``last`` (their files are
    named by their ids), as a release whose migrations end at ``last`` has them."""
    return lambda folder, names: [
        n for n in names if n == "__pycache__" or (n[:4].isdigit() and n[:4] > last)
    ]


def _tables(database_url: str) -> dict[str, list[tuple[str, str]]]:
    """Each table's columns (name, type), as the database has them."""
    schema = inspect(get_engine(database_url))
    return {
        table: [(c["name"], str(c["type"])) for c in schema.get_columns(table)]
        for table in sorted(schema.get_table_names())
    }
