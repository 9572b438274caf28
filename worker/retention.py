"""Retention: remove received images and their SR/SC files once nothing needs them.

The node keeps a copy of every radiograph it receives (the spool) and of every object
it makes (the outbox). Kept for ever they fill the disk, and they are patient images
that the PACS already holds. An instance's rows and results stay in the database for
good (status, metrics, audit); its files are removed ``BONEAGE_RETENTION_DAYS`` after
it finished, or after a copy of it was last received if that came later (a copy sent
again unchanged, by a backfill say, finishes nothing), and only once every delivery of
it succeeded: a pending or failed delivery keeps everything, so it can still be sent,
retried or looked into. An image the PACS rejected as "Data Retention Policy Expired"
(IHE IOCM) goes at the next run, not ``BONEAGE_RETENTION_DAYS`` after: the hospital
itself no longer keeps it.

Removal is recorded before any file goes (``Instance.files_removed_at``, set by a
conditional update that a concurrent ``reprocess`` cannot interleave with), and then
the files are unlinked. A crash in between leaves files that the next run removes (it
sweeps the instances marked in the last day). A file written after the mark (the same
instance received again) is never removed: the listener clears the mark when it
records a new copy. Nor is a received file written after the reception its row
records, in the last hour: the listener puts a copy in the spool before it records
it, and a run in between would otherwise take a new copy, perhaps corrected, that the
row is about to say is there and still to be compared.

The rows' times are the database server's clock (``db.queries.database_now``), and so
is all a run compares with them: the days it counts, the mark it writes (which a
delivery's ``created_at`` is compared with) and its sweep's window. A file's time is
the clock of the host that wrote it, taken to be the one retention runs on (the
listener's, in whose process it runs every hour): the mark and the reception a file is
compared with are taken onto this host's clock by its offset from the database's,
measured at the run's start (:func:`_started`).

An object of ours made after the mark (a rejection note for an image the PACS rejected
once our copy of it was gone) moves the mark: its file goes as the instance's did,
``BONEAGE_RETENTION_DAYS`` after the instance finished (its rejection) and once every
delivery of it succeeded. Until then no run takes it, its sweep neither, whatever its
file's time says (a worker's clock a second behind dates a note made just after the
mark before it): an object's file goes only where every delivery naming it was made by
the mark, by the database's clock, and is delivered, superseded or abandoned.

A row's file is removed only from the node's own spool and outbox (``spool_dir``,
``outbox_dir``; the folder holding it resolved, ``..`` and symlinks followed): a
database copied from another node (a validation node set up from production's: ``db
new-identity``) or a data directory moved has rows naming files elsewhere, another
node's or where this node's once were, which are kept and counted, once a run at
WARNING. Given no spool or no outbox, retention removes no row's file of that kind.

``reprocess`` leaves instances whose files were removed alone and says so: send them
again from the PACS, or ``backfill`` them.

An SR or SC made with nothing to send it to (no destination configured, or a
``reprocess`` not asked to send) has no delivery row to find it by: it goes when it is
``BONEAGE_RETENTION_DAYS`` old, by its file's time, since nothing will ever send it.
A row names an outbox file by its name there, whatever folder the row's path gives (the
outbox mounted elsewhere when it was written): such a file, whose failed delivery waits
for the outbox to be put back, is not taken for one with nothing to send it to.

A received image in the spool that no instance row names is one whose row the listener
could not commit (the database was down: the PACS was answered 0xA700, and usually
sends it again, which makes its row), or one whose row was lost: a database restored
from a backup has no row for what came after the backup, images the PACS was told
Success for, perhaps never assessed, of which these files are the only copies from
which results could be rebuilt. Nothing else would ever remove them, and no row shows
them to ``status``, which counts them by their markers (:func:`unrecorded_images`). Such
a file is dated from when retention first found it unrecorded, never by its own time (a
restore leaves files as old as the backup): retention then
makes an empty marker under its name in ``spool/.unrecorded`` (``ab/<32 hex>.dcm``),
whose time is that first sighting, and says how many at WARNING. The file goes, with
its marker, once the marker is ``BONEAGE_RETENTION_DAYS`` old, if the file is as old
too (a copy received since is new) and no row names it still; a marker whose file is
gone or now has a row goes. A dry run makes no marker: it says how many it would.
Neither is ever younger than the recording window. Markers are made only by the
spool's owner, the listener's user: a run as another user (root) makes none, and says
so once, with how many: it would make ``spool/.unrecorded`` its own, and the
listener's hourly runs could then neither read nor make markers (the images stay
undated, and kept, until a run as the owner dates them). Markers that cannot be made
are said once a run, with how many and why. The listener holds the spool's
recording lock from before it renames a copy into place until its row is committed
(dicom_io.scp), and these files are removed only under that lock taken exclusively,
each looked up again then: a copy whose row is being committed is never taken,
whatever its time says. Where no lock can be had (no listener has made it yet, the
file system takes none, the file is not the listener's), none is removed. On an NFS
spool Linux emulates ``flock`` with ``fcntl`` locks, and the exclusive lock retention
asks for on its read-only descriptor fails (``EBADF``; ``ENOLCK`` where the server
takes no locks): such images are then always kept, which retention says once a
process. (Its descriptor stays read-only: opened to write, in the listener's own
process, it would be granted that lock over the C-STOREs' shared one, and closing it
would let theirs go.) Only the listener's own names (``spool/ab/<32 hex>.dcm``) are
looked at, never ``spool/.incoming``, where each listener's partial files are its own
to sweep.

The received image of an instance marked removed goes under the same lock, taken once
a batch, and is looked at again then, with its row (:class:`_RecordedImages`): the
listener renames a new copy of the instance into the same place, and before, one
renamed in between retention's look and its unlink by name was unlinked, perhaps a
corrected image the PACS was told Success for. Where listeners hold the lock past
:data:`_LOCK_TRIES_SECONDS`, such images are left to the next run's sweep, and the
run's later batches leave theirs without waiting again (:class:`_SpoolLock`). Where no
lock is possible at all (no listener has made it yet, NFS), they go without it, as
before, since kept for ever they would fill the disk: a copy renamed in between the
look and the unlink is then lost, the window that remains.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.engine import session_scope
from db.queries import database_now, rejects
from db.schema import FINISHED, Delivery, DeliveryState, Instance, InstanceState, Rejection
from db.schema import utcnow as now
from dicom_io.scp import recording_lock

logger = logging.getLogger(__name__)

__all__ = ["RetentionReport", "UnrecordedImages", "remove_expired_files", "unrecorded_images"]

#: Instances marked this recently are swept again, for files a crash left behind.
_SWEEP_WINDOW = timedelta(days=1)
#: The listener renames a copy into the spool and then records it (dicom_io.scp), in
#: seconds (a store past 10 s is logged as slow). A received file written after the
#: reception its row records, and this recently, may be a copy it is recording now;
#: one older is a copy whose record failed (the PACS was answered 0xA700, and sends it
#: again), which retention may take.
_RECORDING = timedelta(hours=1)
_BATCH = 200
#: How many times a run reads this host's clock and the database's together, keeping
#: the reading that took the least time (:func:`_started`).
_CLOCK_READINGS = 5
#: How long a run tries for the spool's recording lock, while listeners hold it (they
#: take it, shared, for each C-STORE), before it leaves the received files no row names,
#: or a batch of those of instances marked removed, to the next.
_LOCK_TRIES_SECONDS = 30.0
#: The listener's names for received files (dicom_io.scp.spool_path): a folder of two
#: hexadecimal digits, a file of 32 more.
_SPOOL_FOLDER = re.compile(r"[0-9a-f]{2}")
_SPOOL_FILE = re.compile(r"[0-9a-f]{32}\.dcm")
#: Where retention dates the received images no row names, in the spool: a marker for
#: each, under the image's name there (:func:`_unrecorded_images`). Not a name of the
#: listener's, which sweeps only ``.incoming``.
UNRECORDED_DIR = ".unrecorded"
#: Why ``flock`` refuses where the spool's file system takes no such locks: on NFS,
#: Linux emulates them with ``fcntl`` locks, and an exclusive one fails ``EBADF`` on the
#: descriptor retention opens read-only (it must: opened to write, in the listener's own
#: process, its lock would be granted over its C-STOREs' and their lock let go when it
#: closes), or the server takes none (``ENOLCK``).
_NO_LOCKS_ERRNOS = frozenset({errno.EBADF, errno.ENOLCK})
NO_LOCKS = (
    "the spool's file system does not take the locks retention needs (NFS?): received "
    "images that no instance records are kept"
)
#: Whether this process has said :data:`NO_LOCKS` (at WARNING, once: it holds every run).
_no_locks_said = False


@dataclass(frozen=True)
class RetentionReport:
    """What one run removed (or, in a dry run, would remove)."""

    instances: int = 0
    files: int = 0
    bytes: int = 0
    dry_run: bool = False
    #: Of ``files``, the SR and SC files that no delivery named (:func:`_unsent_outputs`).
    unsent_outputs: int = 0
    #: Of ``files``, the received images that no instance row named
    #: (:func:`_unrecorded_images`).
    unrecorded_images: int = 0
    #: Received images that no instance row names, found so for the first time (in a
    #: dry run: that would be): they go ``older_than`` from now unless a row names them.
    unrecorded_first_seen: int = 0
    #: Received images that no instance row names, not yet dated, that this run did not
    #: date (would not, in a dry run): it is not the spool's owner, or the markers could
    #: not be made. They are kept until a run dates them.
    unrecorded_unmarked: int = 0
    #: Files there that the rows of the instances this run marked (in a dry run: would
    #: mark) name outside the node's spool and outbox, kept (:func:`_within`); not in
    #: ``files``.
    kept_elsewhere: int = 0
    #: Instances marked removed whose received image or objects listeners kept this run
    #: from (they held the spool's recording lock, :class:`_RecordedImages`): the next
    #: runs' sweeps take them, within a day of the mark; not in ``files``.
    left: int = 0

    def __add__(self, other: RetentionReport) -> RetentionReport:
        return RetentionReport(
            self.instances + other.instances,
            self.files + other.files,
            self.bytes + other.bytes,
            self.dry_run,
            self.unsent_outputs + other.unsent_outputs,
            self.unrecorded_images + other.unrecorded_images,
            self.unrecorded_first_seen + other.unrecorded_first_seen,
            self.unrecorded_unmarked + other.unrecorded_unmarked,
            self.kept_elsewhere + other.kept_elsewhere,
            self.left + other.left,
        )


#: The IOCM title of a rejection note a PACS stores when its own retention policy
#: removes a study: our copy of an image so rejected need not wait out ours.
EXPIRED_AT_THE_PACS = "113039"  # Data Retention Policy Expired


def _expired(cutoff: datetime) -> list[ColumnElement[bool]]:
    """Conditions of an instance whose files may go: not gone yet, or an object of ours
    made since they went (a rejection note of an image the PACS rejected after its
    removal); finished, and last received, long enough ago (or rejected by the PACS as
    expired under its own retention policy: the hospital no longer keeps the image); all
    sent (or superseded: a later assessment replaced them, and they are never sent; or
    abandoned by the administrator, never sent either); and
    not received again since (a new copy, perhaps corrected, that the worker has yet to
    compare with what it assessed: removing it would lose the correction)."""
    expired_at_the_pacs = (
        select(Rejection.id)
        .where(
            Rejection.sop_instance_uid == Instance.sop_instance_uid,
            Rejection.code == EXPIRED_AT_THE_PACS,
            # in a study the image has been in, or its series: not another image under its UID
            rejects(Instance.id, Instance.study_instance_uid, Instance.series_instance_uid),
        )
        .exists()
    )
    unsent = (
        select(Delivery.id)
        .where(
            Delivery.instance_id == Instance.id,
            # abandoned: given up on purpose by the administrator, never to be sent
            Delivery.state.not_in(
                [DeliveryState.DELIVERED, DeliveryState.SUPERSEDED, DeliveryState.ABANDONED]
            ),
        )
        .exists()
    )
    made_since_removal = (
        select(Delivery.id)
        .where(
            Delivery.instance_id == Instance.id,
            Delivery.created_at > Instance.files_removed_at,
        )
        .exists()
    )
    return [
        Instance.state.in_(FINISHED),
        or_(Instance.files_removed_at.is_(None), made_since_removal),
        or_(
            and_(
                Instance.finished_at < cutoff,
                # a copy received again, unchanged, leaves finished_at as it was
                or_(
                    Instance.last_received_again_at.is_(None),
                    Instance.last_received_again_at < cutoff,
                ),
            ),
            (Instance.state == InstanceState.REJECTED) & expired_at_the_pacs,
        ),
        Instance.received_again_at.is_(None),
        ~unsent,
    ]


@dataclass(frozen=True)
class _Start:
    """When a run started, by the database's clock and by this host's, read together.

    The rows' times are the database's (``db.queries.database_now``): the cutoff, the
    removal mark and the sweep's window, which are compared with them, are taken from
    ``database``. The files' times are a host's: they are compared with ``host``, and a
    row's time that a file is compared with is taken onto it by :meth:`on_host`.
    """

    database: datetime
    host: datetime

    def on_host(self, at: datetime) -> datetime:
        """``at``, a time of the database's clock, on this host's clock."""
        return at + (self.host - self.database)


def _started(database_url: str) -> _Start:
    """The clocks at a run's start (:class:`_Start`).

    This host's clock is read just before the database's: the host's reading is the
    earlier by the query's way to the server, so the offset measured (host - database)
    is at most the true one, and a row's time taken onto this host's clock falls a
    little earlier than it should, never later. Only a file written at or before a time
    so taken is removed: an error keeps a file near it (the copy a row records, written
    just before its reception: kept, and recoverable), never takes one written just
    after it (a new copy: lost). The error is kept small all the same, or such copies
    were kept for ever: the clocks are read :data:`_CLOCK_READINGS` times, in a
    transaction already begun, and the reading that took the least time is kept (one
    where this process waited for a processor between the two is not).
    """
    with session_scope(database_url) as session:
        session.connection()  # begun, so that nothing but the query is timed
        readings: list[tuple[timedelta, _Start]] = []
        for _ in range(_CLOCK_READINGS):
            host = now()
            database = database_now(session)
            readings.append((now() - host, _Start(database, host)))
        return min(readings, key=lambda reading: reading[0])[1]


@dataclass(frozen=True)
class _Dirs:
    """The node's spool and outbox, the only places retention removes a row's file from,
    resolved once a run; None where not given, or not resolvable: then no file of that
    kind is removed (:func:`_within`)."""

    spool: Path | None
    outbox: Path | None

    @classmethod
    def of(cls, spool_dir: Path | None, outbox_dir: Path | None) -> _Dirs:
        def resolved(directory: Path | None) -> Path | None:
            try:
                return None if directory is None else directory.resolve()
            except (OSError, RuntimeError):  # RuntimeError: a symlink loop
                return None

        return cls(resolved(spool_dir), resolved(outbox_dir))


def _named_dir(given: Path | None, resolved: Path | None) -> str:
    """A directory of the node's as a log line gives it."""
    if given is None:
        return "none given"
    return str(given) if resolved is not None else f"{given}, which cannot be resolved"


