"""The read-only queries behind `boneage-worker status`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import (
    Delivery,
    DeliveryState,
    Heartbeat,
    Instance,
    InstanceState,
    Node,
    ObjectKind,
    Rejection,
    UTCDateTime,
)


@dataclass(frozen=True)
class ProcessBeat:
    name: str
    role: str
    seen_at: datetime
    started_at: datetime
    detail: dict[str, Any]


def take_instances(session: Session, instance_ids: Iterable[int]) -> None:
    """Hold the rows of ``instance_ids`` until ``session``'s transaction ends, one by one
    in id order: a row lock on PostgreSQL, the write lock on SQLite (a write begins it).

    Every path that changes an image's deliveries beside another (an attempt's commit, a
    withdrawal, a rejection note, a redirect, a failed attempt's count) takes its row
    first, so that one sees what the other committed; in id order, so that two taking
    several rows never wait on each other in a cycle.
    """
    for instance_id in sorted(set(instance_ids)):
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(claimed_by=Instance.claimed_by)
            .execution_options(synchronize_session=False)
        )


def rejects(
    instance_id: SQLColumnExpression[int] | int,
    first_study: SQLColumnExpression[str] | str,
    series: SQLColumnExpression[str] | str,
    read: Iterable[str] = (),
) -> ColumnElement[bool]:
    """Whether a row of `rejections` naming the instance's SOP Instance UID rejects the
    instance ``instance_id``: the note names it in a study the image has been in, as this
    node received it (the one it was first received in, ``first_study``; one an object
    of ours of it went to, where the PACS moved it; ``read``, the study of the copy an
    attempt reads now), or in the series it was received in (``series``, the instance's
    Series Instance UID: a PACS that moves a study keeps its series' UIDs, and need not
    send the image again), or the row is from before revision 0022 and names no study.

    A note naming the UID in another study and another series rejects another image
    under it (a modality that reuses UIDs), at the PACS: not this one
    (:data:`REJECTED_IN_ANOTHER_STUDY`).
    """
    went_there = (
        select(Delivery.id)
        .where(
            Delivery.instance_id == instance_id,
            Delivery.study_instance_uid == Rejection.study_instance_uid,
        )
        # the instance and the rejection of the statements it is in, however deep
        .correlate_except(Delivery)
        .exists()
    )
    studies = [study for study in read if study]
    return or_(
        Rejection.study_instance_uid.is_(None),
        Rejection.study_instance_uid == first_study,
        *([Rejection.study_instance_uid.in_(studies)] if studies else []),
        # false, not NULL, on a row from before revision 0022, which names no series
        and_(Rejection.series_instance_uid.is_not(None), Rejection.series_instance_uid == series),
        went_there,
    )


def made_here() -> ColumnElement[bool]:
    """Deliveries this node made under the identity it has: those after the highest id
    the database held when `boneage-worker db new-identity` gave it
    (``Node.copied_deliveries_up_to``), every one on a node never given a new identity.

    The others are the node's the database was copied from (worker.node_identity): their
    objects are that node's to send, and to withdraw. A note of ours withdrawing one
    would withdraw, at a destination the copy shares with that node (its PACS), a result
    that stands there, under the UID of that node's own note (a note's UID is derived
    from its object's alone, worker.pipeline.withdrawal_uid). Ids are numbered as rows
    are made and never removed, and the command runs while no process of the node runs:
    a row up to the mark is one the copy holds from the other node. A scalar subquery,
    read with the statement it is in.
    """
    copied = select(Node.copied_deliveries_up_to).where(Node.id == 1).scalar_subquery()
    return Delivery.id > func.coalesce(copied, 0)


def database_now(session: Session) -> datetime:
    """The database server's clock, in UTC.

    Heartbeats are written and judged by it, so that a node whose hosts' clocks differ
    does not see a live process as gone (or a dead one as alive). SQLite runs on the
    one host: its clock is the local one.
    """
    if session.get_bind().dialect.name == "sqlite":
        # The host's clock, read here: SQLite's own ('now', strftime %f) is to the
        # millisecond only, and a claim and a copy received within one millisecond were
        # stamped alike, the copy taken for one the claim read and forgotten (found in
        # review). SQLite is a file on the one host, so the host's clock is the
        # database's; stored as UTCDateTime stores any time (text, to the microsecond).
        return datetime.now(UTC)
    # clock_timestamp(), not now(): now() is when the transaction began
    current: datetime = session.execute(
        select(func.clock_timestamp(type_=UTCDateTime()))
    ).scalar_one()
    return current.astimezone(UTC)


def instance_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Instance.state, func.count()).group_by(Instance.state))
    counts = {state.value: 0 for state in InstanceState}
    counts.update({state.value: n for state, n in rows})
    return counts


def delivery_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
    counts = {state.value: 0 for state in DeliveryState}
    counts.update({state.value: n for state, n in rows})
    return counts


def retrying_deliveries(session: Session) -> tuple[int, str | None]:
    """Pending deliveries that failed at least once, and the latest error among them."""
    rows = list(
        session.execute(
            select(Delivery.last_error)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.attempts > 0)
            .order_by(Delivery.id.desc())
        )
    )
    return len(rows), (rows[0][0] if rows else None)


@dataclass(frozen=True)
class FailedDelivery:
    """A delivery whose attempts are spent (or that failed for good at once).

    No column records when it failed, nor when its last attempt began: that is reckoned
    (`worker.status`) from ``created_at`` (when it was made, or last put back by
    `retry-deliveries`) and its attempts, and from ``sending_since``, when an attempt
    whose answer never came began: the last, or an earlier one whose mark a later
    attempt that sent nothing kept.
    """

    id: int
    instance_id: int
    kind: str
    destination: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sending_since: datetime | None


def failed_deliveries(session: Session) -> list[FailedDelivery]:
    """Every failed delivery, newest row first (they stay until `retry-deliveries`)."""
    return _deliveries_in(session, DeliveryState.FAILED)


def abandoned_deliveries(session: Session, limit: int) -> tuple[int, list[FailedDelivery]]:
    """Failed deliveries the administrator gave up (`abandon-deliveries`): how many, and
    the ``limit`` newest rows, whose errors say who gave them up, when and why."""
    count = session.scalar(select(func.count()).where(Delivery.state == DeliveryState.ABANDONED))
    return int(count or 0), _deliveries_in(session, DeliveryState.ABANDONED, limit)


def abandoned_notes(session: Session) -> int:
    """How many of the abandoned deliveries are rejection notes of ours: each leaves at
    the PACS a result it should have withdrawn, to be withdrawn there by hand."""
    count = session.scalar(
        select(func.count()).where(
            Delivery.state == DeliveryState.ABANDONED, Delivery.kind == ObjectKind.KO
        )
    )
    return int(count or 0)


def _deliveries_in(
    session: Session, state: DeliveryState, limit: int | None = None
) -> list[FailedDelivery]:
    """The deliveries in ``state``, newest row first, at most ``limit`` of them."""
    return [
        FailedDelivery(
            d.id,
            d.instance_id,
            d.kind.value,
            d.destination,
            d.attempts,
            d.last_error,
            d.created_at,
            d.sending_since,
        )
        for d in session.scalars(
            select(Delivery)
            .where(Delivery.state == state)
            .order_by(Delivery.id.desc())
            .limit(limit)
        )
    ]


@dataclass(frozen=True)
class Overdue:
    """Pending deliveries due by ``now``: how many, since when the one due longest has
    been due, and when the latest delivery was made.

    A delivery is due from its ``next_attempt_at`` (its creation where that is empty).
    A delivery worker that claims one moves it out by the time a send may take, and a
    failed attempt by its back-off, so one long overdue is one no worker took.
    """

    count: int
    oldest_due: datetime | None
    last_delivered_at: datetime | None


def overdue_deliveries(session: Session, now: datetime) -> Overdue:
    due = func.coalesce(Delivery.next_attempt_at, Delivery.created_at, type_=UTCDateTime())
    count, oldest = session.execute(
        select(func.count(), func.min(due, type_=UTCDateTime())).where(
            Delivery.state == DeliveryState.PENDING, due <= now
        )
    ).one()
    last = session.scalar(select(func.max(Delivery.delivered_at, type_=UTCDateTime())))
    return Overdue(int(count), oldest, last)


def spooled(session: Session) -> tuple[int, int]:
    """Received images still on disk (retention has not removed them): count, bytes."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
            Instance.files_removed_at.is_(None)
        )
    ).one()
    return int(count), int(size)


