"""The listener against peers that misbehave on the wire: oversized PDU headers, PDUs
sent a byte at a time. Raw sockets play those peers; dcmtk's storescu and pynetdicom
play the honest ones."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_io.scp import (
    ASSOCIATE_PDU_LIMIT,
    MAXIMUM_PDU_SIZE,
    P_DATA_MARGIN,
    VERIFICATION_SOP_CLASS,
    ReceivedInstance,
    StorageSCP,
    pdu_length_limit,
)
from tests.integration.test_listener import write_hand
from tests.support import storescu_command, wait_for

pytestmark = pytest.mark.integration

#: The listener's timeouts here: ARTIM (ACSE) shorter than the network timeout, so a
#: test can tell which one ended a connection.
ARTIM_S = 1.0
NETWORK_S = 2.0


class Node:
    """The listener on a free loopback port, recording what it stores in a list."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        acse_timeout: float,
        network_timeout: float,
        dimse_timeout: float,
        host: str = "127.0.0.1",
        **options: Any,
    ) -> None:
        self.recorded: list[ReceivedInstance] = []
        self.spool = tmp_path / "spool"
        self.scp = StorageSCP(
            ae_title="BONEAGE",
            spool_dir=self.spool,
            record=self._record,
            notify=lambda _id: None,
            allowed_callers=[("PACS", None)],
            host=host,
            port=0,
            acse_timeout=acse_timeout,
            network_timeout=network_timeout,
            dimse_timeout=dimse_timeout,
            **options,
        )

    def _record(self, received: ReceivedInstance) -> int:
        self.recorded.append(received)
        return len(self.recorded)

    def storescu(
        self, *files: Path, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return storescu(self.scp.port, *files, extra=extra)

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        """A TCP connection from ``source`` (any of 127.0.0.0/8 is this machine)."""
        return socket.create_connection(
            ("127.0.0.1", self.scp.port), timeout=30, source_address=(source, 0)
        )

    def incoming(self) -> list[Path]:
        """The data set files in spool/.incoming, whichever listener's folder holds them."""
        return sorted((self.spool / ".incoming").rglob("*.dcm"))


def storescu(
    port: int, *files: Path, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu, calling as PACS, sending ``files`` over one association."""
    return subprocess.run(
        storescu_command(port, *files, extra=extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def node(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[Node]:
    made = Node(tmp_path, acse_timeout=ARTIM_S, network_timeout=NETWORK_S, dimse_timeout=10)
    made.scp.start()
    yield made
    made.scp.stop()


def read_until_closed(sock: socket.socket) -> bytes:
    """All the listener sends until it closes the connection (EOF or reset)."""
    received = bytearray()
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return bytes(received)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def association_request() -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends for a C-ECHO, as bytes on the wire."""
    sent: list[bytes] = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    server = ae.start_server(("127.0.0.1", 0), block=False, ae_title="BONEAGE")
    assert server is not None  # not blocking: the server is returned
    try:
        assoc = ae.associate(
            "127.0.0.1",
            server.server_address[1],
            ae_title="BONEAGE",
            evt_handlers=[(evt.EVT_DATA_SENT, lambda event: sent.append(event.data))],
        )
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()
    assert sent[0][0] == 0x01
    return sent[0]


# -- PDU lengths ------------------------------------------------------------------


def test_limits_follow_the_pdu_type() -> None:
    assert pdu_length_limit(0x04) == MAXIMUM_PDU_SIZE + P_DATA_MARGIN
    assert pdu_length_limit(0x01) == pdu_length_limit(0x02) == ASSOCIATE_PDU_LIMIT
    assert all(pdu_length_limit(t) < 100 for t in (0x03, 0x05, 0x06, 0x07))


@pytest.mark.parametrize(
    ("pdu_type", "after_association"),
    [(0x01, False), (0x04, False), (0x04, True), (0x05, True)],
    ids=["A-ASSOCIATE-RQ", "P-DATA-TF unasked", "P-DATA-TF", "A-RELEASE-RQ"],
)
def test_a_pdu_header_claiming_a_gibibyte_is_aborted_before_anything_is_allocated(
    node: Node, tmp_path: Path, pdu_type: int, after_association: bool
) -> None:
    request = association_request() if after_association else b""
    before = rss_bytes()
    with node.connect() as sock:
        if request:
            sock.sendall(request)
            accept = sock.recv(6)
            assert accept[:1] == b"\x02"  # A-ASSOCIATE-AC
            sock.recv(struct.unpack(">L", accept[2:6])[0], socket.MSG_WAITALL)
        sock.sendall(struct.pack(">BBL", pdu_type, 0, 1 << 30))
        answer = read_until_closed(sock)
    # A-ABORT from the service provider, reason "invalid PDU parameter value", then closed
    assert answer == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
    assert rss_bytes() - before < 64 << 20  # not the gibibyte the header asked for
    done = node.storescu(write_hand(tmp_path / "hand.dcm"))
    assert done.returncode == 0, done.stderr
    assert len(node.recorded) == 1


@pytest.mark.parametrize(("excess", "reason"), [(0, 0x00), (1, 0x06)])
def test_an_association_request_up_to_the_limit_is_read(
    node: Node, excess: int, reason: int
) -> None:
    # At the bound the body is read, then refused as the garbage it is (A-ABORT, no
    # reason); a byte more and it is refused unread (invalid PDU parameter value).
    length = ASSOCIATE_PDU_LIMIT + excess
    with node.connect() as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, length))
        if not excess:  # (a body the listener never reads would reset the connection)
            sock.sendall(b"\0" * length)
        answer = read_until_closed(sock)
    assert answer[:1] == b"\x07" and answer[9] == reason