def _within(path: Path, directory: Path | None) -> bool:
    """Whether ``path``, a row's, names an entry of ``directory`` (resolved) or of a
    folder below it.

    The folder holding it is resolved (``..`` and symlinked folders followed to where
    they lead), never the entry itself: unlinking a symlink removes the link, which is
    in the directory, never what it points to. A row's path anywhere else is another
    node's file (a database copied from it: ``db new-identity``) or one where this
    node's data directory once was: never this node's to remove.
    """
    if directory is None or path.name in ("", ".", ".."):
        return False
    try:
        folder = path.parent.resolve()
    except (OSError, RuntimeError):
        return False
    return folder.is_relative_to(directory)


def _kept(path: Path, directory: Path | None, name: str) -> int:
    """1 where a file that a row names at ``path``, outside ``directory`` (the node's
    spool or outbox), is there to be kept, at that path or under ``directory`` by its
    ``name`` there (the data directory moved, the rows naming its old place); else 0."""
    here = directory is not None and os.path.exists(directory / name)
    return int(here or os.path.exists(path))


#: The states of a delivery that has done with its object's file: sent, replaced by a
#: later assessment's (never sent), or given up by the administrator (never sent).
_OVER = frozenset({DeliveryState.DELIVERED, DeliveryState.SUPERSEDED, DeliveryState.ABANDONED})


