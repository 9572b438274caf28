"""Failed deliveries the administrator gives up on purpose (`abandon-deliveries`), and
commands that publish while the broker is away.

A failed SR or SC whose file retention removed kept `status` unhealthy for ever: nothing
could send it, and no command closed it. `abandon-deliveries` closes the failed ones it
is given, recording who, when and why; `status` then counts them apart, and retention,
the redirects of `retry-deliveries`, a late failed attempt and the withdrawals of a
rejection note treat them as what they are. `retry-deliveries` and `reprocess` with the
broker away ended in a traceback; they now say so in one sentence, and exit with 1.

The node's real database (SQLite, and a real PostgreSQL where the rows' states matter),
the commands run as an administrator runs them, a broker URL naming a free port where
nothing listens.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import insert, select, update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_delivery import PynetdicomPACS
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_rejection_notes import image_of
from tests.support import free_port, pacs_rejection_note
from worker import delivery
from worker.cli import _broker_shown
from worker.delivery import abandon_failed, retry_failed, send_deliveries
from worker.pipeline import assess_instance
from worker.retention import remove_expired_files
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.status import collect

pytestmark = pytest.mark.integration

#: Where the deliveries went: nothing here is sent to it.
OLD = "OLD@127.0.0.1:104"
#: The destination configured now.
NEW = "NEW@127.0.0.1:105"

NOT_CONFIGURED = "destination no longer configured"


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    """The node, sending to ``NEW``, on SQLite and on a real PostgreSQL."""
    database: dict[str, Any] = {}
    if request.param == "postgresql":
        database["database_url"] = request.getfixturevalue("postgres_url")
    return make_runtime(tmp_path, tiny_checkpoint, destinations=NEW, **database)


def _instance(rt: Runtime, **values: Any) -> int:
    """An instance spooled and recorded as the listener records it, then assessed (its
    row says so) 40 days ago; ``values`` set on its row."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(
                state=InstanceState.ASSESSED,
                finished_at=now() - dt.timedelta(days=40),
                **values,
            )
        )
    return instance_id


def _delivery(rt: Runtime, instance_id: int, uid: str, **values: Any) -> int:
    """A delivery row of ``instance_id``, an SR to ``OLD`` made 40 days ago."""
    row = {
        "instance_id": instance_id,
        "kind": ObjectKind.SR,
        "destination": OLD,
        "sop_instance_uid": uid,
        "path": f"/nonexistent/{uid}.dcm",
        "created_at": now() - dt.timedelta(days=40),
        **values,
    }
    with session_scope(rt.database_url) as session:
        return int(
            session.execute(insert(Delivery).values(row).returning(Delivery.id)).scalar_one()
        )


def _failed_with_files_removed(rt: Runtime, uid: str) -> int:
    """An SR failed to a destination no longer configured, whose file retention removed
    (its instance's removal mark after the row was made)."""
    instance_id = _instance(rt, files_removed_at=now() - dt.timedelta(days=9))
    return _delivery(
        rt, instance_id, uid, state=DeliveryState.FAILED, attempts=1, last_error=NOT_CONFIGURED
    )


def _node(rt: Runtime, tmp_path: Path, checkpoint: Path, destinations: str) -> Runtime:
    """A node on ``rt``'s database that sends to ``destinations``."""
    return make_runtime(
        tmp_path / "node", checkpoint, destinations=destinations, database_url=rt.database_url
    )


def _given_up_at(
    rt: Runtime, tmp_path: Path, at: str, **new_values: Any
) -> tuple[int, int, int, Path]:
    """An SR of a new image, failed to ``OLD`` (no longer configured), and failed at
    ``at``, where the administrator abandoned it (``new_values`` set on that row): the
    image's id, the two deliveries' ids, and the SR's file."""
    path = tmp_path / "sr.dcm"
    path.write_bytes(b"an SR as written")
    instance_id = _instance(rt)
    old = _delivery(
        rt,
        instance_id,
        "9.9.1",
        path=str(path),
        state=DeliveryState.FAILED,
        last_error=NOT_CONFIGURED,
    )
    new = _delivery(
        rt,
        instance_id,
        "9.9.1",
        destination=at,
        path=str(path),
        state=DeliveryState.FAILED,
        **new_values,
    )
    abandon_failed(rt.database_url, [new], reason="NEW never takes it", by="me")
    return instance_id, old, new, path


def _states(rt: Runtime) -> dict[int, tuple[DeliveryState, str | None]]:
    with session_scope(rt.database_url) as session:
        return {d.id: (d.state, d.last_error) for d in session.scalars(select(Delivery))}