# -- time to send one PDU ----------------------------------------------------------


class Trickle(threading.Thread):
    """Sends one byte every `INTERVAL` seconds, each well within the listener's timeouts,
    until the listener closes the connection."""

    INTERVAL = 0.2

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.INTERVAL):
            try:
                self.sock.send(b"\0")
            except OSError:  # closed by the listener
                return
            self.sent += 1


@pytest.mark.parametrize("established", [False, True], ids=["ARTIM", "network timeout"])
def test_a_pdu_sent_a_byte_at_a_time_loses_its_connection_at_the_timeout(
    node: Node, tmp_path: Path, established: bool
) -> None:
    request = association_request() if established else b""
    with node.connect() as sock:
        if request:
            sock.sendall(request)
            accept = sock.recv(6)
            assert accept[:1] == b"\x02"
            sock.recv(struct.unpack(">L", accept[2:6])[0], socket.MSG_WAITALL)
            header = struct.pack(">BBL", 0x04, 0, 1000)  # a P-DATA-TF of 1000 bytes
        else:
            header = struct.pack(">BBL", 0x01, 0, 1000)  # an A-ASSOCIATE-RQ of 1000 bytes
        started = time.monotonic()
        sock.sendall(header)
        trickle = Trickle(sock)
        trickle.start()
        try:
            read_until_closed(sock)  # returns once the listener closes
        finally:
            trickle.stop.set()
            trickle.join()
        elapsed = time.monotonic() - started
    limit = NETWORK_S if established else ARTIM_S
    # every byte came well within the socket's timeout: only the deadline for the
    # whole PDU ended it, not long after it passed
    assert trickle.sent >= limit / Trickle.INTERVAL / 2
    assert limit * 0.9 <= elapsed < limit + 5
    server = node.scp._server
    assert server is not None
    wait_for(lambda: not server.active_associations, timeout=10, what="the thread to end")
    done = node.storescu(write_hand(tmp_path / "hand.dcm"))
    assert done.returncode == 0, done.stderr


# -- a data set that cannot be written ----------------------------------------------

#: The listener in a process whose files may not grow past ``argv[2]`` bytes
#: (RLIMIT_FSIZE: writing past it fails with EFBIG, as a full disk fails with ENOSPC).
_SIZE_LIMITED_LISTENER = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from dicom_io.scp import StorageSCP
recorded = []
scp = StorageSCP(ae_title="BONEAGE", spool_dir=Path(sys.argv[1]),
                 record=lambda r: recorded.append(r) or len(recorded), notify=lambda i: None,
                 allowed_callers=[("PACS", None)], host="127.0.0.1", port=0)
