"""The assess pipeline, wired in one visible place.

    spool file ─▶ gate ─▶ pixels ─▶ model (bone age + Grad-CAM) ─▶ SR + SC
              ─▶ outbox files ─▶ Result + Delivery rows (one commit) ─▶ deliveries enqueued

Exactly-once comes from the schema: one Result per (instance, model, assessment)
and one Delivery per (object, destination). The output UIDs are derived from the
node (:func:`image_uids`), the source instance, the model and the assessment, so a
redelivered task that gets this far makes the same objects again, and its commit fails
on the unique constraint; another node makes its own under other UIDs.

An instance is assessed once, unless a copy of it received again changes what its
result depends on (:func:`assessment_inputs`: a corrected sex or birth date, the
gate's decision, how the pixels are described; or the pixels themselves, told by a
32 x 32 picture of the image, :func:`image_signature`) or the patient its SR and SC are
filed under (:func:`identity_digest`: a corrected Patient ID). It is then assessed
again, as assessment 2, 3 ...: new SR and SC in the same series, the SR naming the
reports it replaces (Predecessor Documents), and the earlier results kept; what was
filed under another patient or study is withdrawn there. A copy that changes nothing of
that (the PACS forwarding the study again, transcoded, with its own attributes or a
reconciled accession number) is not.

Two attempts at one instance may run at once (the same study sent twice, a
message delivered again while the first attempt still runs). Their SR and SC
carry the same UIDs and file names but not the same bytes (creation times), so
an attempt's files are staged under names of their own and moved into place
only inside its commit, after the rows went in: the database's unique keys hold
every other attempt at that point until this one has committed, and then refuse
it, and a refused attempt removes what it staged. The files in the outbox are
therefore always those whose SHA-256 the committed deliveries recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import (
    Boolean,
    ColumnElement,
    String,
    and_,
    case,
    false,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.queries import (
    REJECTED_IN_ANOTHER_STUDY,
    UID_CLASH,
    WITHDRAW_BY_HAND,
    database_now,
    made_here,
    reason_category,
    rejects,
    take_instances,
)
from db.schema import (
    FINISHED,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Model,
    ObjectKind,
    Rejection,
    Result,
    UTCDateTime,
)
from dicom_io import gate
from dicom_io.content import MANUFACTURER, BoneAgeFinding, image_side
from dicom_io.ko import (
    REJECTION_TITLES,
    Reference,
    build_rejection_note,
    is_key_object_selection,
    read_rejection_note,
)
from dicom_io.pixels import (
    FRAME_DESCRIPTION,
    FileChangedError,
    NoContrastError,
    PixelDataError,
    decode_as_assessed,
    decode_for_display,
    drop_pixel_data,
    read_image,
)
from dicom_io.sc import (
    REPLACES_HEAT_MAP,
    build_heatmap_sc,
    build_withdrawal_sc,
    notice_body_part,
    overlay_shape,
    render_overlay,
    series_laterality,
)
from dicom_io.scp import fsync_directory, local_fault, uid_tag
from dicom_io.sr import (
    build_bone_age_sr,
    build_not_assessed_sr,
    earlier_report,
    referenced_sop_class,
)
from dicom_io.uids import LEGACY_UIDS, UUID_ROOT, UidScheme, derived_from, root_of
from worker.heartbeat import claim_holders, process_name
from worker.reconciler import claim_ended, died_reason, worker_died
from worker.runtime import SOFTWARE_NAME, Runtime

if TYPE_CHECKING:
    from models.predictor import BoneAgePredictor, Prediction

logger = logging.getLogger(__name__)

#: Series numbers of our output series, high so they sort after the source series.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
KO_SERIES_NUMBER = 9903

#: How many times an instance may start processing before it is marked `error`: an
#: attempt spends one when it fails for a fault, or never ends (its worker killed, the
#: same image each time); not when it fails for trouble the task retries.
MAX_ATTEMPTS = 3

#: Trouble a retry may cure, which the assess task retries itself with a back-off (the
#: database away, the file system full). Any other exception is a fault: its attempt
#: gives the instance up, and the reconciler queues it again after a pause
#: (worker.reconciler.FAULT_PAUSE).
RETRIED_BY_THE_TASK: tuple[type[Exception], ...] = (OperationalError, OSError)

#: The retries the assess task makes of :data:`RETRIED_BY_THE_TASK` (worker.tasks: its
#: max_retries, after 5 s doubling to 5 minutes, each at random up to that: at most about
#: 75 minutes in all). The attempts that fail so spend none of :data:`MAX_ATTEMPTS`; the
#: instance ends in error when one more than these has failed, the task's back-off spent
#: (a disk full for a minute, or an NFS mount stalled, no longer ends every image in hand
#: in error within seconds).
TRANSIENT_RETRIES = 20


@dataclasses.dataclass(frozen=True)
class AssessOutcome:
    state: str  # "assessed", "not_assessed", "rejected", "error", "skipped", "duplicate"
    delivery_ids: tuple[int, ...] = ()
    reason: str | None = None
    # the instance ended with a copy received again that no assessment read (it came
    # while this attempt held the instance, and its own message was refused): the task
    # queues it, to be compared (worker.tasks.assess)
    copy_to_compare: bool = False


def node_uids(rt: Runtime) -> UidScheme:
    """How this node derives the UIDs of a new image's objects (:mod:`dicom_io.uids`):
    under BONEAGE_UID_ROOT, else 2.25, with the node's identity, its Device Observer UID
    (made at random once and kept in its database: every process of the node, on any
    host, has it; another node has another)."""
    return UidScheme(rt.settings.uid_root or UUID_ROOT, rt.device_observer_uid)


def image_uids(rt: Runtime, instance_id: int) -> UidScheme:
    """How the UIDs of the objects of the image ``instance_id`` are derived: under the
    root its first object of ours that a delivery recorded is under (pydicom's, with no
    node in them, for one made before the node's identity went into them;
    BONEAGE_UID_ROOT as it was then), so that what is derived again of the image (the
    series a later assessment joins, the note withdrawing an object, the SR saying it is
    not assessed, made already) is what the PACS has; for an image with none,
    :func:`node_uids`.

    Only this node's deliveries count (:func:`made_here`): on a database copied from
    another node, an image that node assessed gets UIDs of this node's own, never the
    other's derivation, which, under pydicom's root, has no node in it and would give
    the copy's next assessment the UIDs that node's next assessment makes."""
    with session_scope(rt.database_url) as session:
        first = session.scalar(
            select(Delivery.sop_instance_uid)
            .where(Delivery.instance_id == instance_id, made_here())
            .order_by(Delivery.id)
            .limit(1)
        )
    node = node_uids(rt)
    return node if first is None else dataclasses.replace(node, root=root_of(first))


@dataclasses.dataclass(frozen=True)
class Output:
    """One object of an assessment in the outbox, or staged to go there.

    ``staged`` is the durable file of this attempt, under a name of its own, until
    :func:`publish` moves it to ``path`` (None once it is there).
    """

    kind: ObjectKind
    sop_instance_uid: str
    path: Path
    sha256: str  # hex digest of the file's bytes, checked before each send
    staged: Path | None = None
    # an object of the assessment's result; not so a notice withdrawing an earlier one's
    of_result: bool = True
    study_instance_uid: str | None = None  # where it goes
    series_instance_uid: str | None = None
    # the destinations it goes to, where not all of them: a note of ours withdrawing an
    # object goes where that object went
    destinations: tuple[str, ...] | None = None
    # a note of ours: the SOP Instance UID of the object it withdraws
    withdraws: str | None = None


@dataclasses.dataclass(frozen=True)
class HeatMap:
    """A heat map of ours that a destination has or may have, as it was written."""

    sop_instance_uid: str
    path: Path  # its file in the outbox (until retention removes it)
    sha256: str | None  # of the file as written; None on a row from before it was kept
    assessment: int = 1  # the assessment that made it
    # the side its assessment's result recorded (Result.laterality), which it states: its
    # series' side where retention removed the files (:func:`series_side`)
    side: str | None = None


@dataclasses.dataclass(frozen=True)
class HeatMapSeries:
    """The heat-map series of one model about an image, as an earlier assessment left it
    at a destination."""

    model_id: str
    model_name: str
    trained: bool
    study_instance_uid: str
    series_instance_uid: str
    # its heat maps that a destination has or may have, in the order they were made: a
    # notice joining the series carries their Body Part Examined (:func:`stage_withdrawals`)
    heat_maps: tuple[HeatMap, ...] = ()
    # the side ("L", "R") a series of its own was opened for, where a heat map's side
    # differed from the Laterality of the model's series of the image (:func:`sc_series_uid`,
    # :func:`heat_map_series`); None: the model's series of the image in that study
    side: str | None = None

    @property
    def latest(self) -> int:
        """The assessment that made its latest heat map."""
        return max((h.assessment for h in self.heat_maps), default=0)

    @functools.cached_property
    def first_as_written(self) -> Dataset | None:
        """See :func:`first_heat_map_as_written`. Read once: an assessment asks for it
        several times (the series it joins, its side, the SC's and each notice's
        attributes), and each answer must come from the same read, not from a file that
        retention may remove in between (its side would then come from the result
        recorded instead, beside a Body Part Examined from the file)."""
        return next((h for h in map(_heat_map_as_written, self.heat_maps) if h is not None), None)


def write_atomically(ds: Dataset, path: Path, *, sync_directory: bool = True) -> str:
    """Write ``ds`` as a Part 10 file: temporary name, fsync, rename, fsync dir.

    With ``sync_directory=False`` the rename is durable only once the caller fsyncs
    the directory (after writing several files into it).

    Returns
    -------
    str
        The hex SHA-256 of the bytes written: a delivery checks it before it sends the
        file as it is stored.
    """
    temp, digest = _stage(ds, path)
    os.replace(temp, path)
    if sync_directory:
        fsync_directory(path.parent)
    return digest


def _stage(ds: Dataset, path: Path) -> tuple[Path, str]:
    """Write ``ds`` durably beside ``path``, under a name no other attempt uses.

    Returns the staged file and the hex SHA-256 of its bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    data = encoded.getbuffer()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)  # owner-only (0600), as every file the node keeps
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, hashlib.sha256(data).hexdigest()


def publish(outputs: list[Output]) -> list[Output]:
    """Move staged outputs to their outbox names, then fsync the directories once."""
    published = []
    for output in outputs:
        if output.staged is not None:
            os.replace(output.staged, output.path)
        published.append(dataclasses.replace(output, staged=None))
    for directory in {output.path.parent for output in outputs}:
        fsync_directory(directory)
    return published


#: A staged output older than this belongs to an attempt that died before its commit
#: (an attempt stages and publishes within seconds).
STAGED_MAX_AGE_SECONDS = 3600.0


def sweep_staged(outbox_dir: Path, *, older_than: float = STAGED_MAX_AGE_SECONDS) -> int:
    """Remove the outputs that attempts which died before their commit left staged.

    Returns how many files went. Younger files are left: another worker's attempt may be
    between staging and publishing them.
    """
    removed = 0
    cutoff = time.time() - older_than
    for staged in outbox_dir.glob("*.tmp"):  # ours are dot-files; glob sees them
        try:
            if staged.stat().st_mtime < cutoff:
                staged.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        logger.info("outbox: removed %d file(s) staged by attempts that did not finish", removed)
    return removed


def discard(outputs: list[Output]) -> None:
    """Remove the files an attempt staged and did not publish."""
    for output in outputs:
        if output.staged is not None:
            output.staged.unlink(missing_ok=True)


def chronological_age_months(
    facts: gate.PatientFacts, *, today: date | None = None
) -> float | None:
    """Age at the image from birth date and study date; PatientAge as a last resort.

    None where neither gives it; where PatientAge is too coarse to set a bone age
    against (:func:`age_too_coarse`, whose note says why); and where the image is
    dated after ``today`` (:func:`dated_in_the_future`).
    """
    from models.reference import age_in_months

    if dated_in_the_future(facts, today=today):
        return None
    if facts.age_from_birth_date:
        assert facts.birth_date is not None and facts.reference_date is not None
        return age_in_months(facts.birth_date, facts.reference_date)
    if age_too_coarse(facts) is not None:
        return None
    return facts.patient_age_months


#: The note of a result whose patient's age is known only in whole years.
AGE_IN_WHOLE_YEARS = "No chronological age or SDS: no birth date, age in whole years only"
#: The note of a result whose patient's age is known only in whole months, under 2 years.
AGE_IN_WHOLE_MONTHS = (
    "No chronological age or SDS: no birth date, age in whole months only, under 2 years"
)
#: Under this age (months), a Patient's Age in whole months is too coarse for an SDS.
_WHOLE_MONTHS_TOO_COARSE_UNDER = 24.0


def age_too_coarse(facts: gate.PatientFacts) -> str | None:
    """Why the only age known, a Patient's Age (no birth date), is too coarse to set a
    bone age against, or None where it is not.

    An AS value counts whole units (PS3.5 6.2): the child is up to one unit older. In
    whole years (``"010Y"``) that is up to 11 months, against a Greulich-Pyle SD of 7-13
    months from 5 to 17 years; in whole months under 2 years, up to a month against an
    SD that falls to 0.7 month at 3 months (``"003M"`` read as 3.0 made a child of 3.95
    months with a bone age of 3.95 months SDS +1.4; found in review). Weeks and days are
    fine enough.
    """
    if facts.age_from_birth_date:
        return None
    if facts.age_in_whole_years_only:
        return AGE_IN_WHOLE_YEARS
    if (
        facts.patient_age_unit == "M"
        and facts.patient_age_months is not None
        and facts.patient_age_months < _WHOLE_MONTHS_TOO_COARSE_UNDER
    ):
        return AGE_IN_WHOLE_MONTHS
    return None


#: The note of a result whose patient's age the image does not give at all.
AGE_NOT_KNOWN = (
    "No chronological age or SDS: the patient's age is not known from the image; "
    "the model is for ages 0-19 years"
)


def age_notes(facts: gate.PatientFacts, *, male: bool) -> list[str]:
    """What a result says of the patient's age where it gives no chronological age or no
    SDS, and why (its SR's comments, its SC's panel).

    Where the image gives no age at all (no birth date with a date of the image, no
    Patient's Age), the gate cannot hold the patient to the model's ages and the reader
    is told (:data:`AGE_NOT_KNOWN`): an SR and SC that said nothing read as if the age
    had been checked (found in review).
    """
    if dated_in_the_future(facts):
        return [DATED_IN_THE_FUTURE]
    if (coarse := age_too_coarse(facts)) is not None:
        return [coarse]
    chronological = chronological_age_months(facts)
    if chronological is None:
        return [AGE_NOT_KNOWN]
    no_sd = outside_the_sd_table(chronological, male=male)
    return [no_sd] if no_sd is not None else []


def outside_the_sd_table(chronological_age_months: float, *, male: bool) -> str | None:
    """Why a result at this chronological age has no SDS: the Greulich-Pyle table has no
    SD there (:func:`models.reference.sd_table_ages`); None where it has.

    Past its last age (16 years for girls, 17 for boys, where the gate admits 19) the
    skeleton may be mature: its bone age stops rising while the age goes on, and an SDS
    held at the last SD called a normal 18-year-old girl's hand -1.5 (found in review).
    """
    from models.reference import sd_table_ages

    first, last = sd_table_ages(male=male)
    if first <= chronological_age_months <= last:
        return None
    return (
        f"No SDS: the Greulich-Pyle reference has standard deviations from {first:g} months "
        f"to {last / 12:g} years for {'boys' if male else 'girls'}"
    )


#: The note of a result whose image is dated after the day it was assessed.
DATED_IN_THE_FUTURE = "No chronological age or SDS: the image is dated after today"


def dated_in_the_future(facts: gate.PatientFacts, *, today: date | None = None) -> bool:
    """The date of the image is after ``today`` (the node's; a day's grace for a study
    in a zone ahead of it): a modality whose clock runs ahead, whose age of the patient
    at the image would be too high by as much. Its dates give no age."""
    reference = facts.reference_date
    return reference is not None and reference > (today or date.today()) + timedelta(days=1)