def _cli(rt: Runtime, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """`boneage-worker ARGS` on ``rt``'s node, as an administrator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={
            **os.environ,
            "BONEAGE_DATA_DIR": str(rt.settings.data_dir),
            "BONEAGE_DATABASE_URL": rt.database_url,
            "BONEAGE_DESTINATIONS": NEW,
            "BONEAGE_MODEL": str(rt.settings.model),
            **env,
        },
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the broker away ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:{port}/0", "redis://:**@127.0.0.1:{port}/0"),
        ("amqp://guest:s3cret@127.0.0.1:{port}//", "amqp://guest:**@127.0.0.1:{port}//"),
    ],
)
def test_retry_deliveries_with_the_broker_away_says_so_in_one_sentence(
    tmp_path: Path, tiny_checkpoint: Path, broker: str, shown: str
) -> None:
    """The rows are put back to pending and the broker does not take their messages: no
    traceback, but which broker (its password masked), and that the reconciler sends
    them once it is back; status 1."""
    rt = make_runtime(tmp_path, tiny_checkpoint, destinations=OLD)
    failed = [
        _delivery(rt, _instance(rt), f"9.9.{n}", state=DeliveryState.FAILED, attempts=3)
        for n in range(2)
    ]
    port = free_port()

    done = _cli(
        rt,
        "retry-deliveries",
        BONEAGE_DESTINATIONS=OLD,
        BONEAGE_BROKER_URL=broker.format(port=port),
    )

    assert done.returncode == 1
    assert done.stdout.splitlines() == ["2 failed deliveries queued again"]
    assert "Traceback" not in done.stderr and "s3cret" not in done.stdout + done.stderr
    [sentence] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert re.fullmatch(
        re.escape(f"Error: the broker at {shown.format(port=port)} could not be reached (")
        + r"OperationalError: \w+"
        + re.escape("): 2 deliveries stay pending, and the reconciler sends them once the ")
        + "broker is back",
        sentence,
    ), sentence
    assert {state for state, _ in _states(rt).values()} == {DeliveryState.PENDING}
    assert sorted(_states(rt)) == sorted(failed)


def test_reprocess_with_the_broker_away_says_so_in_one_sentence(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The instances are put back in the queue state and the broker does not take their
    messages: they stay queued for the reconciler, which the command says; status 1."""
    rt = make_runtime(tmp_path, tiny_checkpoint, destinations=NEW)
    instance_id = _instance(rt)
    port = free_port()

    done = _cli(
        rt,
        "reprocess",
        "--instance",
        str(instance_id),
        BONEAGE_BROKER_URL=f"redis://:s3cret@127.0.0.1:{port}/0",
    )

    assert done.returncode == 1
    assert "1 queued for model" in done.stdout
    assert "Traceback" not in done.stderr and "s3cret" not in done.stdout + done.stderr
    [sentence] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert sentence.startswith(
        f"Error: the broker at redis://:**@127.0.0.1:{port}/0 could not be reached ("
    )
    assert sentence.endswith(
        "): 1 instances stay queued, and the reconciler queues them once the broker is back"
    )
    with session_scope(rt.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.QUEUED


def test_reconcile_with_the_broker_away_says_what_it_could_not_queue(runtime: Runtime) -> None:
    """An image left `received` long ago (its message lost) and a delivery pending: the
    broker takes neither message. The command said "re-queued 0 instances, 0 deliveries"
    and exited 0, as if nothing were owed; now it says which broker, what it did not
    queue, and that the reconciler queues it once the broker is back; status 1."""
    rt = runtime
    stuck = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == stuck)
            .values(received_at=now() - dt.timedelta(hours=1))
        )
    pending = _delivery(rt, _instance(rt), "9.9.1", destination=NEW, state=DeliveryState.PENDING)
    port = free_port()

    done = _cli(rt, "reconcile", BONEAGE_BROKER_URL=f"redis://:s3cret@127.0.0.1:{port}/0")

    assert done.returncode == 1
    assert done.stdout.splitlines() == ["re-queued 0 instances, 0 deliveries"]
    assert "Traceback" not in done.stderr and "s3cret" not in done.stdout + done.stderr
    [sentence] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert re.fullmatch(
        re.escape(f"Error: the broker at redis://:**@127.0.0.1:{port}/0 could not be reached (")
        + r"OperationalError: \w+"
        + re.escape(
            "): 1 instances and 1 deliveries were not queued, and the reconciler queues "
            "them once the broker is back"
        ),
        sentence,
    ), sentence
    with session_scope(rt.database_url) as session:
        assert session.get_one(Instance, stuck).state is InstanceState.RECEIVED
    assert _states(rt) == {pending: (DeliveryState.PENDING, None)}


