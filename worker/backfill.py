"""Backfill: have a PACS send us the hand radiographs it already holds.

Query the PACS (C-FIND, Study Root) for studies with CR or DX in a date range, list
their series, keep the hand series (or every CR/DX series when the PACS does not
return BodyPartExamined), then C-MOVE each to our own AE title. The listener
receives them like any forwarded image; the workers do the rest. The PACS must know
our AE title as a move destination (host and port of the listener).
"""

from __future__ import annotations

import datetime as dt
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


@dataclass(frozen=True)
class BackfillPlan:
    """What a backfill would move."""

    studies: list[qr.StudyMatch]
    series: list[qr.SeriesMatch]  # the series to move, in study-date order
    failures: list[str] = field(default_factory=list)  # studies whose series were not listed


@dataclass
class BackfillReport:
    """What a backfill did."""

    studies_found: int
    series_matched: int
    series_moved: int = 0
    instances_moved: int = 0
    failures: list[str] = field(default_factory=list)


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
    for study in studies:
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
        else:
            chosen.extend(s for s in series if is_candidate(s, modalities))
        if on_study is not None:
            on_study(tag)
    return BackfillPlan(studies, chosen, failures)


def run_backfill(
    peer: Destination,
    plan: BackfillPlan,
    *,
    calling_ae_title: str,
    move_destination: str,
    on_series: StepFn | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> BackfillReport:
    """C-MOVE every series of ``plan`` to ``move_destination``; one failure stops no other."""
    report = BackfillReport(
        studies_found=len(plan.studies),
        series_matched=len(plan.series),
        failures=list(plan.failures),
    )
    for series in plan.series:
        tag = uid_tag(series.series_instance_uid)
        try:
            outcome = qr.move_series(
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
            logger.warning("backfill: series %s not moved: %s", tag, exc)
            report.failures.append(f"series {tag}: {exc}")
        else:
            report.instances_moved += outcome.completed + outcome.warning
            if outcome.ok:
                report.series_moved += 1
            else:
                report.failures.append(
                    f"series {tag}: {outcome.failed} of its instances not sent "
                    f"(status 0x{outcome.status:04X})"
                )
            logger.info(
                "backfill: series %s moved (%d sent, %d failed)",
                tag,
                outcome.completed + outcome.warning,
                outcome.failed,
            )
        if on_series is not None:
            on_series(tag)
    return report
