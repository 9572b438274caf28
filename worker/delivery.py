"""Delivery of our SR and SC objects, with retries whose state lives in the db.

A delivery is `pending` until the destination answers Success (or a warning,
which means it stored the object), `failed` once its attempts are spent. Nothing
is dropped silently: a failed delivery stays visible in `status` until
`boneage-worker retry-deliveries` sends it again, or until the administrator gives it
up on purpose (`boneage-worker abandon-deliveries`, `abandon_failed`: one whose file
retention removed, which nothing can send): it is then `abandoned`, with who, when
and why in its row, and `status` counts it apart, no longer as a problem.

The deliveries of one message (an assessment's SR and SC) that go to the same
destination travel over one association. Each one still has its own outcome: the
destination may store the SR and refuse the SC, or the link may break between them.
An object whose SOP class the destination accepts no presentation context for fails
at once, with that reason (sending again cannot help), and the others still go; so
does one the destination answers 0xA9xx or 0xCxxx, a judgement on the object itself.

Sending starts with a claim: one conditional UPDATE moves the rows' next attempt
out by the time a send may take (`claim_seconds`). A duplicate message for the same
rows (the reconciler and a retry both queued one, or two delivery workers hold
copies) then finds them not due, so an object is not sent twice at once; and if the
worker dies while sending, the reconciler picks the rows up once the claim runs out.
The claim gives the objects' bytes time to go at `FLOOR_RATE`, and the send ends
(unanswered, retried) `SEND_TIMEOUT` before the claim does, however it progresses.

An object goes out as its file is stored, byte for byte (nothing decoded and encoded
again) where the destination takes its transfer syntax, and re-encoded in Explicit or
Implicit VR Little Endian where it takes only those (`dicom_io.scu.send_datasets`), once
the file's SHA-256 matches the one recorded when it was written: a file damaged or cut
short since then fails at once, with the reason, instead of reaching the PACS.

A row records the destination it goes to as it was configured when the row was made.
An SR or SC whose destination is no longer in ``BONEAGE_DESTINATIONS`` (an administrator
corrected a mistyped node, or took one out of service) fails for good when it is
claimed, with the reason "destination no longer configured", and is not sent;
`retry-deliveries` sends such failed rows to the configured destinations instead (new
rows, or the object's earlier ones there put back; the old one superseded, see
`retry_failed`). A rejection note of ours still goes: it withdraws an object that
destination has (or may have), which would otherwise stand there; where the object
never arrived, the note is superseded unsent as anywhere else.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

from pydicom import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from sqlalchemy import ColumnElement, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from db.engine import session_scope
from db.queries import database_now, made_here, take_instances
from db.schema import Delivery, DeliveryState, Instance, ObjectKind
from db.schema import utcnow as now
from dicom_io.scu import (
    Answer,
    NotAccepted,
    NotSendable,
    SendError,
    send_datasets,
    stored,
    stored_syntax,
    warning,
)
from dicom_io.stored_text import read_keeping_text
from worker.logs import exception_summary
from worker.runtime import Runtime
from worker.settings import Destination, Settings
from worker.tls import client_context

logger = logging.getLogger(__name__)

#: Seconds our SCU waits on a silent destination (association, network, each answer).
SEND_TIMEOUT = 30.0

#: The slowest link a send is given time for, in bytes a second (512 kbit/s): a claim
#: lasts long enough to carry its objects at this rate (`claim_seconds`), a 12 MB heat
#: map about 3 min. A remote site's VPN or leased line is 1 Mbit/s or more; half of it
#: leaves room for the traffic that shares it. A slower link fails at the claim's end.
FLOOR_RATE = 64_000

#: The longest a claim lasts, in seconds, whatever it carries: the deliver task's hard
#: time limit is this and a little more (`worker.celery_app.deliver_time_limit`). A
#: message's objects too large to go at `FLOOR_RATE` in it fail at its end.
MAX_CLAIM_SECONDS = 900.0


@dataclass(frozen=True)
class DeliveryOutcome:
    # "delivered", "retry", "failed", "skipped", or "waiting": a note of ours held, no
    # attempt made, until the send of the object it withdraws ends
    state: str
    retry_in: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Claimed:
    id: int
    kind: ObjectKind
    destination: str
    path: Path
    sha256: str | None  # None on rows written before checksums were recorded
    withdraws: str | None  # a note of ours: the UID of our object it withdraws
    created_at: datetime
    claimed_at: datetime  # by the database's clock, as the claim dated the row
    # when this process took up its settings (Runtime.settings_since, its host's clock),
    # by the database's clock: moved by the host's offset from it at the claim
    settings_since: datetime
    # its sending_since before this claim: an earlier attempt whose answer never came,
    # or whose sender died (the object may be at the destination); kept by a failure of
    # this attempt that sent nothing (`_record_failure`)
    sent_before: datetime | None = None
    # the `time.monotonic` instant its send must end by: its claim's end, less
    # `SEND_TIMEOUT` (on this host's clock, from before the claim was dated)
    send_by: float | None = None


@dataclass
class Claim:
    """The claim a call of :func:`send_deliveries` took, for the task that made it: the
    time it wrote into the rows it claimed (``sending_since``) and the end it gave them
    (``next_attempt_at``), as committed; both None where no claim committed (none of the
    rows due, or the database away). A task whose retry could not be published gives
    back only the rows that still show this claim (`worker.tasks.RetriedWithinBudget`):
    a claim another worker took on the same rows is not its own, whenever it was taken.
    """

    claimed_at: datetime | None = None
    until: datetime | None = None


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential back-off: base, 2·base, 4·base … capped."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


def refused_for_good(status: int) -> bool:
    """Whether a C-STORE failure status means the same object would fail again.

    0xA9xx (Data Set does not match SOP Class) and 0xCxxx (Cannot understand) judge the
    object itself (PS3.4 B.2.3); 0xA7xx (Out of Resources) and other failures may pass.
    """
    return (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


#: Why a delivery whose outbox folder this host cannot see is tried again (not failed).
OUTBOX_FOLDER_MISSING = (
    "the outbox folder is missing on this host (the data folder not mounted?): tried again"
)

#: Why an SR or SC to a destination taken out of the settings is not sent.
NOT_CONFIGURED = "destination no longer configured"
#: How long a delivery made after this process read its settings, to a destination they
#: do not name, is tried again before it fails as :data:`NOT_CONFIGURED`: the process that
#: made it may have newer settings (a rolling restart, the inference workers before the
#: delivery workers), or older ones (the other way round), which this cannot tell. One
#: that `retry-deliveries` put back to pending counts as made then (`retry_failed`).
SETTINGS_ROLLOUT = timedelta(minutes=15)
NOT_CONFIGURED_HERE = (
    "destination not in this delivery worker's BONEAGE_DESTINATIONS, which it took up "
    "before the delivery was made: tried again for 15 minutes (the workers restarting with "
    "other settings), then failed"
)


def configured(settings: Settings, destination: str | Destination) -> bool:
    """Whether ``destination`` (a delivery's ``AE@host:port``) is one of
    ``settings.destinations``: the same AE title and port, the host in any case.

    Text that is no destination is not configured.
    """
    key = _key(destination)
    return key is not None and any(_key(d) == key for d in settings.destinations)


def _key(destination: str | Destination) -> tuple[str, str, int] | None:
    """What tells ``destination`` apart from others: its AE title, host in lower case,
    and port; None for text that is no destination."""
    if isinstance(destination, str):
        try:
            destination = Destination.parse(destination)
        except ValueError:
            return None
    return destination.ae_title, destination.host.lower(), destination.port


def claim_seconds(count: int, size: int = 0) -> float:
    """How long a claim on ``count`` deliveries of ``size`` bytes in all lasts: the longest
    a send of them may take, at `FLOOR_RATE` (`MAX_CLAIM_SECONDS` at most). Their send
    ends `SEND_TIMEOUT` before it, answered or not: the share of the release, which
    leaves time for the abort and for recording what became of each."""
    # association, each answer, release; and the bytes at the slowest rate we carry them
    return min(SEND_TIMEOUT * (count + 2) + size / FLOOR_RATE, MAX_CLAIM_SECONDS)


def deliver_one(rt: Runtime, delivery_id: int, *, force: bool = False) -> DeliveryOutcome:
    """Try to send one delivery now (see `send_deliveries`)."""
    return send_deliveries(rt, [delivery_id], force=force)[delivery_id]


def send_deliveries(
    rt: Runtime, delivery_ids: Sequence[int], *, force: bool = False, claim: Claim | None = None
) -> dict[int, DeliveryOutcome]:
    """Try to send deliveries now, those to one destination over one association.

    Parameters
    ----------
    delivery_ids
        Deliveries to send, in the order they go out (an SR before its SC).
    force
        Send even when the next attempt is not yet due (used by tests and by
        operators; it also overrides another worker's claim).
    claim
        Where given, filled in with the claim this call takes, once it has committed.

    Returns
    -------
    dict
        The outcome of each delivery id given.
    """
    ids = list(dict.fromkeys(delivery_ids))
    claimed, outcomes = _claim(rt, ids, force=force, claim=claim)
    claimed = _notes_whose_objects_arrived(rt, claimed, outcomes)
    by_destination: dict[str, list[_Claimed]] = {}
    for row in claimed:
        by_destination.setdefault(row.destination, []).append(row)
    # the ids the destination answered stored, or that went unanswered: at the PACS, or
    # maybe, whatever fails after the answer (recording it, the database away)
    arrived: set[int] = set()
    for destination_text, rows in by_destination.items():
        try:
            _send_to(rt, destination_text, rows, outcomes, arrived)
        except Exception as exc:
            # A fault of ours (or of a library) must still cost the claimed rows an
            # attempt: raised, it would leave them pending under the claim, sent again
            # by the reconciler and failing again for ever, never counted nor `failed`.
            # The type alone, in the row (which `status` prints) as in the log: the
            # message may be a library's quoting the data set (pydicom's "Unknown Value
            # Representation 'JA' in tag (4F44,5E45)" is a patient's name read as a tag).
            error = f"internal error while sending: {exception_summary(exc)}"
            logger.exception(
                "deliveries to %s: internal error while sending (%s)",
                destination_text,
                type(exc).__name__,
            )
            for row in rows:
                if row.id not in outcomes:
                    # one stored, its success not recorded, keeps this claim's mark: a
                    # rejection note of ours withdraws it even if it is superseded before
                    # it is sent again
                    outcomes[row.id] = _record_failure(
                        rt,
                        row.id,
                        error,
                        may_have_arrived=row.id in arrived,
                        sent_before=row.sent_before,
                    )
    return {delivery_id: outcomes[delivery_id] for delivery_id in ids}


def _claim(
    rt: Runtime, ids: list[int], *, force: bool, claim: Claim | None = None
) -> tuple[list[_Claimed], dict[int, DeliveryOutcome]]:
    if not ids:
        return [], {}
    with session_scope(rt.database_url) as session:
        # The database's clock, whichever host this runs on: the rows' times are compared
        # by other processes (another delivery worker's claim, the reconciler), on other
        # hosts, whose clocks may differ from this one's by more than a claim lasts.
        started = time.monotonic()  # before the claim is dated: its end comes later
        current = database_now(session)
        # this process's start, by the same clock, for `_send_to`'s rollout window
        settings_since = rt.settings_since + (current - now())
        conditions = [Delivery.id.in_(ids), Delivery.state == DeliveryState.PENDING]
        if not force:
            # a second of slack: a retry's message may arrive a little before its due time
            conditions.append(
                or_(
                    Delivery.next_attempt_at.is_(None),
                    Delivery.next_attempt_at <= current + timedelta(seconds=1),
                )
            )
        # The marks the rows have before the claim replaces them, read under the lock
        # the claim's UPDATE then holds until the commit: a row lock (PostgreSQL), or the
        # write lock (SQLite), taken first by a write that changes nothing, since pysqlite
        # begins the transaction only at the first write and a read before it holds no
        # lock. Read outside it, a row another claim took meanwhile was taken again
        # (force) with the mark from before that claim, and a failure of this attempt
        # that sent nothing put that one back, erasing the other's.
        if session.get_bind().dialect.name == "sqlite":
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids))
                .values(sending_since=Delivery.sending_since)
                .execution_options(synchronize_session=False)
            )
        marks: dict[int, datetime | None] = {}
        size = 0
        for row in session.execute(
            select(Delivery.id, Delivery.sending_since, Delivery.path)
            .where(*conditions)
            .with_for_update(key_share=True)
        ):
            marks[row.id] = row.sending_since
            size += _size(row.path)
        seconds = claim_seconds(len(ids), size)
        until = current + timedelta(seconds=seconds)
        rows = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(list(marks)), *conditions)
            .values(next_attempt_at=until, sending_since=current)
            .returning(
                Delivery.id,
                Delivery.kind,
                Delivery.destination,
                Delivery.path,
                Delivery.sha256,
                Delivery.withdraws,
                Delivery.created_at,
            )
            .execution_options(synchronize_session=False)
        ).all()
        claimed = {
            row.id: _Claimed(
                row.id,
                row.kind,
                row.destination,
                Path(row.path),
                row.sha256,
                row.withdraws,
                row.created_at,
                current,
                settings_since,
                marks.get(row.id),
                started + seconds - SEND_TIMEOUT,
            )
            for row in rows
        }
        others = [i for i in ids if i not in claimed]
        # only a skipped delivery needs a second look (why it was not claimed)
        states = {
            row.id: row.state
            for row in (
                session.execute(select(Delivery.id, Delivery.state).where(Delivery.id.in_(others)))
                if others
                else ()
            )
        }
    if claim is not None and claimed:  # committed
        claim.claimed_at, claim.until = current, until
    skipped: dict[int, DeliveryOutcome] = {}
    for delivery_id in others:
        state = states.get(delivery_id)
        if state is None:
            reason = "no such delivery"
        elif state is not DeliveryState.PENDING:
            reason = f"already {state.value}"
        else:
            # being sent under another message's claim, or its retry is not due
            reason = "not due yet"
        skipped[delivery_id] = DeliveryOutcome("skipped", error=reason)
    return [claimed[i] for i in ids if i in claimed], skipped


def _size(path: str) -> int:
    """Bytes of an outbox file; 0 for one that cannot be read (its send fails at once)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


#: Seconds past the end of the claim on an object's send that a note of ours naming
#: it waits, before it looks again at whether the object arrived.
NOTE_WAIT_SLACK = 1.0


def _notes_whose_objects_arrived(
    rt: Runtime, claimed: list[_Claimed], outcomes: dict[int, DeliveryOutcome]
) -> list[_Claimed]:
    """Of the claimed deliveries, those to send now: all but our rejection notes whose
    object (``withdraws``) has not arrived at the note's destination.

    A PACS that applies IOCM refuses a note naming an instance it does not have, so:

    - the object's own send to that destination under way (its claim not run out): the
      note waits until that send's claim ends, with no attempt counted;
    - the object never arrived (its send failed, or it was superseded before it went):
      the note is superseded, with that reason, and never sent;
    - delivered, or its fate unknown (a worker died sending it; the destination never
      answered its C-STORE; a note from before revision 0009, which does not say what
      it withdraws): the note goes.
    """
    notes = [row for row in claimed if row.withdraws]
    if not notes:
        return claimed
    with session_scope(rt.database_url) as session:
        current = database_now(session)  # as the object's claim was dated (`_claim`)
        objects = {
            (uid, destination): (state, sending_since, claim_ends)
            for uid, destination, state, sending_since, claim_ends in session.execute(
                select(
                    Delivery.sop_instance_uid,
                    Delivery.destination,
                    Delivery.state,
                    Delivery.sending_since,
                    Delivery.next_attempt_at,
                ).where(Delivery.sop_instance_uid.in_({row.withdraws for row in notes}))
            )
        }
        for note in notes:
            found = objects.get((note.withdraws or "", note.destination))
            if found is None:
                continue  # nothing known of it here: the PACS decides
            state, sending_since, claim_ends = found
            if state is DeliveryState.DELIVERED:
                continue
            if sending_since is not None:
                if claim_ends is None or claim_ends <= current:
                    continue  # unanswered, or its sender died or is overdue: may be there
                wait = (claim_ends - current).total_seconds() + NOTE_WAIT_SLACK
                changes: dict[str, object] = {
                    "next_attempt_at": current + timedelta(seconds=wait),
                    "sending_since": None,
                }
                outcomes[note.id] = DeliveryOutcome(
                    "waiting", retry_in=wait, error="the object it withdraws is being sent"
                )
            else:
                changes = {
                    "state": DeliveryState.SUPERSEDED,
                    "last_error": _NEVER_ARRIVED,
                    "next_attempt_at": None,
                    "sending_since": None,
                }
                outcomes[note.id] = DeliveryOutcome("skipped", error=_NEVER_ARRIVED)
            session.execute(
                update(Delivery)
                .where(Delivery.id == note.id)
                .values(**changes)
                .execution_options(synchronize_session=False)
            )
    held = [row for row in notes if row.id in outcomes]
    if held:
        logger.info(
            "rejection notes %s: %d held or superseded, their objects not at the destination",
            ", ".join(str(row.id) for row in held),
            len(held),
        )
    return [row for row in claimed if row.id not in outcomes]


_NEVER_ARRIVED = "the object it withdraws never arrived there: nothing to withdraw"


def _send_to(
    rt: Runtime,
    destination_text: str,
    rows: list[_Claimed],
    outcomes: dict[int, DeliveryOutcome],
    arrived: set[int] | None = None,
) -> None:
    """Send ``rows`` to one destination; each row's outcome goes into ``outcomes``
    as soon as it is recorded, and the id of each the destination may have stored
    (answered stored, or sent and never answered) into ``arrived`` once the send ends,
    before anything is recorded."""
    arrived = set() if arrived is None else arrived
    settings = rt.settings
    try:
        destination = Destination.parse(destination_text)
    except ValueError as exc:
        for row in rows:
            outcomes[row.id] = _record_failure(
                rt, row.id, str(exc), permanent=True, sent_before=row.sent_before
            )
        return
    if not configured(settings, destination):
        # Taken out of the settings (a mistyped node corrected, one out of service):
        # nothing more of ours goes there but the notes withdrawing what it has. A row
        # newer than this process's settings is tried again for a while first: the
        # inference worker that made it, or the `retry-deliveries` that put it back
        # (either sets ``created_at``), may have taken up settings this one has not yet
        # (a rolling restart, one deployment before the other).
        for row in rows:
            if row.kind is ObjectKind.KO:
                continue
            if (
                # all by the database's clock: the row was made on another host, maybe
                row.created_at > row.settings_since
                and row.claimed_at - row.created_at < SETTINGS_ROLLOUT
            ):
                outcomes[row.id] = _record_failure(
                    rt, row.id, NOT_CONFIGURED_HERE, sent_before=row.sent_before
                )
            else:
                outcomes[row.id] = _record_failure(
                    rt, row.id, NOT_CONFIGURED, permanent=True, sent_before=row.sent_before
                )
        rows = [row for row in rows if row.kind is ObjectKind.KO]
        if not rows:
            return
    try:
        # Built per attempt: a renewed certificate is used without a restart.
        tls = client_context(settings)
    except (OSError, ssl.SSLError) as exc:
        # A configuration fault the administrator can fix: retried, never permanent.
        error = f"TLS settings unusable: {exc}"
        for row in rows:
            outcomes[row.id] = _record_failure(rt, row.id, error, sent_before=row.sent_before)
        return

    sendable: list[tuple[_Claimed, Dataset | Path]] = []
    for row in rows:
        try:
            ds = check_outbox(row.path, row.sha256)
        except FileNotFoundError:
            if not Path(row.path).parent.is_dir():
                # the folder itself: a shared data folder not mounted yet on this host,
                # which would fail every delivery for good; tried again, as the network
                outcomes[row.id] = _record_failure(
                    rt, row.id, OUTBOX_FOLDER_MISSING, sent_before=row.sent_before
                )
                continue
            error = "the outbox file is missing"
            outcomes[row.id] = _record_failure(
                rt, row.id, error, permanent=True, sent_before=row.sent_before
            )
        except _DamagedObject as exc:
            error = f"the outbox file is damaged: {exc}"
            outcomes[row.id] = _record_failure(
                rt, row.id, error, permanent=True, sent_before=row.sent_before
            )
        except OSError as exc:
            outcomes[row.id] = _record_failure(
                rt, row.id, f"the outbox file: {exc}", sent_before=row.sent_before
            )
        else:
            sendable.append((row, ds))
    if not sendable:
        return

    answered: Sequence[Answer]
    broken: str | None = None
    unanswered = False  # the first object without an answer went, and may be stored
    try:
        answered = send_datasets(
            [ds for _, ds in sendable],
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=settings.ae_title,
            timeout=SEND_TIMEOUT,
            ssl_context=tls,
            # the claim's end: past it another worker may send them, or a note of ours
            # withdrawing one of them go out before it
            deadline=min((r.send_by for r, _ in sendable if r.send_by is not None), default=None),
        )
    except (SendError, OSError, RuntimeError) as exc:
        answered = exc.answered if isinstance(exc, SendError) else ()
        unanswered = isinstance(exc, SendError) and exc.unanswered
        broken = _why_not_sent(exc, destination)

    # every one the destination has or may have, before any is recorded: a failure to
    # record one must not lose the mark of another
    arrived.update(
        row.id
        for index, (row, _) in enumerate(sendable)
        if (index < len(answered) and stored(answered[index]))
        or (unanswered and index == len(answered))
    )
    delivered: list[int] = []
    warned: dict[int, str] = {}  # of those, stored with a warning status: its remark
    for index, (row, _) in enumerate(sendable):
        answer = answered[index] if index < len(answered) else None
        if answer is None:
            outcomes[row.id] = _record_failure(
                rt,
                row.id,
                broken or "not sent",
                may_have_arrived=row.id in arrived,
                sent_before=row.sent_before,
            )
        elif isinstance(answer, NotAccepted):
            # The destination does not take this SOP class: sending again cannot help
            # until its administrator changes that (then `retry-deliveries`).
            outcomes[row.id] = _record_failure(
                rt, row.id, answer.reason, permanent=True, sent_before=row.sent_before
            )
        elif stored(answer):
            delivered.append(row.id)
            if warning(answer):
                # stored, with a remark (0xB007: elements discarded, an SR perhaps shown
                # without its bone age): kept on the row, and said with the row's id
                warned[row.id] = f"stored with warning status 0x{answer:04X}"
                logger.warning(
                    "delivery %d to %s: %s", row.id, destination.ae_title, warned[row.id]
                )
        elif refused_for_good(answer):
            error = f"{destination} answered status 0x{answer:04X} (a refusal: not sent again)"
            outcomes[row.id] = _record_failure(
                rt, row.id, error, permanent=True, sent_before=row.sent_before
            )
        else:
            error = f"{destination} answered status 0x{answer:04X}"
            outcomes[row.id] = _record_failure(rt, row.id, error, sent_before=row.sent_before)
    if delivered:
        with session_scope(rt.database_url) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(delivered))
                .values(
                    state=DeliveryState.DELIVERED,
                    delivered_at=database_now(session),
                    attempts=Delivery.attempts + 1,
                    last_error=None,
                    next_attempt_at=None,
                    sending_since=None,
                )
                .execution_options(synchronize_session=False)
            )
            for delivery_id, remark in warned.items():
                session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id)
                    .values(last_error=remark)
                    .execution_options(synchronize_session=False)
                )
        logger.info(
            "deliveries %s sent to %s", ", ".join(map(str, delivered)), destination.ae_title
        )
        outcomes.update({delivery_id: DeliveryOutcome("delivered") for delivery_id in delivered})