@dataclasses.dataclass
class _Claim:
    """The instance an attempt works on: its file, SOP Instance UID and assessment;
    and once the attempt has read the file, the digest of what the result depends on
    (:func:`assessment_inputs`), or :data:`UNREAD`."""

    instance_id: int
    spool: Path
    sop_instance_uid: str
    assessment: int
    inputs: str | None = None
    # once the attempt has decoded the image, its picture (:func:`image_signature`)
    pixels: bytes | None = None
    # once the attempt has read the file, the patient it names (:func:`identity_digest`)
    identity: str | None = None
    # the patient the assessment before this one read, where a copy received again opened
    # this one (Instance.identity_before_sha256: a retry of the attempt that opened it
    # finds it there); None for a first assessment, and where that one read none
    identity_before: str | None = None
    # this attempt looked for what went under the patient before, and withdrew or named it
    # (:func:`stage_moved_withdrawals`): the assessment is done with that patient
    withdrew_patient_before: bool = False
    # the study the instance was first received in (where its first outputs went)
    first_study: str = ""
    # once the attempt has read the file, the study the copy is in: a rejection note
    # naming the image there rejects it (:func:`_rejection_in`)
    study: str = ""
    # whether this assessment's outputs go to the destinations (Instance.send_outputs)
    send: bool = True
    # whether a copy was received since the instance was queued (Instance.received_again_at
    # of an instance not finished): the PACS's correction, which this assessment may read
    copy_came: bool = False
    # when the attempt claimed the instance (Instance.started_at, as its claim wrote it)
    started_at: datetime | None = None
    # the count of attempts its claim left on the row (Instance.attempts)
    attempts: int | None = None

    def other_study(self, source: Dataset) -> str | None:
        """The study ``source`` (the copy read) is in, where it is not the one the
        instance was first received in: this assessment's outputs go there, in series
        of their own (:func:`sr_series_uid`)."""
        study = str(source.get("StudyInstanceUID", "") or "").strip()
        return study if self.first_study and study and study != self.first_study else None


#: Why a message for an instance that another attempt is assessing now is skipped.
BEING_ASSESSED = "being assessed by another attempt"


#: The inputs recorded of an assessment that could not read its file (missing, or not
#: DICOM): any readable copy received again differs from it.
UNREAD = "unread"


def _again(assessment: int) -> tuple[str, ...]:
    """What sets the outputs of a later assessment apart, in :meth:`UidScheme.derive`."""
    return () if assessment == 1 else (f"assessment {assessment}",)


def _claim(
    rt: Runtime,
    instance_id: int,
    held: datetime | None = None,
    *,
    shared: bool = False,
    held_attempts: int | None = None,
) -> _Claim | AssessOutcome:
    """Claim ``instance_id`` for this attempt, or say why not.

    An instance another attempt is assessing now (`processing`, its claim not ended:
    worker.reconciler.claim_ended) is refused, unless ``held`` is that claim's time
    (``Instance.started_at``): the task's retry of the try that took it. So is one whose
    claim ended with a process that may have held other images (``claim_shared``): the
    reconciler takes it back, counting no attempt, to be assessed alone
    (worker.reconciler.reconcile). ``shared``: this process may hold other images
    while it assesses this one (a batching worker's task threads). A message that
    came for a copy received meanwhile is not lost with the refusal: the holder leaves
    the copy to compare (``received_again_at`` after its claim, :func:`_compared_if_read`)
    and its task queues it once the holder ends (:func:`_with_copy_to_compare`); a holder
    that dies is taken back by the reconciler (its heartbeat stops, or its lease ends)
    and assessed again from the newest copy.

    ``held_attempts``: the count of attempts the claim ``held`` left on the row. The
    retry goes on with that attempt, whether or not the try before could give it back
    (the database away when it failed): counted again, a blip of the database spent one
    of the image's :data:`MAX_ATTEMPTS`, and on its third ended it in error. None (a
    message of an earlier release): counted as a new attempt.
    """
    with session_scope(rt.database_url) as session:
        # The row held first: what the claim and, where it is refused, the reads after it
        # find is one state of it; a holder that committed its result between the refused
        # claim and a read after it made a stale read give an assessed image up (found in
        # review).
        take_instances(session, [instance_id])
        # The database's clock, not this host's: the times it is compared with (a copy
        # received again, a message published, the lease) are stamped by it too, on
        # whichever host, and hosts' clocks may differ by more than the time between
        # a publish and its claim.
        current = database_now(session)
        live_workers = claim_holders(session)
        free = or_(
            Instance.state != InstanceState.PROCESSING,
            Instance.claimed_by.is_(None),  # an attempt that failed for a fault let it go
            claim_ended(current, live_workers) & ~Instance.claim_shared,
            *([Instance.started_at == held] if held is not None else []),
        )
        # taken over from a worker that died holding it: its reason says so, as where the
        # reconciler takes it back (worker.reconciler.DIED), and the error after the last
        # attempt quotes it
        claim_reason = case((worker_died(live_workers), died_reason()), else_=Instance.reason)
        # One conditional statement, not a read and a write: an attempt whose claim
        # waited on another attempt's commit (PostgreSQL waits on the row, then reads it
        # again) must find the instance finished, not put it back to `processing`.
        continued = (
            Instance.started_at == held if held is not None and held_attempts is not None else None
        )
        claimed = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state.not_in(FINISHED),
                Instance.attempts < MAX_ATTEMPTS
                if continued is None
                else or_(Instance.attempts < MAX_ATTEMPTS, continued),
                free,
            )
            .values(
                state=InstanceState.PROCESSING,
                claimed_by=process_name("worker"),
                started_at=current,
                attempts=Instance.attempts + 1
                if continued is None
                else case((continued, held_attempts), else_=Instance.attempts + 1),
                claim_shared=_claim_shared(shared),
                reason=claim_reason,
            )
            .returning(
                Instance.attempts,
                Instance.spool_path,
                Instance.sop_instance_uid,
                Instance.assessment,
                Instance.study_instance_uid,
                Instance.send_outputs,
                Instance.received_again_at,
                Instance.identity_before_sha256,
            )
        ).one_or_none()
        if claimed is not None:
            return _Claim(
                instance_id,
                Path(claimed.spool_path),
                claimed.sop_instance_uid,
                claimed.assessment,
                identity_before=claimed.identity_before_sha256,
                first_study=claimed.study_instance_uid,
                send=claimed.send_outputs,
                copy_came=claimed.received_again_at is not None,
                started_at=current,
                attempts=claimed.attempts,
            )
        instance = session.get(Instance, instance_id, populate_existing=True)
        if instance is None:
            logger.warning("assess: instance %d does not exist", instance_id)
            return AssessOutcome("skipped", reason="no such instance")
        if instance.state not in FINISHED:
            if (
                instance.attempts >= MAX_ATTEMPTS
                and session.scalar(select(Instance.id).where(Instance.id == instance_id, free))
                is not None
            ):
                instance.reason = session.scalar(
                    select(claim_reason).where(Instance.id == instance_id)
                )
                _give_up(instance, current)
                return AssessOutcome("error", reason=instance.reason)
            # Not claimed beside it: the image was assessed twice at once, the commit kept
            # one result, and the copy read by neither could be forgotten (the later
            # claim's time on the row). A claim that ended between the refusal and this
            # read (its worker's heartbeat just gone stale) is the reconciler's to take.
            logger.info("assess: instance %d is being assessed by another attempt", instance_id)
            return AssessOutcome("skipped", reason=BEING_ASSESSED)
        finished = instance.state
        received_again = instance.received_again_at is not None
        seen = _Seen(
            instance.sop_instance_uid,
            instance.study_instance_uid,
            instance.assessment,
            instance.inputs_sha256,
            instance.identity_sha256,
            instance.pixels_signature,
            Path(instance.spool_path),
            instance.reason,
        )
    # A message delivered again, with no copy received since the instance finished: the
    # file is the one its assessment read, and nothing is read or written.
    if received_again:
        # the copy in the spool now is at least as new as any before (by the database's
        # clock, which dated them: the file is read after it)
        checked = current
        reopened = _reopen_if_received_changed(
            rt, instance_id, finished, seen, checked=checked, shared=shared
        )
        if reopened is not None:
            return reopened
        _compared_copies_received_before(rt, instance_id, checked)
    logger.info("assess: instance %d already %s", instance_id, finished.value)
    return AssessOutcome("skipped", reason=f"already {finished.value}")


def _claim_shared(shared: bool) -> ColumnElement[bool]:
    """Instance.claim_shared of a claim whose process may hold other images (``shared``):
    never for an image to be assessed alone, whose death is then its own even where the
    task took it beside others (it found the image not yet marked, and the reconciler
    marked it before the claim)."""
    return case((Instance.alone, false()), else_=literal(shared, Boolean()))


def _received_again_and_compared(since: datetime) -> ColumnElement[datetime | None]:
    """Instance.received_again_at, emptied if no copy came after ``since``."""
    return case((Instance.received_again_at <= since, None), else_=Instance.received_again_at)


def _compared_copies_received_before(rt: Runtime, instance_id: int, since: datetime) -> None:
    """Record that the copies received before ``since`` were compared with what the
    finished assessment read: the reconciler has no more message to send for them."""
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id, Instance.received_again_at.is_not(None))
            .values(received_again_at=_received_again_and_compared(since))
        )


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a finished instance's last assessment read, as its row keeps it."""

    sop_instance_uid: str
    first_study: str  # the study it was first received in
    assessment: int
    inputs: str | None
    identity: str | None
    pixels: bytes | None
    spool: Path
    reason: str | None = None  # the row's, as the claim read it


def _reopen_if_received_changed(
    rt: Runtime,
    instance_id: int,
    finished: InstanceState,
    seen: _Seen,
    *,
    checked: datetime,
    shared: bool = False,
) -> _Claim | AssessOutcome | None:
    """Claim a finished instance for its next assessment if the copy in the spool (the
    one received last) changes what the finished assessment read: from the header (what
    the result depends on, or the patient it is filed under), or of the pixels
    (:func:`signatures_differ`).

    Not for an instance finished before revision 0004 (no digest), nor for a copy that
    cannot be parsed: nothing says it changed. The identity of one finished before
    revision 0015 is not compared. Of two attempts that find the same change at once,
    one claims it; the other leaves it.

    A copy in another study or under another patient is the image moved or refiled only
    if its pixels are the image's: other pixels are another image under the same SOP
    Instance UID, which is refused (:func:`_refuse_uid_clash`), and its outcome returned.
    The image's own copy received after it (inputs and pixels unchanged) takes the
    refusal back (:func:`_own_copy_came_again`).

    Raises
    ------
    OSError
        When the copy cannot be read for trouble a retry may cure (:func:`_io_trouble`):
        the task retries, and the copy stays to be compared.
    """
    assessment, inputs = seen.assessment, seen.inputs
    if inputs is None or finished is InstanceState.REJECTED:  # rejected stays rejected
        return None
    try:
        ds = read_image(seen.spool)  # the header; the pixels are read only if it is the same
    except FileNotFoundError:
        return None  # gone (retention): nothing to compare
    except Exception as exc:
        if _io_trouble(exc):
            raise
        return None  # not DICOM, or not as pydicom can parse
    try:
        _, received = _decide(rt, ds)
    except Exception:
        return None
    identity = identity_digest(ds, seen.sop_instance_uid)
    other_patient = seen.identity is not None and identity != seen.identity
    other_study = _study_of(ds) != seen.first_study
    pixels, picture = seen.pixels, None
    # a rejection note received again is applied again: it may name more instances now,
    # or its first application may have ended in error (applied again, it changes
    # nothing it changed)
    if is_key_object_selection(ds):
        pass
    elif received == inputs and not other_patient:
        if pixels is None:  # assessed before revision 0007, or read no pixels
            return None
        try:
            picture = picture_now(rt, ds)
        except FileChangedError:
            return None  # a later copy took its place: its own message compares that one
        # any other OSError: raised, the task retries, and the copy stays to be compared
        if not signatures_differ(pixels, picture):
            if picture != UNDECODABLE:
                _own_copy_came_again(rt, instance_id, finished, seen, checked)
            return None
    elif (other_patient or other_study) and pixels is not None and pixels != UNDECODABLE:
        # moved or refiled by the PACS, or another image under this one's UID?
        try:
            picture = picture_now(rt, ds)
        except FileChangedError:
            return None
        if picture != UNDECODABLE and signatures_differ(pixels, picture):
            return _refuse_uid_clash(
                rt, instance_id, finished, seen, checked, other_patient, other_study
            )
    with session_scope(rt.database_url) as session:
        started = database_now(session)  # as `_claim` dates a claim
        claimed = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state == finished,
                Instance.assessment == assessment,
            )
            .values(
                state=InstanceState.PROCESSING,
                assessment=assessment + 1,
                claimed_by=process_name("worker"),
                claim_shared=_claim_shared(shared),
                started_at=started,
                finished_at=None,
                reason=None,
                attempts=1,
                transient_failures=0,
                # this copy's: sent once more, it is not assessed again, even if this fails
                inputs_sha256=received,
                identity_sha256=identity,
                # the patient the outputs out there were filed under, for whichever
                # attempt finishes this assessment: the last one's, or, where that one
                # ended in error with none made, the one before it still kept
                identity_before_sha256=func.coalesce(
                    Instance.identity_before_sha256, literal(seen.identity, String())
                ),
                pixels_signature=Instance.pixels_signature if picture is None else picture,
                # the latency of this assessment counts from this copy (the UPDATE reads
                # the columns as they were before it)
                assessment_received_at=func.coalesce(
                    Instance.received_again_at, literal(checked, UTCDateTime())
                ),
                received_again_at=_received_again_and_compared(checked),
                send_outputs=True,  # whatever a reprocess before asked: a new assessment
            )
            .returning(
                Instance.spool_path,
                Instance.sop_instance_uid,
                Instance.study_instance_uid,
                Instance.identity_before_sha256,
            )
        ).one_or_none()
        if claimed is None:
            return None
        # what the earlier assessments made no longer stands: what has not gone never will
        _supersede_unsent(session, instance_id, assessment + 1)
    logger.info(
        "instance %d received again with other patient, study or image values, or other "
        "pixels, than its assessment %d read: assessing it again",
        instance_id,
        assessment,
    )
    return _Claim(
        instance_id,
        Path(claimed.spool_path),
        claimed.sop_instance_uid,
        assessment + 1,
        received,
        identity=identity,
        identity_before=claimed.identity_before_sha256,
        first_study=claimed.study_instance_uid,
        started_at=started,
    )


def _study_of(ds: Dataset) -> str:
    return str(ds.get("StudyInstanceUID", "") or "").strip()


def _io_trouble(exc: BaseException) -> bool:
    """Whether ``exc``, raised reading a spooled file, is trouble a retry may cure: the
    machine's, as the listener tells it (:func:`dicom_io.scp.local_fault`: an OSError the
    system raised, EIO, ESTALE, EMFILE, EACCES ..., or memory exhausted, raised or
    wrapped in the errno-less OSError pydicom raises for a sequence item it could not
    read), or another copy taking the file's place. Not a missing file, and not pydicom's
    OSError for data it cannot parse ("No tag to read at file position")."""
    if isinstance(exc, FileNotFoundError):
        return False
    return isinstance(exc, FileChangedError) or local_fault(exc)


def _refuse_uid_clash(
    rt: Runtime,
    instance_id: int,
    finished: InstanceState,
    seen: _Seen,
    checked: datetime,
    other_patient: bool,
    other_study: bool,
) -> AssessOutcome:
    """Refuse a copy received again that is another image under the instance's SOP
    Instance UID (a modality that reuses UIDs): its pixels are not the image's, and it
    is in another study or under another patient. Nothing is made or sent for it, no
    note withdraws the image's results, which stand, and the instance's reason says so
    to the administrator (`status` lists it among the recent problems); the copy counts
    as compared. The image's own copy received again takes that back
    (:func:`_own_copy_came_again`); one received while this compared is not refused
    here: it holds the spool now, and its own message compares it."""
    where = " and ".join(
        ["under another patient"] * other_patient + ["in another study"] * other_study
    )
    clash = (
        f"{UID_CLASH} (other pixels, {where}): its results stand and nothing was made of "
        "the other, whose copy is now the one in the spool (reprocess leaves it until this "
        "image is received again); ask whoever sent it to give each image UIDs of its own"
    )
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state == finished,
                Instance.assessment == seen.assessment,
                # the copy compared is still the last received, and not compared since: a
                # later one (the image's own again, maybe) took its place in the spool and
                # its message compares it; one compared since has had its say
                Instance.received_again_at.is_not(None),
                Instance.received_again_at <= checked,
            )
            .values(
                reason=case(
                    (Instance.reason.is_(None), literal(clash)),
                    (Instance.reason.contains(UID_CLASH, autoescape=True), Instance.reason),
                    else_=Instance.reason + literal(f"; {clash}"),
                ),
                received_again_at=_received_again_and_compared(checked),
            )
        )
    logger.error(
        "instance %d: another image was received under its SOP Instance UID (%s): "
        "refused, its results stand",
        instance_id,
        where,
    )
    return AssessOutcome("skipped", reason=clash)


