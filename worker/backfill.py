"""Backfill: have a PACS send us the hand radiographs it already holds.

Query the PACS (C-FIND, Study Root) for studies with CR or DX in a date range, list
their series, keep the hand series (or every CR/DX series when the PACS does not
return BodyPartExamined), then C-MOVE each to our own AE title. The listener
receives them like any forwarded image; the workers do the rest. The PACS must know
our AE title as a move destination (host and port of the listener).

A study's Key Object Selection series (Modality KO) are moved too, before its hand
series: that is where a PACS keeps its IHE IOCM rejection notes. A PACS that does not
apply IOCM (Orthanc) still lets a rejected image be retrieved; forwarded alone, it
would be assessed and a bone age filed into a study the PACS rejected. The listener
only keeps and queues a note; the worker applies it (``worker.pipeline``: it records
the instances rejected, no model involved), and an image's assessment looks for its
rejection when it starts and again, under the image's row lock, when it commits.
Moved first, the note is queued before the images it rejects arrive, so it is applied
before any of them can be assessed: each is recorded ``rejected``, with no bone age
made or sent. (Were the note applied only after an assessment committed, a worker
held up, it would still withdraw that image's SR and SC, as a note forwarded late
does.) A key object selection that is no rejection note ("For Teaching", "Of
Interest") is recorded ``not_assessed`` and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dicom_io import qr
from dicom_io.gate import may_be_a_hand  # the gate's own reading
from dicom_io.scp import uid_tag
from worker.settings import Destination

logger = logging.getLogger(__name__)

StepFn = Callable[[str], None]

#: The Modality of a Key Object Selection Document's series (PS3.3 C.17.6.1), the
#: series in which a PACS keeps its rejection notes.
KEY_OBJECT_MODALITY = "KO"

#: Queries in a row that got no association with the PACS, or lost it before the PACS's
#: final answer, after which a backfill stops: the PACS has gone (or turns us away), and
#: each further query would wait out its own connection timeout. Counted over the
#: studies whose series are listed (C-FIND), and again over the series moved (C-MOVE);
#: a query the PACS answered, matched, moved or refused, starts the count again.
MAX_UNREACHED = 3


@dataclass(frozen=True)
class BackfillPlan:
    """What a backfill would move."""

    studies: list[qr.StudyMatch]
    # the series to move, in study-date order; of each study its key object selection
    # series (rejection notes) first, then its hand series
    series: list[qr.SeriesMatch]
    failures: list[str] = field(default_factory=list)  # studies whose series were not listed
    studies_not_tried: int = 0  # left when the listing stopped, the PACS unreached

    @property
    def key_object_series(self) -> list[qr.SeriesMatch]:
        """The key object selection series among :attr:`series` (rejection notes)."""
        return [s for s in self.series if is_key_object_series(s)]


@dataclass
class BackfillReport:
    """What a backfill did."""

    studies_found: int
    series_matched: int
    series_moved: int = 0
    instances_moved: int = 0  # with or without a warning, of failed series too
    instances_with_warnings: int = 0  # of instances_moved, those sent with a warning
    series_not_tried: int = 0  # left when the run stopped: the PACS unreached, or Ctrl-C
    studies_not_tried: int = 0  # whose series were never listed (BackfillPlan's)
    failures: list[str] = field(default_factory=list)


class BackfillInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_backfill`; ``report`` says what was moved before it.

    A KeyboardInterrupt still, for a caller that knows nothing of backfills.
    """

    def __init__(self, report: BackfillReport) -> None:
        super().__init__("backfill interrupted")
        self.report = report

    @staticmethod
    def report_of(exc: BaseException) -> BackfillReport | None:
        """The report of the BackfillInterrupted that ``exc`` is, or that it came during
        the handling of (a second Ctrl-C while the first one's was being ended)."""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, BackfillInterrupted):
                return seen.report
            seen = seen.__context__
        return None


class _Moved(enum.Enum):
    """How the move of one series went."""

    ALL = "every instance sent"
    NOT_ALL = "the PACS answered, and did not send them all"
    UNREACHED = "no association, or it ended before the PACS's final answer"


def is_candidate(series: qr.SeriesMatch, modalities: Sequence[str]) -> bool:
    """A series worth moving: one of ``modalities``, and a hand unless the body part is unknown.

    An empty BodyPartExamined means the PACS did not return it (or the images do not
    state it): the series is moved and the gate decides, as for forwarded images. The
    body part is read as the gate reads it (:func:`dicom_io.gate.may_be_a_hand`): a side
    written in (``L HAND``), or a region the hand is part of (``EXTREMITY``), is moved.
    """
    if series.modality not in {m.upper() for m in modalities}:
        return False
    return may_be_a_hand(series.body_part_examined)