class _DamagedObject(Exception):
    """An outbox file that is no complete object to send."""


def check_outbox(path: Path, sha256: str | None) -> Dataset | Path:
    """What to send for one outbox file, once it is known to be what was written.

    With the SHA-256 recorded at writing, the file itself (sent as stored); without
    one (a row from before checksums were recorded), the dataset read back in full.

    Raises
    ------
    OSError
        The file cannot be read (`FileNotFoundError`: it is gone).
    _DamagedObject
        Its bytes are not those written, or it lacks what a C-STORE needs.
    """
    if sha256 is None:
        return _read_outbox(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise _DamagedObject(
            "its contents changed since it was written "
            f"(SHA-256 {digest.hexdigest()[:16]}…, written as {sha256[:16]}…)"
        )
    try:
        stored_syntax(path)
    except NotSendable as exc:  # written so by us: a fault of ours, but retrying cannot help
        # our own words, or pydicom's reason the file meta does not parse by its type
        why = exc.__context__
        raise _DamagedObject(
            str(exc) if why is None else f"it is no DICOM Part 10 file ({type(why).__name__})"
        ) from None
    return path


#: What pydicom raises, reading a file, on contents it cannot make sense of:
#: NotImplementedError for an unknown Value Representation (a damaged byte; reading
#: decodes no pixel data, which raises it for a transfer syntax it cannot decode).
_UNREADABLE = (
    InvalidDicomError,
    NotImplementedError,
    BytesLengthException,
    AttributeError,
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    struct.error,
)


def _read_outbox(path: Path) -> Dataset:
    """Read one of our objects back, in full, before it is offered to a destination.

    For rows without a recorded SHA-256. pydicom reads lazily: a file damaged after we
    wrote it (a full disk, a restored backup) would otherwise fail midway through the
    association, or not be noticed; a file cut short after its last complete element
    still reads as whole, which only the checksum catches.

    Raises
    ------
    OSError
        The file cannot be opened (`FileNotFoundError`: it is gone).
    _DamagedObject
        It is no DICOM file, or lacks what a C-STORE needs, or does not parse.
    """
    try:
        # parses every element now, and keeps as stored the text that lost characters in
        # decoding (a Patient ID copied as received), which pynetdicom encodes again
        ds = read_keeping_text(path)
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if keyword not in ds:
                raise _DamagedObject(f"it has no {keyword}")
        if "TransferSyntaxUID" not in ds.file_meta:
            raise _DamagedObject("its file meta has no TransferSyntaxUID")
    except _UNREADABLE as exc:
        # pydicom's message quotes the bytes it read: a damaged file's may be a
        # patient's name read as a tag and a VR, so the type alone
        raise _DamagedObject(f"it does not parse ({type(exc).__name__})") from None
    return ds


def _why_not_sent(exc: Exception, destination: Destination) -> str:
    """What a send that failed records and logs: `SendError`'s own words, and the
    machine's (an `OSError`); where a library's exception is in it (pynetdicom's or
    pydicom's, encoding the data set: it may quote the values), that by its type."""
    if isinstance(exc, SendError):
        cause = exc.__cause__
        if cause is None:
            return str(exc)
        return f"{destination} cannot take the object ({exception_summary(cause)})"
    return exception_summary(exc)


def _record_failure(
    rt: Runtime,
    delivery_id: int,
    error: str,
    *,
    permanent: bool = False,
    may_have_arrived: bool = False,
    sent_before: datetime | None = None,
) -> DeliveryOutcome:
    """Count a failed attempt, and fail the delivery for good when ``permanent`` or when
    its attempts are spent; a delivery found delivered meanwhile is left as it is.

    ``may_have_arrived``: the object went and its answer never came (the destination
    may have stored it), or the destination stored it and recording that failed. Its
    ``sending_since`` is kept: such an object, once superseded, is taken as one that may
    be at the destination (named by the SR that replaces it, withdrawn by a rejection
    note of ours, which then goes), as one whose worker died sending it is.

    Otherwise its ``sending_since`` becomes ``sent_before``, what it was before the
    claim of this attempt (`_Claimed.sent_before`): an attempt that failed without the
    object reaching the destination (not sent: its destination no longer configured,
    the destination away; or refused) leaves the mark of an earlier one whose answer
    never came, or whose sender died, since that object may be there all the same."""
    settings = rt.settings
    with session_scope(rt.database_url) as session:
        # One conditional UPDATE: a failure that comes late (a send that timed out while
        # a later one, under a claim that ran out, succeeded) must not turn a delivered
        # object into a failed one. The row stays locked until the commit.
        # Nor an abandoned one back into a failed one (its attempt, under a claim that
        # ran out, failed after the administrator gave it up): its row keeps who did.
        counted = session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state.not_in([DeliveryState.DELIVERED, DeliveryState.ABANDONED]),
            )
            .values(
                attempts=Delivery.attempts + 1,
                last_error=error[:500],
                sending_since=Delivery.sending_since if may_have_arrived else sent_before,
            )
            .returning(Delivery.state, Delivery.attempts)
            .execution_options(synchronize_session=False)
        ).one_or_none()
        if counted is None:
            found = session.get(Delivery, delivery_id)
            if found is None:
                return DeliveryOutcome("skipped", error="no such delivery")
            if found.state is DeliveryState.ABANDONED:
                logger.warning(
                    "delivery %d: a failed attempt (%s) ignored, the delivery was abandoned",
                    delivery_id,
                    error,
                )
                return DeliveryOutcome("skipped", error="abandoned")
            logger.warning(
                "delivery %d: a failed attempt (%s) ignored, the object was delivered",
                delivery_id,
                error,
            )
            return DeliveryOutcome("skipped", error="already delivered")
        state, attempts = counted
        changes: dict[str, object]
        if state is DeliveryState.SUPERSEDED:
            # replaced, or its image rejected, while it was being sent: not sent again
            changes = {"next_attempt_at": None}
            outcome = DeliveryOutcome("skipped", error="superseded while it was being sent")
        elif permanent or attempts >= settings.delivery_max_attempts:
            changes = {"state": DeliveryState.FAILED, "next_attempt_at": None}
            outcome = DeliveryOutcome("failed", error=error)
        else:
            wait = backoff_seconds(
                attempts, settings.delivery_backoff_seconds, settings.delivery_backoff_max_seconds
            )
            # ends the claim; by the database's clock, as the claims compare it (`_claim`)
            changes = {"next_attempt_at": database_now(session) + timedelta(seconds=wait)}
            outcome = DeliveryOutcome("retry", retry_in=wait, error=error)
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(**changes)
            .execution_options(synchronize_session=False)
        )
    if outcome.state == "failed":
        logger.error("delivery %d failed after %d attempts: %s", delivery_id, attempts, error)
    elif outcome.state == "retry":
        logger.warning(
            "delivery %d attempt %d failed (%s); next in %.0fs",
            delivery_id,
            attempts,
            error,
            outcome.retry_in,
        )
    return outcome