# -- abandon-deliveries ---------------------------------------------------------------


def test_failed_deliveries_whose_files_retention_removed_can_be_abandoned(
    runtime: Runtime,
) -> None:
    """Nothing can send them, and `status` was unhealthy for ever. Abandoned, after a
    question answered no, then yes: each row says who, when and why, and the error it
    failed with; `status` no longer counts them unhealthy but shows them; and
    `retry-deliveries` leaves them."""
    ids = [_failed_with_files_removed(runtime, f"9.9.{n}") for n in range(2)]
    before = collect(runtime.settings)
    [problem] = [p for p in before["problems"] if "deliveries failed" in p]
    assert "'boneage-worker abandon-deliveries' closes them" in problem
    reason = "files removed by retention, results read in the RIS"

    declined = _cli(
        runtime, "abandon-deliveries", "--reason", reason, *map(str, ids), stdin="n\n", SUDO_USER=""
    )

    assert declined.returncode == 1
    with session_scope(runtime.database_url) as session:
        of = {d.id: d.instance_id for d in session.scalars(select(Delivery))}
    assert declined.stdout.splitlines()[:2] == [
        f"delivery {i} (sr to {OLD}) of instance {of[i]}, failed: {NOT_CONFIGURED}; its "
        "file removed by retention"
        for i in ids
    ]
    assert (
        "Abandon these 2 failed SR and SC deliveries? Never sent again, none reaches the "
        "destination it failed to"
    ) in declined.stdout
    assert declined.stderr.splitlines()[-1] == (
        "Error: nothing abandoned: answer y to the question, or pass --yes"
    )
    assert {state for state, _ in _states(runtime).values()} == {DeliveryState.FAILED}

    done = _cli(
        runtime, "abandon-deliveries", "--reason", reason, *map(str, ids), stdin="y\n", SUDO_USER=""
    )

    assert done.returncode == 0, done.stderr
    # the answer, read from a pipe, is not echoed: the line goes on after the question
    assert done.stdout.splitlines()[-1].endswith(
        "[y/N]: 2 failed deliveries abandoned: never sent again, and 'status' counts them "
        "as abandoned"
    )
    rows = _states(runtime)
    assert {state for state, _ in rows.values()} == {DeliveryState.ABANDONED}
    pattern = (
        re.escape(f"abandoned by the administrator (user {_user()}) on ")
        + r"\d{4}-\d\d-\d\d \d\d:\d\d"
        + re.escape(f" UTC: {reason} (it had failed: {NOT_CONFIGURED})")
    )
    assert all(re.fullmatch(pattern, error or "") for _, error in rows.values()), rows

    after = collect(runtime.settings)
    assert not [p for p in after["problems"] if "deliveries" in p]
    assert after["failed_deliveries"] == []
    assert after["deliveries"]["abandoned"] == 2
    assert after["abandoned_deliveries"]["count"] == 2
    assert [d["id"] for d in after["abandoned_deliveries"]["newest"]] == ids[::-1]
    shown = _cli(runtime, "status", COLUMNS="400")
    assert "2 deliveries abandoned by the administrator, never sent" in " ".join(
        shown.stdout.split()
    )

    assert retry_failed(runtime).queued == []
    assert {state for state, _ in _states(runtime).values()} == {DeliveryState.ABANDONED}


def test_abandon_deliveries_refuses_what_is_not_failed(runtime: Runtime) -> None:
    """Only failed deliveries: one pending, delivered, superseded, abandoned already, or
    none at all among those given, and none is abandoned, each named with why."""
    failed = _failed_with_files_removed(runtime, "9.9.1")
    instance_id = _instance(runtime)
    others = {
        state: _delivery(runtime, instance_id, f"9.9.{n}", state=state)
        for n, state in enumerate(
            [
                DeliveryState.PENDING,
                DeliveryState.DELIVERED,
                DeliveryState.SUPERSEDED,
                DeliveryState.ABANDONED,
            ],
            start=2,
        )
    }
    missing = max(others.values()) + 1
    given = [failed, *others.values(), missing]

    done = _cli(runtime, "abandon-deliveries", "--yes", "--reason", "x", *map(str, given))

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "Error: nothing abandoned: only failed deliveries can be abandoned (a rejection note "
        "only where its destination is no longer configured), and "
        f"delivery {others[DeliveryState.PENDING]} is pending: it is still being tried, and "
        f"may yet be delivered; delivery {others[DeliveryState.DELIVERED]} was delivered; "
        f"delivery {others[DeliveryState.SUPERSEDED]} was superseded: nothing sends it "
        f"anyway; delivery {others[DeliveryState.ABANDONED]} was abandoned already; "
        f"delivery {missing} does not exist"
    ]
    assert _states(runtime)[failed][0] is DeliveryState.FAILED