scp.start()
print(scp.port, flush=True)
sys.stdin.read()  # until the test closes it
print(len(recorded), flush=True)
scp.stop()
"""


def test_a_data_set_that_cannot_be_written_is_answered_out_of_resources(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    from tests.integration.test_listener import write_large_hand

    spool = tmp_path / "spool"
    large = write_large_hand(tmp_path / "large.dcm", rows=2000, columns=2000)  # 8 MB
    limit = 4 << 20
    assert large.stat().st_size > limit
    listener = subprocess.Popen(
        [sys.executable, "-c", _SIZE_LIMITED_LISTENER, str(spool), str(limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdin is not None
        port = int(listener.stdout.readline())
        refused = storescu(port, large, extra=("-v",))
        small = storescu(port, write_hand(tmp_path / "hand.dcm"))  # the listener carries on

        listener.stdin.close()
        recorded = int(listener.stdout.readline())
    finally:
        listener.kill()
        listener.wait(10)
        log = listener.stderr.read() if listener.stderr else ""
    # dcmtk's words for 0xA7xx
    assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stderr
    assert small.returncode == 0, small.stderr
    assert recorded == 1  # the small one
    assert "could not be written" in log and "Traceback" not in log, log
    assert list((spool / ".incoming").rglob("*.dcm")) == []  # nothing partial left
    assert len([p for p in spool.rglob("*.dcm")]) == 1


# -- a transfer that never ends -------------------------------------------------------

#: A pynetdicom peer that sends a C-STORE's command and half its data set, says so,
#: and then waits: for a line on stdin (then it aborts the association) or to be killed.
_HALF_A_STORE = """
import sys
from io import BytesIO
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