#: Ids a warning of `retry_failed` names, at most; the rest are counted.
IDS_NAMED = 20

#: What an SR or SC failed to a destination no longer configured says, superseded by its
#: copies to the configured destinations (`retry_failed`).
REDIRECTED = "destination no longer configured; sent to the configured destinations instead"


@dataclass(frozen=True)
class Retried:
    """What `retry_failed` did with the failed deliveries it was given.

    ``reset``: the ids put back to pending. ``redirected``: for each SR or SC whose
    destination is no longer configured, now superseded, the ids of its deliveries
    queued to the configured destinations: new ones, or its earlier ones there put back
    to pending (a destination it was sent away from configured again); none where each
    of them has it, or has it on its way. Left failed, their destinations no longer
    configured: ``no_destination`` (none is configured) and ``no_file`` (the object's
    file is gone, see `files_gone`), of which ``removed`` are those retention removed;
    the others (``missing``) go once their files are back where they were written; and
    ``abandoned_there``, each with the configured destinations, every one of which gave
    a delivery of its object up and none of which has it or has it on its way
    (`abandoned_at_targets`): it would go to no configured destination instead.
    """

    reset: list[int]
    redirected: dict[int, list[int]]
    destinations: list[str]  # where the redirected deliveries go
    no_destination: list[int]
    no_file: list[int]
    removed: list[int]
    abandoned_there: dict[int, list[str]]

    @property
    def missing(self) -> list[int]:
        """Of ``no_file``, those whose files are not found where they were written and
        that retention did not remove: `PUT_BACK`."""
        removed = set(self.removed)
        return [delivery_id for delivery_id in self.no_file if delivery_id not in removed]

    @property
    def queued(self) -> list[int]:
        """The deliveries to send now, in id order."""
        return sorted([*self.reset, *(i for new in self.redirected.values() for i in new)])