def test_a_late_failed_attempt_leaves_an_abandoned_delivery_as_it_is(runtime: Runtime) -> None:
    """An attempt whose claim ran out fails after the administrator gave the delivery up:
    the row keeps its state and who gave it up (it was made failed again)."""
    [delivery_id] = [_failed_with_files_removed(runtime, "9.9.1")]
    assert abandon_failed(runtime.database_url, [delivery_id], reason="gone", by="me") == [
        delivery_id
    ]
    before = _states(runtime)[delivery_id]

    outcome = delivery._record_failure(runtime, delivery_id, "association aborted", permanent=True)

    assert outcome == delivery.DeliveryOutcome("skipped", error="abandoned")
    assert _states(runtime)[delivery_id] == before


@pytest.mark.parametrize("spelled", ["NEW@localhost:105", "NEW@LOCALHOST:105"])
def test_a_redirect_sends_nothing_where_the_object_was_abandoned(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path, spelled: str
) -> None:
    """The SR failed to the old destination, and to the configured one, which refused it
    for good, where the administrator gave it up. `retry-deliveries` redirects the old
    one's, and does not send it again where it was given up, however the settings spelled
    that destination's host then."""
    node = _node(runtime, tmp_path, tiny_checkpoint, "NEW@localhost:105")
    _, old, new, _ = _given_up_at(
        node,
        tmp_path,
        spelled,
        last_error=f"{spelled} answered status 0xA900 (a refusal: not sent again)",
    )

    retried = retry_failed(node, [old])

    assert retried.redirected == {} and retried.queued == []
    assert retried.abandoned_there == {old: ["NEW@localhost:105"]}
    rows = _states(node)
    assert sorted(rows) == [old, new]  # none made
    # not superseded as "sent to the configured destinations instead": it went nowhere
    assert rows[old] == (DeliveryState.FAILED, NOT_CONFIGURED)
    assert rows[new][0] is DeliveryState.ABANDONED

    # the command says so (before: "the configured destinations each had them already")
    done = _cli(node, "retry-deliveries", BONEAGE_DESTINATIONS="NEW@localhost:105")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "0 failed deliveries queued again",
        "1 failed deliveries left failed, their destinations no longer configured: "
        "abandoned at the configured destination(s) NEW@localhost:105, and no other "
        "configured destination would get them: give them up too with 'boneage-worker "
        f"abandon-deliveries --reason TEXT {old}', or configure a destination that takes "
        "them and run retry-deliveries again",
    ]
    assert _states(node) == rows


