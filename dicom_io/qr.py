"""Query/Retrieve SCU: find studies and series on a PACS, and have it send series to us.

Study Root Query/Retrieve Information Model (PS3.4 Annex C): C-FIND at STUDY and
SERIES level, C-MOVE at SERIES level to a move destination the peer knows by AE
title. Plain functions over one association each; no database, broker or model.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.association import Association

from dicom_io.scu import open_association

__all__ = [
    "MoveOutcome",
    "QueryError",
    "SeriesMatch",
    "StudyMatch",
    "find_series",
    "find_studies",
    "move_series",
]

logger = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)

# PS3.4 Annex C.6.2 (pynetdicom.sop_class builds these names at run time, unseen by mypy)
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"


class QueryError(RuntimeError):
    """The peer could not be reached, or refused or failed a query or retrieve."""


@dataclass(frozen=True)
class StudyMatch:
    """A study the peer holds (no patient attribute is kept)."""

    study_instance_uid: str
    study_date: str  # DA, YYYYMMDD; empty when the peer did not say
    modalities_in_study: tuple[str, ...]


@dataclass(frozen=True)
class SeriesMatch:
    """A series of a study, with what the peer said about it (empty when unknown)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    number_of_instances: int | None


@dataclass(frozen=True)
class MoveOutcome:
    """The final C-MOVE response: the status and the counts of sub-operations."""

    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        # 0xB000: some sub-operations failed; the peer still sent the others.
        return self.status == 0x0000 and self.failed == 0


def _date_range(since: dt.date, until: dt.date | None) -> str:
    """DA range matching (PS3.4 C.2.2.2.5): ``YYYYMMDD-`` or ``YYYYMMDD-YYYYMMDD``."""
    if until is not None and until < since:
        raise ValueError(f"until {until.isoformat()} is before since {since.isoformat()}")
    return f"{since:%Y%m%d}-{until:%Y%m%d}" if until is not None else f"{since:%Y%m%d}-"


def _associate(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    context: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Association:
    return open_association(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        contexts=[(context, None)],
        timeout=timeout,
        ssl_context=ssl_context,
        error=QueryError,
    )


def _find(
    identifier: Dataset,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[Dataset]:
    assoc = _associate(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        context=StudyRootQueryRetrieveInformationModelFind,
        timeout=timeout,
        ssl_context=ssl_context,
    )
    try:
        for status, answer in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            if not status or "Status" not in status:
                raise QueryError(f"{ae_title}@{host}:{port} did not answer the C-FIND")
            code = int(status.Status)
            if code in _PENDING:
                if answer is not None:
                    yield answer
            elif code != 0x0000:
                raise QueryError(f"{ae_title}@{host}:{port} failed the C-FIND: 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def find_studies(
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    since: dt.date,
    until: dt.date | None = None,
    modalities: Sequence[str] = ("CR", "DX"),
    timeout: float = 60,
    ssl_context: ssl.SSLContext | None = None,
) -> list[StudyMatch]:
    """Studies with one of ``modalities`` and a StudyDate in ``[since, until]``.

    One C-FIND per modality (single-value ModalitiesInStudy matching, which every
    peer supports; value lists are optional), merged by StudyInstanceUID. A study
    whose ModalitiesInStudy the peer returns and that has none of ``modalities`` is
    dropped, for peers that do not match on that key.

    Raises
    ------
    QueryError
        No association, or the peer failed the query.
    ValueError
        ``until`` before ``since``, or no modality.
    """
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    wanted = {m.strip().upper() for m in modalities}
    found: dict[str, StudyMatch] = {}
    for modality in sorted(wanted):
        # Study Root, STUDY level: the keys to match and the ones to return
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = _date_range(since, until)
        query.ModalitiesInStudy = modality
        for answer in _find(
            query,
            ae_title=ae_title,
            host=host,
            port=port,
            calling_ae_title=calling_ae_title,
            timeout=timeout,
            ssl_context=ssl_context,
        ):
            uid = _text(answer, "StudyInstanceUID")
            raw = answer.get("ModalitiesInStudy", "") or ""
            values = [raw] if isinstance(raw, str) else list(raw)
            in_study = tuple(sorted({str(v).strip().upper() for v in values if str(v).strip()}))
            if not uid or (in_study and not wanted & set(in_study)):
                continue
            found.setdefault(uid, StudyMatch(uid, _text(answer, "StudyDate"), in_study))
    return sorted(found.values(), key=lambda s: (s.study_date, s.study_instance_uid))


def find_series(
    study_instance_uid: str,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 60,
    ssl_context: ssl.SSLContext | None = None,
) -> list[SeriesMatch]:
    """Every series of a study, with Modality, BodyPartExamined and instance count.

    Filtering is the caller's: a peer that does not support a return key leaves
    it empty, and only the caller knows whether empty means "keep".
    """
    # Study Root, SERIES level: the study's unique key, then the keys to return
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.BodyPartExamined = ""
    query.NumberOfSeriesRelatedInstances = ""
    series: list[SeriesMatch] = []
    for answer in _find(
        query,
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae_title=calling_ae_title,
        timeout=timeout,
        ssl_context=ssl_context,
    ):
        uid = _text(answer, "SeriesInstanceUID")
        if not uid:
            continue
        count = _text(answer, "NumberOfSeriesRelatedInstances")
        series.append(
            SeriesMatch(
                study_instance_uid=study_instance_uid,
                series_instance_uid=uid,
                modality=_text(answer, "Modality").upper(),
                body_part_examined=_text(answer, "BodyPartExamined").upper(),
                number_of_instances=int(count) if count.isdigit() else None,
            )
        )
    return series


def move_series(
    study_instance_uid: str,
    series_instance_uid: str,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    move_destination: str,
    timeout: float = 600,
    ssl_context: ssl.SSLContext | None = None,
) -> MoveOutcome:
    """Ask the peer to C-STORE one series to ``move_destination`` (an AE title it knows).

    Returns when the peer has finished (its final response).

    Raises
    ------
    QueryError
        No association, no final response, or the C-MOVE was refused (such as an
        unknown move destination, 0xA801).
    """
    assoc = _associate(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        context=StudyRootQueryRetrieveInformationModelMove,
        timeout=timeout,
        ssl_context=ssl_context,
    )
    # Study Root, SERIES level: the unique keys down to the series
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    final: MoveOutcome | None = None
    try:
        for status, _ in assoc.send_c_move(
            query, move_destination, StudyRootQueryRetrieveInformationModelMove
        ):
            if not status or "Status" not in status:
                raise QueryError(f"{ae_title}@{host}:{port} did not answer the C-MOVE")
            code = int(status.Status)
            if code in _PENDING:
                continue
            final = MoveOutcome(
                status=code,
                completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
                warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
            )
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise QueryError(f"{ae_title}@{host}:{port} sent no final C-MOVE response")
    # 0xA7xx out of resources, 0xA801 unknown destination, 0xA9xx bad identifier,
    # 0xCxxx unable to process, 0xFE00 cancelled: nothing (more) will be sent.
    if (final.status & 0xF000) in (0xA000, 0xC000) or final.status == 0xFE00:
        raise QueryError(
            f"{ae_title}@{host}:{port} failed the C-MOVE to {move_destination}: "
            f"0x{final.status:04X} ({final.completed} sent, {final.failed} failed)"
        )
    return final