def _named(ids: Sequence[int]) -> str:
    """``ids`` for a log line: the first `IDS_NAMED`, the rest counted."""
    more = f" and {len(ids) - IDS_NAMED} more" if len(ids) > IDS_NAMED else ""
    return ", ".join(str(i) for i in ids[:IDS_NAMED]) + more


def _file_gone(path: str, created_at: datetime, files_removed_at: datetime | None) -> bool | None:
    """Whether the file of a delivery made at ``created_at`` is gone, and how: True where
    retention removed it (its instance's files were removed after the row was made),
    False where it is not there all the same (an outbox volume not mounted, a file
    removed by hand), None where it is there."""
    if files_removed_at is not None and created_at <= files_removed_at:
        return True
    return None if Path(path).is_file() else False


#: Ids bound to one statement, at most (PostgreSQL binds at most 65535 values).
_CHUNK = 1000


def files_gone(session: Session, delivery_ids: Sequence[int]) -> dict[int, bool]:
    """Of ``delivery_ids``, those whose object's file is gone, each with whether
    retention removed it (see `_file_gone`): `retry_failed` leaves them failed
    (``no_file``), those retention removed for good, the others until their files are
    back where they were written (`PUT_BACK`)."""
    ids = list(delivery_ids)
    gone: dict[int, bool] = {}
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(Delivery.id, Delivery.path, Delivery.created_at, Instance.files_removed_at)
            .join(Instance, Delivery.instance_id == Instance.id)
            .where(Delivery.id.in_(ids[start : start + _CHUNK]))
        )
        for row in rows:
            removed = _file_gone(*row[1:])
            if removed is not None:
                gone[row.id] = removed
    return gone