def test_a_redirect_goes_where_the_object_was_not_abandoned(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Given up at one configured destination, the SR goes to the other: the old
    delivery is superseded, sent to the configured destinations instead."""
    other = f"OTHER@127.0.0.1:{free_port()}"
    node = _node(runtime, tmp_path, tiny_checkpoint, f"{NEW},{other}")
    _, old, _, _ = _given_up_at(node, tmp_path, NEW)

    retried = retry_failed(node, [old])

    [queued] = retried.queued
    assert retried.redirected == {old: [queued]} and retried.abandoned_there == {}
    rows = _states(node)
    assert rows[old] == (DeliveryState.SUPERSEDED, delivery.REDIRECTED)
    with session_scope(node.database_url) as session:
        assert session.get_one(Delivery, queued).destination == other


def test_a_redirect_is_done_where_another_destination_has_the_object(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Given up at NEW, the SR was delivered to OTHER, the other configured destination:
    the old delivery is superseded, sent to the configured destinations instead (none
    queued: OTHER has it), and `status` no longer reports it. Before, it was left failed
    as "abandoned at NEW and no other configured destination would get them"."""
    other = f"OTHER@127.0.0.1:{free_port()}"
    node = _node(runtime, tmp_path, tiny_checkpoint, f"{NEW},{other}")
    instance_id, old, _, path = _given_up_at(node, tmp_path, NEW)
    _delivery(
        node, instance_id, "9.9.1", destination=other, path=str(path), state=DeliveryState.DELIVERED
    )
    [problem] = [p for p in collect(node.settings)["problems"] if "deliveries failed" in p]
    assert "sends them to the configured destinations instead" in problem

    retried = retry_failed(node, [old])

    assert retried.redirected == {old: []} and retried.abandoned_there == {}
    assert retried.queued == []
    assert _states(node)[old] == (DeliveryState.SUPERSEDED, delivery.REDIRECTED)
    assert not [p for p in collect(node.settings)["problems"] if "deliveries failed" in p]


def test_status_says_what_retry_deliveries_does_where_the_object_was_abandoned(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The SR failed to OLD, no longer configured, and was abandoned at NEW, the only
    configured destination: `retry-deliveries` leaves it failed, and `status` says so,
    with what to do, where it said `retry-deliveries` sends it to NEW instead. A second
    one, not abandoned at NEW, is counted apart."""
    instance_id, old, _, path = _given_up_at(runtime, tmp_path, NEW)
    [problem] = [p for p in collect(runtime.settings)["problems"] if "deliveries failed" in p]
    retry = "'boneage-worker retry-deliveries'"
    given_up = (
        f"abandoned at the configured destination(s) {NEW}, which have them neither "
        f"delivered nor pending: {retry} leaves them failed; close them with "
        "'boneage-worker abandon-deliveries', or configure a destination that takes them "
        f"and run {retry} again"
    )
    assert problem == (
        f"1 deliveries failed to destinations no longer configured ({OLD}): their objects "
        f"were {given_up}; latest error: {NOT_CONFIGURED}"
    )
    assert retry_failed(runtime, [old]).abandoned_there == {old: [NEW]}

    _delivery(
        runtime,
        instance_id,
        "9.9.2",
        path=str(path),
        state=DeliveryState.FAILED,
        last_error=NOT_CONFIGURED,
    )
    [problem] = [p for p in collect(runtime.settings)["problems"] if "deliveries failed" in p]
    assert problem.startswith(
        f"2 deliveries failed to destinations no longer configured ({OLD}): {retry} sends "
        f"them to the configured destinations instead, all but 1: 1 {given_up}; "
    )


def test_retention_removes_the_files_of_abandoned_deliveries(runtime: Runtime) -> None:
    """An image whose SR was delivered and whose SC was abandoned: its files go when
    their time comes, as a delivered image's; one with a failed SC keeps them."""
    kept_files: list[Path] = []
    removed_files: list[Path] = []
    for files, state in ((removed_files, DeliveryState.ABANDONED), (kept_files, None)):
        instance_id = spool_instance(runtime)
        ids = assess_instance(runtime, instance_id).delivery_ids
        with session_scope(runtime.database_url) as session:
            rows = {
                d.kind: d for d in session.scalars(select(Delivery).where(Delivery.id.in_(ids)))
            }
            rows[ObjectKind.SR].state = DeliveryState.DELIVERED
            rows[ObjectKind.SC].state = DeliveryState.FAILED
            instance = session.get_one(Instance, instance_id)
            instance.finished_at = now() - dt.timedelta(days=40)
            files += [Path(instance.spool_path), *(Path(d.path) for d in rows.values())]
        if state is DeliveryState.ABANDONED:
            abandon_failed(runtime.database_url, [rows[ObjectKind.SC].id], reason="x", by="me")
    assert all(p.exists() for p in [*kept_files, *removed_files])

    report = remove_expired_files(
        runtime.database_url,
        older_than=dt.timedelta(days=30),
        spool_dir=runtime.settings.spool_dir,
        outbox_dir=runtime.settings.outbox_dir,
    )

    assert (report.instances, report.files) == (1, 3)
    assert not any(p.exists() for p in removed_files)
    assert all(p.exists() for p in kept_files)


@pytest.mark.parametrize("unanswered", [True, False])
def test_a_rejection_withdraws_an_abandoned_object_that_may_have_arrived(
    runtime: Runtime, unanswered: bool
) -> None:
    """The SR and SC failed, their last C-STORE unanswered (they may be at the PACS), and
    were abandoned; then the PACS rejects the image. Our notes withdraw them there, as
    they would failed ones (superseded by the rejection, keeping their mark). Never
    sent, nothing is withdrawn."""
    image_id = spool_instance(runtime)
    ids = assess_instance(runtime, image_id).delivery_ids
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                state=DeliveryState.FAILED,
                attempts=31,
                next_attempt_at=None,
                sending_since=now() - dt.timedelta(hours=1) if unanswered else None,
            )
        )
    assert abandon_failed(runtime.database_url, ids, reason="x", by="me") == sorted(ids)

    notes = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, image_id)))
    ).delivery_ids

    with session_scope(runtime.database_url) as session:
        made = [session.get_one(Delivery, n) for n in notes]
        assert [(d.kind, d.destination) for d in made] == (
            [(ObjectKind.KO, NEW)] * 2 if unanswered else []
        )
    assert {_states(runtime)[i][0] for i in ids} == {DeliveryState.ABANDONED}