def _own_copy_came_again(
    rt: Runtime, instance_id: int, finished: InstanceState, seen: _Seen, checked: datetime
) -> None:
    """Take back what :func:`_refuse_uid_clash` told of an image whose own copy is
    received again (the inputs and pixels its finished assessment read): the spool holds
    the image again, not the other, so `status` no longer lists it and a reprocess may
    assess it (worker.reprocess.uid_clashes). The rest of its reason stays; the copy
    counts as compared.

    As the refusal, only for the assessment that read it, and only where no copy came
    after the one compared (``received_again_at``, stamped by the listener once the file
    is in place, no later than ``checked``): one that came meanwhile took the file's
    place, may be the other image again, and its own message compares it. The reason is
    written only as the claim read it, so that a refusal committed since stands.
    """
    if seen.reason is None or UID_CLASH not in seen.reason:
        return
    with session_scope(rt.database_url) as session:
        cleared = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state == finished,
                Instance.assessment == seen.assessment,
                Instance.received_again_at <= checked,
                Instance.reason == seen.reason,
            )
            .values(
                reason=_without_uid_clash(seen.reason),
                received_again_at=_received_again_and_compared(checked),
            )
            .returning(Instance.id)
        ).one_or_none()
    if cleared is not None:
        logger.info(
            "instance %d: its own copy was received again after another image under its "
            "SOP Instance UID: the spool holds it again, and it is no longer said to clash",
            instance_id,
        )


def _without_uid_clash(reason: str) -> str | None:
    """``reason`` without what :func:`_refuse_uid_clash` added: its end, as nothing is
    added to the reason of a finished instance after it (a rejection note, or the next
    assessment, writes it anew); None where that was all of it."""
    return reason[: reason.find(UID_CLASH)].removesuffix("; ") or None


def _compared_if_read(instance: Instance) -> None:
    """Forget a copy received again before this attempt began: the attempt read it (it
    reads the file after its claim)."""
    again, began = instance.received_again_at, instance.started_at
    if again is not None and began is not None and again <= began:
        instance.received_again_at = None


def _give_up(instance: Instance, at: datetime, *, retried: bool = False) -> None:
    """End ``instance``, whose attempts are spent (``retried``: the task's retries of
    trouble a retry may cure), in error, ``at`` (the database's clock, as every time other
    hosts compare); its reason keeps the last's."""
    instance.state = InstanceState.ERROR
    last = f"; the last: {instance.reason}" if instance.reason else ""
    tried = (
        f"the task's {TRANSIENT_RETRIES + 1} tries, each failing for trouble a retry may "
        "cure, its back-off spent"
        if retried
        else f"{MAX_ATTEMPTS} attempts"
    )
    instance.reason = f"processing did not complete in {tried}{last}"
    instance.finished_at = at
    instance.transient_failures = 0
    _compared_if_read(instance)
    logger.error("assess: instance %d gave up after %s", instance.id, tried)


def give_up_retries(rt: Runtime, instance_id: int) -> None:
    """End ``instance_id`` in error when the assess task has spent its retries and this
    process still holds the claim: an attempt whose claim or failure could not be
    recorded (the database away) spent a retry of the task's and none of
    ``transient_failures``, and the instance would wait for the lease to run out (half
    an hour) in place of ending as the task did (found in review)."""
    with session_scope(rt.database_url) as session:
        take_instances(session, [instance_id])  # read under the lock, as _finish
        instance = session.get(Instance, instance_id)
        if (
            instance is not None
            and instance.state is InstanceState.PROCESSING
            and instance.claimed_by == process_name("worker")
        ):
            _give_up(instance, database_now(session), retried=True)


#: The outcome of an attempt whose claim ended before it could commit (:func:`_held_by`).
CLAIM_ENDED = "its claim ended while it was assessed; another attempt has the image"


def _claim_ended(instance_id: int, finished: bool) -> AssessOutcome:
    """The outcome of an attempt whose claim ended before it could close the instance:
    a duplicate where another attempt finished it, else :data:`CLAIM_ENDED`."""
    logger.warning(
        "instance %d: its claim ended while it was assessed (its lease ran out, or its "
        "worker was taken for dead): %s",
        instance_id,
        "another attempt finished it" if finished else "it is left to the attempt after it",
    )
    return AssessOutcome("duplicate") if finished else AssessOutcome("skipped", reason=CLAIM_ENDED)


class _ClaimEnded(Exception):
    """The attempt's claim ended before it could close the instance, and another attempt
    holds it, or will (:func:`_held_by`): :func:`assess_instance` says so
    (:func:`_claim_ended`)."""


def _finish(rt: Runtime, claim: _Claim, state: InstanceState, reason: str | None) -> None:
    """Close the claimed instance with no result and nothing to send.

    Raises
    ------
    _ClaimEnded
        This attempt's claim no longer holds it (:func:`_held_by`), and it is not
        finished; nothing is changed. One finished (by another attempt, or a rejection
        note) is left as it is, as before the claim was checked.
    """
    with session_scope(rt.database_url) as session:
        # its row held before it is read: a copy received again meanwhile, whose
        # message a claim refused, is not erased by a stale read (_compared_if_read)
        take_instances(session, [claim.instance_id])
        instance = session.get(Instance, claim.instance_id)
        if instance is None or instance.state in FINISHED:
            return  # another attempt, or a rejection note, closed it: it stands
        if not _held_by(instance, claim):
            raise _ClaimEnded
        _close(instance, claim, state, reason, database_now(session))


def _held_by(instance: Instance, claim: _Claim) -> bool:
    """Whether ``instance`` (its row read under its lock) is still held by ``claim``'s
    attempt: `processing`, claimed by this process at that claim's time. A claim ends
    when its lease runs out or its worker is taken for dead (worker.reconciler), and
    another attempt may hold the image, or have finished it, by the time this one ends:
    closing it then put that attempt's assessment in `error`, or made the image's end
    this attempt's, and a result of another model went beside that one's."""
    return (
        instance.state is InstanceState.PROCESSING
        and instance.claimed_by == process_name("worker")
        and instance.started_at == claim.started_at
    )


def _close(
    instance: Instance, claim: _Claim, state: InstanceState, reason: str | None, at: datetime
) -> None:
    """Give ``instance`` the state its claimed attempt ends in, ``at`` (the database's
    clock, as every time other hosts compare), with the inputs it read."""
    instance.state = state
    instance.reason = reason
    instance.finished_at = at
    instance.inputs_sha256 = claim.inputs
    instance.identity_sha256 = claim.identity
    if claim.withdrew_patient_before and state is not InstanceState.ERROR:
        # done with: what went under it was withdrawn, or named to withdraw by hand. Not
        # otherwise: an assessment in error made nothing, one that sends nothing (a
        # reprocess without --send) withdrew nothing, and one not assessed may have
        # looked for nothing; a reprocess of it, or its next assessment, needs it
        instance.identity_before_sha256 = None
    instance.pixels_signature = claim.pixels
    instance.transient_failures = 0
    _compared_if_read(instance)


@dataclasses.dataclass
class Attempt:
    """The claim an attempt of :func:`assess_instance` took, for the task that made it:
    the instance's assessment and when the attempt began (``Instance.started_at``), both
    None until the attempt claimed the instance. A task whose retry could not be
    published gives the instance back only where its row still shows this claim
    (`worker.tasks.RetriedWithinBudget`)."""

    assessment: int | None = None
    started_at: datetime | None = None
    attempts: int | None = None  # the count of attempts the claim left on the row


def assess_instance(
    rt: Runtime,
    instance_id: int,
    *,
    send: bool = True,
    attempt: Attempt | None = None,
    held: datetime | None = None,
    shared: bool = False,
    held_attempts: int | None = None,
) -> AssessOutcome:
    """Assess one received instance and queue its outputs for delivery.

    Returns what happened; raises only for trouble a retry may cure
    (:data:`RETRIED_BY_THE_TASK`), after which the task is retried, or for a fault,
    after which this attempt gives the instance up for the reconciler to queue again.
    Either way the instance's reason says where the attempt failed until another one
    finishes it, and the error the instance ends in after :data:`MAX_ATTEMPTS` says
    where the last one did. With ``send=False``, or where a `reprocess` not asked to
    send cleared the instance's ``send_outputs`` (whatever message then queues it: the
    reconciler's too), the result is recorded and the SR and SC written to the outbox,
    but no delivery is made; unless a copy of the image came since it was queued, which
    this attempt may read: the PACS's correction is sent. ``attempt``, where given, is
    filled in with the claim this attempt takes. ``held``: the time of the claim the
    task's try before this retry took (its ``attempt.started_at``), which this attempt
    takes over although no other may while it runs (:func:`_claim`). ``shared``: this
    process may hold other images while it assesses this one (:func:`_claim`).
    ``held_attempts``: the count of attempts that claim left (``attempt.attempts``),
    which the retry keeps (:func:`_claim`).
    """
    claimed = _claim(rt, instance_id, held, shared=shared, held_attempts=held_attempts)
    if isinstance(claimed, AssessOutcome):
        return claimed
    if attempt is not None:
        attempt.assessment, attempt.started_at = claimed.assessment, claimed.started_at
        attempt.attempts = claimed.attempts
    try:
        outcome = _assessed_by_this_model(rt, claimed)
        if outcome is None:
            # a copy that came while it waited is sent as one received again after would be
            outcome = _assess(rt, claimed, send=(send and claimed.send) or claimed.copy_came)
    except _ClaimEnded:
        outcome = _claim_ended(instance_id, finished=False)
    except Exception as exc:
        from models.predictor import DeviceFailure  # torch: loaded by then

        if isinstance(exc, DeviceFailure):
            give_back_held_from_a_failed_device(rt, exc)  # this image among them
        else:
            _note_failed_attempt(rt, claimed, exc)
        raise
    return _with_copy_to_compare(rt, instance_id, outcome)


#: What the reason of an instance given back by a worker whose GPU failed ends with.
GIVEN_BACK_FROM_A_FAILED_DEVICE = "; the worker's GPU failed: given back to be queued again"


def give_back_held_from_a_failed_device(rt: Runtime, exc: BaseException) -> int:
    """Put every instance this process holds (`processing`, claimed under its
    :func:`~worker.heartbeat.process_name`) back to `received`, claimed by none, its
    attempt not counted, in one statement: the images are not at fault, and the worker
    stops next (worker.tasks), to be restarted on a GPU that works; the reconciler
    queues them again. A threads pool's other tasks claimed theirs (an attempt counted
    each) and met the same failed GPU, or were still reading their images: the process
    ends before they would give theirs back. Returns
    how many were given back; where that cannot be written, 0 and a warning (the
    reconciler takes them back once the stopped worker's lease runs out)."""
    held = (Instance.state == InstanceState.PROCESSING) & (
        Instance.claimed_by == process_name("worker")
    )
    try:
        with session_scope(rt.database_url) as session:
            # their rows first, in id order, as every path that changes several does
            take_instances(session, session.scalars(select(Instance.id).where(held)).all())
            given_back = session.execute(
                update(Instance)
                .where(held)
                .values(
                    reason=literal("attempt ", String)
                    + Instance.attempts.cast(String)
                    + literal(f" failed: {_failure(exc)}{GIVEN_BACK_FROM_A_FAILED_DEVICE}"),
                    attempts=case((Instance.attempts > 0, Instance.attempts - 1), else_=0),
                    state=InstanceState.RECEIVED,
                    claimed_by=None,
                )
                .execution_options(synchronize_session=False)
            )
            return int(given_back.rowcount)  # type: ignore[attr-defined]
    except Exception as noted:  # the database may be away too
        logger.warning(
            "the instances this worker holds were not given back after the GPU failed "
            "(%s); the reconciler takes them back once its lease runs out",
            type(noted).__name__,
        )
        return 0


def _with_copy_to_compare(rt: Runtime, instance_id: int, outcome: AssessOutcome) -> AssessOutcome:
    """``outcome``, saying whether the instance, finished, still has a copy received again
    to compare: one that came after this attempt claimed it (:func:`_compared_if_read`
    kept it), whose message was refused while the attempt ran, or is still on its way.
    Queued again, it is compared at once, not when the reconciler finds it (once the
    inference queue is empty, minutes later at best); a message on its way too compares
    it a second time, which changes nothing."""
    try:
        with session_scope(rt.database_url) as session:
            waiting = session.scalar(
                select(Instance.id).where(
                    Instance.id == instance_id,
                    Instance.state.in_(FINISHED),
                    Instance.received_again_at.is_not(None),
                )
            )
    except Exception as exc:  # the outcome stands; the reconciler finds the copy
        logger.warning(
            "instance %d: whether a copy waits to be compared is not known (%s)",
            instance_id,
            type(exc).__name__,
        )
        return outcome
    return dataclasses.replace(outcome, copy_to_compare=waiting is not None)


def _assessed_by_this_model(rt: Runtime, claim: _Claim) -> AssessOutcome | None:
    """End the claim of an instance this worker's model has already assessed in this
    assessment, as it was, with nothing made or sent; None when it has not.

    `reprocess` puts such an instance back in the queue for another model, and a worker
    still running this one may take the message; or a message delivered again finds the
    instance still claimed by the attempt that committed its result. Assessing it would
    only clash with the result it has.
    """
    model_id = rt.predictor.model_id
    with session_scope(rt.database_url) as session:
        has_result = session.scalar(
            select(Result.id).where(
                Result.instance_id == claim.instance_id,
                Result.model_id == model_id,
                Result.assessment == claim.assessment,
            )
        )
        if has_result is None:
            return None
        take_instances(session, [claim.instance_id])  # read under the lock, as _finish
        instance = session.get_one(Instance, claim.instance_id)
        if instance.state not in FINISHED:  # else an attempt beside this one closed it
            # No file was read: a copy received meanwhile (a correction, while a reprocess
            # waited) is left to be compared (_with_copy_to_compare), not taken as read.
            instance.state = InstanceState.ASSESSED
            instance.reason = None
            instance.finished_at = database_now(session)
    logger.warning(
        "instance %d: this worker's model %s assessed it already; a reprocess for another "
        "model needs workers that run that model",
        claim.instance_id,
        model_id[:12],
    )
    return AssessOutcome("skipped", reason="already assessed by this worker's model")


#: The header attributes an assessment's result depends on beside the gate's decision
#: and the patient's facts (:func:`assessment_inputs`): the study and series the SR
#: and SC join, the orientation the SC is shown in, and how the pixels are described
#: and shown (dicom_io.pixels).
IMAGE_INPUTS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientOrientation",
    *FRAME_DESCRIPTION,
    "NumberOfFrames",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
)


def assessment_inputs(ds: Dataset, decision: gate.GateDecision) -> str:
    """Hex SHA-256 of what an assessment of ``ds`` depends on, its pixels aside.

    The gate's ``decision`` on it (accepted, or refused and why) and the patient's
    facts it read (sex, birth date, the date of the image, age, the side our objects
    state: :func:`~dicom_io.content.image_side`), and the
    values of :data:`IMAGE_INPUTS` as pydicom reads them, surrounding spaces aside
    (an absent attribute differs from an empty one). A patient's name or ID,
    accession number or study description that a PACS reconciles changes none of it
    (the descriptions count where the gate decides by them). The digest is kept in
    the database in place of the values.
    """
    digest = hashlib.sha256()
    digest.update(f"{decision.accepted}\n{decision.reason}\n{decision.facts!r}\n".encode())
    if decision.facts.age_in_whole_years_only:  # the repr leaves the unit out
        digest.update(b"age in whole years only\n")
    for keyword in IMAGE_INPUTS:
        digest.update(f"{keyword}={_header_text(ds, keyword)}\n".encode("utf-8", "replace"))
    return digest.hexdigest()


#: The attribute that names the patient an SR or SC of ours is filed under, as
#: dicom_io.sr copies it from the image (:func:`identity_digest`): the Patient ID. Not
#: Patient's Name, whose spelling a PACS corrects under the same ID (and in our SR and SC
#: with it), nor the Issuer of Patient ID or Other Patient IDs, which a PACS adds or
#: reconciles when it forwards or moves an image: a backfill from one that adds them
#: would assess every image again and withdraw every result (found in review).
PATIENT_IDENTITY = ("PatientID",)


def patient_identity(ds: Dataset) -> str:
    """The values of :data:`PATIENT_IDENTITY` in ``ds``, as text to compare: surrounding
    spaces aside, an absent attribute as an empty one (an SR writes Patient ID empty
    where the image has none)."""
    return "\n".join(
        f"{keyword}={_identity_text(ds, keyword) if keyword in ds else ''}"
        for keyword in PATIENT_IDENTITY
    )