ds = dcmread(sys.argv[1])
ae = AE(ae_title="PACS")
ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title="BONEAGE")
assert assoc.is_established
request = C_STORE()
request.MessageID, request.Priority = 1, 2
request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
request.DataSet = BytesIO(encode(ds, False, True))
message = C_STORE_RQ()
message.primitive_to_message(request)
fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16382))
for fragment in fragments[: len(fragments) // 2]:
    assoc.dul.send_pdu(fragment)
print("half sent", flush=True)
sys.stdin.readline()
assoc.abort()
"""


@pytest.mark.parametrize("ending", ["A-ABORT", "killed"])
def test_the_partial_file_of_a_transfer_that_ends_midway_is_removed_at_once(
    node: Node, tmp_path: Path, ending: str
) -> None:
    from tests.integration.test_listener import write_large_hand

    large = write_large_hand(tmp_path / "large.dcm")
    peer = subprocess.Popen(
        [sys.executable, "-c", _HALF_A_STORE, str(large), str(node.scp.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout is not None and peer.stdin is not None
        assert peer.stdout.readline() == "half sent\n"
        partial = wait_for(
            lambda: [p for p in node.incoming() if p.stat().st_size > 1 << 20],
            timeout=30,
            what="a partial file in spool/.incoming",
        )
        assert partial[0].stat().st_size < large.stat().st_size
        if ending == "killed":
            peer.kill()
        else:
            peer.stdin.write("abort\n")
            peer.stdin.flush()
        peer.wait(30)
        # gone while the listener runs on: no restart, no sweep
        wait_for(lambda: node.incoming() == [], timeout=10, what="the partial file removed")
    finally:
        peer.kill()
        peer.wait(10)
    assert node.recorded == []
    done = node.storescu(large)
    assert done.returncode == 0, done.stderr
    assert len(node.recorded) == 1 and node.incoming() == []


def test_a_sweep_removes_incoming_files_nothing_is_writing(node: Node) -> None:
    incoming = node.spool / ".incoming"
    old, fresh = incoming / "tmpold.dcm", incoming / "tmpfresh.dcm"
    for path in (old, fresh):
        path.write_bytes(b"\0" * 132)
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))

    assert node.scp.sweep_incoming(older_than=600) == 1
    assert node.incoming() == [fresh]


# -- connections at once ------------------------------------------------------------


def echo_association(port: int) -> Association:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    return ae.associate("127.0.0.1", port, ae_title="BONEAGE")


def echoes(port: int) -> bool:
    """Whether the listener takes an association and answers its C-ECHO with Success."""
    assoc = echo_association(port)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo().Status
    assoc.release()
    return bool(status == 0x0000)


def test_connections_past_the_bound_are_closed_on_arrival(
    tmp_path: Path, dcmtk: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Connections that never speak (a port scan, a stuck client) hold a thread each
    until their timeout: past the bound, one more is closed at once, with nothing said,
    and the listener serves again as soon as they are gone."""
    # timeouts far longer than the test: only the bound can close a connection here
    node = Node(
        tmp_path, acse_timeout=60, network_timeout=60, dimse_timeout=60, maximum_connections=3
    )
    node.scp.start()
    try:
        idle = [node.connect() for _ in range(3)]
        extra = node.connect()
        extra.settimeout(10)
        assert read_until_closed(extra) == b""  # no timeout: closed, not left waiting
        extra.close()
        refused = echo_association(node.scp.port)  # a PACS too: it tries again later
        assert not refused.is_established
        assert node.scp.refused_connections == 2
        messages = [r.getMessage() for r in caplog.records if "closed on arrival" in r.getMessage()]
        assert messages == [
            "1 connection(s) closed on arrival, the last from 127.0.0.1: 3 connections at "
            "once is the most this listener takes"
        ]  # the second within the minute: counted, not logged

        for connection in idle:
            connection.close()

        # Within half the ARTIM timeout: a connection that closes before its A-ASSOCIATE-RQ
        # gives its place back at once, where it used to keep it until ARTIM ran out.
        port = node.scp.port
        wait_for(lambda: echoes(port), timeout=30, what="a C-ECHO once the idle ones are gone")
        done = node.storescu(write_hand(tmp_path / "hand.dcm"))
        assert done.returncode == 0, done.stderr
        assert len(node.recorded) == 1
    finally:
        node.scp.stop()


@pytest.mark.parametrize(
    "sent",
    [
        b"GET / HTTP/1.1\r\nHost: node\r\n\r\n",  # a web probe: no PDU type
        struct.pack(">BBL", 0x01, 0, ASSOCIATE_PDU_LIMIT + 1),  # too long for its type
        struct.pack(">BBL", 0x01, 0, 68) + b"\x00\x01",  # cut short, then closed
        b"",  # connected and closed
    ],
    ids=["http-probe", "too-long", "cut-short", "nothing"],
)
def test_what_is_no_association_request_gives_its_place_back_at_once(
    tmp_path: Path, dcmtk: dict[str, str], sent: bytes
) -> None:
    """A connection that sent anything but an A-ASSOCIATE-RQ, and closed, is done: with
    the listener's one place taken by it, a C-ECHO gets in within seconds, where the
    association used to wait out ARTIM (60 s here) first."""
    node = Node(
        tmp_path, acse_timeout=60, network_timeout=60, dimse_timeout=60, maximum_connections=1
    )
    node.scp.start()
    assert node.scp._server is not None

    def waiting_for_a_request() -> bool:
        associations = node.scp._server.ae.active_associations  # type: ignore[union-attr]
        return any(a.dul.state_machine.current_state == "Sta2" for a in associations)

    try:
        with node.connect() as sock:
            wait_for(waiting_for_a_request, timeout=10, what="the listener awaiting a request")
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)  # an A-ABORT or nothing, and closed

        port = node.scp.port
        wait_for(lambda: echoes(port), timeout=10, what="a C-ECHO in the first one's place")
    finally:
        node.scp.stop()


# -- associations at once from one address ------------------------------------------