@dataclass(frozen=True)
class _Files:
    """One instance's files: the received image, and the objects made of it that may go."""

    spool: Path
    #: when the copy its row records was received (the last copy, if one came again)
    received: datetime
    #: in the outbox, and every delivery of each done with it by the mark (:func:`_files_of`)
    outputs: list[Path]
    #: whether ``spool`` is in the node's spool (:func:`_within`): kept where it is not
    spool_ours: bool = True
    #: files there that the instance's rows name outside the node's spool and outbox: kept
    elsewhere: int = 0

    def paths(self) -> list[Path]:
        return [self.spool, *self.outputs] if self.spool_ours else list(self.outputs)


def _outbox_name(path: str) -> str:
    """An object's name in the outbox (``<12 hex>-sr.dcm``; worker.pipeline writes no
    folders there): what names it whichever folder the outbox is mounted at (a row's
    path is the one its worker saw)."""
    return Path(path).name


def _files_of(session: Session, marks: dict[int, datetime], dirs: _Dirs) -> dict[int, _Files]:
    """The files of each instance in ``marks`` that may go, the instance marked removed
    at its time (in a dry run, to be): its received image where the node's spool holds
    it, and the objects made of it that the node's outbox holds and that no delivery
    needs.

    An object's file may go only where every delivery row naming it was made at or
    before the mark and is over with it (:data:`_OVER`). A row made after the mark is
    an object of ours made since (a rejection note for an image the PACS rejected just
    after the mark): its file goes once the mark moves past it (:func:`_expired`), and
    not before, even where its time, a worker's clock, falls before the mark. The rows
    naming a file are found by its name: an SR sent to two destinations is one file
    under two rows, and a row written where the outbox was mounted elsewhere spells its
    path otherwise. They are all the instance's: a name is made of its object's UID.
    """
    instances = session.execute(
        select(
            Instance.id, Instance.spool_path, Instance.received_at, Instance.last_received_again_at
        ).where(Instance.id.in_(list(marks)))
    ).all()
    rows = session.execute(
        select(Delivery.instance_id, Delivery.path, Delivery.state, Delivery.created_at).where(
            Delivery.instance_id.in_(list(marks))
        )
    ).all()
    needed: set[tuple[int, str]] = set()  # (instance, name) of a file a delivery needs
    named: dict[int, list[Path]] = {}
    for instance_id, path, state, created_at in rows:
        if state not in _OVER or created_at > marks[instance_id]:
            needed.add((instance_id, _outbox_name(path)))
        paths = named.setdefault(instance_id, [])
        if Path(path) not in paths:  # SR and SC go to each destination
            paths.append(Path(path))
    files: dict[int, _Files] = {}
    for instance_id, spool, first, again in instances:
        spool_ours = _within(Path(spool), dirs.spool)
        elsewhere = 0 if spool_ours else _kept(Path(spool), dirs.spool, _spool_name(spool))
        outputs: list[Path] = []
        for output in named.get(instance_id, []):
            if not _within(output, dirs.outbox):
                elsewhere += _kept(output, dirs.outbox, output.name)
            elif (instance_id, output.name) not in needed:
                outputs.append(output)
        files[instance_id] = _Files(Path(spool), again or first, outputs, spool_ours, elsewhere)
    return files