#: What brings back a failed SR or SC whose file is not found where it was written and
#: that retention did not remove (an outbox volume not mounted, a data directory moved):
#: `retry_failed` redirects it once the file is there again.
PUT_BACK = (
    "put the outbox back where it was written (BONEAGE_DATA_DIR), then run "
    "'boneage-worker retry-deliveries'"
)


def _put_back(current: datetime) -> dict[str, object]:
    """What a failed delivery that `retry_failed` puts back to pending is given: due
    ``current`` (now, by the database's clock, as the claims compare it), its attempts
    counted from nought, and ``created_at`` ``current``, as a delivery it makes.

    Put back, it is a delivery queued now by settings that name its destination: a
    delivery worker not restarted yet, whose settings do not, tries it again for
    `SETTINGS_ROLLOUT` before it fails it for good; with its old ``created_at`` it
    failed at once (the settings changed A -> B -> A, `retry-deliveries` run before the
    delivery workers' restart). `status` reckons its last attempt from ``created_at``
    and its attempts, counted from nought again. What else reads ``created_at`` still
    holds. `_file_gone` takes a file as removed by retention where the removal came
    after the row was made: a row is put back only where a delivery of its object is
    failed (the row itself, or the one redirected, whose file was found there), and
    retention removes no file of an instance while a delivery of it is pending or
    failed, so no put-back row's file went between its two times. And a row made after
    its instance's removal mark has retention look at the instance again, as a delivery
    made then does (the file it sent then goes in its turn).
    """
    return {
        "state": DeliveryState.PENDING,
        "attempts": 0,
        "next_attempt_at": current,
        "created_at": current,
    }


#: Why a delivery that a database copied from another node holds, not sent, is
#: superseded when `boneage-worker db new-identity` gives the copy an identity of its
#: own (worker.node_identity): the other node's to send, never this one's.
MADE_BEFORE_THE_COPY = (
    "made by the node this database was copied from, before it was sent: not this "
    "node's to send (boneage-worker db new-identity)"
)


#: Where a delivery's object is, or is on its way, or where the administrator gave its
#: delivery up (`abandon_failed`): a redirect sends it there no more.
_NOT_AGAIN = (DeliveryState.DELIVERED, DeliveryState.PENDING, DeliveryState.ABANDONED)


#: Failed SRs and SCs to destinations no longer configured that `retry_failed` redirects
#: in one transaction: it holds their images' rows until it commits, and the listener's
#: record of a copy received again, a withdrawal, an assessment of one of them wait.
REDIRECT_BATCH = 100


class RetryInterrupted(Exception):
    """`retry_failed` stopped by an error (a deadlock, a lost connection, SQLite's
    "database is locked") after some of its work committed: ``retried``, what committed
    (its deliveries pending, to be published and said), and ``left``, the failed SRs and
    SCs to destinations no longer configured that it did not redirect (still failed: a
    run again takes them). The error is its ``__cause__``."""

    def __init__(self, retried: Retried, left: list[int]) -> None:
        super().__init__(
            f"retry-deliveries stopped: {len(retried.queued)} deliveries queued before, "
            f"{len(left)} failed deliveries not redirected"
        )
        self.retried = retried
        self.left = left


