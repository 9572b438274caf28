"""Destinations that stall in the middle of a transfer: the send fails in bounded time.

pynetdicom clears its socket's timeout once connected. A peer that stopped reading
(its receive window at zero) blocked the DUL thread's send for ever, and one that
stopped halfway through writing a PDU its read; the abort after the DIMSE timeout then
waited for that thread for ever too, and with it the delivery worker (the solo pool of
`serve`, where Celery enforces no time limit), for every destination.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, ObjectKind
from dicom_io.qr import QueryError, StudyRootQueryRetrieveInformationModelFind, find_studies
from dicom_io.scu import Answer, SendError, send_datasets
from tests.integration.test_pipeline import make_runtime, spool_instance
from tests.integration.test_security import Certificates
from tests.support import wait_for
from worker import delivery
from worker.delivery import send_deliveries
from worker.pipeline import assess_instance

pytestmark = pytest.mark.integration

Stall = Literal["stops reading", "stops mid-PDU"]

#: The timeout our SCU is given in these tests (association, DIMSE, each socket wait).
TIMEOUT = 2.0
#: Longer than any bounded failure takes (about two timeouts); the wait was for ever.
WATCHDOG = 20.0


class StallingPeer:
    """A pynetdicom Storage SCP that accepts the association and, at the first P-DATA-TF
    it reads, stalls until stopped: ``stops reading`` reads nothing more (its receive
    buffer kept small, so that the sender's window closes); ``stops mid-PDU`` writes
    the first 3 bytes of a P-DATA-TF and nothing more."""

    ae_title = "PACS"

    def __init__(
        self,
        stall: Stall,
        ssl_context: ssl.SSLContext | None = None,
        sop_classes: Sequence[str] = (ComprehensiveSRStorage, SecondaryCaptureImageStorage),
    ) -> None:
        self.stall = stall
        self.stalled = threading.Event()
        self._stopping = threading.Event()
        ae = AE(ae_title=self.ae_title)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # its own timers never end the stall before the test does
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 4 * WATCHDOG
        self._server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            ssl_context=ssl_context,
            # once stopped, what it read is answered
            evt_handlers=[
                (evt.EVT_DATA_RECV, self._on_data),
                (evt.EVT_C_STORE, lambda _: 0x0000),
                (evt.EVT_C_FIND, lambda _: [(0x0000, None)]),
            ],
        )
        assert self._server is not None and self._server.socket is not None
        # connections accepted from now take the listening socket's receive buffer
        self._server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def _on_data(self, event: evt.Event) -> None:
        # runs on the acceptor's DUL thread, which reads the socket: blocking it stalls
        if event.data[:1] != b"\x04" or self.stalled.is_set():  # not a P-DATA-TF
            return
        if self.stall == "stops mid-PDU":
            transport = event.assoc.dul.socket
            assert transport is not None and transport.socket is not None
            transport.socket.sendall(b"\x04\x00\x00")  # PDU type, reserved, a length's first byte
        self.stalled.set()
        self._stopping.wait(4 * WATCHDOG)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("pki"))


def server_context(certificates: Certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificates.node)
    return context


def window_filling_size() -> int:
    """Bytes that fill the sender's send buffer at its largest and the peer's window."""
    try:
        largest = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        largest = 8 << 20
    return 2 * largest + (1 << 20)


def secondary_capture(path: Path, pixel_bytes: int) -> Path:
    """A Secondary Capture file of ``pixel_bytes`` bytes of Pixel Data (never decoded)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "OT"
    ds.add_new(0x7FE00010, "OB", bytes(pixel_bytes))
    ds.save_as(path, enforce_file_format=True)
    return path


def our_association_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """pynetdicom threads of associations we requested, started since ``before``."""
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and (
            (isinstance(t, Association) and t.is_requestor)
            or (isinstance(t, DULServiceProvider) and t.assoc.is_requestor)
        )
    ]