def _remove_files(
    instance_id: int,
    files: _Files,
    marked_at: datetime,
    started: _Start,
    images: _RecordedImages,
) -> tuple[int, int]:
    """Unlink an instance's files marked removed at ``marked_at``; (files, bytes) removed.

    None written after the mark: a copy received again since, or an object made of it.
    Nor a received file written after the reception its row records, unless that was
    more than :data:`_RECORDING` before the run ``started``: a copy the listener has put
    in place and may be recording now (it commits the row once the file is there, maybe
    after this run's mark), whose row will say it is there to be compared.

    The mark and the reception are the database's clock, as is the run's start. The
    files' times are the clock of the host that wrote them, assumed to be this host's,
    and the times they are compared with are taken onto it (:meth:`_Start.on_host`):
    retention runs hourly in the listener's own process, which writes the spool, so
    the received file's time is this host's clock exactly where a new copy is at
    stake (compared with the database's times as they are, a copy written on a host
    minutes behind the database after the reception its row records was dated before
    it, and removed). The objects are the workers', most often on the listener's host
    too. A run on another host (``boneage-worker retention``) or a worker elsewhere is
    off by the difference between the two hosts' clocks, as every run was before: left
    to NTP.

    Only the objects in ``files.outputs`` go (:func:`_files_of`), and the received
    image only where it is in the node's spool (``files.spool_ours``), under the spool's
    recording lock that ``images``, the batch the instance is in, takes.
    """
    count = size = 0
    if files.spool_ours:  # not another node's file, nor one where the spool once was
        recorded_copy = min(marked_at, max(files.received, started.database - _RECORDING))
        count, size = images.remove(
            instance_id, files.spool, marked_at, started.on_host(recorded_copy)
        )
    # The objects too only while the row keeps the mark, read under the lock: a copy
    # recorded since is compared with the assessment they hold, and its withdrawals are
    # made from them (the patient and study they were filed under), which would
    # otherwise be left to be made by hand
    written_by = started.on_host(marked_at)
    due = [path for path in files.outputs if _may_be_removed(path, written_by)]
    if not due or not images.still_marked(instance_id, marked_at):
        return count, size  # none there (a sweep of files gone already takes no lock)
    outputs, outputs_size = _remove(due, written_by)
    return count + outputs, size + outputs_size


def _remove(paths: Iterable[Path], written_by: datetime) -> tuple[int, int]:
    """Unlink ``paths`` not written after ``written_by``; (files, bytes) removed."""
    count = size = 0
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("retention: cannot inspect a file (%s)", exc.strerror)
            continue
        if stat.st_mtime > written_by.timestamp():
            continue  # a new copy, not the file retention chose
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("retention: cannot remove a file (%s)", exc.strerror)
            continue
        count, size = count + 1, size + stat.st_size
    return count, size


def _sizes(paths: Iterable[Path]) -> tuple[int, int]:
    count = size = 0
    for path in paths:
        try:
            size += path.stat().st_size
            count += 1
        except OSError:
            continue
    return count, size