def held_association(port: int, source: str = "127.0.0.1") -> Association:
    """A C-ECHO association from ``source`` (any of 127.0.0.0/8 is this machine), left
    open."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    return ae.associate("127.0.0.1", port, ae_title="BONEAGE", bind_address=(source, 0))


def test_one_address_gets_its_share_of_the_associations_and_no_more(
    tmp_path: Path, dcmtk: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A caller holding its share of associations open: one more from its address is
    rejected, transiently (a PACS tries again), while another address still gets in;
    releasing one lets the next in."""
    # timeouts far longer than the test: only the bound refuses here
    node = Node(
        tmp_path,
        acse_timeout=60,
        network_timeout=60,
        dimse_timeout=60,
        maximum_associations_per_peer=2,
    )
    node.scp.start()
    port = node.scp.port
    hand = write_hand(tmp_path / "hand.dcm")
    held = [held_association(port) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        refused = held_association(port)
        assert refused.is_rejected
        answer = refused.acceptor.primitive
        assert answer is not None
        # rejected-transient, service provider (presentation), local limit exceeded
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)
        sent = node.storescu(hand, extra=("-v",))  # dcmtk, from the same address
        assert sent.returncode != 0
        assert "Rejected Transient" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        assert node.recorded == []

        other = held_association(port, source="127.0.0.2")
        assert other.is_established
        assert other.requestor.address == "127.0.0.2"
        assert other.send_c_echo().Status == 0x0000
        other.release()

        assert node.scp.counters["refused"] == 2
        messages = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert messages == [
            "1 association(s) from 127.0.0.1 refused: 2 at once from one address is the "
            "most this listener takes"
        ]  # the second within the minute: counted, not logged

        held.pop().release()
        wait_for(lambda: echoes(port), timeout=30, what="a C-ECHO once one is released")
        done = node.storescu(hand)
        assert done.returncode == 0, done.stderr
        assert len(node.recorded) == 1
    finally:
        for assoc in held:
            assoc.release()
        node.scp.stop()


def test_the_bound_per_address_is_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from worker.listener import Listener
    from worker.settings import load_settings

    assert load_settings(data_dir=tmp_path).max_associations_per_peer == 16
    monkeypatch.setenv("BONEAGE_MAX_ASSOCIATIONS_PER_PEER", "3")
    settings = load_settings(data_dir=tmp_path)
    assert settings.max_associations_per_peer == 3
    assert Listener(settings).scp.maximum_associations_per_peer == 3
    monkeypatch.setenv("BONEAGE_MAX_ASSOCIATIONS_PER_PEER", "0")
    with pytest.raises(ValidationError, match="max_associations_per_peer"):
        load_settings(data_dir=tmp_path)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "| `BONEAGE_MAX_ASSOCIATIONS_PER_PEER` |" in readme


def test_a_caller_pinned_to_another_address_hears_why_it_is_rejected(tmp_path: Path) -> None:
    """Rejected from an EVT_REQUESTED handler, the A-ASSOCIATE-RJ reaches the peer, with
    its reason (permanent: calling AE title not recognised, so a PACS does not retry),
    where the connection used to close first and the peer saw an abort."""
    scp = StorageSCP(
        ae_title="BONEAGE",
        spool_dir=tmp_path / "spool",
        record=lambda _received: 1,
        notify=lambda _id: None,
        allowed_callers=[("PACS", "10.99.99.99")],
        host="127.0.0.1",
        port=0,
    )
    scp.start()
    try:
        refused = held_association(scp.port)
        assert refused.is_rejected and not refused.is_aborted
        answer = refused.acceptor.primitive
        assert answer is not None
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
        assert scp.counters["refused"] == 1
    finally:
        scp.stop()


# -- connections at once from one address -------------------------------------------

#: Well within the listener's ARTIM and TLS handshake timeouts (60 s and 10 s here): a
#: connection closed sooner was closed on arrival, not for its silence.
PROMPTLY_S = 5.0