@dataclass(frozen=True)
class Waiting:
    """Instances not finished: how many, since when the oldest waits (since it was
    received or queued, or, being assessed, since its attempt began), and when the
    latest instance finished."""

    count: int
    oldest_since: datetime | None
    last_finished_at: datetime | None


def waiting(session: Session) -> Waiting:
    since = case(
        (Instance.state == InstanceState.PROCESSING, Instance.started_at),
        else_=func.coalesce(Instance.queued_at, Instance.received_at),
    )
    count, oldest = session.execute(
        select(func.count(), func.min(since, type_=UTCDateTime())).where(
            Instance.state.in_(_UNFINISHED)
        )
    ).one()
    last = session.scalar(select(func.max(Instance.finished_at)))
    return Waiting(int(count), oldest, last)


def heartbeats(session: Session) -> list[ProcessBeat]:
    return [
        ProcessBeat(h.name, h.role, h.seen_at, h.started_at, dict(h.detail or {}))
        for h in session.scalars(select(Heartbeat).order_by(Heartbeat.role, Heartbeat.name))
    ]


#: States of an instance not finished yet: one with a reason there had an attempt fail
#: (worker.pipeline), and waits to be tried again.
_UNFINISHED = (InstanceState.RECEIVED, InstanceState.QUEUED, InstanceState.PROCESSING)