def remove_expired_files(
    database_url: str,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    outbox_dir: Path | None = None,
    spool_dir: Path | None = None,
    all_marked: bool = False,
) -> RetentionReport:
    """Remove the files of instances finished more than ``older_than`` ago, all sent.

    Parameters
    ----------
    database_url : str
        The node's database.
    older_than : datetime.timedelta
        How long after an instance finished its files are kept
        (``BONEAGE_RETENTION_DAYS``).
    dry_run : bool
        Report what would be removed; change nothing.
    outbox_dir : pathlib.Path, optional
        The node's outbox: its SR and SC files that no delivery names go when they are
        ``older_than`` old (:func:`_unsent_outputs`). A delivery's file goes only from
        here: without it, none goes (the instances are marked all the same).
    spool_dir : pathlib.Path, optional
        The node's spool: its received images that no instance row names go
        ``older_than`` after retention first found them so (:func:`_unrecorded_images`).
        An instance's received image goes only from here: without it, none goes.
    all_marked : bool
        Look again at the files of every instance marked removed before, not only of
        those marked in the last day (:func:`_sweep`): once a moved data directory's old
        place is linked to the new, the files its rows name there go.

    A row's file elsewhere (a database copied from another node, a data directory
    moved) is kept, and counted (``RetentionReport.kept_elsewhere``), and said at
    WARNING once a run.

    Returns
    -------
    RetentionReport
        Instances, files and bytes removed (or that would be).
    """
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    started = _started(database_url)
    # Compared with the rows' times (finished_at, last_received_again_at): the database's
    # clock, as they are.
    cutoff = started.database - older_than
    dirs = _Dirs.of(spool_dir, outbox_dir)
    lock = _SpoolLock()  # once listeners held it past the tries, for the rest of the run
    report = RetentionReport(dry_run=dry_run)
    last_id = 0
    while True:
        with session_scope(database_url) as session:
            ids = list(
                session.scalars(
                    select(Instance.id)
                    .where(Instance.id > last_id, *_expired(cutoff))
                    .order_by(Instance.id)
                    .limit(_BATCH)
                )
            )
            if not ids:
                break
            last_id = ids[-1]
            if not dry_run:
                # Conditional: an instance reprocessed since the select is no longer
                # finished, and keeps its files. The rows are taken in id order, and
                # those another transaction holds are left for the next run
                # (PostgreSQL; SQLite serialises writers): a rejection note or a
                # redirect holds several images' rows, taken in id order
                # (db.queries.take_instances), and an UPDATE taking rows in the order its
                # plan meets them deadlocked with it. A row held is being withdrawn,
                # redirected or sent now, perhaps given a delivery that keeps its files.
                # The lock is the one the UPDATE takes (NO KEY UPDATE): a delivery
                # inserted beside it waits on it no more than before.
                free = (
                    select(Instance.id)
                    .where(Instance.id.in_(ids), *_expired(cutoff))
                    .order_by(Instance.id)
                    .with_for_update(skip_locked=True, key_share=True)
                )
                ids = sorted(
                    session.scalars(
                        update(Instance)
                        .where(Instance.id.in_(free.scalar_subquery()), *_expired(cutoff))
                        # the database's clock: compared with a delivery's created_at
                        # (made_since_removal, worker.delivery._file_gone) and by
                        # the next runs' sweeps, on whatever host they run
                        .values(files_removed_at=started.database)
                        .returning(Instance.id),
                        execution_options={"synchronize_session": False},
                    )
                )
            files = _files_of(session, dict.fromkeys(ids, started.database), dirs)
        left = 0
        if dry_run:
            count, size = _sizes(path for of in files.values() for path in of.paths())
        else:
            count = size = 0
            # the received images under one take of the spool's recording lock
            with _RecordedImages(database_url, dirs.spool, files, lock) as images:
                for instance_id, of in files.items():
                    removed, removed_bytes = _remove_files(
                        instance_id, of, started.database, started, images
                    )
                    count, size = count + removed, size + removed_bytes
            left = images.left
        elsewhere = sum(of.elsewhere for of in files.values())
        report = report + RetentionReport(
            len(ids), count, size, dry_run, kept_elsewhere=elsewhere, left=left
        )
    if not dry_run:
        window = None if all_marked else _SWEEP_WINDOW
        report = report + _sweep(database_url, started, dirs, lock, window)
    if report.kept_elsewhere:  # one line a run: no path, which may be any node's
        logger.warning(
            "retention%s: %d file(s) that the rows of the instances marked name outside "
            "this node's spool (%s) and outbox (%s) %s: another node's files (a database "
            "copied from it), or this node's where its data directory once was (moved: "
            "link the old place to the new, and run `boneage-worker retention "
            "--all-marked`)",
            " (dry run)" if dry_run else "",
            report.kept_elsewhere,
            _named_dir(spool_dir, dirs.spool),
            _named_dir(outbox_dir, dirs.outbox),
            "would be kept" if dry_run else "kept",
        )
    # The files no row names are judged by their own times and their markers', never by
    # a row's: this host's clock throughout. The markers are this host's; the images'
    # and objects' times, the listener's and the workers', are off it by as much as the
    # hosts' clocks differ, nothing beside the days they are kept, and a copy being
    # recorded is kept by the recording lock, not by the recording window alone.
    host_cutoff = started.host - older_than
    if outbox_dir is not None:
        report = report + _unsent_outputs(database_url, outbox_dir, host_cutoff, dry_run=dry_run)
    if spool_dir is not None:
        report = report + _unrecorded_images(
            database_url, spool_dir, host_cutoff, started.host - _RECORDING, dry_run=dry_run
        )
    if report.instances or report.files:
        logger.info(
            "retention%s: %d instance(s), %d file(s), %.1f MB %s%s",
            " (dry run)" if dry_run else "",
            report.instances,
            report.files,
            report.bytes / 1e6,
            "would be removed" if dry_run else "removed",
            f"; {report.unrecorded_images} of them received image(s) that no instance recorded"
            if report.unrecorded_images
            else "",
        )
    return report


def _sweep(
    database_url: str,
    started: _Start,
    dirs: _Dirs,
    lock: _SpoolLock,
    window: timedelta | None = _SWEEP_WINDOW,
) -> RetentionReport:
    """Files of recently marked instances that a crash left behind, or received images
    left while listeners held the recording lock (:class:`_RecordedImages`), marked
    before this run and at most ``window`` before it (None: ever), by the database's
    clock, as the marks are: those :func:`_files_of` lets go.
    The files their rows name elsewhere were counted by the run that marked them; with
    ``window`` None (every mark, after a link was made) they are counted again.

    In batches of :data:`_BATCH`, read a batch at a time by id: a first clean-up marks
    as many instances in a day as the node ever kept, more than PostgreSQL binds in one
    statement (65,535), and one list of them all failed every run's sweep for a day,
    and what comes after it; every mark ever (``window`` None) is millions of rows.
    """
    since = [] if window is None else [Instance.files_removed_at >= started.database - window]
    report = RetentionReport()
    last_id = 0
    while True:
        with session_scope(database_url) as session:
            rows = session.execute(
                select(Instance.id, Instance.files_removed_at)
                .where(
                    Instance.id > last_id,
                    Instance.files_removed_at.is_not(None),
                    *since,
                    Instance.files_removed_at < started.database,
                )
                .order_by(Instance.id)
                .limit(_BATCH)
            ).all()
            if not rows:
                break
            last_id = rows[-1][0]
            marks = {instance_id: mark for instance_id, mark in rows if mark is not None}
            files = _files_of(session, marks, dirs)
        count = size = 0
        # the received images under one take of the spool's recording lock
        with _RecordedImages(database_url, dirs.spool, files, lock) as images:
            for instance_id, of in files.items():
                removed, removed_bytes = _remove_files(
                    instance_id, of, marks[instance_id], started, images
                )
                count, size = count + removed, size + removed_bytes
        # the files kept elsewhere were counted by the run that marked them; looking at
        # every mark (after a link was made for a moved data directory), they say
        # whether the link took
        elsewhere = sum(of.elsewhere for of in files.values()) if window is None else 0
        report = report + RetentionReport(
            0, count, size, left=images.left, kept_elsewhere=elsewhere
        )
    return report


def _unsent_outputs(
    database_url: str, outbox: Path, cutoff: datetime, *, dry_run: bool
) -> RetentionReport:
    """SR and SC files in ``outbox`` written before ``cutoff`` (this host's clock, as
    their times are) that no delivery names.

    They were made with nothing to send them to: no destination was configured, or a
    ``reprocess`` was not asked to send. Nothing will ever send them, and without a
    delivery row the instances' removal cannot find them. A file being published now
    is new, and so never one of them (its rows commit just after it is renamed in).

    A delivery names a file by its name in the outbox (:func:`_outbox_name`), as the
    spool's rows do theirs (:func:`_spool_name`): a row written where the outbox was
    mounted elsewhere keeps its file, which a failed delivery of it is waiting for
    (``worker.delivery.PUT_BACK``).
    """
    old: list[Path] = []
    try:
        entries = list(outbox.glob("*.dcm"))  # staged files end in .tmp
    except OSError:
        entries = []
    for path in entries:
        try:
            if path.stat().st_mtime < cutoff.timestamp():
                old.append(path)
        except OSError:
            continue
    if not old:
        return RetentionReport(dry_run=dry_run)
    named = _names_rows_give(database_url, Delivery.path, _outbox_name, {p.name for p in old})
    unsent = [p for p in old if p.name not in named]
    count, size = _sizes(unsent) if dry_run else _remove(unsent, cutoff)
    return RetentionReport(0, count, size, dry_run, unsent_outputs=count)