def _user() -> str:
    """This process's effective user, by the system's user database."""
    return pwd.getpwuid(os.geteuid()).pw_name


def test_a_rejection_note_of_ours_cannot_be_abandoned(runtime: Runtime) -> None:
    """Our note withdraws an SR or SC the destination has or may have (the PACS rejected
    its image, or a correction moved it to another patient): given up, that result
    stays there, perhaps under the wrong patient, and `status` says the node is
    healthy. Refused, with what to do instead; nothing abandoned, the SR given with it
    neither. Before, it was abandoned as an SR is."""
    sr = _failed_with_files_removed(runtime, "9.9.1")
    note = _delivery(
        runtime,
        _instance(runtime),
        "9.9.2",
        kind=ObjectKind.KO,
        destination=NEW,
        withdraws="9.9.3",
        state=DeliveryState.FAILED,
        attempts=31,
        last_error=f"{NEW} answered status 0xA700",
    )

    done = _cli(runtime, "abandon-deliveries", "--yes", "--reason", "x", str(sr), str(note))

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "Error: nothing abandoned: only failed deliveries can be abandoned (a rejection note "
        "only where its destination is no longer configured), and "
        f"delivery {note} is a rejection note: it withdraws a result the destination may "
        "show (its image rejected by the PACS, or under another patient now), which would "
        "stay there: make the destination take it, then run 'boneage-worker "
        f"retry-deliveries {note}'; where it never will, --including-notes abandons it, and "
        "the result must be withdrawn at the PACS by hand"
    ]
    assert {state for state, _ in _states(runtime).values()} == {DeliveryState.FAILED}
    # nor by the function the command calls, given one
    assert abandon_failed(runtime.database_url, [note], reason="x", by="me") == []
    assert (
        abandon_failed(runtime.database_url, [note], reason="x", by="me", settings=runtime.settings)
        == []
    )
    assert _states(runtime)[note][0] is DeliveryState.FAILED


def test_a_rejection_note_to_a_destination_no_longer_configured_can_be_abandoned(
    runtime: Runtime,
) -> None:
    """Our note to OLD, a node decommissioned: nothing can send it (`retry-deliveries`
    puts it back to OLD, where it fails again), and `status` stayed unhealthy with no
    way out but SQL. It is abandoned, the listing warning that the PACS there may still
    show the result it withdraws. Before, it was refused as a note to NEW is."""
    note = _delivery(
        runtime,
        _instance(runtime),
        "9.9.2",
        kind=ObjectKind.KO,
        destination=OLD,
        withdraws="9.9.3",
        state=DeliveryState.FAILED,
        attempts=3,
        last_error=NOT_CONFIGURED,
    )

    done = _cli(runtime, "abandon-deliveries", "--yes", "--reason", "OLD is gone", str(note))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "warning: 1 of them are rejection notes to destinations no longer configured: the "
        "PACS there may still show the results they withdraw, and nothing withdraws them "
        "once abandoned",
        "1 failed deliveries abandoned: never sent again, and 'status' counts them as abandoned",
    ]
    assert _states(runtime)[note][0] is DeliveryState.ABANDONED
    assert not [p for p in collect(runtime.settings)["problems"] if "deliveries" in p]