def retry_failed(rt: Runtime, delivery_ids: list[int] | None = None) -> Retried:
    """Send failed deliveries (all, or ``delivery_ids``) again: put back to pending, due
    now (`_put_back`), or, an SR or SC whose destination is no longer configured, to the
    configured destinations instead.

    The state changes in conditional UPDATEs, not a read and a write: a delivery
    superseded between the two (a later assessment of its image, or the image rejected
    by the PACS) must stay so, never to be sent.

    An SR or SC whose destination is no longer configured (sent there, it would fail at
    once, see `configured`; the administrator corrected a mistyped node) is superseded,
    `REDIRECTED`, and its object queued to each configured destination that neither has
    it nor has it on its way (a delivery there delivered, or pending; nor one there
    abandoned): the rows of an
    assessment are made for the destinations configured when it commits, and those that
    came after it would never get its results. Its delivery there, where one was made
    before (failed, or superseded `REDIRECTED` when the settings named other
    destinations: changed, and changed back), is put back to pending (the unique key
    allows one per destination), else a new one made. Its image's row is taken first,
    as a withdrawal of the image takes it (`db.queries.take_instances`): a withdrawal or a later
    assessment either supersedes what this makes, or has superseded the row, which then
    stays so. They go `REDIRECT_BATCH` at a time, each batch in a transaction of its
    own (`_redirect_batch`), which takes its images' rows, reads its rows again and
    commits: each row is superseded together with what it queues, or not at all, and
    the images of a backlog of thousands are not all held until the last is done. Such
    a row whose object's file is gone (`files_gone`), or any while no destination is
    configured, stays failed, named in a warning; one whose file is only not found
    where it was written is redirected by a later run once the file is back
    (`PUT_BACK`). So does one whose object the administrator gave up at every
    configured destination, none of which has it or has it on its way
    (``abandoned_there``, `abandoned_at_targets`): superseded, it would say it went to
    the configured destinations instead, and it went nowhere. The row superseded keeps
    its ``sending_since``: where its last attempt's answer never came, the object may
    be at the old node, and our rejection notes still go there. Our rejection notes are
    put back wherever they go.

    Raises
    ------
    RetryInterrupted
        Where a batch fails after the deliveries put back, and perhaps earlier
        batches, committed: it carries what committed, logged as a run that ends logs
        it, so that the caller publishes and says it before the error goes on (nothing
        is lost otherwise: the reconciler sends pending deliveries, but the operator saw
        only a traceback). An error before anything committed is raised as it is.
    """
    conditions = [Delivery.state == DeliveryState.FAILED]
    if delivery_ids:
        conditions.append(Delivery.id.in_(delivery_ids))
    targets = [str(d) for d in rt.settings.destinations]
    with session_scope(rt.database_url) as session:
        # a few destinations, however many rows: compared here, as a claim compares them
        texts = session.scalars(select(Delivery.destination).where(*conditions).distinct())
        wanted = [text for text in texts if configured(rt.settings, text)]
        sendable = or_(Delivery.kind == ObjectKind.KO, Delivery.destination.in_(wanted))
        reset = sorted(
            session.scalars(
                update(Delivery)
                .where(*conditions, sendable)
                .values(**_put_back(database_now(session)))
                .returning(Delivery.id)
                .execution_options(synchronize_session=False)
            )
        )
        stranded = [
            (delivery_id, instance_id)
            for delivery_id, instance_id in session.execute(
                select(Delivery.id, Delivery.instance_id)
                .where(*conditions, ~sendable)
                .order_by(Delivery.id)
            )
        ]
    no_destination = [] if targets else [delivery_id for delivery_id, _ in stranded]
    # what the batches committed, taken in only once each has
    redirected: dict[int, list[int]] = {}
    no_file: dict[int, bool] = {}
    went: set[str] = set()
    abandoned_there: dict[int, list[str]] = {}
    done = 0
    try:
        for start in range(0, len(stranded) if targets else 0, REDIRECT_BATCH):
            batch = stranded[start : start + REDIRECT_BATCH]
            batch_redirected, batch_no_file, batch_went, batch_abandoned = _redirect_batch(
                rt, batch, conditions, targets
            )
            redirected.update(batch_redirected)
            no_file.update(batch_no_file)
            went |= batch_went
            abandoned_there.update(batch_abandoned)
            done = start + len(batch)
    except Exception as exc:
        retried = _logged(reset, redirected, went, no_destination, no_file, abandoned_there)
        left = [delivery_id for delivery_id, _ in stranded[done:]]
        logger.error(
            "retry-deliveries stopped (%s) after %d deliveries were queued: %d failed "
            "deliveries to destinations no longer configured not redirected, left failed "
            "for a run again: %s",
            type(exc).__name__,
            len(retried.queued),
            len(left),
            _named(left),
        )
        raise RetryInterrupted(retried, left) from exc
    return _logged(reset, redirected, went, no_destination, no_file, abandoned_there)


def _redirect_batch(
    rt: Runtime,
    batch: list[tuple[int, int]],
    conditions: list[ColumnElement[bool]],
    targets: list[str],
) -> tuple[dict[int, list[int]], dict[int, bool], set[str], dict[int, list[str]]]:
    """Redirect ``batch`` (delivery and instance ids of failed SRs and SCs to
    destinations no longer configured) to ``targets`` in one transaction (`retry_failed`):
    what it redirected, the files it found gone, where it queued, and what it left
    failed because every target gave it up and none has it (``abandoned_there``,
    `abandoned_at_targets`), once committed."""
    redirected: dict[int, list[int]] = {}
    no_file: dict[int, bool] = {}
    went: set[str] = set()
    abandoned_there: dict[int, list[str]] = {}
    with session_scope(rt.database_url) as session:
        # before any delivery row of theirs, as a withdrawal of the image (the PACS
        # rejected it) and its next assessment (a corrected copy) take it before they
        # supersede its unsent objects: a delivery made under it is seen by that
        # supersede, or finds its object superseded already
        take_instances(session, (instance_id for _, instance_id in batch))
        rows = session.execute(
            select(Delivery, Instance.files_removed_at)
            .join(Instance, Delivery.instance_id == Instance.id)
            .where(Delivery.id.in_([delivery_id for delivery_id, _ in batch]), *conditions)
            .order_by(Delivery.id)
        ).all()
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        # read once the images are taken: nothing changes their deliveries meanwhile, and
        # what this batch queues (pending) never makes another of its rows given up
        given_up = abandoned_at_targets(session, [row.id for row, _ in rows], targets)
        current = database_now(session)  # once, for every row this batch queues
        for row, files_removed_at in rows:
            gone = _file_gone(row.path, row.created_at, files_removed_at)
            if gone is not None:
                no_file[row.id] = gone
                continue
            if row.id in given_up:
                # `_queue_to` would queue it nowhere, and no configured destination has
                # it: left failed, not superseded as sent to the configured destinations
                # instead
                abandoned_there[row.id] = given_up[row.id]
                continue
            taken = session.scalar(
                update(Delivery)
                .where(Delivery.id == row.id, Delivery.state == DeliveryState.FAILED)
                .values(state=DeliveryState.SUPERSEDED, last_error=REDIRECTED)
                .returning(Delivery.id)
                .execution_options(synchronize_session=False)
            )
            if taken is None:
                continue  # superseded meanwhile: a later assessment, the PACS rejected it
            new: list[int] = []
            for target in targets:
                queued = _queue_to(session, dialect, row, target, current)
                if queued is not None:
                    new.append(queued)
                    went.add(target)
            redirected[row.id] = new
    return redirected, no_file, went, abandoned_there


def _logged(
    reset: list[int],
    redirected: dict[int, list[int]],
    went: set[str],
    no_destination: list[int],
    no_file: dict[int, bool],
    abandoned_there: dict[int, list[str]],
) -> Retried:
    """What `retry_failed` did, committed, as a `Retried`, with its log lines."""
    made_to = sorted(went)
    if redirected:
        logger.info(
            "%d failed deliveries to destinations no longer configured sent to the "
            "configured destinations instead (%s): %s",
            len(redirected),
            ", ".join(made_to) or "each had them already",
            _named(list(redirected)),
        )
    if no_destination:
        logger.warning(
            "%d failed deliveries left failed, their destinations no longer configured and "
            "no destination configured (BONEAGE_DESTINATIONS): %s",
            len(no_destination),
            _named(no_destination),
        )
    retried = Retried(
        reset,
        redirected,
        made_to,
        no_destination,
        sorted(no_file),
        sorted(delivery_id for delivery_id, by_retention in no_file.items() if by_retention),
        dict(sorted(abandoned_there.items())),
    )
    if abandoned_there:
        logger.warning(
            "%d failed deliveries left failed, their destinations no longer configured and "
            "their objects abandoned at the configured destinations (%s): %s",
            len(abandoned_there),
            ", ".join(sorted({d for there in abandoned_there.values() for d in there})),
            _named(sorted(abandoned_there)),
        )
    if retried.removed:
        logger.warning(
            "%d failed deliveries left failed, their destinations no longer configured and "
            "their files removed by retention: %s",
            len(retried.removed),
            _named(retried.removed),
        )
    if retried.missing:
        logger.warning(
            "%d failed deliveries left failed, their destinations no longer configured and "
            "their files not found where they were written (%s, then run it again): %s",
            len(retried.missing),
            PUT_BACK,
            _named(retried.missing),
        )
    return retried