#: How the reason of an instance ends whose SR or SC, at the PACS, no note of ours could
#: withdraw (worker.pipeline: its file gone, or refused by the note's builder).
WITHDRAW_BY_HAND = "withdraw them at the PACS by hand"

#: What the reason of an image says once a rejection note named its SOP Instance UID in
#: a study it was never received in (worker.pipeline): another image under the UID at the
#: PACS, which the note rejects; this one's results stand, and no note withdraws them.
REJECTED_IN_ANOTHER_STUDY = (
    "a rejection note named this SOP Instance UID in a study this image was not received in"
)

#: What the reason of an image says once another image came under its SOP Instance UID
#: and was refused (worker.pipeline): its results stand, and nothing of the other is made.
UID_CLASH = "another image was received under this SOP Instance UID and refused"


def recent_problems(session: Session, limit: int = 5) -> list[dict[str, Any]]:
    """Latest instances not assessed, in error, waiting to be tried again after an
    attempt failed, with objects of ours at the PACS to withdraw by hand, or whose SOP
    Instance UID another image came under, or a rejection note named in another study,
    newest first. Failed deliveries are not among
    them (`failed_deliveries`): a day of chest films forwarded by mistake would push them
    out of the few shown."""
    problems: list[dict[str, Any]] = []
    for inst in session.scalars(
        select(Instance)
        .where(
            Instance.state.in_([InstanceState.NOT_ASSESSED, InstanceState.ERROR])
            | (Instance.state.in_(_UNFINISHED) & Instance.reason.is_not(None))
            | Instance.reason.endswith(WITHDRAW_BY_HAND, autoescape=True)
            | Instance.reason.contains(UID_CLASH, autoescape=True)
            | Instance.reason.contains(REJECTED_IN_ANOTHER_STUDY, autoescape=True)
        )
        .order_by(Instance.finished_at.desc().nulls_first(), Instance.id.desc())
        .limit(limit)
    ):
        problems.append(
            {
                "what": f"instance {inst.id}",
                "state": inst.state.value,
                "reason": inst.reason,
                "at": inst.finished_at or inst.started_at or inst.received_at,
            }
        )
    return problems


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def last_hour(session: Session, now: datetime) -> dict[str, Any]:
    """Throughput and latency (received → last delivery, received → result) over an hour."""
    since = now - timedelta(hours=1)
    states = list(session.scalars(select(Instance.state).where(Instance.finished_at >= since)))
    latencies = latencies_since(session, since)
    return {
        "assessed": states.count(InstanceState.ASSESSED),
        "not_assessed": states.count(InstanceState.NOT_ASSESSED),
        "rejected": states.count(InstanceState.REJECTED),
        "error": states.count(InstanceState.ERROR),
        "processing_p50_s": _percentile(latencies.to_assessed, 0.5),
        "processing_p95_s": _percentile(latencies.to_assessed, 0.95),
        "delivered_p50_s": _percentile(latencies.to_delivered, 0.5),
        "delivered_p95_s": _percentile(latencies.to_delivered, 0.95),
    }