def test_a_rejection_note_its_destination_never_takes_is_abandoned_only_by_name(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A PACS that takes our SR and SC but no Key Object Selection. It rejects the image:
    our notes withdrawing them fail at once (no presentation context), and can never
    go. Before, `abandon-deliveries` refused them, saying to make the destination take
    them, and `status` stayed unhealthy for ever. Without --including-notes they are
    still refused, the refusal naming it; with it they are abandoned, after a warning
    that the results stay at the PACS, to be withdrawn there by hand; `status` then
    counts them apart, no longer as a problem."""
    pacs = PynetdicomPACS([ComprehensiveSRStorage, SecondaryCaptureImageStorage])
    try:
        rt = _node(runtime, tmp_path, tiny_checkpoint, pacs.destination)
        image_id = spool_instance(rt)
        sent = send_deliveries(rt, assess_instance(rt, image_id).delivery_ids)
        assert {o.state for o in sent.values()} == {"delivered"}
        rejection = pacs_rejection_note(image_of(rt, image_id))
        notes = assess_instance(rt, spool_dataset(rt, rejection)).delivery_ids
        refused = send_deliveries(rt, notes)
    finally:
        pacs.stop()
    assert len(notes) == 2
    assert [o.state for o in refused.values()] == ["failed", "failed"]
    assert all(
        (o.error or "").startswith("no presentation context accepted for Key Object Selection")
        for o in refused.values()
    )
    assert [p for p in collect(rt.settings)["problems"] if "2 deliveries failed" in p]
    ids = sorted(notes)
    there = {"BONEAGE_DESTINATIONS": pacs.destination}
    reason = "the PACS takes no Key Object Selection"

    without = _cli(rt, "abandon-deliveries", "--yes", "--reason", reason, *map(str, ids), **there)

    assert without.returncode == 1
    assert "--including-notes abandons it" in without.stderr
    assert {_states(rt)[i][0] for i in ids} == {DeliveryState.FAILED}

    done = _cli(
        rt,
        "abandon-deliveries",
        "--including-notes",
        "--reason",
        reason,
        *map(str, ids),
        stdin="y\n",
        **there,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[2] == (
        f"WARNING: 2 of them are rejection notes of ours to configured destinations "
        f"(deliveries {ids[0]} {ids[1]}): each withdraws an SR or SC of ours that the PACS "
        "has or may have (its image rejected by the PACS, or now under another patient or "
        "study). Abandoned, it is never sent: that result stays at the PACS, perhaps under "
        "the wrong patient, and 'status' no longer reports it; withdraw it there by hand"
    )
    assert lines[-1].endswith(
        "[y/N]: 2 failed deliveries abandoned: never sent again, and "
        "'status' counts them as abandoned"
    )
    assert {_states(rt)[i][0] for i in ids} == {DeliveryState.ABANDONED}
    after = collect(rt.settings)
    assert not [p for p in after["problems"] if "deliveries" in p]
    assert (after["abandoned_deliveries"]["count"], after["abandoned_deliveries"]["notes"]) == (
        2,
        2,
    )
    shown = " ".join(_cli(rt, "status", COLUMNS="400", **there).stdout.split())
    assert (
        "2 of them are rejection notes of ours: the results they withdraw stay at the PACS "
        "unless withdrawn there by hand"
    ) in shown


def test_a_rejection_note_that_failed_while_its_destination_was_away_is_not_abandoned(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The PACS stores our SR and SC, then is down when it rejects the image: our notes
    withdrawing them fail (their attempts spent on a refused connection), which sending
    again once the PACS is back mends. --including-notes refuses them, saying to retry
    them; they stay failed. Before, it abandoned them as one the PACS never takes, and
    the results stayed at the PACS."""
    pacs = PynetdicomPACS([ComprehensiveSRStorage, SecondaryCaptureImageStorage])
    try:
        rt = make_runtime(
            tmp_path / "node",
            tiny_checkpoint,
            destinations=pacs.destination,
            database_url=runtime.database_url,
            delivery_max_attempts=1,
        )
        image_id = spool_instance(rt)
        sent = send_deliveries(rt, assess_instance(rt, image_id).delivery_ids)
        assert {o.state for o in sent.values()} == {"delivered"}
    finally:
        pacs.stop()
    rejection = pacs_rejection_note(image_of(rt, image_id))
    notes = sorted(assess_instance(rt, spool_dataset(rt, rejection)).delivery_ids)
    failed = send_deliveries(rt, notes)
    assert [o.state for o in failed.values()] == ["failed", "failed"]
    assert all("no connection" in (o.error or "") for o in failed.values())

    done = _cli(
        rt,
        "abandon-deliveries",
        "--including-notes",
        "--yes",
        "--reason",
        "the PACS takes no Key Object Selection",
        *map(str, notes),
        BONEAGE_DESTINATIONS=pacs.destination,
    )

    assert done.returncode == 1
    assert f"run 'boneage-worker retry-deliveries {notes[0]}'" in done.stderr
    assert {_states(rt)[i][0] for i in notes} == {DeliveryState.FAILED}


def test_who_abandoned_is_the_user_the_system_knows_and_who_ran_sudo(
    runtime: Runtime,
) -> None:
    """$LOGNAME and $USER are anyone's to set: the row records the effective user by the
    user database, and the user sudo was run by. Before, it recorded "user mallory"."""
    ids = [_failed_with_files_removed(runtime, f"9.9.{n}") for n in range(2)]

    for delivery_id, sudo in zip(ids, ["alice", ""], strict=True):
        done = _cli(
            runtime,
            "abandon-deliveries",
            "--yes",
            "--reason",
            "gone",
            str(delivery_id),
            LOGNAME="mallory",
            USER="mallory",
            SUDO_USER=sudo,
        )
        assert done.returncode == 0, done.stderr

    rows = _states(runtime)
    via = {ids[0]: " via sudo from alice", ids[1]: ""}
    for delivery_id in ids:
        assert (rows[delivery_id][1] or "").startswith(
            f"abandoned by the administrator (user {_user()}{via[delivery_id]}) on "
        ), rows[delivery_id]
    assert "mallory" not in str(rows) or _user() == "mallory"


def test_retry_deliveries_names_the_ids_given_that_are_not_failed(runtime: Runtime) -> None:
    """An abandoned delivery given by id is not sent again, nor is a delivered or pending
    one, and one that does not exist: the command names each, with why, in one line.
    Before, it said only "0 failed deliveries queued again"."""
    instance_id = _instance(runtime)
    failed = _delivery(runtime, instance_id, "9.9.1", destination=NEW, state=DeliveryState.FAILED)
    abandoned = _failed_with_files_removed(runtime, "9.9.2")
    abandon_failed(runtime.database_url, [abandoned], reason="gone", by="me")
    delivered = _delivery(runtime, instance_id, "9.9.3", state=DeliveryState.DELIVERED)
    pending = _delivery(runtime, instance_id, "9.9.4", state=DeliveryState.PENDING)
    missing = pending + 1
    given = [abandoned, failed, delivered, pending, missing]

    done = _cli(runtime, "retry-deliveries", *map(str, given), BONEAGE_BROKER_URL="")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1 failed deliveries queued again",
        "4 deliveries given were left as they are, only failed ones are sent again: "
        f"delivery {abandoned} was abandoned: given up by the administrator, it is never "
        f"sent again; delivery {delivered} was delivered; delivery {pending} is pending: "
        f"it is still being tried, and may yet be delivered; delivery {missing} does not "
        "exist",
    ]
    rows = _states(runtime)
    assert rows[failed][0] is DeliveryState.PENDING
    assert rows[abandoned][0] is DeliveryState.ABANDONED


