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

from dicom_io.scu import open_association, release

__all__ = [
    "AssociationFailed",
    "MoveFailed",
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

#: The Message ID of our one C-FIND or C-MOVE on each association, which a C-CANCEL names.
_MESSAGE_ID = 1

# PS3.4 Annex C.6.2 (pynetdicom.sop_class builds these names at run time, unseen by mypy)
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"


class QueryError(RuntimeError):
    """The peer could not be reached, or refused or failed a query or retrieve."""


class AssociationFailed(QueryError):
    """No association with the peer (unreachable, or it rejected us), or the association
    ended before the peer's final answer: nothing said whether the peer could do it."""


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
    #: Whether the response gave Number of Failed Sub-operations (0 where it did not).
    failed_given: bool = True

    @property
    def ok(self) -> bool:
        """Every instance sent. 0xB000 with no failed sub-operation is sent with warnings
        only (PS3.4 Table C.4-2: one or more failures *or warnings*), where the response
        says there was none: one that gives no count may have failed them all."""
        if self.status == 0xB000:
            return self.failed_given and self.failed == 0
        return self.status == 0x0000 and self.failed == 0

    @property
    def sent(self) -> int:
        """Sub-operations the destination took, with or without a warning."""
        return self.completed + self.warning


class MoveFailed(QueryError):
    """The peer's final C-MOVE status was a failure or a cancel; ``outcome`` holds its
    counts: the sub-operations it completed before it stopped were sent."""

    def __init__(self, message: str, outcome: MoveOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class AnsweredThenInterrupted(KeyboardInterrupt):
    """Ctrl-C once the peer's final C-MOVE response had come, while the association was
    released (and is now aborted): ``answer`` is what :func:`move_series` would have
    returned or raised, for a caller that counts what was sent."""

    def __init__(self, answer: MoveOutcome | QueryError) -> None:
        super().__init__("interrupted once the C-MOVE was answered")
        self.answer = answer


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
        error=AssociationFailed,
    )


def _cancel_and_abort(assoc: Association, model: str) -> None:
    """End an association whose C-FIND or C-MOVE the peer may still be answering.

    A release would wait: a peer answers the A-RELEASE-RQ only once it has sent its
    final response (pynetdicom's SCP serves one message at a time), so the rest of a
    move, or the ACSE timeout. The C-CANCEL (PS3.7) asks the peer to stop sending, and
    the A-ABORT, sent after it on the same connection, ends the association without
    waiting for any answer.
    """
    if not assoc.is_established:
        return  # pynetdicom aborted it already: no answer in time, or the peer aborted
    try:
        assoc.send_c_cancel(_MESSAGE_ID, query_model=model)
    except (RuntimeError, ValueError) as exc:  # lost meanwhile; the abort ends it anyway
        logger.debug("C-CANCEL not sent: %s", exc)
    finally:
        assoc.abort()


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
    failure: int | None = None
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
            identifier, StudyRootQueryRetrieveInformationModelFind, msg_id=_MESSAGE_ID
        ):
            if not status or "Status" not in status:
                raise AssociationFailed(f"{ae_title}@{host}:{port} did not answer the C-FIND")
            code = int(status.Status)
            if code in _PENDING:
                if answer is not None:
                    yield answer
            elif code != 0x0000:
                failure = code
    except BaseException:
        # interrupted (Ctrl-C, or the caller stopped reading) or lost before the final
        # response: the peer may still be sending matches
        _cancel_and_abort(assoc, StudyRootQueryRetrieveInformationModelFind)
        raise
    # the final response came: nothing is outstanding, and the peer answers a release now
    release(assoc)
    if failure is not None:
        raise QueryError(f"{ae_title}@{host}:{port} failed the C-FIND: 0x{failure:04X}")


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

    Interrupted (Ctrl-C) or cut off before the final response, it sends the peer a
    C-CANCEL and aborts the association, not waiting for the peer to finish.

    Raises
    ------
    AssociationFailed
        No association, or no final response.
    MoveFailed
        The C-MOVE was refused or failed (such as an unknown move destination, 0xA801,
        or out of resources partway, 0xA702) or was cancelled; its ``outcome`` counts
        what was sent before.
    """
    # Study Root, SERIES level: the unique keys down to the series
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    final: MoveOutcome | None = None
    # nothing between the association and the try that ends it when interrupted
    assoc = _associate(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        context=StudyRootQueryRetrieveInformationModelMove,
        timeout=timeout,
        ssl_context=ssl_context,
    )
    try:
        for status, _ in assoc.send_c_move(
            query,
            move_destination,
            StudyRootQueryRetrieveInformationModelMove,
            msg_id=_MESSAGE_ID,
        ):
            if not status or "Status" not in status:
                raise AssociationFailed(f"{ae_title}@{host}:{port} did not answer the C-MOVE")
            code = int(status.Status)
            if code in _PENDING:
                continue
            final = MoveOutcome(
                status=code,
                completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
                warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
                failed_given=status.get("NumberOfFailedSuboperations") is not None,
            )
    except BaseException:
        # interrupted (Ctrl-C) or lost before the final response: the peer may still be
        # sending; a release would wait for the rest of the series
        _cancel_and_abort(assoc, StudyRootQueryRetrieveInformationModelMove)
        raise
    answer: MoveOutcome | QueryError = final or AssociationFailed(
        f"{ae_title}@{host}:{port} sent no final C-MOVE response"
    )
    # 0xA7xx out of resources, 0xA801 unknown destination, 0xA9xx bad identifier,
    # 0xCxxx unable to process, 0xFE00 cancelled: nothing (more) will be sent.
    if final is not None and (
        (final.status & 0xF000) in (0xA000, 0xC000) or final.status == 0xFE00
    ):
        answer = MoveFailed(
            f"{ae_title}@{host}:{port} failed the C-MOVE to {move_destination}: "
            f"0x{final.status:04X} ({final.sent} sent, {final.failed} failed)",
            final,
        )
    # the final response came (failure included): nothing is outstanding, and the peer
    # answers a release now
    try:
        release(assoc)
    except KeyboardInterrupt as exc:
        raise AnsweredThenInterrupted(answer) from exc
    if isinstance(answer, QueryError):
        raise answer
    return answer