def is_key_object_series(series: qr.SeriesMatch) -> bool:
    """A series of Key Object Selection Documents, where a PACS keeps its rejection notes.

    Which of its documents are rejection notes is told by their titles, which a
    SERIES-level query does not return: every one is moved, and the worker reads each
    (a key object selection that rejects nothing is recorded and left).
    """
    return series.modality == KEY_OBJECT_MODALITY


def study_series_to_move(
    series: Sequence[qr.SeriesMatch], modalities: Sequence[str]
) -> list[qr.SeriesMatch]:
    """Of one study's ``series``, those a backfill moves, in the order it moves them.

    The key object selection series come first, so that a rejection note is recorded
    before the images it rejects arrive, and they are never assessed; then the hand
    series (:func:`is_candidate`). A study with no hand series to move gets nothing
    moved, its notes neither: they reject nothing that we would receive.
    """
    hands = [s for s in series if not is_key_object_series(s) and is_candidate(s, modalities)]
    if not hands:
        return []
    return [*(s for s in series if is_key_object_series(s)), *hands]


def plan_backfill(
    peer: Destination,
    *,
    calling_ae_title: str,
    since: dt.date,
    until: dt.date | None = None,
    modalities: Sequence[str] = ("CR", "DX"),
    on_study: StepFn | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> BackfillPlan:
    """Find the studies in the range and the series of each that a backfill would move.

    A study whose series query fails is named in ``failures`` and left; after
    :data:`MAX_UNREACHED` studies in a row got no answer from the PACS the listing stops,
    and the plan holds the series of the studies listed before, the studies left
    counted in ``studies_not_tried`` and named in a failure.

    Raises
    ------
    dicom_io.qr.QueryError
        The study query failed (a failed series query is recorded in ``failures``).
    """
    studies = qr.find_studies(
        ae_title=peer.ae_title,
        host=peer.host,
        port=peer.port,
        calling_ae_title=calling_ae_title,
        since=since,
        until=until,
        modalities=modalities,
        ssl_context=ssl_context,
    )
    logger.info("backfill: %d studies from %s match", len(studies), peer)
    chosen: list[qr.SeriesMatch] = []
    failures: list[str] = []
    unreached = 0  # studies in a row whose series query got no answer from the PACS
    for index, study in enumerate(studies):
        if unreached >= MAX_UNREACHED:
            not_tried = len(studies) - index
            message = (
                f"stopped: the series of {unreached} studies in a row got no association "
                f"with {peer} (or lost it before its answer); {not_tried} studies not "
                "tried: run the backfill again once the PACS answers"
            )
            logger.error("backfill: %s", message)
            failures.append(message)
            return _planned(studies, chosen, failures, not_tried)
        tag = uid_tag(study.study_instance_uid)
        try:
            series = qr.find_series(
                study.study_instance_uid,
                ae_title=peer.ae_title,
                host=peer.host,
                port=peer.port,
                calling_ae_title=calling_ae_title,
                ssl_context=ssl_context,
            )
        except qr.QueryError as exc:
            logger.warning("backfill: series of study %s not listed: %s", tag, exc)
            failures.append(f"study {tag}: {exc}")
            unreached = unreached + 1 if isinstance(exc, qr.AssociationFailed) else 0
        else:
            chosen.extend(study_series_to_move(series, modalities))
            unreached = 0
        if on_study is not None:
            on_study(tag)
    return _planned(studies, chosen, failures, 0)


def _planned(
    studies: list[qr.StudyMatch],
    series: list[qr.SeriesMatch],
    failures: list[str],
    studies_not_tried: int,
) -> BackfillPlan:
    plan = BackfillPlan(studies, series, failures, studies_not_tried)
    logger.info(
        "backfill: %d series to move, %d of them key object selections (rejection notes)",
        len(plan.series),
        len(plan.key_object_series),
    )
    return plan


def run_backfill(
    peer: Destination,
    plan: BackfillPlan,
    *,
    calling_ae_title: str,
    move_destination: str,
    on_series: StepFn | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> BackfillReport:
    """C-MOVE every series of ``plan`` to ``move_destination``, in its order.

    One failure stops no other, but for two: a study whose key object selection series
    did not all arrive has its hand series left (each counted a failure), since one of
    its images may be rejected by a note that is missing; and after
    :data:`MAX_UNREACHED` series in a row got no answer from the PACS (no
    association, or it ended before the final response) the run stops, the series left
    counted in ``series_not_tried`` and named in a failure. Running it again moves them.

    Raises
    ------
    BackfillInterrupted
        Ctrl-C: the move under way is cancelled (:func:`dicom_io.qr.move_series`), and
        the report says what was moved before it, that series and those after it
        counted in ``series_not_tried``.
    """
    report = BackfillReport(
        studies_found=len(plan.studies),
        series_matched=len(plan.series),
        studies_not_tried=plan.studies_not_tried,
        failures=list(plan.failures),
    )
    notes_missing: set[str] = set()  # studies with a key object series not (all) moved
    unreached = 0  # series in a row whose move got no answer from the PACS
    ended = 0  # series whose move has ended (the PACS's answer came), or that were left
    moving: qr.SeriesMatch | None = None  # the series whose move is under way
    try:
        for series in plan.series:
            if unreached >= MAX_UNREACHED:
                report.series_not_tried = len(plan.series) - ended
                message = (
                    f"stopped: {unreached} series in a row got no association with {peer} "
                    f"(or lost it before its answer); {report.series_not_tried} series not "
                    "tried: run the backfill again once the PACS answers"
                )
                logger.error("backfill: %s", message)
                report.failures.append(message)
                break
            tag = uid_tag(series.series_instance_uid)
            notes = is_key_object_series(series)
            if not notes and series.study_instance_uid in notes_missing:
                logger.warning(
                    "backfill: series %s not moved: a key object series of its study was not",
                    tag,
                )
                report.failures.append(
                    f"series {tag}: not moved, as the key object selections (rejection "
                    "notes) of its study were not all moved first"
                )
                ended += 1
            else:
                moving = series
                answer = _ask_to_move(peer, series, calling_ae_title, move_destination, ssl_context)
                ended, moving = ended + 1, None  # interrupted from here on, it is counted
                moved = _count(series, answer, report)
                unreached = unreached + 1 if moved is _Moved.UNREACHED else 0
                if moved is not _Moved.ALL and notes:
                    notes_missing.add(series.study_instance_uid)
            if on_series is not None:
                on_series(tag)
    except KeyboardInterrupt as exc:
        if isinstance(exc, qr.AnsweredThenInterrupted) and moving is not None:
            # the PACS's answer came, and the release was cut short: counted as it came
            _count(moving, exc.answer, report)
            ended, moving = ended + 1, None
        report.series_not_tried = len(plan.series) - ended
        if report.series_not_tried:
            under_way = (
                ", the one under way among them (what it sent before its move was "
                "cancelled is not counted)"
                if moving is not None
                else ""
            )
            message = (
                f"interrupted: {report.series_not_tried} series not moved{under_way}: run "
                "the backfill again to move them"
            )
            report.failures.append(message)
            logger.warning("backfill: %s", message)
        raise BackfillInterrupted(report) from exc
    return report


def _ask_to_move(
    peer: Destination,
    series: qr.SeriesMatch,
    calling_ae_title: str,
    move_destination: str,
    ssl_context: ssl.SSLContext | None,
) -> qr.MoveOutcome | qr.QueryError:
    """C-MOVE one series: the PACS's final answer, or why there was none."""
    try:
        return qr.move_series(
            series.study_instance_uid,
            series.series_instance_uid,
            ae_title=peer.ae_title,
            host=peer.host,
            port=peer.port,
            calling_ae_title=calling_ae_title,
            move_destination=move_destination,
            ssl_context=ssl_context,
        )
    except qr.QueryError as exc:
        return exc


def _count(
    series: qr.SeriesMatch, answer: qr.MoveOutcome | qr.QueryError, report: BackfillReport
) -> _Moved:
    """Count the move of one series in ``report``."""
    tag = uid_tag(series.series_instance_uid)
    # the report first, the log after: a Ctrl-C in the log leaves the report whole
    if isinstance(answer, qr.QueryError):
        report.failures.append(f"series {tag}: {answer}")
        if isinstance(answer, qr.MoveFailed):  # what it sent before it stopped did come
            report.instances_moved += answer.outcome.sent
            report.instances_with_warnings += answer.outcome.warning
        logger.warning("backfill: series %s not moved: %s", tag, answer)
        return _Moved.UNREACHED if isinstance(answer, qr.AssociationFailed) else _Moved.NOT_ALL
    outcome = answer
    report.instances_moved += outcome.sent
    report.instances_with_warnings += outcome.warning
    if outcome.ok:
        report.series_moved += 1
    elif outcome.failed:
        report.failures.append(
            f"series {tag}: {outcome.failed} of its instances not sent "
            f"(status 0x{outcome.status:04X})"
        )
    else:
        report.failures.append(f"series {tag}: the PACS ended its move with 0x{outcome.status:04X}")
    logger.info(
        "backfill: %s series %s moved (%d sent, %d of them with a warning, %d failed)",
        "key object" if is_key_object_series(series) else "image",
        tag,
        outcome.sent,
        outcome.warning,
        outcome.failed,
    )
    return _Moved.ALL if outcome.ok else _Moved.NOT_ALL
