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

An object of ours made after the mark (a rejection note for an image the PACS rejected
once our copy of it was gone) moves the mark: its file goes as the instance's did,
``BONEAGE_RETENTION_DAYS`` after the instance finished (its rejection) and once every
delivery of it succeeded.

``reprocess`` leaves instances whose files were removed alone and says so: send them
again from the PACS, or ``backfill`` them.

An SR or SC made with nothing to send it to (no destination configured, or a
``reprocess`` not asked to send) has no delivery row to find it by: it goes when it is
``BONEAGE_RETENTION_DAYS`` old, by its file's time, since nothing will ever send it.

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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from db.engine import session_scope
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
#: How long a run tries for the spool's recording lock, while listeners hold it (they
#: take it, shared, for each C-STORE), before it leaves the received files no row names
#: to the next.
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
class _Files:
    """One instance's files: the received image, and the objects made of it."""

    spool: Path
    #: when the copy its row records was received (the last copy, if one came again)
    received: datetime
    outputs: list[Path]

    def paths(self) -> list[Path]:
        return [self.spool, *self.outputs]


def _files_of(session: Session, ids: list[int]) -> dict[int, _Files]:
    """Spool file and output files of each instance in ``ids``."""
    files = {
        instance_id: _Files(Path(spool), again or first, [])
        for instance_id, spool, first, again in session.execute(
            select(
                Instance.id,
                Instance.spool_path,
                Instance.received_at,
                Instance.last_received_again_at,
            ).where(Instance.id.in_(ids))
        )
    }
    outputs = session.execute(
        select(Delivery.instance_id, Delivery.path).where(Delivery.instance_id.in_(ids))
    )
    for instance_id, path in outputs:
        if Path(path) not in files[instance_id].outputs:  # SR and SC go to each destination
            files[instance_id].outputs.append(Path(path))
    return files


def _remove_files(files: _Files, marked_at: datetime, started: datetime) -> tuple[int, int]:
    """Unlink an instance's files marked removed at ``marked_at``; (files, bytes) removed.

    None written after the mark: a copy received again since, or an object made of it.
    Nor a received file written after the reception its row records, unless that was
    more than :data:`_RECORDING` before ``started``: a copy the listener has put in
    place and may be recording now (it commits the row once the file is there, maybe
    after this run's mark), whose row will say it is there to be compared.
    """
    recorded_copy = min(marked_at, max(files.received, started - _RECORDING))
    count, size = _remove([files.spool], recorded_copy)
    outputs, outputs_size = _remove(files.outputs, marked_at)
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
        ``older_than`` old (:func:`_unsent_outputs`).
    spool_dir : pathlib.Path, optional
        The node's spool: its received images that no instance row names go
        ``older_than`` after retention first found them so (:func:`_unrecorded_images`).

    Returns
    -------
    RetentionReport
        Instances, files and bytes removed (or that would be).
    """
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    started = now()
    cutoff = started - older_than
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
                        .values(files_removed_at=started)
                        .returning(Instance.id),
                        execution_options={"synchronize_session": False},
                    )
                )
            files = _files_of(session, ids)
        if dry_run:
            count, size = _sizes(path for of in files.values() for path in of.paths())
        else:
            count = size = 0
            for of in files.values():
                removed, removed_bytes = _remove_files(of, started, started)
                count, size = count + removed, size + removed_bytes
        report = report + RetentionReport(len(ids), count, size, dry_run)
    if not dry_run:
        report = report + _sweep(database_url, started)
    if outbox_dir is not None:
        report = report + _unsent_outputs(database_url, outbox_dir, cutoff, dry_run=dry_run)
    if spool_dir is not None:
        report = report + _unrecorded_images(
            database_url, spool_dir, cutoff, started - _RECORDING, dry_run=dry_run
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


def _sweep(database_url: str, started: datetime) -> RetentionReport:
    """Files of recently marked instances that a crash left behind (marked before now)."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Instance.id, Instance.files_removed_at).where(
                and_(
                    Instance.files_removed_at.is_not(None),
                    Instance.files_removed_at >= started - _SWEEP_WINDOW,
                    Instance.files_removed_at < started,
                )
            )
        ).all()
        marks = {instance_id: marked for instance_id, marked in rows if marked is not None}
        files = _files_of(session, list(marks))
    count = size = 0
    for instance_id, of in files.items():
        removed, removed_bytes = _remove_files(of, marks[instance_id], started)
        count, size = count + removed, size + removed_bytes
    return RetentionReport(0, count, size)


def _unsent_outputs(
    database_url: str, outbox: Path, cutoff: datetime, *, dry_run: bool
) -> RetentionReport:
    """SR and SC files in ``outbox`` written before ``cutoff`` that no delivery names.

    They were made with nothing to send them to: no destination was configured, or a
    ``reprocess`` was not asked to send. Nothing will ever send them, and without a
    delivery row the instances' removal cannot find them. A file being published now
    is new, and so never one of them (its rows commit just after it is renamed in).
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
    named: set[str] = set()
    for start in range(0, len(old), _BATCH):
        chunk = [str(p) for p in old[start : start + _BATCH]]
        with session_scope(database_url) as session:
            named.update(session.scalars(select(Delivery.path).where(Delivery.path.in_(chunk))))
    unsent = [p for p in old if str(p) not in named]
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
    wanted = old.keys() | markers.keys()
    with session_scope(database_url) as session:
        named = {
            name
            for name in map(
                _spool_name,
                session.scalars(select(Instance.spool_path).execution_options(yield_per=5000)),
            )
            if name in wanted
        }
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