def _received_files(spool: Path) -> Iterator[Path]:
    """The files in ``spool`` under the listener's names for received images; never
    those in ``spool/.incoming`` (nor the spool's lock files)."""
    try:
        folders = [f for f in spool.iterdir() if _SPOOL_FOLDER.fullmatch(f.name)]
    except OSError:
        return
    for folder in folders:
        try:
            names = [p for p in folder.iterdir() if _SPOOL_FILE.fullmatch(p.name)]
        except OSError:  # not a folder, or removed meanwhile
            continue
        yield from names


def _names_rows_give(
    database_url: str,
    column: InstrumentedAttribute[str],
    name_of: Callable[[str], str],
    wanted: Collection[str],
) -> set[str]:
    """Of the names ``wanted``, those a row's path in ``column`` gives (``name_of``): the
    files a row names whichever folder it was written under. Every row is read, streamed,
    in one pass: a row's path cannot be looked up by its name alone."""
    with session_scope(database_url) as session:
        paths = session.scalars(select(column).execution_options(yield_per=5000))
        return {name for name in map(name_of, paths) if name in wanted}


def _spool_name(path: str) -> str:
    """``ab/<32 hex>.dcm``: what names a received file whichever folder the spool is
    mounted at (a row's path is the one its listener saw)."""
    return "/".join(path.rsplit("/", 2)[-2:])


def _unrecorded_images(
    database_url: str, spool: Path, cutoff: datetime, recording: datetime, *, dry_run: bool
) -> RetentionReport:
    """Received images in ``spool`` that no instance row names (see the module
    docstring): copies whose row the listener could not commit, or whose row a restored
    database lost.

    One written before ``recording`` (the recording window) is marked when first found
    so: an empty file under its name in :data:`UNRECORDED_DIR`, whose time is then. It
    goes once both its marker and it were written before ``cutoff`` and ``recording``,
    never by its own time alone: a database restored from a backup leaves files as old
    as the backup, which are kept as long from when retention first saw them. A marker
    whose image is gone, or now named by a row, goes.

    Each row's file is matched by its name in the spool as well as by its path, so that
    a spool mounted elsewhere than where its rows were written keeps every file. The
    files are removed under the recording lock (:func:`dicom_io.scp.recording_lock`),
    taken exclusively, and each is looked up again then: no listener is then between
    renaming a copy into place and committing its row, so a file still unnamed is no
    copy being recorded, and one renamed in since is too new to be taken.
    """
    due_by = min(cutoff, recording)
    written_by = due_by.timestamp()
    present: set[str] = set()
    old: dict[str, tuple[Path, float]] = {}
    for path in _received_files(spool):
        name = _spool_name(str(path))
        present.add(name)
        try:
            written = path.stat().st_mtime
        except OSError:
            continue
        if written < recording.timestamp():
            old[name] = (path, written)
    markers_dir = spool / UNRECORDED_DIR
    markers = {_spool_name(str(marker)): marker for marker in _received_files(markers_dir)}
    if not old and not markers:
        return RetentionReport(dry_run=dry_run)
    named = _names_rows_give(
        database_url, Instance.spool_path, _spool_name, old.keys() | markers.keys()
    )
    stale = [marker for name, marker in markers.items() if name in named or name not in present]
    first_seen = [name for name in old if name not in named and name not in markers]
    due: list[tuple[Path, Path]] = []
    for name, (path, written) in old.items():
        if name in named or name not in markers:
            continue
        try:
            marked = markers[name].stat().st_mtime
        except OSError:
            continue
        if marked < written_by and written < written_by:
            due.append((path, markers[name]))
    # Only the spool's owner (the listener's user) makes markers: made by root, say,
    # ``.unrecorded`` and its folders (0700) were root's, and the listener's hourly run
    # could then neither see the markers nor make any: none was ever dated or removed.
    owner = _owner(spool)
    marks = owner == os.geteuid()
    if dry_run:
        if first_seen and marks:
            logger.info(
                "retention (dry run): %d received image(s) that no instance records would "
                "be first seen now: removed BONEAGE_RETENTION_DAYS after that unless a row "
                "names them",
                len(first_seen),
            )
        elif first_seen:
            logger.info(
                "retention (dry run): would not be marked, and so kept: %d received "
                "image(s) that no instance records: run retention as the spool's owner "
                "(uid %s)",
                len(first_seen),
                owner,
            )
        count, size = _sizes(path for path, _ in due)
        return RetentionReport(
            0,
            count,
            size,
            True,
            unrecorded_images=count,
            unrecorded_first_seen=len(first_seen) if marks else 0,
            unrecorded_unmarked=0 if marks else len(first_seen),
        )
    for marker in stale:
        with contextlib.suppress(OSError):
            marker.unlink(missing_ok=True)
    marked_now = unmarked = 0
    if first_seen and not marks:
        unmarked = len(first_seen)
        logger.warning(
            "retention: not marked, and so kept: %d received image(s) that no instance "
            "records (markers are the spool owner's to make): run retention as the spool's "
            "owner (uid %s)",
            unmarked,
            owner,
        )
    elif first_seen:
        marked_now, unmarked, cause = _mark(markers_dir, first_seen)
        if cause is not None:  # one line a run, not one a file: the cause is the same
            logger.warning(
                "retention: %d received image(s) that no instance records could not be "
                "marked (%s), and so are kept%s",
                unmarked,
                cause.strerror or type(cause).__name__,
                f": {UNRECORDED_DIR} in the spool and its folders must be the spool "
                f"owner's (uid {owner})"
                if isinstance(cause, PermissionError)
                else "",
            )
    if marked_now:
        logger.warning(
            "retention: %d received image(s) that no instance records, first seen now: "
            "removed BONEAGE_RETENTION_DAYS from now unless a row names them",
            marked_now,
        )
    count = size = 0
    for start in range(0, len(due), _BATCH):
        removed = _remove_unrecorded(database_url, spool, due[start : start + _BATCH], due_by)
        if isinstance(removed, str):
            _left(len(due) - start, removed)
            break
        count, size = count + removed[0], size + removed[1]
    return RetentionReport(
        0,
        count,
        size,
        unrecorded_images=count,
        unrecorded_first_seen=marked_now,
        unrecorded_unmarked=unmarked,
    )


