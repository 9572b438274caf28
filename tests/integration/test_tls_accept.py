"""The TLS listener's handshakes happen on each connection's own thread, not in the accept loop.

An idle TCP connection (a port scanner, a half-open client, a load-balancer probe) to
the TLS port holds up no other client, and is closed once the handshake timeout passes;
a client with a bad certificate loses only its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_io.scp import VERIFICATION_SOP_CLASS, ReceivedInstance, StorageSCP
from tests.integration.test_listener import write_hand
from tests.integration.test_security import Certificates, storescu_over_tls
from tests.support import free_port, wait_for
from worker import tls
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Well within `tls.HANDSHAKE_TIMEOUT_SECONDS` (10 s): the accept loop used to hold every
#: client behind each idle connection for that long.
PROMPTLY_SECONDS = 5.0


@dataclass
class TLSListener:
    scp: StorageSCP
    certificates: Certificates
    recorded: list[ReceivedInstance]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[TLSListener]:
    with tls_listener(tmp_path) as made:
        yield made


@contextlib.contextmanager
def tls_listener(tmp_path: Path, **options: Any) -> Iterator[TLSListener]:
    """The listener over TLS on a free port; ``options`` for its StorageSCP."""
    certificates = Certificates(tmp_path / "pki")
    certificate, key = certificates.node
    settings = Settings(
        tls_certificate=certificate,
        tls_private_key=key,
        tls_ca_certificates=certificates.ca,
        tls_require_client_certificate=True,
    )
    recorded: list[ReceivedInstance] = []

    def record(instance: ReceivedInstance) -> int:
        recorded.append(instance)
        return len(recorded)

    scp = StorageSCP(
        ae_title="BONEAGE",
        spool_dir=tmp_path / "spool",
        record=record,
        notify=lambda _: None,
        host="127.0.0.1",
        port=free_port(),
        ssl_context=tls.server_context(settings),
        **options,
    )
    scp.start()
    try:
        yield TLSListener(scp, certificates, recorded)
    finally:
        scp.stop()


def associate(port: int, context: ssl.SSLContext, *storage: str) -> Association:
    ae = AE(ae_title="PACS")
    for sop_class in (VERIFICATION_SOP_CLASS, *storage):
        ae.add_requested_context(sop_class)
    # Longer than the old accept loop made us wait, so that it fails on time, not on these
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title="BONEAGE", tls_args=(context, "localhost"))


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """Plain TCP connections that never send a byte (no TLS ClientHello)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


def closed_by_peer(connection: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the peer to close; True if it did."""
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_hold_up_no_tls_client(listener: TLSListener, tmp_path: Path) -> None:
    port = listener.scp.port
    good = listener.certificates.client_context(with_certificate=True)
    first = write_hand(tmp_path / "first.dcm")
    second = write_hand(tmp_path / "second.dcm")
    opened = time.monotonic()
    idle = idle_connections(port, 3)
    try:
        started = time.monotonic()
        image = dcmread(first)
        assoc = associate(port, good, image.SOPClassUID)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(image).Status == 0x0000
        assoc.release()
        echoed_and_stored = time.monotonic() - started

        dcmtk = storescu_over_tls(listener.certificates, port, second)
        assert dcmtk.returncode == 0, dcmtk.stderr
        all_served = time.monotonic() - started
        assert echoed_and_stored < PROMPTLY_SECONDS
        assert all_served < PROMPTLY_SECONDS
        assert len(listener.recorded) == 2

        # The idle connections are closed by the listener once the handshake timeout
        # has passed, not before (a slow client still has its time).
        for connection in idle:
            assert closed_by_peer(connection)
        waited = time.monotonic() - opened
        assert tls.HANDSHAKE_TIMEOUT_SECONDS - 1 < waited < tls.HANDSHAKE_TIMEOUT_SECONDS + 10
    finally:
        for connection in idle:
            connection.close()


def test_a_bad_certificate_loses_only_its_connection(
    listener: TLSListener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = listener.scp.port
    stranger = Certificates(tmp_path / "other-pki")  # a client certificate of another CA
    bad = listener.certificates.client_context(with_certificate=False)
    bad.load_cert_chain(*stranger.client)
    no_certificate = listener.certificates.client_context(with_certificate=False)
    good = listener.certificates.client_context(with_certificate=True)
    [idle] = idle_connections(port, 1)
    try:
        started = time.monotonic()
        refused = associate(port, bad)
        assert not refused.is_established
        assert not associate(port, no_certificate).is_established
        served = associate(port, good)
        assert served.is_established
        assert served.send_c_echo().Status == 0x0000
        served.release()
        assert time.monotonic() - started < PROMPTLY_SECONDS
    finally:
        idle.close()
    failures = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert any("127.0.0.1" in line and "CERTIFICATE" in line.upper() for line in failures)


def test_connections_in_their_handshake_count_against_the_bound(tmp_path: Path) -> None:
    """Connections that never start their handshake each hold a thread for up to the
    handshake timeout: past the listener's bound on connections at once, one more is
    closed on arrival, and the places come back as they close."""
    with tls_listener(tmp_path, maximum_connections=2) as made:
        port = made.scp.port
        good = made.certificates.client_context(with_certificate=True)
        idle = idle_connections(port, 2)
        try:
            [extra] = idle_connections(port, 1)
            extra.settimeout(PROMPTLY_SECONDS)
            assert closed_by_peer(extra)  # at once, not after the handshake timeout
            extra.close()
            assert made.scp.refused_connections == 1
        finally:
            for connection in idle:
                connection.close()

        def echoed() -> bool:
            assoc = associate(port, good)
            if not assoc.is_established:
                return False
            status = assoc.send_c_echo().Status
            assoc.release()
            return bool(status == 0x0000)

        # before the handshake timeout: a connection closed in its handshake leaves then
        wait_for(echoed, timeout=tls.HANDSHAKE_TIMEOUT_SECONDS / 2, what="a C-ECHO over TLS")