def closed_at_once(sock: socket.socket) -> bool:
    """Whether the listener closes ``sock`` within `PROMPTLY_S`, having sent nothing."""
    sock.settimeout(PROMPTLY_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def awaiting_requests(scp: StorageSCP, source: str = "127.0.0.1") -> int:
    """The listener's associations from ``source`` still waiting for their A-ASSOCIATE-RQ:
    connections it has taken that never spoke."""
    assert scp._server is not None
    return sum(
        1
        for assoc in scp._server.ae.active_associations
        if assoc.dul.state_machine.current_state == "Sta2"
        and assoc.requestor.address.removeprefix("::ffff:") == source
    )


def settled(scp: StorageSCP) -> bool:
    """Whether the listener holds no connection: none in its handshake, no association's
    thread (the bookkeeping of its bound on connections in all)."""
    server = scp._server
    assert server is not None
    return not server._handling and not server.ae.active_associations


@pytest.mark.parametrize("host", ["127.0.0.1", "::"], ids=["IPv4", "dual-stack"])
def test_one_address_gets_its_share_of_the_connections_and_no_more(
    tmp_path: Path, dcmtk: dict[str, str], caplog: pytest.LogCaptureFixture, host: str
) -> None:
    """Connections that never send an A-ASSOCIATE-RQ, from one address: past twice its
    share of associations, one more from it is closed at once, while another address
    still associates; the places come back as they close. On a dual-stack listener an
    IPv4 caller (``::ffff:127.0.0.1``) counts as ``127.0.0.1``."""
    if host == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    # timeouts far longer than the test: only the bound closes a connection here
    node = Node(
        tmp_path,
        acse_timeout=60,
        network_timeout=60,
        dimse_timeout=60,
        host=host,
        maximum_associations_per_peer=2,
    )
    node.scp.start()
    port = node.scp.port
    share = 4  # twice the address's associations
    idle: list[socket.socket] = []
    try:
        idle += [node.connect() for _ in range(share)]
        wait_for(
            lambda: awaiting_requests(node.scp) == share,
            timeout=10,
            what="the listener holding the idle connections",
        )
        extra = node.connect()
        assert closed_at_once(extra)
        extra.close()
        assert node.scp.refused_connections == 1
        refused = held_association(port)  # a PACS at the same address: it tries again
        assert not refused.is_established
        assert node.scp.refused_connections == 2
        assert node.scp.connections_from("127.0.0.1") == share
        assert node.scp.connections_from("::ffff:127.0.0.1") == share

        other = held_association(port, source="127.0.0.2")
        assert other.is_established
        assert other.send_c_echo().Status == 0x0000
        assert node.scp.connections_from("127.0.0.2") == 1
        other.release()

        messages = [r.getMessage() for r in caplog.records if "closed on arrival" in r.getMessage()]
        assert messages == [
            "1 connection(s) from 127.0.0.1 closed on arrival: 4 at once from one address is "
            "the most this listener takes"
        ]  # the second within the minute: counted, not logged

        idle.pop().close()
        wait_for(
            lambda: node.scp.connections_from("127.0.0.1") == share - 1,
            timeout=10,
            what="the closed connection's place given back",
        )
        assert echoes(port)  # from 127.0.0.1 again
        assert node.scp.refused_connections == 2
    finally:
        for connection in idle:
            connection.close()
    try:
        wait_for(lambda: settled(node.scp), timeout=10, what="every connection gone")
        assert node.scp.connections_from("127.0.0.1") == 0
        assert node.scp.connections_from("127.0.0.2") == 0
    finally:
        node.scp.stop()


def test_every_way_a_connection_ends_gives_its_address_its_place_back(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    """Closed before its A-ASSOCIATE-RQ, a probe that is no request, released, aborted,
    rejected (by title, or for the address's share of associations): none leaves the
    address a place short, so its whole share of idle connections still fits after."""
    node = Node(
        tmp_path,
        acse_timeout=60,
        network_timeout=60,
        dimse_timeout=60,
        maximum_associations_per_peer=1,
    )
    node.scp.start()
    port = node.scp.port
    share = 2  # twice the address's associations

    def stranger() -> Association:
        ae = AE(ae_title="STRANGER")  # no allowed caller: rejected permanently
        ae.add_requested_context(VERIFICATION_SOP_CLASS)
        return ae.associate("127.0.0.1", port, ae_title="BONEAGE")

    def one_too_many() -> None:
        held = held_association(port)
        try:
            assert held_association(port).is_rejected  # the address's one association
        finally:
            held.release()

    def aborted() -> None:
        assoc = held_association(port)
        assert assoc.is_established
        assoc.abort()

    def probe(sent: bytes) -> None:
        with node.connect() as sock:
            wait_for(lambda: awaiting_requests(node.scp) == 1, timeout=10, what="taken")
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)

    endings: list[tuple[str, Callable[[], object]]] = [
        ("closed before its request", lambda: probe(b"")),
        ("an HTTP probe", lambda: probe(b"GET / HTTP/1.1\r\n\r\n")),
        ("released", lambda: echoes(port) or pytest.fail("no C-ECHO")),
        ("aborted", aborted),
        ("rejected by title", lambda: stranger().is_rejected or pytest.fail("not rejected")),
        ("rejected for its share", one_too_many),
    ]
    idle: list[socket.socket] = []
    try:
        for what, ending in endings:
            ending()
            wait_for(lambda: settled(node.scp), timeout=10, what=f"{what}: every place back")

        idle += [node.connect() for _ in range(share)]
        wait_for(
            lambda: awaiting_requests(node.scp) == share,
            timeout=10,
            what="the listener holding the address's whole share",
        )
        extra = node.connect()
        assert closed_at_once(extra)
        extra.close()
        assert node.scp.refused_connections == 1
    finally:
        for connection in idle:
            connection.close()
    try:
        wait_for(lambda: settled(node.scp), timeout=10, what="every connection gone")
        assert node.scp.connections_from("127.0.0.1") == 0
    finally:
        node.scp.stop()


@pytest.mark.slow
def test_tls_handshakes_count_against_the_share_of_their_address(tmp_path: Path) -> None:
    """Over TLS, connections that never start their handshake: past the address's share,
    one more from it is closed at once (not after the handshake timeout), another address
    still associates, and a failed handshake gives its place back."""
    from tests.integration.test_security import Certificates
    from tests.integration.test_tls_accept import tls_listener
    from worker import tls

    def tls_echo(port: int, context: ssl.SSLContext, source: str = "127.0.0.1") -> bool:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(VERIFICATION_SOP_CLASS)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="BONEAGE",
            tls_args=(context, "localhost"),
            bind_address=(source, 0),
        )
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo().Status
        assoc.release()
        return bool(status == 0x0000)

    assert PROMPTLY_S < tls.HANDSHAKE_TIMEOUT_SECONDS
    with tls_listener(tmp_path, maximum_associations_per_peer=1) as made:
        scp, port = made.scp, made.scp.port
        server = scp._server
        assert server is not None
        share = 2  # twice the address's associations
        good = made.certificates.client_context(with_certificate=True)
        stranger = Certificates(tmp_path / "other-pki")
        bad = made.certificates.client_context(with_certificate=False)
        bad.load_cert_chain(*stranger.client)

        assert tls_echo(port, good)
        assert not tls_echo(port, bad)  # its handshake fails
        wait_for(lambda: settled(scp), timeout=10, what="both connections gone")

        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(share)]
        try:
            # no ClientHello: each in its handshake, on its own thread
            wait_for(lambda: len(server._handling) == share, timeout=10, what="handshakes")
            extra = socket.create_connection(("127.0.0.1", port), timeout=30)
            assert closed_at_once(extra)
            extra.close()
            assert scp.refused_connections == 1
            assert scp.connections_from("127.0.0.1") == share

            assert tls_echo(port, good, source="127.0.0.2")

            idle.pop().close()
            wait_for(
                lambda: scp.connections_from("127.0.0.1") == share - 1,
                timeout=PROMPTLY_S,  # before the handshake timeout
                what="the closed connection's place given back",
            )
            assert tls_echo(port, good)
        finally:
            for connection in idle:
                connection.close()
        wait_for(lambda: settled(scp), timeout=PROMPTLY_S, what="every connection gone")
        assert scp.connections_from("127.0.0.1") == 0
        assert scp.connections_from("127.0.0.2") == 0