@dataclass(frozen=True)
class UnrecordedImages:
    """The received images in the spool that no instance row names and that retention
    has dated (a marker in :data:`UNRECORDED_DIR`): what ``status`` says of them."""

    images: int = 0
    bytes: int = 0
    #: When the first of them is due to go: retention's first run after it removes it
    #: (the listener's, hourly), unless a row names it by then. None where there are
    #: none, or where retention keeps files for ever.
    first_goes_after: datetime | None = None


def unrecorded_images(
    database_url: str, spool: Path, older_than: timedelta | None
) -> UnrecordedImages | None:
    """The received images in ``spool`` that no instance row names, as retention has
    dated them (:func:`_unrecorded_images`), and when the first goes if retention keeps
    files ``older_than`` (None: for ever); None where the markers cannot be read (they
    are the spool owner's, 0700), or where there is no ``spool`` at all (not known: the
    listener's spool is elsewhere, another data directory, or not mounted), as opposed
    to a spool without markers, which has none dated.

    Only the markers are read, with each one's image, never the whole spool: an image
    not dated yet (found by no run as the spool's owner) is not counted. A marker whose
    image is gone, or whose image a row now names by its path, is not counted either
    (the next run removes it). A row written where the spool was mounted elsewhere names
    its image by a path this does not match: such an image is counted until that run.
    """
    markers_dir = spool / UNRECORDED_DIR
    try:
        folders = [f for f in markers_dir.iterdir() if _SPOOL_FOLDER.fullmatch(f.name)]
    except FileNotFoundError:
        # no markers yet, where the spool itself is there
        return UnrecordedImages() if spool.is_dir() else None
    except OSError:
        return None
    dated: dict[str, tuple[float, int]] = {}  # image: since when it is dated, its size
    for folder in folders:
        try:
            names = [m for m in folder.iterdir() if _SPOOL_FILE.fullmatch(m.name)]
        except PermissionError:
            return None
        except OSError:  # not a folder, or removed meanwhile
            continue
        for marker in names:
            image = spool / folder.name / marker.name
            try:
                image_stat, marked = image.stat(), marker.stat().st_mtime
            except OSError:  # gone: the next run removes its marker
                continue
            # due once both were written long enough ago (_unrecorded_images)
            dated[str(image)] = (max(marked, image_stat.st_mtime), image_stat.st_size)
    paths = list(dated)
    for start in range(0, len(paths), _BATCH):
        with session_scope(database_url) as session:
            for named in session.scalars(
                select(Instance.spool_path).where(
                    Instance.spool_path.in_(paths[start : start + _BATCH])
                )
            ):
                dated.pop(named, None)
    if not dated:
        return UnrecordedImages()
    first = None
    if older_than is not None:
        since = datetime.fromtimestamp(min(at for at, _ in dated.values()), UTC)
        first = since + max(older_than, _RECORDING)
    return UnrecordedImages(len(dated), sum(size for _, size in dated.values()), first)


def _owner(spool: Path) -> int | None:
    """The spool's owner (uid), the listener's user; None where it cannot be read."""
    try:
        return spool.stat().st_uid
    except OSError:
        return None


def _left(due: int, why: str) -> None:
    """Say that ``due`` received images that no instance records, due to go, are kept
    because the recording lock could not be had (``why``): where the file system takes
    no locks, at WARNING once a process (it holds every run), else every run."""
    global _no_locks_said
    if why != NO_LOCKS:
        logger.warning(
            "retention: %d received image(s) that no instance records, due to go, left to "
            "the next run: %s",
            due,
            why,
        )
    elif not _no_locks_said:
        _no_locks_said = True
        logger.warning("retention: %s (%d due to go now; said once)", NO_LOCKS, due)
    else:
        logger.debug("retention: %d received image(s) due to go kept: %s", due, NO_LOCKS)


def _mark(markers_dir: Path, names: list[str]) -> tuple[int, int, OSError | None]:
    """Make an empty marker in ``markers_dir`` for each of ``names`` (``ab/<32
    hex>.dcm``), dated now; how many were made, how many could not be, and why the last
    of those could not."""
    made = failed = 0
    cause: OSError | None = None
    for name in names:
        marker = markers_dir / name
        try:
            markers_dir.mkdir(exist_ok=True, mode=0o700)
            marker.parent.mkdir(exist_ok=True, mode=0o700)
            # never an existing marker's time: that is the first sighting
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            continue  # marked meanwhile by another run
        except OSError as exc:
            failed, cause = failed + 1, exc
            continue
        made += 1
    return made, failed, cause


def _remove_unrecorded(
    database_url: str, spool: Path, images: list[tuple[Path, Path]], written_by: datetime
) -> tuple[int, int] | str:
    """Unlink those of ``images`` (each with its marker) that no row names and that were
    written before ``written_by``, and their markers, under the spool's recording lock;
    (files, bytes) removed, or why the lock could not be had: at once where no lock is
    possible, after :data:`_LOCK_TRIES_SECONDS` where listeners held it."""
    deadline = time.monotonic() + _LOCK_TRIES_SECONDS
    while True:
        with recording_lock(spool) as refused:
            if refused is None:
                with session_scope(database_url) as session:
                    named = set(
                        session.scalars(
                            select(Instance.spool_path).where(
                                Instance.spool_path.in_([str(image) for image, _ in images])
                            )
                        )
                    )
                removed = _remove((i for i, _ in images if str(i) not in named), written_by)
                for image, marker in images:
                    if str(image) in named or not os.path.exists(image):
                        with contextlib.suppress(OSError):
                            marker.unlink(missing_ok=True)
                return removed
        if isinstance(refused, FileNotFoundError):
            return "no listener has made the spool's recording lock yet"
        if refused.errno in _NO_LOCKS_ERRNOS:
            return NO_LOCKS
        if not isinstance(refused, BlockingIOError):
            return (
                "the spool's recording lock cannot be taken "
                f"({refused.strerror or type(refused).__name__})"
            )
        if time.monotonic() >= deadline:
            return f"listeners held the spool's recording lock for {_LOCK_TRIES_SECONDS:g} s"
        time.sleep(0.05)  # each C-STORE holds it shared for a rename and a commit