def _identity_text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds[keyword].value
    except Exception:  # a value pydicom refuses to convert: its bytes, as they came
        return f"\x00raw {ds.get_item(keyword).value!r}"
    return _value_text(value)


def _value_text(value: object) -> str:
    """A value as text to compare; a sequence's items element by element, in tag order."""
    if isinstance(value, Dataset):
        parts = []
        for tag in sorted(value.keys()):
            try:
                text = _value_text(value[tag].value)
            except Exception:
                text = f"\x00raw {value.get_item(tag).value!r}"
            parts.append(f"{int(tag):08X}={text}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_value_text(item) for item in value)
    return str(value).strip()


def identity_digest(ds: Dataset, sop_instance_uid: str) -> str:
    """Hex SHA-256 of the patient ``ds`` names (:func:`patient_identity`), salted with its
    SOP Instance UID: kept in the database in place of the values. A copy received again
    under another Patient ID (the PACS corrected it) is assessed again: its SR and SC are
    filed under the patient it names."""
    text = f"{sop_instance_uid}\n{patient_identity(ds)}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def _decide(rt: Runtime, ds: Dataset) -> tuple[gate.GateDecision, str]:
    """The gate's decision on ``ds`` under this site's settings, and the digest of what
    its assessment depends on: an assessment and the comparison of a copy received
    again must compute both the same way."""
    decision = gate.check(ds, require_sex=rt.settings.missing_sex == "reject")
    return decision, assessment_inputs(ds, decision)


def _header_text(ds: Dataset, keyword: str) -> str:
    if keyword not in ds:
        return "\x00absent"
    try:
        value = ds[keyword].value
    except Exception:  # a value pydicom refuses to convert: its bytes, as they came
        return f"\x00raw {ds.get_item(keyword).value!r}"
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(item).strip() for item in value)
    return str(value).strip()


def _decode(rt: Runtime, ds: Dataset) -> np.ndarray:
    """``ds``'s image as the model and the heat map get it (:func:`decode_as_assessed`:
    reduced, as far as they allow).

    Raises
    ------
    PixelDataError
        When the pixel data is missing or cannot be decoded.
    """
    input_size, floor = rt.predictor.input_size, rt.settings.sc_min_long_side
    with rt.stage():
        return decode_as_assessed(ds, input_size=input_size, sc_min_long_side=floor)


#: The cells a side of the picture an assessment keeps of its image (:func:`image_signature`).
SIGNATURE_CELLS = 32
#: How far two pictures of one image may be apart, each standardised (its mean taken
#: away, divided by its standard deviation): on average over the cells, and in any one
#: cell (:func:`signatures_differ`). Measured on a 2048 px and a 1400 px hand: a copy
#: transcoded to JPEG 2000, lossless or 20:1, and decoded at the same or another
#: reduction, is at most 0.016 apart on average and 0.16 in a cell; flipped, 0.45 and
#: 4.1; a corner an eighth of the side made white, 0.18 and 5.1.
SIGNATURE_MEAN_SD = 0.05
SIGNATURE_CELL_SD = 0.5
#: The picture recorded of an assessment whose pixels could not be decoded: any copy
#: that decodes differs from it, a copy that does not is the same.
UNDECODABLE = b"\x00undecodable"


def image_signature(image: np.ndarray) -> bytes:
    """A picture of the display image (:func:`decode_for_display`) an assessment gave
    the model: the mean of each cell of a 32 x 32 grid over it, in 8-bit grey levels
    (fewer cells where the image has fewer pixels). It tells nothing of the patient
    that the image would not.
    """
    height, width = image.shape
    cells = min(SIGNATURE_CELLS, height, width)
    rows = (np.arange(cells) * height) // cells
    columns = (np.arange(cells) * width) // cells
    # along the rows first, whose values lie side by side: 0.7 ms for 1400 x 1100 pixels
    # where the columns first take 3 ms (float32 sums of a cell's few thousand values
    # are exact to far under a grey level)
    sums = np.add.reduceat(np.add.reduceat(image, columns, axis=1), rows, axis=0)
    counts = np.outer(np.diff(rows, append=height), np.diff(columns, append=width))
    return np.round(np.clip(sums / counts, 0.0, 1.0) * 255).astype(np.uint8).tobytes()


def signatures_differ(first: bytes, second: bytes) -> bool:
    """Whether two pictures (:func:`image_signature`, or :data:`UNDECODABLE`) are of
    other pixels.

    Each is standardised first. Where the header states no window, the display image's
    is the 0.5-99.5 percentile range of the pixels decoded, which moves when a copy is
    decoded otherwise (JPEG 2000 at a reduced level is smoother than blocks averaged):
    a lossless transcode then shifted the whole picture by 2.4-4 grey levels. A window
    moves the picture linearly, which standardising takes away. Other pixels do not:
    another image, or this one flipped, shifted, or changed in a region (a marker, a
    mask), more than :data:`SIGNATURE_MEAN_SD` on average or :data:`SIGNATURE_CELL_SD`
    in a cell. A change of tone alone (another look-up table) is not told apart from a
    transcode, and does not count: the window the model sees absorbs most of it.
    """
    if first == second:
        return False
    if len(first) != len(second):
        return True
    apart = np.abs(_standardised(first) - _standardised(second))
    return bool(apart.mean() > SIGNATURE_MEAN_SD or apart.max() > SIGNATURE_CELL_SD)


def _standardised(picture: bytes) -> np.ndarray:
    values = np.frombuffer(picture, np.uint8).astype(np.float64)
    centred = values - values.mean()
    spread = float(values.std())
    return centred / spread if spread > 0 else centred


def picture_now(rt: Runtime, ds: Dataset) -> bytes:
    """The picture of ``ds``'s pixels, decoded as an assessment decodes them
    (:func:`image_signature`), or :data:`UNDECODABLE`.

    Raises
    ------
    OSError
        When the file cannot be read (:class:`FileChangedError` when another copy took
        its place since its header was read).
    """
    try:
        return image_signature(_decode(rt, ds))
    except PixelDataError:
        return UNDECODABLE


#: The folder that holds this project's packages (the checkout, or site-packages where
#: it is installed), and those packages: a failure is placed at its last frame in them.
_PACKAGES_ROOT = Path(__file__).resolve().parents[1]
_OUR_PACKAGES = frozenset({"worker", "dicom_io", "models", "db", "tests"})


def _failure(exc: BaseException) -> str:
    """What failed and where, for a person: the exception's type and the last line of
    this project's code it came through. Never its message, which may quote a
    patient's attributes (pydicom's and highdicom's do)."""
    place = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if not path.is_relative_to(_PACKAGES_ROOT):
            continue
        relative = path.relative_to(_PACKAGES_ROOT)
        if relative.parts[0] in _OUR_PACKAGES:
            place = f" in {relative.as_posix()}:{frame.lineno} ({frame.name})"
            break
    return f"{type(exc).__name__}{place}"


def site_sex_note(male: bool) -> str:
    """The note of an assessment whose image records no sex, given the site's."""
    return (
        f"Patient sex not recorded as M or F: assessed as {'male' if male else 'female'} "
        "(site setting BONEAGE_MISSING_SEX)"
    )


def _note_failed_attempt(rt: Runtime, claim: _Claim, exc: BaseException) -> None:
    """Record on the instance, still `processing` under this attempt's claim, where the
    attempt failed, and the inputs and identity it read, if it got so far (so that a
    corrected copy received again is assessed again, even after the instance ended in
    error). An attempt whose claim is no longer on the row (the reconciler took the
    instance back and another attempt claimed it since) records nothing: its failure
    cleared the other's claim, and counted in that one's attempts (found in review).

    The task retries the trouble in :data:`RETRIED_BY_THE_TASK` itself, with its
    back-off: the claim stays, and its attempt is given back (it spends none of
    :data:`MAX_ATTEMPTS`); the instance ends in error when the task's retries are spent
    (:data:`TRANSIENT_RETRIES`). After a fault the last of :data:`MAX_ATTEMPTS` ends it
    in error at once; before that, no worker keeps the claim: no message will bring the
    instance back, and the reconciler queues it again once its pause is over, where it
    used to wait for the lease of a worker that died (half an hour).
    """
    instance_id = claim.instance_id
    try:
        with session_scope(rt.database_url) as session:
            # The row first, locked until the commit (a row lock on PostgreSQL, the write
            # lock on SQLite), then read: the claim is checked, and the counts written,
            # on the row as it is. Read first, a claim taken between the read and the
            # write was cleared, and a count written back lost another's.
            take_instances(session, [instance_id])
            instance = session.get(Instance, instance_id)
            if instance is not None and instance.state is InstanceState.PROCESSING:
                if (instance.claimed_by, instance.started_at) != (
                    process_name("worker"),
                    claim.started_at,
                ):
                    logger.info(
                        "instance %d: the failed attempt's claim was taken back; another "
                        "attempt holds it",
                        instance_id,
                    )
                    return
                failed = f"attempt {instance.attempts} failed: {_failure(exc)}"
                instance.reason = failed
                if claim.inputs is not None:
                    instance.inputs_sha256 = claim.inputs
                    instance.identity_sha256 = claim.identity
                if isinstance(exc, RETRIED_BY_THE_TASK):
                    instance.attempts = max(0, instance.attempts - 1)
                    # given back here: a death in the back-off, the image held by no
                    # thread, gives back nothing more (the reconciler gives a shared
                    # claim's attempt back), and the retry's claim says again whether
                    # its process holds others
                    instance.claim_shared = False
                    instance.transient_failures += 1
                    instance.reason = (
                        f"{failed} (retried: {instance.transient_failures} of "
                        f"{TRANSIENT_RETRIES + 1} tries)"
                    )
                    if instance.transient_failures > TRANSIENT_RETRIES:
                        _give_up(instance, database_now(session), retried=True)
                elif instance.attempts >= MAX_ATTEMPTS:
                    _give_up(instance, database_now(session))
                else:
                    instance.claimed_by = None
    except Exception as noted:  # the database may be what failed
        logger.warning(
            "instance %d: where the attempt failed is not recorded (%s)",
            instance_id,
            type(noted).__name__,
        )


#: Why an instance whose spooled file is not its image is not assessed
#: (:func:`_of_another_image`).
SPOOLED_ANOTHER_IMAGE = "the spooled file is not this image"


def _of_another_image(claim: _Claim, ds: Dataset) -> str | None:
    """What makes the spooled file ``ds`` another image than the claimed instance's, or
    None: another SOP Instance UID. A copy in another study is not: the PACS may have
    moved the image, or corrected its patient, and sent it again before its first
    assessment, which then files its objects where the image is now."""
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if sop_uid and sop_uid != claim.sop_instance_uid:
        return "of another SOP Instance UID"
    return None


def _assess(rt: Runtime, claim: _Claim, *, send: bool) -> AssessOutcome:
    """:func:`assess_instance` of an instance this attempt has claimed."""
    settings = rt.settings
    instance_id, spool = claim.instance_id, claim.spool

    try:
        # the header; of the pixel data only what is decoded is read, when it is (of several
        # frames the one assessed; a large uncompressed frame a strip at a time), so that
        # memory grows neither with an instance's frames nor with an uncompressed one's size
        ds = read_image(spool)
    except FileNotFoundError:
        claim.inputs = UNREAD
        _finish(rt, claim, InstanceState.ERROR, "the spooled file is missing")
        return AssessOutcome("error", reason="spool file missing")
    except Exception as exc:  # pydicom raises many types on malformed files
        if _io_trouble(exc):  # EIO, a stale NFS handle, no file descriptor left: retried
            raise
        claim.inputs = UNREAD
        reason = f"the file cannot be parsed as DICOM ({type(exc).__name__})"
        logger.info("instance %d not assessed (%s)", instance_id, reason_category(reason))
        _finish(rt, claim, InstanceState.NOT_ASSESSED, reason)
        return AssessOutcome("not_assessed", reason=reason)
    if (other := _of_another_image(claim, ds)) is not None:
        claim.inputs = UNREAD  # its own copy received again is then assessed
        logger.error("instance %d not assessed: its spooled file is %s", instance_id, other)
        reason = f"{SPOOLED_ANOTHER_IMAGE} ({other}): nothing was made of it"
        _finish(rt, claim, InstanceState.ERROR, reason)
        return AssessOutcome("error", reason=reason)

    decision, claim.inputs = _decide(rt, ds)
    claim.identity = identity_digest(ds, claim.sop_instance_uid)
    claim.study = _study_of(ds)
    if is_key_object_selection(ds):
        return _key_object_selection(rt, claim, ds)
    if (rejection := _rejection(rt, claim)) is not None:
        withdrawals = _withdrawn_with_the_copy(rt, claim, rejection, ds)
        _finish(rt, claim, InstanceState.REJECTED, rejection.why)
        logger.info("instance %d not assessed: the PACS rejected it", instance_id)
        return AssessOutcome("rejected", delivery_ids=tuple(withdrawals), reason=rejection.why)
    if not decision.accepted:
        return _not_assessed(rt, claim, ds, decision.reason or "", send=send)
    facts = decision.facts
    notes: list[str] = []
    male = facts.male
    if male is None:
        male = settings.missing_sex == "male"
        notes.append(site_sex_note(male))
    notes += age_notes(facts, male=male)

    predictor = rt.predictor
    try:
        image = _decode(rt, ds)
    except NoContrastError as exc:  # decoded, but blank or saturated: nothing to assess
        claim.pixels = UNDECODABLE  # a copy that shows an image is then assessed
        return _not_assessed(rt, claim, ds, f"pixel data: {exc}", send=send)
    except PixelDataError as exc:
        claim.pixels = UNDECODABLE  # a copy that decodes is then assessed
        return _not_assessed(rt, claim, ds, f"pixel data cannot be decoded: {exc}", send=send)
    claim.pixels = image_signature(image)
    # Decoded: the stored pixels are not read again, and a batching worker holds as many
    # studies at once as it has task threads.
    drop_pixel_data(ds)

    started = time.perf_counter()
    prediction = rt.predict(image, male=male)  # alone, or in a batch with other tasks'
    elapsed = time.perf_counter() - started

    finding = assessment_finding(predictor, prediction, facts, male=male, notes=notes)
    chronological, sds = finding.chronological_age_months, finding.sds
    other_study = claim.other_study(ds)
    uids = image_uids(rt, instance_id)
    earlier_maps = _earlier_heat_maps(rt, claim, ds, uids)
    # the series this heat map joins, and its heat maps before this one, whose Body Part
    # Examined and Laterality it carries: one of its side (as the SC would state it alone);
    # only a later assessment has earlier ones to compare
    opened_for, joined = heat_map_series(
        earlier_maps,
        finding.laterality or image_side(ds),
        source_uid=claim.sop_instance_uid,
        model_id=predictor.model_id,
        other_study=other_study,
        uids=uids,
    )
    new_series = (
        sc_series_uid(
            claim.sop_instance_uid, predictor.model_id, other_study, uids=uids, side=opened_for
        )
        if earlier_maps
        else None
    )
    outputs = stage_outputs(  # moved into the outbox by the commit, if it wins
        ds,
        image,
        prediction,
        finding,
        source_uid=claim.sop_instance_uid,
        uids=uids,
        outbox_dir=settings.outbox_dir,
        device_observer_uid=rt.device_observer_uid,
        assessment=claim.assessment,
        replaces=_earlier_reports(rt, claim, ds),
        replaces_heat_map=joined is not None,
        series_heat_map=first_heat_map_as_written(joined) if joined is not None else None,
        other_study=other_study,
        sc_side=opened_for,
        sc_laterality=series_side(joined) if joined is not None else None,
    )
    # the other heat maps in this study, another model's or the series of another side
    # this one left, are withdrawn by a notice in each series
    try:
        outputs += stage_withdrawals(
            ds,
            [
                m
                for m in earlier_maps
                if m.series_instance_uid != new_series
                and m.study_instance_uid == ds.StudyInstanceUID
            ],
            ASSESSED_AGAIN,
            source_uid=claim.sop_instance_uid,
            uids=uids,
            outbox_dir=settings.outbox_dir,
            assessment=claim.assessment,
        )
        # and what went into a study the image has left is withdrawn there
        moved, unmade = stage_moved_withdrawals(rt, claim, ds) if send else ([], None)
        outputs += moved
    except BaseException:
        discard(outputs)
        raise

    _ensure_model(rt, predictor)
    result = Result(
        instance_id=instance_id,
        model_id=predictor.model_id,
        assessment=claim.assessment,
        bone_age_months=prediction.bone_age_months,
        chronological_age_months=chronological,
        sds=sds,
        intervals={str(k): list(v) for k, v in prediction.intervals.items()},
        male=male,
        laterality=facts.laterality,
        inference_seconds=elapsed,
        device=predictor.runs_on[:64],
    )
    # the finding's notes: those above and what the prediction adds (an estimate outside
    # the ages reported), so that the reason and `status` say what the SR and SC say
    caveats = [*finding.notes] + (
        [] if finding.model_trained else ["assessed by an UNTRAINED model"]
    )
    if unmade is not None:
        caveats.append(unmade)
    outcome = _commit(
        rt,
        claim,
        InstanceState.ASSESSED,
        "; ".join(caveats) or None,
        result,
        outputs,
        send=send,
    )
    outcome = _rejected_at_the_commit(rt, claim, outcome, ds)
    if outcome.state == "assessed":
        logger.info(
            "instance %d assessed in %.2fs on %s (%d deliveries)",
            instance_id,
            elapsed,
            predictor.runs_on,
            len(outcome.delivery_ids),
        )
    return outcome