def abandoned_at_targets(
    session: Session, delivery_ids: Sequence[int], targets: Sequence[str]
) -> dict[int, list[str]]:
    """Of ``delivery_ids`` (failed SRs and SCs to destinations no longer configured),
    those `retry_failed` leaves failed (``abandoned_there``) because the administrator
    gave their objects up at the configured destinations ``targets``, each with those
    destinations: a delivery of its object to each of them abandoned, and none of them
    has it delivered or pending. Redirected, it would go nowhere (`_queue_to` queues
    nothing where a delivery is abandoned), and it would say it went to the configured
    destinations instead; where one of them has it, or has it on its way, it is
    redirected as any other. `status` asks the same (`worker.status`). One query per
    chunk of ids, whatever the number of rows."""
    ids = list(delivery_ids)
    if not targets:
        return {}
    keys = [_key(t) for t in targets]
    other = aliased(Delivery)
    there: dict[int, list[set[DeliveryState]]] = {}
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(Delivery.id, other.destination, other.state)
            .join(other, other.sop_instance_uid == Delivery.sop_instance_uid)
            .where(Delivery.id.in_(ids[start : start + _CHUNK]), other.id != Delivery.id)
        )
        for delivery_id, destination, state in rows:
            key = _key(destination)
            states = there.setdefault(delivery_id, [set() for _ in targets])
            for n, target_key in enumerate(keys):
                if key == target_key:
                    states[n].add(state)
    has_it = {DeliveryState.DELIVERED, DeliveryState.PENDING}
    return {
        delivery_id: list(targets)
        for delivery_id, states in sorted(there.items())
        if all(DeliveryState.ABANDONED in s and not s & has_it for s in states)
    }