@pytest.mark.parametrize(
    ("broker", "shown"),
    [
        # kombu cannot read them: its ValueError quoted "pa", part of the password
        ("redis://user:pa/ss@host:6379/0", "redis://***"),
        ("redis://user:pa#ss@host:6379/0", "redis://***"),
        ("redis://user:pa?ss@host:6379/0", "redis://***"),
        # spaces around the ';': the second URL was shown whole, its password with it
        (
            "amqp://user:pass1@h1// ; amqp://user:pass2@h2//",
            "amqp://user:**@h1//;amqp://user:**@h2//",
        ),
        ("amqp://user:pass1@h1//,amqp://user:pass2@h2//", "amqp://***"),  # no failover list
        ("amqp://user:pa;ss@host//", "amqp://***;***"),  # a password cut at its ';'
        ("sentinel://:pass1@h1:26379;h2:26379", "sentinel://:**@h1:26379/;h2:26379"),
        ("redis://:pass1@host:6379/0", "redis://:**@host:6379/0"),
    ],
)
def test_the_broker_is_shown_without_any_part_of_its_password(
    tmp_path: Path, broker: str, shown: str
) -> None:
    """Each URL of a failover list without its password, as Celery's banner shows it;
    ``scheme://***`` where kombu cannot read it or what it shows keeps a password."""
    assert _broker_shown(load_settings(data_dir=tmp_path, broker_url=broker)) == shown


def test_a_broker_url_kombu_cannot_read_is_shown_masked_when_it_is_away(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A password with an unescaped '/': the publish fails, and the sentence says which
    broker without any of the password (before: kombu's ValueError, quoting part of it,
    ended the command in a traceback)."""
    rt = make_runtime(tmp_path, tiny_checkpoint, destinations=OLD)
    _delivery(rt, _instance(rt), "9.9.1", state=DeliveryState.FAILED, attempts=3)

    done = _cli(
        rt,
        "retry-deliveries",
        BONEAGE_DESTINATIONS=OLD,
        BONEAGE_BROKER_URL=f"redis://user:s3c/ret@127.0.0.1:{free_port()}/0",
    )

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "s3c" not in done.stdout + done.stderr and "ret@" not in done.stderr
    [sentence] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert sentence.startswith("Error: the broker at redis://*** could not be reached ("), sentence