def stage_outputs(
    source: Dataset,
    image: np.ndarray,
    prediction: Prediction,
    finding: BoneAgeFinding,
    *,
    source_uid: str,
    uids: UidScheme,
    outbox_dir: Path,
    device_observer_uid: str,
    assessment: int = 1,
    replaces: Sequence[Dataset] = (),
    replaces_heat_map: bool = False,
    other_study: str | None = None,
    series_heat_map: Dataset | None = None,
    sc_side: str | None = None,
    sc_laterality: str | None = None,
) -> list[Output]:
    """Build the SR and the heat-map SC of one assessment and stage both, durable.

    Output identities depend only on (node, source instance, model, assessment): see the
    module docstring. :func:`publish` moves them into the outbox (the pipeline does so
    inside its commit).
    """
    sr, sc = build_outputs(
        source,
        image,
        prediction,
        finding,
        source_uid=source_uid,
        uids=uids,
        device_observer_uid=device_observer_uid,
        assessment=assessment,
        replaces=replaces,
        replaces_heat_map=replaces_heat_map,
        other_study=other_study,
        series_heat_map=series_heat_map,
        sc_side=sc_side,
        sc_laterality=sc_laterality,
    )
    staged = [_stage_output(outbox_dir, ObjectKind.SR, sr, "sr")]
    try:
        staged.append(_stage_output(outbox_dir, ObjectKind.SC, sc, "sc"))
    except BaseException:
        discard(staged)
        raise
    return staged


def build_outputs(
    source: Dataset,
    image: np.ndarray,
    prediction: Prediction,
    finding: BoneAgeFinding,
    *,
    source_uid: str,
    uids: UidScheme,
    device_observer_uid: str,
    assessment: int = 1,
    replaces: Sequence[Dataset] = (),
    replaces_heat_map: bool = False,
    other_study: str | None = None,
    series_heat_map: Dataset | None = None,
    sc_side: str | None = None,
    sc_laterality: str | None = None,
) -> tuple[Dataset, Dataset]:
    """The SR and the heat-map SC of one assessment, in memory: ``(sr, sc)``.

    A later assessment's SR and SC join the first's series as instance ``assessment``;
    its SR replaces the reports in ``replaces`` (:func:`dicom_io.sr.earlier_report`),
    and with ``replaces_heat_map`` its SC says, in its picture and comments, that it
    replaces the earlier heat map of the series, which a destination holds. With
    ``other_study`` (the image is now in another study than the one it was first received
    in) both go into series of their own in that study. ``series_heat_map``, the first
    earlier heat map of the SC's series still as written
    (:func:`first_heat_map_as_written`), gives the SC the series' Body Part Examined and
    Laterality; None (the series' first heat map, or retention removed the earlier ones'
    files): the source's (:func:`dicom_io.sc.build_heatmap_sc`). ``sc_side``: the SC goes
    into the series of its own opened for that side (:func:`heat_map_series`).
    ``sc_laterality``: the side of the series the SC joins (:func:`series_side`), which it
    carries where no heat map of the series can be read any more, not the side the source
    states.
    """
    model_id = finding.model_id
    sr_uid = uids.derive(source_uid, model_id, *_again(assessment), "sr")
    sc_uid = uids.derive(source_uid, model_id, *_again(assessment), "sc")

    sr = build_bone_age_sr(
        source,
        finding,
        series_instance_uid=sr_series_uid(source_uid, model_id, other_study, uids=uids),
        sop_instance_uid=sr_uid,
        series_number=SR_SERIES_NUMBER,
        instance_number=assessment,
        device_observer_uid=device_observer_uid,
        predecessors=replaces,
    )
    if replaces_heat_map:
        finding = dataclasses.replace(finding, notes=(*finding.notes, REPLACES_HEAT_MAP))
    # the heat map straight at the picture's size: never upsampled to the full image
    rgb = render_overlay(image, prediction.cam_at(overlay_shape(image.shape)), finding)
    if series_heat_map is None and sc_laterality is not None:
        finding = dataclasses.replace(finding, laterality=sc_laterality)
    sc = build_heatmap_sc(
        source,
        rgb,
        finding,
        series_instance_uid=sc_series_uid(
            source_uid, model_id, other_study, uids=uids, side=sc_side
        ),
        sop_instance_uid=sc_uid,
        series_number=SC_SERIES_NUMBER,
        instance_number=assessment,
        series_heat_map=series_heat_map,
    )
    return sr, sc


#: Why another model's heat map no longer stands, once its image was assessed again.
ASSESSED_AGAIN = "the image was received again with other values and assessed again"


def stage_withdrawals(
    source: Dataset,
    heat_maps: Sequence[HeatMapSeries],
    why: str,
    *,
    source_uid: str,
    uids: UidScheme,
    outbox_dir: Path,
    assessment: int,
) -> list[Output]:
    """Stage a notice withdrawing the bone age of each series in ``heat_maps``, as
    instance ``assessment`` of that series: a viewer that shows the images and not the
    SR that replaced their report sees it after the heat maps.

    Its Body Part Examined and Laterality, General Series attributes, are the series'
    own: those of the first of its heat maps whose file is still as written
    (:func:`first_heat_map_as_written`), the one the series was opened with, not
    ``source``'s (a copy received again, which may name another part or side, or none);
    where none is left, the hand's and the series' side (:func:`series_side`), else the
    side ``source`` states (:func:`~dicom_io.sc.notice_body_part`,
    :func:`~dicom_io.content.image_side`).

    A notice joins the series whose heat maps it withdraws, whatever side ``source``
    states: in a series of its own it would withdraw nothing a viewer shows beside it, and
    it shows no hand to label. Each series gets one, the model's series of the image and
    those opened for a side (:func:`heat_map_series`) alike, under a UID of its own
    (:func:`_on_side`).
    """
    staged: list[Output] = []
    try:
        for series in heat_maps:
            written = first_heat_map_as_written(series)
            notice = build_withdrawal_sc(
                source,
                why,
                body_part_examined=notice_body_part(written),
                series_heat_map=written,
                laterality=series_side(series),
                model_name=series.model_name,
                model_trained=series.trained,
                series_instance_uid=series.series_instance_uid,
                sop_instance_uid=uids.derive(
                    source_uid,
                    series.model_id,
                    *_again(assessment),
                    "withdrawn-sc",
                    *_on_side(series.side),
                ),
                series_number=SC_SERIES_NUMBER,
                instance_number=assessment,
            )
            output = _stage_output(outbox_dir, ObjectKind.SC, notice, "withdrawn-sc")
            staged.append(dataclasses.replace(output, of_result=False))
    except BaseException:
        discard(staged)
        raise
    return staged


def first_heat_map_as_written(series: HeatMapSeries) -> Dataset | None:
    """The header of the first heat map of ``series`` whose file is still as written
    (:func:`_heat_map_as_written`): the one the series was opened with, unless retention
    removed it. Its Body Part Examined and Laterality are the series' (General Series
    attributes), which a withdrawal notice and a later heat map joining the series carry;
    None where no heat map of the series can be read any more. Read once for each
    ``series`` (:attr:`HeatMapSeries.first_as_written`)."""
    return series.first_as_written


def _heat_map_as_written(heat_map: HeatMap) -> Dataset | None:
    """The header of ``heat_map`` as its file in the outbox holds it, where that file is
    still there (retention removes it) and is the one written (its SHA-256, its UID)."""
    try:
        data = heat_map.path.read_bytes()
    except FileNotFoundError:
        return None
    if heat_map.sha256 is not None and hashlib.sha256(data).hexdigest() != heat_map.sha256:
        return None
    try:
        header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # pydicom raises many types on a malformed file: not the one written
        return None
    if str(header.get("SOPInstanceUID", "")) != heat_map.sop_instance_uid:
        return None
    return header


def sc_series_uid(
    source_uid: str,
    model_id: str,
    other_study: str | None = None,
    *,
    uids: UidScheme,
    side: str | None = None,
) -> str:
    """The series of one model's heat maps of ``source_uid`` (and of notices that
    withdraw them); in ``other_study``, another than the one the image was first
    received in, a series of its own: a series belongs to one study. With ``side``, the
    series of its own a heat map of that side opens where the model's series of the image
    has another Laterality (:func:`heat_map_series`): a General Series attribute, one
    value for the series."""
    return uids.derive(source_uid, model_id, "sc-series", *_in_study(other_study), *_on_side(side))


def sr_series_uid(
    source_uid: str, model_id: str | None, other_study: str | None = None, *, uids: UidScheme
) -> str:
    """The series of the SRs about ``source_uid``: of one model, or (None) of those
    that say it was not assessed; in ``other_study`` one of its own, as
    :func:`sc_series_uid`."""
    if model_id is None:
        return uids.derive(source_uid, "not-assessed-series", *_in_study(other_study))
    return uids.derive(source_uid, model_id, "sr-series", *_in_study(other_study))


def _in_study(other_study: str | None) -> tuple[str, ...]:
    """What sets a series in another study apart, in :meth:`UidScheme.derive`: nothing for
    the study the image was first received in, so the UIDs stay what they were."""
    return () if other_study is None else ("study", other_study)


def _on_side(side: str | None) -> tuple[str, ...]:
    """What sets a heat-map series opened for a side apart (:func:`heat_map_series`), and
    the notices in it, in :meth:`UidScheme.derive`: nothing for the model's series of the
    image, so the UIDs of an image whose side never changed stay what they were."""
    return () if side is None else ("side", side)


#: The sides a heat-map series of its own is opened for (:func:`heat_map_series`).
SIDES = ("L", "R")


def heat_map_series(
    earlier: Sequence[HeatMapSeries],
    side: str | None,
    *,
    source_uid: str,
    model_id: str,
    other_study: str | None,
    uids: UidScheme,
) -> tuple[str | None, HeatMapSeries | None]:
    """The heat-map series a heat map of the model ``model_id`` of the image joins, whose
    own side (its finding's, else the one its image states:
    :func:`~dicom_io.content.image_side`) is ``side``: ``(opened_for, joined)``, the side
    of a series of its own (:func:`sc_series_uid`'s ``side``; None: the model's series of
    the image in that study) and that series as ``earlier`` assessments left it (None:
    none of its heat maps is at a destination).

    Laterality is a General Series attribute, which a heat map joining a series carries
    (that of the series' first heat map, :func:`first_heat_map_as_written`): a heat map
    whose side differs from it, the PACS having corrected the image's side (L sent again
    as R), goes into a series of its own for that side, not into one that would label a
    right hand left. The model's series of the image is the one whose Laterality is
    ``side`` (:func:`series_side`: where retention removed its heat maps' files, the side
    its first heat map's result recorded; a side unknown so is not ``side``), and where it
    has none of its heat maps at a destination and no series was opened for ``side``: the
    heat map opens it, and carries its own side. A copy that states
    no side contradicts none: its heat map joins the series of the image's latest heat
    map, and carries its Laterality.
    """
    ours = {
        opened_for: next(
            (
                m
                for m in earlier
                if m.series_instance_uid
                == sc_series_uid(source_uid, model_id, other_study, uids=uids, side=opened_for)
            ),
            None,
        )
        for opened_for in (None, *SIDES)
    }
    if side is None:
        standing = [(m.latest, opened_for) for opened_for, m in ours.items() if m is not None]
        latest = max(standing, key=lambda made: made[0])[1] if standing else None
        return latest, ours[latest]
    default = ours[None]
    if default is not None:  # its side unknown (None) is not this one: a series of its own
        opened_for = None if series_side(default) == side else side
    else:  # none at a destination: a series opened for this side before is this side's
        opened_for = side if ours.get(side) is not None else None
    return opened_for, ours[opened_for]


def series_side(series: HeatMapSeries) -> str | None:
    """The side (Laterality, a General Series attribute) of ``series``: that of its first
    heat map still as written (:func:`first_heat_map_as_written`); where retention removed
    their files, the side a series of its own was opened for (its UID says it), else the
    side the result of the assessment that made its first heat map recorded
    (:attr:`HeatMap.side`, which that heat map stated). None: it states no side, or its
    side is unknown (a result recorded before the gate read the side as our objects
    state it), which a heat map of a side therefore does not join."""
    written = first_heat_map_as_written(series)
    if written is not None:
        return series_laterality(written)
    if series.side is not None:
        return series.side
    return series.heat_maps[0].side if series.heat_maps else None


def _earlier_reports(rt: Runtime, claim: _Claim, source: Dataset) -> list[Dataset]:
    """The SRs of earlier assessments of the claimed instance that a destination has, or
    may have: the reports a later assessment's SR replaces. Those not sent were
    superseded when the instance was claimed for this assessment; of those, the ones then
    on their way may arrive all the same, and are named too (a send that failed since
    is not). And the SR of this assessment that said the image was not assessed, which a
    `reprocess` that now assesses it replaces (a site that since gives a sex where none
    is, a decoder mended): left unnamed, it stood at the PACS beside the bone age. Not
    this assessment's reports of other models: those stand beside this one's."""
    not_assessed_before = and_(
        Delivery.instance_id == claim.instance_id,
        Delivery.kind == ObjectKind.SR,
        Delivery.assessment == claim.assessment,
        Delivery.result_id.is_(None),
        or_(
            Delivery.state == DeliveryState.DELIVERED,
            _unsent_on_their_way(),
            # being sent now, or failed without an answer to its last send: the commit
            # supersedes it (_supersede_not_assessed), and it may be at the destination
            # all the same; one not sent yet is superseded and never goes
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED])
            & Delivery.sending_since.is_not(None),
        ),
        made_here(),
    )
    with session_scope(rt.database_url) as session:
        rows = session.execute(
            select(
                Delivery.sop_instance_uid,
                Result.model_id,
                Delivery.study_instance_uid,
                Delivery.series_instance_uid,
            )
            .outerjoin(Result, Delivery.result_id == Result.id)
            .where(or_(and_(*_sent_before(claim, ObjectKind.SR)), not_assessed_before))
            .order_by(Delivery.id)
        ).all()
    reports: dict[str, Dataset] = {}
    for sop_instance_uid, model_id, study, series in rows:
        if sop_instance_uid not in reports:  # one per report, whatever its destinations
            # where it went; a row from before revision 0006: the first study's series,
            # derived as it was then (the node's identity went into UIDs long after)
            reports[sop_instance_uid] = earlier_report(
                study or claim.first_study or source.StudyInstanceUID,
                series or sr_series_uid(claim.sop_instance_uid, model_id, uids=LEGACY_UIDS),
                sop_instance_uid,
            )
    return list(reports.values())


def _sent_before(claim: _Claim, kind: ObjectKind) -> tuple[ColumnElement[bool], ...]:
    """Deliveries of ``kind`` of earlier assessments of the claimed instance whose object
    a destination has, or may have: delivered, or superseded (or abandoned by the
    administrator) while on their way. Made by this node (:func:`made_here`): those of
    the node its database was copied from are that node's to replace and withdraw
    (:func:`_left_to_the_copied_node`)."""
    return (
        Delivery.instance_id == claim.instance_id,
        Delivery.kind == kind,
        Delivery.assessment < claim.assessment,
        or_(Delivery.state == DeliveryState.DELIVERED, _unsent_on_their_way()),
        made_here(),
    )