@pytest.fixture(
    params=[
        ("stops reading", False),
        ("stops mid-PDU", False),
        ("stops reading", True),
        ("stops mid-PDU", True),
    ],
    ids=["stops-reading", "stops-mid-pdu", "stops-reading-tls", "stops-mid-pdu-tls"],
)
def stalling(
    request: pytest.FixtureRequest, certificates: Certificates
) -> Iterator[tuple[StallingPeer, ssl.SSLContext | None]]:
    stall, tls = request.param
    peer = StallingPeer(stall, server_context(certificates) if tls else None)
    client = certificates.client_context(with_certificate=False) if tls else None
    try:
        yield peer, client
    finally:
        peer.stop()


def test_a_destination_that_stalls_mid_transfer_fails_the_send_in_bounded_time(
    stalling: tuple[StallingPeer, ssl.SSLContext | None], tmp_path: Path
) -> None:
    peer, client = stalling
    size = window_filling_size() if peer.stall == "stops reading" else 1024
    path = secondary_capture(tmp_path / "sc.dcm", size)
    outcome: list[BaseException | list[Answer]] = []

    def send() -> None:
        try:
            outcome.append(
                send_datasets(
                    [path],
                    ae_title=peer.ae_title,
                    host="127.0.0.1",
                    port=peer.port,
                    calling_ae_title="BONEAGE",
                    timeout=TIMEOUT,
                    ssl_context=client,
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    before = set(threading.enumerate())
    started = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(WATCHDOG)  # for ever before: the DUL thread blocked, and the abort on it
    elapsed = time.monotonic() - started

    assert peer.stalled.is_set()
    assert not sender.is_alive()
    [raised] = outcome
    assert isinstance(raised, SendError)
    assert "did not answer a C-STORE" in str(raised)
    assert raised.answered == () and raised.unanswered
    assert elapsed < 4 * TIMEOUT + 2
    # and nothing of the association is left waiting on the peer, which still stalls
    wait_for(
        lambda: not our_association_threads(before),
        timeout=WATCHDOG,
        what="the association's threads to end",
    )


def test_a_delivery_to_a_destination_that_stalls_is_retried(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR and SC of an assessment, to a PACS that stops halfway through its first
    answer: both are retried later (the SR may have arrived), and the worker is free."""
    monkeypatch.setattr(delivery, "SEND_TIMEOUT", TIMEOUT)
    peer = StallingPeer("stops mid-PDU")
    try:
        rt = make_runtime(tmp_path, tiny_checkpoint, destinations=peer.destination)
        ids = assess_instance(rt, spool_instance(rt)).delivery_ids
        outcomes: dict[int, delivery.DeliveryOutcome] = {}
        sender = threading.Thread(
            target=lambda: outcomes.update(send_deliveries(rt, ids)), daemon=True
        )
        sender.start()
        sender.join(WATCHDOG)
        assert peer.stalled.is_set()
        assert not sender.is_alive()
    finally:
        peer.stop()

    assert [o.state for o in outcomes.values()] == ["retry", "retry"]
    with session_scope(rt.database_url) as session:
        rows = {d.kind: d for d in session.scalars(select(Delivery))}
    sr, sc = rows[ObjectKind.SR], rows[ObjectKind.SC]
    assert all(d.state is DeliveryState.PENDING and d.attempts == 1 for d in (sr, sc))
    assert sr.last_error is not None and "did not answer a C-STORE" in sr.last_error
    # it went, and its answer never came: it may be at the destination
    assert sr.sending_since is not None and sc.sending_since is None


def test_a_query_to_a_peer_that_stalls_fails_in_bounded_time() -> None:
    """The query/retrieve client opens its associations as the Storage SCU does."""
    peer = StallingPeer("stops mid-PDU", sop_classes=[StudyRootQueryRetrieveInformationModelFind])
    outcome: list[BaseException | object] = []

    def query() -> None:
        try:
            outcome.append(
                find_studies(
                    ae_title=peer.ae_title,
                    host="127.0.0.1",
                    port=peer.port,
                    calling_ae_title="BONEAGE",
                    since=dt.date(2026, 1, 1),
                    modalities=("DX",),
                    timeout=TIMEOUT,
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    try:
        asker = threading.Thread(target=query, daemon=True)
        asker.start()
        asker.join(WATCHDOG)
        assert peer.stalled.is_set()
        assert not asker.is_alive()
    finally:
        peer.stop()
    [raised] = outcome
    assert isinstance(raised, QueryError)
    assert "did not answer the C-FIND" in str(raised)