@dataclass
class _SpoolLock:
    """The spool's recording lock as one run found it: once listeners held it past
    :data:`_LOCK_TRIES_SECONDS`, the run's later batches do not wait for it again (each
    would, and the listener's reconcile loop, in whose thread the hourly run is, with
    them), and leave their images to the next run."""

    #: why listeners kept this run from it, once they did
    held: str = ""


class _RecordedImages:
    """The received images of one batch of instances marked removed, unlinked under one
    take of the spool's recording lock (:func:`dicom_io.scp.recording_lock`), exclusive:
    :func:`_remove_files` is given it for each of the batch's instances in the ``with``
    block.

    The listener renames a copy into the spool holding that lock shared, until the
    copy's row is committed (which clears the removal mark and sets
    ``received_again_at``). An image looked at, then unlinked by name, without it could
    be a new copy renamed in between, perhaps a corrected image the PACS was told
    Success for, lost while its row says it is there to be compared (found in review).
    Under the lock no C-STORE is between its rename and its commit: each image is
    looked at again there, and goes only if it was not written after the time it must
    not be, and its row still has the mark it was removed under and no copy received
    again (which keeps a new copy whose time misleads: written on a host behind).

    The lock is taken when the first image, or SR or SC (:meth:`still_marked`), that may
    go is met (a sweep of files gone already takes none) and let go when the batch is
    done: each C-STORE waits for it meanwhile, never for a whole run. While listeners
    hold it, it is tried for :data:`_LOCK_TRIES_SECONDS`; then the batch's files are
    left to the next run,
    counted and said at WARNING, and that run's sweep takes them (:func:`_sweep`: their
    instances were marked in the last day). Where no lock is possible at all (no
    listener has made it yet; the spool's file system takes none, NFS; the file is none
    the listener can use, which then records without it), they are looked at and
    unlinked without it, as before, since kept for ever they would fill the disk: a copy
    renamed in between the two is then lost, the window that remains.
    """

    def __init__(
        self, database_url: str, spool: Path | None, files: dict[int, _Files], run: _SpoolLock
    ) -> None:
        self._database_url = database_url
        self._spool = spool
        #: the batch's instances, by id: two rows naming one path stay two
        self._ids = list(files)
        self._run = run
        self._lock = contextlib.ExitStack()
        #: None until the lock is asked for; then whether the batch's images may go
        self._may_go: bool | None = None
        #: The rows of the batch's instances, read under the lock: their removal mark and
        #: when a copy was received again, by id.
        self._rows: dict[int, tuple[datetime | None, datetime | None]] = {}
        self._why_left = ""
        #: The instances whose files would have gone, left to a later run.
        self._left: set[int] = set()

    def __enter__(self) -> _RecordedImages:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.close()  # the lock let go, where it was held
        if self.left:
            logger.warning(
                "retention: the files of %d instance(s) marked removed left to a later run "
                "(the next runs', within a day of the mark; after it, `boneage-worker "
                "retention --all-marked`): %s",
                self.left,
                self._why_left,
            )

    @property
    def left(self) -> int:
        """Instances whose received image or objects would have gone, left to a later
        run."""
        return len(self._left)

    def remove(
        self, instance_id: int, image: Path, marked_at: datetime, written_by: datetime
    ) -> tuple[int, int]:
        """Unlink ``image``, the received image of ``instance_id``, one of the batch's
        instances, marked removed at ``marked_at``, if it was not written after
        ``written_by`` (this host's clock); (files, bytes) removed."""
        if not _may_be_removed(image, written_by):
            return 0, 0  # gone, or a new copy: kept, no lock needed
        if not self.still_marked(instance_id, marked_at):
            # the lock held past its tries (left), a copy recorded since (the listener
            # cleared the mark), or no row to tell
            return 0, 0
        return _remove([image], written_by)  # looked at again, under the lock

    def still_marked(self, instance_id: int, marked_at: datetime) -> bool:
        """Whether the row of ``instance_id`` still has the mark ``marked_at`` and no
        copy received again, read under the lock (taken here where no file of the batch
        has taken it yet); False where the lock was held past its tries (left to a later
        run) or no row tells."""
        if not self._take():
            self._left.add(instance_id)
            return False
        return self._rows.get(instance_id) == (marked_at, None)

    def _take(self) -> bool:
        """Take the lock for the rest of the batch and read the rows under it, once;
        whether the batch's images may go: False where listeners held the lock past
        :data:`_LOCK_TRIES_SECONDS`; True, without it, where no lock is possible."""
        if self._may_go is not None:
            return self._may_go
        if self._run.held:  # an earlier batch of this run waited for it in vain
            self._may_go, self._why_left = False, self._run.held
            return False
        deadline = time.monotonic() + _LOCK_TRIES_SECONDS
        while self._spool is not None:
            refused = self._lock.enter_context(recording_lock(self._spool))
            if refused is None:
                break
            self._lock.close()  # the lock file, where opened
            if not isinstance(refused, BlockingIOError):
                logger.debug(
                    "retention: received images of marked instances go without the spool's "
                    "recording lock (%s)",
                    refused.strerror or type(refused).__name__,
                )
                break
            if time.monotonic() >= deadline:
                self._run.held = (
                    f"listeners held the spool's recording lock for {_LOCK_TRIES_SECONDS:g} s"
                )
                self._may_go, self._why_left = False, self._run.held
                return False
            time.sleep(0.05)  # each C-STORE holds it shared for a rename and a commit
        self._rows = self._read_rows()
        self._may_go = True
        return True

    def _read_rows(self) -> dict[int, tuple[datetime | None, datetime | None]]:
        """The removal mark and the copy received again of the batch's instances, by id:
        an instance with no row found keeps its files (:meth:`still_marked`)."""
        rows: dict[int, tuple[datetime | None, datetime | None]] = {}
        ids = self._ids
        with session_scope(self._database_url) as session:
            for start in range(0, len(ids), _BATCH):
                for instance_id, mark, again in session.execute(
                    select(
                        Instance.id, Instance.files_removed_at, Instance.received_again_at
                    ).where(Instance.id.in_(ids[start : start + _BATCH]))
                ):
                    rows[instance_id] = (mark, again)
        return rows


def _may_be_removed(path: Path, written_by: datetime) -> bool:
    """Whether a file is at ``path``, not written after ``written_by``: one that
    :func:`_remove` would unlink now."""
    try:
        return path.stat().st_mtime <= written_by.timestamp()
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("retention: cannot inspect a file (%s)", exc.strerror)
        return False