def _unsent_on_their_way() -> ColumnElement[bool]:
    """Deliveries never to be sent (superseded, or abandoned by the administrator) whose
    object may be at the destination all the same: an attempt of theirs went and its
    answer never came, or its sender died (``sending_since``)."""
    return Delivery.state.in_(
        [DeliveryState.SUPERSEDED, DeliveryState.ABANDONED]
    ) & Delivery.sending_since.is_not(None)


def _earlier_heat_maps(
    rt: Runtime, claim: _Claim, source: Dataset, uids: UidScheme
) -> list[HeatMapSeries]:
    """The heat-map series of earlier assessments of the claimed instance whose heat
    maps a destination has or may have (as :func:`_earlier_reports` finds their SRs):
    those whose bone age a later assessment replaces or withdraws. One per model and
    study. ``uids``: the image's (:func:`image_uids`), which tell a series opened for a
    side by its UID."""
    if claim.assessment == 1:
        return []
    current = select(Result.model_id).where(
        Result.instance_id == claim.instance_id, Result.assessment == claim.assessment
    )
    with session_scope(rt.database_url) as session:
        rows = session.execute(
            select(
                Model.id,
                Model.architecture,
                Model.trained,
                Delivery.study_instance_uid,
                Delivery.series_instance_uid,
                Delivery.sop_instance_uid,
                Delivery.path,
                Delivery.sha256,
                Delivery.assessment,
                Result.laterality,
            )
            .join(Result, Result.model_id == Model.id)
            .join(Delivery, Delivery.result_id == Result.id)
            .where(*_sent_before(claim, ObjectKind.SC))
            # a model that assessed this assessment already (a reprocess with another
            # model comes after it) has a heat map that stands in its series
            .where(Model.id.not_in(current))
            .order_by(Model.id, Delivery.id)
        ).all()
    found: dict[str, HeatMapSeries] = {}
    for model_id, architecture, trained, study, series, uid, path, sha256, made_by, side in rows:
        # where it went; a row from before revision 0006: the first study's series,
        # derived as it was then (the node's identity went into UIDs long after)
        series = series or sc_series_uid(claim.sop_instance_uid, model_id, uids=LEGACY_UIDS)
        study = study or claim.first_study or str(source.StudyInstanceUID)
        known = found.get(series)
        if known is None:
            # a series opened for a side (:func:`heat_map_series`) is told by its UID
            other_study = study if claim.first_study and study != claim.first_study else None
            opened_for = next(
                (
                    s
                    for s in SIDES
                    if series
                    == sc_series_uid(
                        claim.sop_instance_uid, model_id, other_study, uids=uids, side=s
                    )
                ),
                None,
            )
            known = HeatMapSeries(
                model_id, model_name(architecture), bool(trained), study, series, side=opened_for
            )
        if all(h.sop_instance_uid != uid for h in known.heat_maps):  # one per destination
            heat_map = HeatMap(uid, Path(path), sha256 or None, made_by, side=side)
            known = dataclasses.replace(known, heat_maps=(*known.heat_maps, heat_map))
        found[series] = known
    return list(found.values())


def model_name(architecture: str) -> str:
    """The model as the SR's algorithm and the SC's equipment name it: a withdrawal
    notice names a model of its series as the heat maps before it did."""
    return f"BoneAgeNet {architecture}"


#: The note of a result whose model's estimate lay outside the range a bone age is
#: reported in (:attr:`models.predictor.Prediction.clipped`).
OUTSIDE_THE_REPORTED_RANGE = (
    "The model's estimate lies outside 0-20 years, the range it reports: shown at its limit; no SDS"
)


def assessment_finding(
    predictor: BoneAgePredictor,
    prediction: Prediction,
    facts: gate.PatientFacts,
    *,
    male: bool,
    notes: list[str] | tuple[str, ...] = (),
) -> BoneAgeFinding:
    """What the SR and SC report of one prediction: bone age, ages, SDS, the model.

    An estimate outside 0-20 years is shown at the limit it was clipped to, with
    :data:`OUTSIDE_THE_REPORTED_RANGE` after ``notes`` and no SDS: the limit is not the
    model's estimate, and an infant's -9 months read as a bone age of 0 and an SDS of
    -4.4 (found in review).
    """
    from models.reference import bone_age_sds

    chronological = chronological_age_months(facts)
    sds = (
        bone_age_sds(prediction.bone_age_months, chronological, male=male)
        if chronological is not None
        and outside_the_sd_table(chronological, male=male) is None
        and not prediction.clipped
        else None
    )
    if prediction.clipped:
        notes = [*notes, OUTSIDE_THE_REPORTED_RANGE]
    return BoneAgeFinding(
        bone_age_months=prediction.bone_age_months,
        chronological_age_months=chronological,
        sds=sds,
        intervals=dict(prediction.intervals),
        model_id=predictor.model_id,
        model_name=model_name(predictor.meta.arch),
        model_version=model_version(predictor),
        model_trained=bool(predictor.meta.trained),
        laterality=facts.laterality,
        notes=tuple(notes),
        precision=predictor.precision,
    )


def warm_up(rt: Runtime) -> float:
    """Assess a synthetic hand in memory so that the first real study is not the slow one.

    A fresh inference process pays on its first image for the network's kernel
    selection and lazy imports, and on its first SR and SC for highdicom's tables of
    the standard (a 22 MB JSON file parsed once per process: 0.3 s alone, over a
    second under load, and about 110 MB). An inference process calls this once at
    start, before it takes work. Nothing is written or recorded.

    Returns
    -------
    float
        Seconds the warm-up took.
    """
    import datetime

    import torch

    from dicom_io.synthetic import make_radiograph_dataset
    from models.predictor import torch_threads

    started = time.perf_counter()
    predictor = rt.predictor
    side = predictor.input_size
    pixels = np.random.default_rng(0).random((side, side)).astype(np.float32)
    study_date = datetime.date(2026, 1, 1)
    source = make_radiograph_dataset(
        pixels, birth_date=study_date.replace(year=2016), study_date=study_date
    )
    decision = gate.check(source, require_sex=False)
    image = decode_for_display(source)
    prediction = predictor.predict(image, male=True)
    for threads in set(predictor.thread_counts) - {torch.get_num_threads()}:
        with torch_threads(threads):  # a study that comes alone: every core
            predictor.predict(image, male=True)
    finding = assessment_finding(predictor, prediction, decision.facts, male=True)
    build_outputs(
        source,
        image,
        prediction,
        finding,
        source_uid=source.SOPInstanceUID,
        uids=node_uids(rt),
        device_observer_uid=rt.device_observer_uid,
    )
    return time.perf_counter() - started