def _queue_to(
    session: Session, dialect: ModuleType, row: Delivery, target: str, current: datetime
) -> int | None:
    """Queue the object of ``row`` (superseded, `REDIRECTED`) to the configured
    destination ``target``, due ``current`` (the database's clock, read once per
    transaction by `_redirect_batch`), unless a delivery of it there is delivered or
    pending (being sent, or to be), or abandoned (the administrator gave it up there: a
    refusal for good, say): the id of the delivery queued, or None.

    A delivery of it there that failed, or that an earlier redirect superseded (the
    settings named ``target``, then other destinations, now ``target`` again), does not
    count: nothing would ever send it there. That delivery is put back to pending (the
    unique key allows one per object and destination), else a new one is made. One
    superseded otherwise (a later assessment, a withdrawal) is never put back: such a
    supersede takes every unsent row of the object, ``row`` with them, which
    `retry_failed` then leaves as it is. Nor is one the node this database was copied
    from made (not `made_here`), even one its own redirect superseded: its object is
    that node's to send.
    """
    key = _key(target)  # however the settings spelled its host then
    there = [
        (delivery_id, state)
        for delivery_id, destination, state in session.execute(
            select(Delivery.id, Delivery.destination, Delivery.state)
            .where(Delivery.sop_instance_uid == row.sop_instance_uid)
            .order_by(Delivery.id)
        )
        if _key(destination) == key
    ]
    if any(state in _NOT_AGAIN for _, state in there):
        return None
    sent_away = or_(
        Delivery.state == DeliveryState.FAILED,
        (Delivery.state == DeliveryState.SUPERSEDED) & (Delivery.last_error == REDIRECTED),
    )
    for delivery_id, _ in reversed(there):
        # conditional: put back only what is still failed or sent away
        back = session.scalar(
            update(Delivery)
            .where(Delivery.id == delivery_id, sent_away, made_here())
            .values(**_put_back(current))
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
        if back is not None:
            return int(back)
    # the unique key: one made meanwhile by another retry-deliveries stands
    made = session.scalar(
        dialect.insert(Delivery)
        .values(
            instance_id=row.instance_id,
            result_id=row.result_id,
            kind=row.kind,
            destination=target,
            sop_instance_uid=row.sop_instance_uid,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            assessment=row.assessment,
            path=row.path,
            sha256=row.sha256,
            withdraws=row.withdraws,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=current,
            created_at=current,
        )
        .on_conflict_do_nothing(index_elements=["sop_instance_uid", "destination"])
        .returning(Delivery.id)
    )
    return None if made is None else int(made)


def reset_failed(rt: Runtime, delivery_ids: list[int] | None = None) -> list[int]:
    """The ids of the deliveries `retry_failed` queues again, in id order."""
    return retry_failed(rt, delivery_ids).queued


#: Why a delivery that is not failed cannot be abandoned (`abandonable`), by its state.
_NOT_ABANDONABLE = {
    DeliveryState.PENDING: "is pending: it is still being tried, and may yet be delivered",
    DeliveryState.DELIVERED: "was delivered",
    DeliveryState.SUPERSEDED: "was superseded: nothing sends it anyway",
    DeliveryState.ABANDONED: "was abandoned already",
}

#: Why a failed rejection note of ours to a configured destination is not abandoned
#: unless asked for by name (`abandonable`, ``including_notes``): it withdraws an SR or
#: SC the destination has or may have, after the PACS rejected its image or a correction
#: moved it to another patient; given up, that result stays there, perhaps under the
#: wrong patient, with `status` healthy. Where the destination never takes it (no
#: Key Object Selection accepted; a PACS that moved our SR with the study refusing a
#: note naming it in the study it left), `abandon-deliveries --including-notes` gives it
#: up, warning that the administrator must withdraw that result at the PACS by hand. One
#: to a destination no longer configured (a node decommissioned) can never be sent
#: (`retry_failed` puts it back to that destination, where it fails again): it may be
#: abandoned without, `abandon-deliveries` warning that the PACS there may still show
#: the result.
_A_NOTE = (
    "is a rejection note: it withdraws a result the destination may show (its image "
    "rejected by the PACS, or under another patient now), which would stay there: make "
    "the destination take it, then run 'boneage-worker retry-deliveries {id}'; where it "
    "never will, --including-notes abandons it, and the result must be withdrawn at the "
    "PACS by hand"
)


#: Why a failed rejection note of ours to a configured destination is not abandoned
#: even with ``including_notes``: it failed without the destination's word on it (the
#: destination away, rejecting the association, not answering), which sending again
#: may mend, not because the destination does not take it (`_failed_for_good`).
_A_NOTE_TO_RETRY = (
    "is a rejection note that failed without the destination's word on it (away, or "
    "not answering), which sending it again may mend: run 'boneage-worker "
    "retry-deliveries {id}'; --including-notes abandons only one the destination "
    "refused (no presentation context accepted for it, or a failure status)"
)

#: How ``last_error`` begins, as `_send_to` records it, for a failure that sending
#: again does not mend: no presentation context accepted for the object's SOP class,
#: its file gone or damaged.
_FOR_GOOD = (
    "no presentation context accepted for ",
    "the outbox file is missing",
    "the outbox file is damaged",
)
#: What ``last_error`` holds where the destination answered the C-STORE with a failure
#: status: a refusal for good (`refused_for_good`), or one answered on each attempt
#: until they were spent (dcm4chee's 0xA772 for a note naming our SR in the study a
#: merge moved it from): the destination's own word on the object, not its absence.
_ANSWERED = " answered status 0x"


def _failed_for_good(last_error: str | None) -> bool:
    """Whether a failed delivery's ``last_error`` is the destination's refusal of it
    (`_FOR_GOOD`, `_ANSWERED`), not a failure to reach it."""
    error = last_error or ""
    return error.startswith(_FOR_GOOD) or _ANSWERED in error


def _failed_for_good_sql() -> ColumnElement[bool]:
    """`_failed_for_good`, as a condition on the row."""
    return or_(
        *(Delivery.last_error.startswith(start, autoescape=True) for start in _FOR_GOOD),
        Delivery.last_error.contains(_ANSWERED, autoescape=True),
    )


def _notes_unconfigured(
    session: Session, settings: Settings | None, delivery_ids: Sequence[int]
) -> list[int]:
    """Of ``delivery_ids``, the failed rejection notes of ours whose destinations
    ``settings`` no longer configures (`configured`): those `abandon_failed` may give up
    (`_A_NOTE`); none without settings."""
    if settings is None:
        return []
    rows = session.execute(
        select(Delivery.id, Delivery.destination).where(
            Delivery.id.in_(list(delivery_ids)),
            Delivery.state == DeliveryState.FAILED,
            Delivery.kind == ObjectKind.KO,
        )
    )
    return [
        delivery_id for delivery_id, destination in rows if not configured(settings, destination)
    ]


@dataclass(frozen=True)
class Abandonable:
    """A failed delivery that `abandon_failed` may give up, as `abandon-deliveries` lists
    it before it asks: what it is, why it failed, and whether its file is gone
    (``file_gone``, as `files_gone` tells: True where retention removed it, False where it
    is not where it was written, None where it is there)."""

    id: int
    instance_id: int
    kind: str
    destination: str
    last_error: str | None
    file_gone: bool | None


def abandonable(
    database_url: str,
    delivery_ids: Sequence[int],
    settings: Settings,
    *,
    including_notes: bool = False,
) -> tuple[list[Abandonable], dict[int, str]]:
    """Of ``delivery_ids``, the failed SRs and SCs, and the failed rejection notes of ours
    whose destinations ``settings`` no longer configures (``including_notes``: and those
    that failed for good, `_failed_for_good`), in id order, and, for each of the others,
    why it cannot be abandoned (no such delivery, not failed: `_NOT_ABANDONABLE`, or a
    rejection note of ours to a configured destination: `_A_NOTE`, with
    ``including_notes`` one sending again may mend: `_A_NOTE_TO_RETRY`)."""
    ids = sorted(set(delivery_ids))
    failed: list[Abandonable] = []
    refused: dict[int, str] = {}
    with session_scope(database_url) as session:
        rows: dict[int, Delivery] = {}
        for start in range(0, len(ids), _CHUNK):
            rows.update(
                (d.id, d)
                for d in session.scalars(
                    select(Delivery).where(Delivery.id.in_(ids[start : start + _CHUNK]))
                )
            )
        gone = files_gone(session, [i for i, d in rows.items() if d.state is DeliveryState.FAILED])
        for delivery_id in ids:
            row = rows.get(delivery_id)
            if row is None:
                refused[delivery_id] = "does not exist"
            elif row.state is not DeliveryState.FAILED:
                refused[delivery_id] = _NOT_ABANDONABLE[row.state]
            elif (
                row.kind is ObjectKind.KO
                and configured(settings, row.destination)
                # with including_notes, one its destination never takes
                and not (including_notes and _failed_for_good(row.last_error))
            ):
                why = _A_NOTE_TO_RETRY if including_notes else _A_NOTE
                refused[delivery_id] = why.format(id=delivery_id)
            else:
                failed.append(
                    Abandonable(
                        row.id,
                        row.instance_id,
                        row.kind.value,
                        row.destination,
                        row.last_error,
                        gone.get(row.id),
                    )
                )
    return failed, refused


#: Why `retry_failed` sends a delivery given by id that is not failed no more
#: (`not_failed`), by its state.
_NOT_RETRIED = {
    **_NOT_ABANDONABLE,
    DeliveryState.SUPERSEDED: "was superseded: nothing sends it",
    DeliveryState.ABANDONED: (
        "was abandoned: given up by the administrator, it is never sent again"
    ),
}


def not_failed(database_url: str, delivery_ids: Sequence[int]) -> dict[int, str]:
    """Of ``delivery_ids``, those that are not failed deliveries, which `retry_failed`
    leaves as they are, each with why (no such delivery, or its state: `_NOT_RETRIED`),
    for `retry-deliveries` to say."""
    ids = sorted(set(delivery_ids))
    states: dict[int, tuple[DeliveryState, str | None]] = {}
    with session_scope(database_url) as session:
        for start in range(0, len(ids), _CHUNK):
            rows = session.execute(
                select(Delivery.id, Delivery.state, Delivery.last_error).where(
                    Delivery.id.in_(ids[start : start + _CHUNK])
                )
            )
            states.update((delivery_id, (state, error)) for delivery_id, state, error in rows)
    left: dict[int, str] = {}
    for delivery_id in ids:
        state, error = states.get(delivery_id, (None, None))
        if state is None:
            left[delivery_id] = "does not exist"
        elif state is DeliveryState.SUPERSEDED and error == MADE_BEFORE_THE_COPY:
            left[delivery_id] = f"was superseded: {MADE_BEFORE_THE_COPY}"
        elif state is not DeliveryState.FAILED:
            left[delivery_id] = _NOT_RETRIED[state]
    return left


def abandoned_note(by: str, at: datetime, reason: str) -> str:
    """What an abandoned delivery's ``last_error`` begins with: who gave it up, when
    (UTC, to the minute) and why; the error it had failed with follows (`abandon_failed`)."""
    return f"abandoned by {by} on {at.astimezone(UTC):%Y-%m-%d %H:%M} UTC: {reason}"


def abandon_failed(
    database_url: str,
    delivery_ids: Sequence[int],
    *,
    reason: str,
    by: str,
    settings: Settings | None = None,
    including_notes: bool = False,
) -> list[int]:
    """Give up the failed deliveries of ``delivery_ids`` on purpose: `abandoned`, never
    sent again, their ``last_error`` saying who (``by``), when and why (`abandoned_note`),
    then the error they had failed with. The ids abandoned, in id order.

    One conditional UPDATE per chunk of ids: a delivery that is no longer failed (put
    back by a `retry-deliveries` run meanwhile, or superseded by a later assessment or a
    rejection by the PACS) is left as it is, and is not among the ids returned, as is a
    rejection note of ours, which `abandonable` refuses (`_A_NOTE`), unless ``settings``
    no longer configure its destination, or ``including_notes`` and it failed for good
    (`_failed_for_good`: the administrator withdraws its result at the PACS by hand). The
    images' rows are taken first, in id order, as every path that changes an image's
    deliveries takes them (`db.queries.take_instances`).
    """
    ids = sorted(set(delivery_ids))
    # this host's clock: a note for people, to the minute, that no process compares
    note = abandoned_note(by, now(), reason)
    before = literal(" (it had failed: ") + Delivery.last_error + literal(")")
    done: list[int] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        with session_scope(database_url) as session:
            given_up = [Delivery.id.in_(chunk), Delivery.state == DeliveryState.FAILED]
            notes = _notes_unconfigured(session, settings, chunk)
            lasting = [Delivery.kind != ObjectKind.KO, Delivery.id.in_(notes)]
            if including_notes:  # and those their destinations never take
                lasting.append(_failed_for_good_sql())
            given_up.append(or_(*lasting))
            take_instances(session, session.scalars(select(Delivery.instance_id).where(*given_up)))
            done += session.scalars(
                update(Delivery)
                .where(*given_up)
                .values(
                    state=DeliveryState.ABANDONED,
                    last_error=literal(note) + func.coalesce(before, ""),
                    next_attempt_at=None,
                )
                .returning(Delivery.id)
                .execution_options(synchronize_session=False)
            )
    if done:
        # the reason is the administrator's free text: it stays in the rows
        logger.warning(
            "%d failed deliveries abandoned by %s, never to be sent: %s",
            len(done),
            by,
            _named(sorted(done)),
        )
    return sorted(done)