# -- metrics (Prometheus scrape): aggregated, bounded by a one-hour window ----------

#: Not-assessed reasons as short categories, by how the reason begins (the reasons
#: are written by `dicom_io.gate` and `worker.pipeline`). A category is a metric
#: label: it never carries free text, so no value of the image reaches the metrics.
REASON_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("SOP class", "sop_class"),
    ("made by boneage-worker", "own_result"),
    ("StudyInstanceUID", "study_uid"),
    ("the instance has no pixel data", "pixels"),
    ("pixel data", "pixels"),
    ("body part", "body_part"),
    ("view is", "view"),
    ("image is", "size"),
    ("pixels are not square", "pixel_shape"),
    ("patient sex", "sex"),
    ("patient age", "age"),
    ("the file cannot be parsed", "parse"),
    # a rejection note, or another Key Object Selection (worker.pipeline)
    ("a key object selection", "key_object"),
)
OTHER_REASON = "other"


def reason_category(reason: str | None) -> str:
    """The category of a not-assessed reason (`REASON_CATEGORIES`), else ``other``."""
    for prefix, category in REASON_CATEGORIES:
        if reason and reason.startswith(prefix):
            return category
    return OTHER_REASON


def not_assessed_by_reason(session: Session) -> dict[str, int]:
    """Instances not assessed, counted by reason category in SQL (one row per category)."""
    category = case(
        *(
            (Instance.reason.startswith(prefix, autoescape=True), cat)
            for prefix, cat in REASON_CATEGORIES
        ),
        else_=OTHER_REASON,
    ).label("category")
    rows = session.execute(
        select(category, func.count())
        .where(Instance.state == InstanceState.NOT_ASSESSED)
        .group_by(category)
    )
    counts = {cat: 0 for _, cat in REASON_CATEGORIES} | {OTHER_REASON: 0}
    for cat, n in rows:
        counts[str(cat)] += n
    return counts


@dataclass(frozen=True)
class Latencies:
    """Seconds from reception, for the instances that finished within the window."""

    to_assessed: list[float]  # received → result committed
    to_delivered: list[float]  # received → last of its objects delivered


def latencies_since(session: Session, since: datetime) -> Latencies:
    """Latencies of the instances assessed, or delivered, at or after ``since``.

    Each assessment counts from the copy it answers: the first from the instance's first
    reception, a later one (a copy received again that changed what the result depends
    on) from that copy. The deliveries of an assessment between the first and the last,
    whose copy's reception is not kept, are left out; so are our rejection notes, which
    withdraw an image's SR and SC when the PACS rejects it, maybe weeks after it came,
    and would count those weeks.
    """
    current = func.coalesce(Instance.assessment_received_at, Instance.received_at)
    assessed = session.execute(
        select(current, Instance.finished_at).where(
            Instance.state == InstanceState.ASSESSED, Instance.finished_at >= since
        )
    )
    received = case(
        # of the current assessment, those made since its copy came (a reprocess with
        # another model counts from its own start, and the first model's objects of the
        # same assessment from the reception they answered)
        (
            (Delivery.assessment == Instance.assessment) & (Delivery.created_at >= current),
            current,
        ),
        (Delivery.assessment == 1, Instance.received_at),
    )
    delivered = session.execute(
        select(received, func.max(Delivery.delivered_at))
        .join(Delivery, Delivery.instance_id == Instance.id)
        .where(
            Delivery.delivered_at >= since,
            # a note from before revision 0009 does not say what it withdraws
            Delivery.kind != ObjectKind.KO,
            Delivery.withdraws.is_(None),
        )
        .group_by(Instance.id, Delivery.assessment, received)
    )
    return Latencies(
        to_assessed=[max(0.0, (f - r).total_seconds()) for r, f in assessed if r and f],
        to_delivered=[max(0.0, (d - r).total_seconds()) for r, d in delivered if r and d],
    )