def _stage_output(outbox_dir: Path, kind: ObjectKind, ds: Dataset, suffix: str) -> Output:
    uid = str(ds.SOPInstanceUID)
    path = outbox_dir / f"{uid_tag(uid)}-{suffix}.dcm"
    staged, digest = _stage(ds, path)
    return Output(
        kind,
        uid,
        path,
        digest,
        staged=staged,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def _not_assessed(
    rt: Runtime,
    claim: _Claim,
    ds: Dataset,
    reason: str,
    *,
    send: bool = True,
) -> AssessOutcome:
    """Record why an image was not assessed; send an SR saying so when configured, and
    always when it replaces a report of an earlier assessment (whose bone age no
    longer stands)."""
    instance_id = claim.instance_id
    # the category, not the reason: a reason may quote the patient's sex or age, which the
    # database and `boneage-worker status` keep and a log shipped elsewhere should not
    logger.info("instance %d not assessed (%s)", instance_id, reason_category(reason))
    settings = rt.settings
    ours = str(ds.get("Manufacturer", "") or "").strip() == MANUFACTURER
    # what an SR references the image by: its SOP class the data set's or the file meta's
    referable = bool(
        all(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        and referenced_sop_class(ds)
    )
    # an SR could neither join the study nor reference the image; of ours, none is made
    ours_to_make = referable and not ours
    replaces = _earlier_reports(rt, claim, ds) if ours_to_make else []
    uids = image_uids(rt, claim.instance_id)
    withdrawn = [  # a notice can join the heat maps' series in this study, not another's
        m
        for m in (_earlier_heat_maps(rt, claim, ds, uids) if ours_to_make else [])
        if m.study_instance_uid == ds.get("StudyInstanceUID")
    ]
    sr_uid = uids.derive(claim.sop_instance_uid, *_again(claim.assessment), "not-assessed-sr")
    report = bool(
        ours_to_make
        and send
        and settings.destinations
        and (settings.send_not_assessed or replaces or withdrawn)
        # its UID names no model: a reprocess of this assessment (another model, the
        # gate deciding as before) finds it made already, with what it withdraws
        and not _made_already(rt, sr_uid)
    )
    # what went into a study the image has left is withdrawn there, an SR sent or not
    moved, unmade = stage_moved_withdrawals(rt, claim, ds) if ours_to_make and send else ([], None)
    recorded = reason if unmade is None else f"{reason}; {unmade}"
    if not report and not moved:
        _finish(rt, claim, InstanceState.NOT_ASSESSED, recorded)
        return AssessOutcome("not_assessed", reason=reason)
    outputs: list[Output] = []
    try:
        if report:
            source_uid = claim.sop_instance_uid
            sr = build_not_assessed_sr(
                ds,
                reason,
                series_instance_uid=sr_series_uid(
                    source_uid, None, claim.other_study(ds), uids=uids
                ),
                sop_instance_uid=sr_uid,
                series_number=SR_SERIES_NUMBER,
                instance_number=claim.assessment,
                device_observer_uid=rt.device_observer_uid,
                predecessors=replaces,
            )
            outputs.append(_stage_output(settings.outbox_dir, ObjectKind.SR, sr, "not-assessed-sr"))
            if withdrawn and ds.get("SOPClassUID"):
                outputs += stage_withdrawals(
                    ds,
                    withdrawn,
                    f"the image was received again and is not assessed: {reason}",
                    source_uid=source_uid,
                    uids=uids,
                    outbox_dir=settings.outbox_dir,
                    assessment=claim.assessment,
                )
    except BaseException:
        discard(outputs + moved)
        raise
    outcome = _commit(
        rt, claim, InstanceState.NOT_ASSESSED, recorded, None, outputs + moved, send=send
    )
    outcome = _rejected_at_the_commit(rt, claim, outcome, ds)
    if outcome.state != "not_assessed":  # rejected, a duplicate attempt, or a clash: said so
        return outcome
    return AssessOutcome("not_assessed", delivery_ids=outcome.delivery_ids, reason=reason)


def _made_already(rt: Runtime, sop_instance_uid: str) -> bool:
    """Whether an object of ours with this UID has a delivery: made, and sent or on its
    way."""
    with session_scope(rt.database_url) as session:
        found = session.scalar(
            select(Delivery.id).where(Delivery.sop_instance_uid == sop_instance_uid).limit(1)
        )
    return found is not None


# -- rejection notes (IHE IOCM) ----------------------------------------------------

#: The classes of our objects, as a rejection note of ours references them.
_OUR_CLASSES = {ObjectKind.SR: ComprehensiveSRStorage, ObjectKind.SC: SecondaryCaptureImageStorage}
#: What a not-assessed reason of a Key Object Selection begins with (its category).
KEY_OBJECT_REASON = "a key object selection"


def _key_object_selection(rt: Runtime, claim: _Claim, ds: Dataset) -> AssessOutcome:
    """Apply a rejection note the PACS sent (a Key Object Selection Document with an
    IOCM rejection title): every instance it names is rejected, those received later
    included; an image not assessed yet never is, and one assessed has its bone age
    withdrawn (:func:`_withdraw`). Only in the study or series the note names it in
    (``db.queries.rejects``): an image of ours that has another study and another series
    is another image under the same SOP Instance UID (a modality that reuses UIDs), and is left, its
    reason saying so. Any other Key Object Selection is recorded and left.

    The rejections are committed first, then each image is withdrawn in a transaction
    of its own: an attempt at that image that commits after the first finds them
    (:func:`_commit`), and one that committed before is found by the second. Applied
    again (the task retried, the note received again), it changes nothing more.
    """
    try:
        note = read_rejection_note(ds)
    except ValueError as exc:
        reason = f"{KEY_OBJECT_REASON} that cannot be read as a rejection note: {exc}"
        logger.warning("instance %d: %s", claim.instance_id, reason)
        _finish(rt, claim, InstanceState.NOT_ASSESSED, reason)
        return AssessOutcome("not_assessed", reason=reason)
    if note is None:
        reason = f"{KEY_OBJECT_REASON}, not a rejection note"
        _finish(rt, claim, InstanceState.NOT_ASSESSED, reason)
        return AssessOutcome("not_assessed", reason=reason)
    # in order, so that two notes naming the same instances take their rows in the same
    # order (PostgreSQL); in chunks, under the limit of parameters to one statement
    rejected = sorted({r.sop_instance_uid for r in note.references})
    # where the note names each (one place an instance: read_rejection_note refuses two)
    named = {r.sop_instance_uid: r for r in note.references}
    images: list[tuple[int, str]] = []
    with session_scope(rt.database_url) as session:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        received = database_now(session)
        for chunk in _chunks(rejected):
            session.execute(
                dialect.insert(Rejection)
                .values(
                    [
                        {
                            "sop_instance_uid": uid,
                            "study_instance_uid": named[uid].study_instance_uid,
                            "series_instance_uid": named[uid].series_instance_uid,
                            "code": note.code,
                            "note_sop_instance_uid": note.sop_instance_uid,
                            "received_at": received,
                        }
                        for uid in chunk
                    ]
                )
                .on_conflict_do_nothing(index_elements=["sop_instance_uid", "study_instance_uid"])
            )
        # of our own objects the note rejects, those not sent never will be: their
        # images' rows first, as a withdrawal and a redirect take them
        _take_images_of(session, rejected)
        for chunk in _chunks(rejected):
            session.execute(
                update(Delivery)
                .where(
                    Delivery.sop_instance_uid.in_(chunk),
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
                )
                .values(state=DeliveryState.SUPERSEDED, last_error=rejected_by_the_pacs(note.code))
                .execution_options(synchronize_session=False)
            )
            images += session.execute(
                select(Instance.id, Instance.sop_instance_uid).where(
                    Instance.sop_instance_uid.in_(chunk), Instance.id != claim.instance_id
                )
            ).all()
    delivery_ids: list[int] = []
    elsewhere = 0
    for instance_id, uid in sorted(images):
        withdrawn = _withdraw(rt, instance_id, uid, named[uid].study_instance_uid, note.code, ds)
        if withdrawn is None:
            elsewhere += 1
        else:
            delivery_ids += withdrawn
    left = (
        f"{elsewhere} received here in another study, left (another image under the "
        "same SOP Instance UID); "
        if elsewhere
        else ""
    )
    reason = (
        f"{KEY_OBJECT_REASON}, rejection note {note.meaning!r}: {len(rejected)} "
        f"instance(s) rejected, {len(images) - elsewhere} of them received here; {left}"
        f"{len(delivery_ids)} rejection note(s) of ours to send"
    )
    logger.info("instance %d: %s", claim.instance_id, reason)
    _finish(rt, claim, InstanceState.NOT_ASSESSED, reason)
    return AssessOutcome("not_assessed", delivery_ids=tuple(delivery_ids), reason=reason)


#: Values bound to one statement at most, in chunks (PostgreSQL takes 65535 parameters).
_CHUNK = 1000


def _chunks(values: Sequence[str]) -> list[Sequence[str]]:
    return [values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK)]


def _take_images_of(session: Session, sop_instance_uids: Sequence[str]) -> None:
    """Hold, until the commit, the rows of the images whose deliveries send our objects
    ``sop_instance_uids``, one by one in id order, all of them before any delivery row (a
    row lock on PostgreSQL, the write lock on SQLite): the order in which :func:`_withdraw`,
    :func:`_commit` and `retry-deliveries` (``db.queries.take_instances``) take them.

    A redirect of such an object holds its image's row while it supersedes the failed
    delivery and queues the object to another destination (a new row, or one put back to
    pending). Without this, a supersede of the object's unsent deliveries waited on the
    failed row only, found it superseded once the redirect committed, and never saw the
    pending row, made after its snapshot: an SR the PACS rejected was sent elsewhere.
    """
    instance_ids: set[int] = set()
    for chunk in _chunks(sop_instance_uids):
        instance_ids.update(
            session.scalars(
                select(Delivery.instance_id).where(Delivery.sop_instance_uid.in_(chunk)).distinct()
            )
        )
    take_instances(session, instance_ids)


def rejected_by_the_pacs(code: str) -> str:
    """The reason of an instance a PACS rejected with a note titled ``code``."""
    return f"rejected by the PACS: {REJECTION_TITLES.get(code, code)}"


class _Rejection(NamedTuple):
    """A rejection note's row that rejects the claimed instance (:func:`_rejection_in`):
    why, as its reason says it; the note's title's code; the study it names it in."""

    why: str
    code: str
    study: str | None


def _rejection(rt: Runtime, claim: _Claim) -> _Rejection | None:
    """The rejection of the claimed instance, if a rejection note named it
    (:func:`_rejection_in`)."""
    with session_scope(rt.database_url) as session:
        return _rejection_in(session, claim)[0]


def _rejected_at_the_commit(
    rt: Runtime, claim: _Claim, outcome: AssessOutcome, ds: Dataset
) -> AssessOutcome:
    """``outcome``, of :func:`_commit`; where it found the image rejected meanwhile, with
    the deliveries of the notes of ours that withdraw what earlier assessments made
    (:func:`_withdrawn_with_the_copy`)."""
    if outcome.state != "rejected" or (rejection := _rejection(rt, claim)) is None:
        return outcome
    withdrawals = _withdrawn_with_the_copy(rt, claim, rejection, ds)
    return dataclasses.replace(outcome, delivery_ids=(*outcome.delivery_ids, *withdrawals))


def _withdrawn_with_the_copy(
    rt: Runtime, claim: _Claim, rejection: _Rejection, ds: Dataset
) -> list[int]:
    """The deliveries of the notes of ours that withdraw what earlier assessments of the
    claimed instance made, where the attempt at a later one finds it rejected: a copy
    moved by the PACS to another study, and sent again, rejected there before it was
    assessed (the note named a study where nothing of ours was, and was taken for
    another image's). Left, the bone age stayed where the image was before.
    :func:`_withdraw` marks the instance rejected."""
    if claim.assessment == 1 or rejection.study is None:  # (a row before revision 0022)
        return []
    withdrawn = _withdraw(
        rt,
        claim.instance_id,
        claim.sop_instance_uid,
        rejection.study,  # the one the note names it in, which the copy's may not be
        rejection.code,
        ds,
        [claim.study],
    )
    return withdrawn or []


def _rejection_in(session: Session, claim: _Claim) -> tuple[_Rejection | None, bool]:
    """The rejection of the claimed instance, if a rejection note named it in a study it
    has been in or in its series (``db.queries.rejects``, the copy the attempt read
    included); and whether one named its SOP Instance UID in another study and series
    (another image under it, rejected at the PACS: not this one,
    :func:`said_rejected_elsewhere`)."""
    rows = session.execute(
        select(
            Rejection.code,
            Rejection.study_instance_uid,
            rejects(
                Instance.id,
                Instance.study_instance_uid,
                Instance.series_instance_uid,
                [claim.study],
            ).label("applies"),
        )
        .join(Instance, Instance.sop_instance_uid == Rejection.sop_instance_uid)
        .where(Instance.id == claim.instance_id)
        .order_by(Rejection.id)
    ).all()
    found = next(((code, study) for code, study, applies in rows if applies), None)
    elsewhere = any(not applies for _, _, applies in rows)
    if found is None:
        return None, elsewhere
    code, study = found
    return _Rejection(rejected_by_the_pacs(code), code, study), elsewhere


def said_rejected_elsewhere(reason: str | None) -> str:
    """``reason`` saying that a rejection note named the image's SOP Instance UID in
    another study (:data:`~db.queries.REJECTED_IN_ANOTHER_STUDY`, among `status`'s recent
    problems), once. Before what :func:`_refuse_uid_clash` said, which stays last
    (:func:`_without_uid_clash` takes it back from there to the end)."""
    said = (
        f"{REJECTED_IN_ANOTHER_STUDY}: another image under its UID, which the note "
        "rejects; this image's results stand and no note of ours withdraws them"
    )
    if not reason:
        return said
    if REJECTED_IN_ANOTHER_STUDY in reason:
        return reason
    if (clash := reason.find(UID_CLASH)) >= 0:
        return f"{reason[:clash]}{said}; {reason[clash:]}"
    return f"{reason}; {said}"


#: The rejection title a note of ours does not repeat: the PACS removes the whole
#: study, our objects with it, for its retention policy, and may refuse such a note
#: from another node.
_NOT_REPEATED = {"113039"}  # Data Retention Policy Expired


def _withdraw(
    rt: Runtime,
    instance_id: int,
    source_uid: str,
    study: str,
    code: str,
    note_ds: Dataset,
    read: Sequence[str] = (),
) -> list[int] | None:
    """Mark the image ``instance_id`` rejected, supersede what of it was not sent, and
    queue a rejection note of ours, with the PACS's title, for each SR and SC of it
    that a destination has or may have (delivered, or on their way), to each of those
    destinations: an IOCM-aware PACS then hides them too. Returns the new deliveries.

    One note per object, its UID derived from the object's: a PACS that never got one
    (its send was under way and failed) refuses only that note, and the same object
    withdrawn again is the same note, which the unique key on (object, destination)
    sends once. A note that cannot be made (:func:`_stage_withdrawal_notes`) leaves the
    image rejected and its unsent objects superseded, and says so in its reason; so does
    an object the node this database was copied from sent, which no note of ours
    withdraws (:func:`_left_to_the_copied_node`).

    None, and nothing done but its reason saying so (:func:`said_rejected_elsewhere`),
    where the image was never in ``study``, where the note names it, nor in the series
    it names: the note rejects another image under its SOP Instance UID. Told under the
    image's row, as the commit of an attempt at it tells the study it read
    (:func:`_rejection_in`). ``read``: the study of the copy an attempt at the image
    read, where the note named it (:func:`_withdrawn_with_the_copy`). ``code``: the
    note's title's code; ``note_ds``: what a note of ours copies the patient and study
    from where our object's file is gone.
    """
    why = rejected_by_the_pacs(code)
    uids = image_uids(rt, instance_id)
    staged: list[Output] = []
    try:
        with session_scope(rt.database_url) as session:
            # the row first (a row lock on PostgreSQL, the write lock on SQLite), as the
            # commit of an attempt at it takes it (:func:`_commit`)
            instance = session.execute(
                update(Instance)
                .where(Instance.id == instance_id)
                .values(claimed_by=Instance.claimed_by)
                .returning(
                    Instance.state,
                    Instance.assessment,
                    Instance.study_instance_uid,
                    Instance.series_instance_uid,
                    Instance.reason,
                )
                .execution_options(synchronize_session=False)
            ).one()
            ours = session.scalar(
                select(Rejection.id).where(
                    Rejection.sop_instance_uid == source_uid,
                    Rejection.study_instance_uid == study,
                    rejects(
                        instance_id,
                        instance.study_instance_uid,
                        instance.series_instance_uid,
                        read,
                    ),
                )
            )
            if ours is None:
                # one not finished is told by the commit of the attempt at it
                if instance.state in FINISHED:
                    session.execute(
                        update(Instance)
                        .where(Instance.id == instance_id)
                        .values(reason=said_rejected_elsewhere(instance.reason))
                        .execution_options(synchronize_session=False)
                    )
                logger.warning(
                    "instance %d: a rejection note names its SOP Instance UID in a study and "
                    "series it was never in: left, another image under the UID",
                    instance_id,
                )
                return None
            if instance.state is not InstanceState.REJECTED:
                session.execute(
                    update(Instance)
                    .where(Instance.id == instance_id)
                    .values(
                        state=InstanceState.REJECTED,
                        reason=why,
                        finished_at=database_now(session),
                        received_again_at=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            _supersede_unsent(
                session, instance_id, instance.assessment + 1, f"{why}, before it was sent"
            )
            if code in _NOT_REPEATED:
                return []
            objects = _sent_objects(
                session, instance_id, source_uid, first_study=instance.study_instance_uid
            )
            left = _left_to_the_copied_node(session, instance_id)
            made = _notes_made(session, instance_id)
            todo, again = [], []
            for uid, sent_object in objects.items():
                note_made = made.get(withdrawal_uid(uid))
                going = note_made[1] if note_made else set()
                to = tuple(sorted(set(sent_object.destinations) - going))
                if not to:
                    continue  # withdrawn already, to each destination that has it
                if note_made:  # its file stands for the deliveries it has: sent as it is
                    again.append(dataclasses.replace(note_made[0], destinations=to))
                else:
                    todo.append(dataclasses.replace(sent_object, destinations=to))
            staged, unmade = _stage_withdrawal_notes(
                rt,
                todo,
                code,
                f"Bone age withdrawn: its source image was {why}; this AI result no longer stands.",
                source_uid=source_uid,
                uids=uids,
                fallback=note_ds,
            )
            current = database_now(session)
            deliveries = [
                _delivery(instance_id, instance.assessment, output, destination, current)
                for output in [*staged, *again]
                for destination in output.destinations or ()
            ]
            # what is to be withdrawn by hand last: `status` finds it at the end
            if said := "; ".join(filter(None, (left, unmade))):
                session.execute(
                    update(Instance)
                    .where(Instance.id == instance_id)
                    .values(reason=f"{why}; {said}")
                    .execution_options(synchronize_session=False)
                )
            session.add_all(deliveries)
            session.flush()
            staged = publish(staged)
            ids = [d.id for d in deliveries]
    except BaseException:
        discard(staged)
        raise
    if ids:
        logger.info(
            "instance %d rejected by the PACS: %d rejection note(s) of ours to send",
            instance_id,
            len(ids),
        )
    return ids


def withdrawal_uid(sop_instance_uid: str) -> str:
    """The SOP Instance UID of our rejection note that withdraws our object
    ``sop_instance_uid``: one note per object, whatever withdrew it; under the root the
    object is (:func:`~dicom_io.uids.derived_from`)."""
    return derived_from(sop_instance_uid, "withdrawn-ko")


@dataclasses.dataclass(frozen=True)
class _SentObject:
    """An SR or SC of ours that a destination has or may have."""

    reference: Reference  # as a note names it
    destinations: tuple[str, ...]  # where it went
    path: Path  # its file in the outbox, as written (until retention removes it)
    sha256: str | None
    # the Instance Number of the note of ours that withdraws it (:func:`_note_numbers`)
    note_number: int


def _sent_objects(
    session: Session, instance_id: int, source_uid: str, *, first_study: str
) -> dict[str, _SentObject]:
    """The SRs and SCs of the image ``instance_id`` that a destination has or may have
    (delivered, or superseded or abandoned while on their way), by SOP Instance UID: this
    node's (:func:`made_here`), never those of the node its database was copied from
    (:func:`_left_to_the_copied_node`)."""
    rows = session.execute(
        select(
            Delivery.kind,
            Delivery.sop_instance_uid,
            Delivery.study_instance_uid,
            Delivery.series_instance_uid,
            Delivery.destination,
            Delivery.path,
            Delivery.sha256,
            Result.model_id,
        )
        .outerjoin(Result, Delivery.result_id == Result.id)
        .where(
            *_at_a_destination(instance_id),
            made_here(),
        )
        .order_by(Delivery.id)
    ).all()
    numbers = _note_numbers(session, instance_id, first_study=first_study)
    objects: dict[str, _SentObject] = {}
    for kind, uid, study, series, destination, path, sha256, model_id in rows:
        # where it went; a row from before revision 0006: the first study's series,
        # derived as it was then (the node's identity went into UIDs long after)
        study = study or first_study
        if series is None:
            if kind is ObjectKind.SC and model_id is None:
                continue  # a withdrawal notice of before 0006: its series unknown
            series = (sr_series_uid if kind is ObjectKind.SR else sc_series_uid)(
                source_uid, model_id, uids=LEGACY_UIDS
            )
        known = objects.get(uid)
        objects[uid] = _SentObject(
            Reference(study, series, _OUR_CLASSES[kind], uid),
            (*known.destinations, destination) if known else (destination,),
            Path(path),
            sha256,
            numbers[uid],
        )
    return objects


def _at_a_destination(instance_id: int) -> tuple[ColumnElement[bool], ...]:
    """Deliveries of the SRs and SCs of the image ``instance_id`` whose object a
    destination has, or may have: delivered, or superseded or abandoned while on their
    way (:func:`_unsent_on_their_way`)."""
    return (
        Delivery.instance_id == instance_id,
        Delivery.kind.in_(list(_OUR_CLASSES)),
        or_(Delivery.state == DeliveryState.DELIVERED, _unsent_on_their_way()),
    )


#: What an image's reason says where a note of ours would have withdrawn objects of it
#: that the node its database was copied from sent (:func:`_left_to_the_copied_node`).
LEFT_TO_THE_COPIED_NODE = (
    "{count} object(s) of ours sent by the node this database was copied from, not "
    "withdrawn from here: they are that node's (boneage-worker db new-identity)"
)


def _left_to_the_copied_node(
    session: Session, instance_id: int, *, before_assessment: int | None = None
) -> str | None:
    """Where the SRs and SCs of the image ``instance_id`` (of its assessments before
    ``before_assessment``, where given) are withdrawn (the PACS rejected the image, it was
    assessed again, or moved), what its reason says of those the node this database was
    copied from sent (delivered, or on their way; not :func:`made_here`): none of them is
    withdrawn from here, nor replaced by an SR of ours (:func:`_sent_objects`,
    :func:`_sent_before`). None where there are none.

    They are that node's: a note of ours would withdraw, at a destination the copy shares
    with it, a result that stands there, and under the UID of that node's own note for
    it (:func:`withdrawal_uid`). Logged by the instance's id and a count only.
    """
    conditions = [*_at_a_destination(instance_id), ~made_here()]
    if before_assessment is not None:
        conditions.append(Delivery.assessment < before_assessment)
    count = session.scalar(
        select(func.count(Delivery.sop_instance_uid.distinct())).where(*conditions)
    )
    if not count:
        return None
    logger.info(
        "instance %d: %d object(s) of ours that the node this database was copied from "
        "sent left to it, not withdrawn from here",
        instance_id,
        count,
    )
    return LEFT_TO_THE_COPIED_NODE.format(count=count)


def _note_numbers(session: Session, instance_id: int, *, first_study: str) -> dict[str, int]:
    """The Instance Number of the note of ours that would withdraw each SR and SC of the
    image ``instance_id``, by the object's SOP Instance UID: its place among the image's
    objects in its study, in the order they were made (their first delivery's id).

    Our notes of an image in one study under one patient share a series
    (:func:`note_series_uid`), where each was numbered 1: they are numbered 1, 2 ... in
    the study, as the objects they withdraw were made. A series holds a part of the
    study's notes, so its numbers are apart and in order, with a gap where a note went
    under another patient (the PACS corrected the study's Patient ID in between).
    Like the note's UIDs, the number is the object's: the same note made again (a retry,
    an attempt beside it) is numbered the same, and the note of an object made later
    comes after it. Every object of the image this node made counts, sent or not, so that
    nothing made or sent since changes a number: delivery rows are never removed, and an
    image's new objects are added under its row's lock (:func:`_commit`), after those
    before them. On a database copied from another node, that node's objects, which no
    note of ours withdraws, do not count (:func:`made_here`: the mark never moves while
    the node runs).
    """
    rows = session.execute(
        select(Delivery.sop_instance_uid, func.min(Delivery.study_instance_uid))
        .where(
            Delivery.instance_id == instance_id,
            Delivery.kind.in_(list(_OUR_CLASSES)),
            made_here(),  # a copy's notes withdraw its own objects only
        )
        .group_by(Delivery.sop_instance_uid)
        .order_by(func.min(Delivery.id))
    ).all()
    numbers: dict[str, int] = {}
    made_in: dict[str, int] = {}
    for uid, study in rows:
        study = study or first_study  # a row from before revision 0006: the first study
        made_in[study] = numbers[uid] = made_in.get(study, 0) + 1
    return numbers


def _notes_made(session: Session, instance_id: int) -> dict[str, tuple[Output, set[str]]]:
    """Our rejection notes made already for the objects of the image ``instance_id`` (it
    moved, or a note rejected it), by SOP Instance UID: each as its file was written, and
    the destinations it goes to."""
    made: dict[str, tuple[Output, set[str]]] = {}
    for ko in session.scalars(
        select(Delivery).where(Delivery.instance_id == instance_id, Delivery.kind == ObjectKind.KO)
    ):
        as_made = Output(
            ObjectKind.KO,
            ko.sop_instance_uid,
            Path(ko.path),
            ko.sha256 or "",
            of_result=False,
            study_instance_uid=ko.study_instance_uid,
            series_instance_uid=ko.series_instance_uid,
            withdraws=ko.withdraws,
        )
        made.setdefault(ko.sop_instance_uid, (as_made, set()))[1].add(ko.destination)
    return made


#: The attributes that name the patient a note of ours is filed under, which its series
#: depends on (:func:`note_series_uid`): a series is one patient's (the DICOM information
#: model), and the Patient ID is one patient's only with its issuer.
NOTE_SERIES_PATIENT = ("PatientID", "IssuerOfPatientID")


def note_series_uid(
    source_uid: str, study_instance_uid: str, filed_as: Dataset, *, uids: UidScheme
) -> str:
    """The Series Instance UID of our rejection notes that withdraw objects of the image
    ``source_uid`` in the study ``study_instance_uid`` under the patient ``filed_as``
    names: its :data:`NOTE_SERIES_PATIENT` values, which the note carries as they are
    there (:func:`~dicom_io.sr.copy_patient_and_study`), surrounding spaces aside, an
    absent attribute as an empty one.

    One series per image, study and patient: after the PACS corrected the Patient ID
    of the image's study, the notes under the patient before and those under the
    patient now are in two series, never one series of two patients, which a PACS
    refuses (a patient mismatch for the series it has) or files under the wrong patient.
    The same note made again (a retry, an attempt beside it) is in the same series, as
    it has the same UIDs. The values go into the UID through a one-way hash only, never
    into a log.

    Notes made before the series depended on the patient are in the image's series of
    that study (the same UID without the patient) and stay there: they are sent as
    recorded (:func:`_notes_made`). A note made since for another object of the image
    in that study, even under the same patient, is in the new series: two series of
    notes for one patient, each of that patient only.
    """
    patient = json.dumps(
        [
            _identity_text(filed_as, keyword) if keyword in filed_as else ""
            for keyword in NOTE_SERIES_PATIENT
        ]
    )
    return uids.derive(source_uid, "ko-series", "study", study_instance_uid, "patient", patient)


def _as_written(sent: _SentObject) -> Dataset | None:
    """The header of our object ``sent`` as its file in the outbox holds it, where that
    file is still there (retention removes it) and is the one written (its SHA-256):
    the patient and study it was filed under, which a note withdrawing it repeats."""
    try:
        data = sent.path.read_bytes()
    except FileNotFoundError:
        return None
    if sent.sha256 is not None and hashlib.sha256(data).hexdigest() != sent.sha256:
        return None
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    reference = sent.reference
    if (str(header.get("SOPInstanceUID", "")), str(header.get("StudyInstanceUID", ""))) != (
        reference.sop_instance_uid,
        reference.study_instance_uid,
    ):
        return None
    return header


def _stage_withdrawal_notes(
    rt: Runtime,
    objects: Sequence[_SentObject],
    code: str,
    description: str,
    *,
    source_uid: str,
    uids: UidScheme,
    fallback: Dataset | None = None,
) -> tuple[list[Output], str | None]:
    """Stage a rejection note of ours, titled ``code``, for each of ``objects``, to go
    to its destinations: in the object's study, with the patient and study it was
    filed under, read from its own file (:func:`_as_written`). IOCM wants a note in
    the patient and study of what it rejects; the image received now may be in
    another, even another patient's. Where that file is gone, ``fallback`` (the PACS's
    own note) stands in for an object in its study.

    Each note is in the series of the image's notes in that study under that patient
    (:func:`note_series_uid`), numbered as :func:`_note_numbers` says. Only a note not
    recorded yet is made here: one recorded (:func:`_notes_made`) is sent as recorded,
    never made again, as its series may be another (made before notes had a series per
    patient, or from another stand-in), and two notes under one SOP Instance UID in two
    series would clash at the PACS. A note not recorded is a note no destination has: an
    attempt that made it and did not commit sent nothing.

    Returns the staged notes, and what could not be made, in words for the instance's
    reason (None when all were): an object whose file is gone and has no stand-in, or
    a value the builder refuses. Those are the same on every try: the others go.
    """
    staged: list[Output] = []
    missing = 0
    failures: list[str] = []
    try:
        for sent in objects:
            reference = sent.reference
            source = _as_written(sent)
            in_its_study = fallback is not None and (
                str(fallback.get("StudyInstanceUID", "")) == reference.study_instance_uid
            )
            if source is None and in_its_study:
                source = fallback
            if source is None:
                missing += 1
                continue
            try:
                note = build_rejection_note(
                    source,
                    code,
                    [reference],
                    description=description,
                    series_instance_uid=note_series_uid(
                        source_uid, reference.study_instance_uid, source, uids=uids
                    ),
                    sop_instance_uid=withdrawal_uid(reference.sop_instance_uid),
                    series_number=KO_SERIES_NUMBER,
                    instance_number=sent.note_number,
                )
            except (TypeError, ValueError) as exc:  # a value it refuses
                failures.append(_failure(exc))
                continue
            output = _stage_output(rt.settings.outbox_dir, ObjectKind.KO, note, "ko")
            staged.append(
                dataclasses.replace(
                    output,
                    of_result=False,
                    destinations=sent.destinations,
                    withdraws=reference.sop_instance_uid,
                )
            )
    except BaseException:
        discard(staged)
        raise
    if not missing and not failures:
        return staged, None
    problems = ([f"{missing} whose file retention removed"] if missing else []) + [
        f"one that failed ({failure})" for failure in failures
    ]
    unmade = (
        f"our rejection notes for {missing + len(failures)} object(s) of ours could not be "
        f"made ({'; '.join(problems)}): {WITHDRAW_BY_HAND}"
    )
    logger.error("image %s: %s", uid_tag(source_uid), unmade)
    return staged, unmade


#: Why our objects in a study the image has left, or filed under a patient it no longer
#: names, are withdrawn (IOCM's title for an instance filed under the wrong patient or
#: procedure).
MOVED_TITLE = "113038"  # Incorrect Modality Worklist Entry
MOVED_AWAY = (
    "Bone age withdrawn from this study: its source image was moved to another study, "
    "where it was assessed again."
)
REFILED = (
    "Bone age withdrawn from this patient: its source image was received again under "
    "another patient, and assessed again there."
)


def stage_moved_withdrawals(
    rt: Runtime, claim: _Claim, source: Dataset
) -> tuple[list[Output], str | None]:
    """Stage a rejection note of ours (113038, Incorrect Modality Worklist Entry) for
    each SR and SC of earlier assessments of the claimed image that a destination has
    or may have in a study other than the one ``source``, the copy received again, is
    in, or filed under another patient than ``source`` names (:func:`patient_identity`,
    read from the object's own file): the PACS moved the image (merged or split
    studies), or corrected the patient it belongs to, and its bone age no longer belongs
    there. A PACS that applies IOCM hides them; one that does not shows the note in that
    study, under that patient. Objects a note of ours withdrew already are left. Returns
    the notes, each to go where its object went, and what could not be made
    (:func:`_stage_withdrawal_notes`), with what is said of the earlier objects that the
    node this database was copied from sent, which this assessment neither replaces nor
    withdraws, wherever they are (:func:`_left_to_the_copied_node`).

    Only a later assessment has earlier objects: a copy in another study or under another
    patient always opens one (the study is among :data:`IMAGE_INPUTS`, the patient is
    :func:`identity_digest`), and `reprocess` leaves an image whose copy received again
    is still to be compared.
    """
    if claim.assessment == 1:
        return [], None
    study_now = _study_of(source)
    identity_now = patient_identity(source)
    # the image came under another patient than the last assessment read: an object
    # whose file is gone was filed under an earlier patient, perhaps that one
    patient_changed = claim.identity_before not in (None, claim.identity)
    claim.withdrew_patient_before = True  # (an attempt that fails below commits nothing)
    uids = image_uids(rt, claim.instance_id)
    with session_scope(rt.database_url) as session:
        objects = _sent_objects(
            session,
            claim.instance_id,
            claim.sop_instance_uid,
            first_study=claim.first_study or study_now,
        )
        withdrawn = _notes_made(session, claim.instance_id)
        left = _left_to_the_copied_node(
            session, claim.instance_id, before_assessment=claim.assessment
        )
    left_behind: list[_SentObject] = []
    refiled: list[_SentObject] = []
    for uid, sent in objects.items():
        if withdrawal_uid(uid) in withdrawn:
            continue
        if sent.reference.study_instance_uid != study_now:
            left_behind.append(sent)
        elif (filed := _as_written(sent)) is None:
            if patient_changed:  # counted as a note that could not be made: by hand
                refiled.append(sent)
        elif patient_identity(filed) != identity_now:
            refiled.append(sent)
    moved, unmade = _stage_withdrawal_notes(
        rt, left_behind, MOVED_TITLE, MOVED_AWAY, source_uid=claim.sop_instance_uid, uids=uids
    )
    try:
        notes, also_unmade = _stage_withdrawal_notes(
            rt, refiled, MOVED_TITLE, REFILED, source_uid=claim.sop_instance_uid, uids=uids
        )
    except BaseException:
        discard(moved)
        raise
    # what is to be withdrawn by hand last: `status` finds it at the end
    return moved + notes, "; ".join(filter(None, (left, unmade, also_unmade))) or None


def _commit(
    rt: Runtime,
    claim: _Claim,
    state: InstanceState,
    reason: str | None,
    result: Result | None,
    outputs: list[Output],
    *,
    send: bool = True,
) -> AssessOutcome:
    """Result, deliveries and the instance's final state in one transaction.

    The staged ``outputs`` are moved into the outbox inside it, once its rows are in
    (see the module docstring); an attempt that another one beat removes them.
    """
    instance_id = claim.instance_id
    try:
        with session_scope(rt.database_url) as session:
            # The instance's row first, locked until the commit (a write: SQLite takes
            # its write lock), then its rejection: a rejection note applied beside this
            # attempt either finds what it commits, or is found here.
            take_instances(session, [instance_id])
            current = database_now(session)  # the instance's end, and its deliveries' birth
            instance = session.get_one(Instance, instance_id)
            rejection, elsewhere = _rejection_in(session, claim)
            if rejection is not None:
                rejected = rejection.why
                # one another attempt finished is left to the note (:func:`_withdraw`),
                # which withdraws what that attempt made; one another attempt holds now
                # is that one's to close
                if _held_by(instance, claim):
                    _close(instance, claim, InstanceState.REJECTED, rejected, current)
                discard(outputs)
                logger.info("instance %d: rejected by the PACS while assessed", instance_id)
                return AssessOutcome("rejected", reason=rejected)
            if not _held_by(instance, claim):
                discard(outputs)
                return _claim_ended(instance_id, instance.state in FINISHED)
            if elsewhere:
                reason = said_rejected_elsewhere(reason)
            if result is not None:
                session.add(result)
                session.flush()
                _supersede_not_assessed(session, claim)
            configured = [str(destination) for destination in rt.settings.destinations]
            deliveries = [
                _delivery(
                    instance_id,
                    claim.assessment,
                    output,
                    destination,
                    current,
                    result_id=result.id if result is not None and output.of_result else None,
                )
                for destination in (configured if send else [])
                for output in outputs
                if output.destinations is None
            ] + [
                # a note of ours withdrawing an object goes where that object went, even a
                # destination configured otherwise since
                _delivery(instance_id, claim.assessment, output, destination, current)
                for output in outputs
                for destination in (output.destinations or () if send else ())
            ]
            session.add_all(deliveries)
            _close(instance, claim, state, reason, current)
            # Any other attempt at this instance now waits on these rows' unique keys
            # (PostgreSQL) or on the write lock (SQLite) until this transaction ends;
            # one that committed first has made the flush fail.
            session.flush()
            delivery_ids = tuple(d.id for d in deliveries)
            outputs = publish(outputs)
    except IntegrityError as exc:
        # Another attempt committed the same outputs first: its files and deliveries
        # stand, and this attempt's staged files go.
        discard(outputs)
        if _finished(rt, instance_id):
            logger.info("instance %d: outputs already recorded by another attempt", instance_id)
            return AssessOutcome("duplicate")
        # No other attempt finished it: the rows clash with something else, which no
        # attempt will get past. Said now, not after the reconciler's three tries.
        reason = f"its outputs could not be recorded: they clash with {_clash(exc)}"
        logger.error("instance %d: %s", instance_id, reason)
        _finish(rt, claim, InstanceState.ERROR, reason)
        return AssessOutcome("error", reason=reason)
    except BaseException:
        discard(outputs)
        raise
    return AssessOutcome(state.value, delivery_ids=delivery_ids, reason=reason)


def _delivery(
    instance_id: int,
    assessment: int,
    output: Output,
    destination: str,
    current: datetime,
    *,
    result_id: int | None = None,
) -> Delivery:
    """The row that sends ``output``, of the instance's ``assessment``, to
    ``destination``, made and due ``current``: now, by the database's clock, which the
    delivery workers and the reconciler, on any host, compare its times with."""
    return Delivery(
        instance_id=instance_id,
        result_id=result_id,
        kind=output.kind,
        destination=destination,
        sop_instance_uid=output.sop_instance_uid,
        study_instance_uid=output.study_instance_uid,
        series_instance_uid=output.series_instance_uid,
        assessment=assessment,
        path=str(output.path),
        sha256=output.sha256,
        withdraws=output.withdraws,
        state=DeliveryState.PENDING,
        next_attempt_at=current,
        created_at=current,
    )


def _finished(rt: Runtime, instance_id: int) -> bool:
    with session_scope(rt.database_url) as session:
        instance = session.get(Instance, instance_id)
        return instance is None or instance.state in FINISHED


def _clash(exc: IntegrityError) -> str:
    """Which unique key an insert broke, in words with no values (they hold UIDs). The
    database names it: ``uq_deliveries_…`` (PostgreSQL) or ``deliveries.…`` (SQLite)."""
    text = str(exc.orig)
    if "deliveries" in text:
        return "a delivery of the same object to the same destination"
    if "results" in text:
        return "a result of the same model"
    return "a row already recorded"


def _supersede_not_assessed(session: Session, claim: _Claim) -> None:
    """Mark the SR of the claimed assessment that said the image was not assessed, where
    it has not been sent (pending, or failed, which `retry-deliveries` would send),
    superseded by the result committed now (a `reprocess` that assesses the image: sent
    after, it stood at the PACS beside the bone age). One being sent at this moment is
    marked too, and the new SR names it (:func:`_earlier_reports`)."""
    session.execute(
        update(Delivery)
        .where(
            Delivery.instance_id == claim.instance_id,
            Delivery.assessment == claim.assessment,
            Delivery.kind == ObjectKind.SR,
            Delivery.result_id.is_(None),
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
            made_here(),
        )
        .values(
            state=DeliveryState.SUPERSEDED,
            last_error="replaced by the image's bone age before it was sent",
        )
        .execution_options(synchronize_session=False)
    )


def _supersede_unsent(
    session: Session, instance_id: int, assessment: int, why: str | None = None
) -> None:
    """Mark the objects of the instance's assessments before ``assessment`` that have
    not been sent (pending, or failed, which `retry-deliveries` would send) superseded,
    ``why`` (replaced by ``assessment``, unless said): nothing sends them.

    One being sent at this moment is marked too; if it goes through, its send records
    it delivered. The SR that replaces it names it either way, unless its send had
    failed by the time that SR was made (:func:`_earlier_reports`).
    """
    superseded = session.scalars(
        update(Delivery)
        .where(
            Delivery.instance_id == instance_id,
            Delivery.assessment < assessment,
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
            # our rejection notes withdraw those objects: they go all the same
            Delivery.kind != ObjectKind.KO,
        )
        .values(
            state=DeliveryState.SUPERSEDED,
            last_error=why or f"replaced by assessment {assessment} before it was sent",
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).all()
    if superseded:
        logger.info("instance %d: %d unsent object(s) superseded", instance_id, len(superseded))


def model_version(predictor: BoneAgePredictor) -> str:
    """The version reported in outputs (the SHA-256 model id is reported beside it)."""
    return str(predictor.meta.extra.get("version") or "unversioned")


def _ensure_model(rt: Runtime, predictor: BoneAgePredictor) -> None:
    """Record the model once; a concurrent insert by another worker is fine."""
    if rt.model_recorded == predictor.model_id:
        return  # once per process, not a query per image
    meta = predictor.meta
    try:
        with session_scope(rt.database_url) as session:
            known = session.get(Model, predictor.model_id) is not None
            if not known:
                session.add(
                    Model(
                        id=predictor.model_id,
                        name=f"{SOFTWARE_NAME} {model_name(meta.arch)}",
                        version=model_version(predictor),
                        architecture=meta.arch,
                        input_size=int(meta.input_size),
                        trained=bool(meta.trained),
                        metadata_json=json.loads(meta.to_json()),
                    )
                )
    except IntegrityError:
        pass
    rt.model_recorded = predictor.model_id
