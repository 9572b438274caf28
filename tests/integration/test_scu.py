"""Our Storage SCU against dcmtk's storescp."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from dicom_io import scu
from dicom_io.scp import VERIFICATION_SOP_CLASS
from dicom_io.scu import (
    NotAccepted,
    NotSendable,
    SendError,
    SendOutcome,
    offered_syntaxes,
    open_association,
    send_files,
)
from dicom_io.synthetic import make_radiograph_dataset
from tests.conftest import StoreSCP
from tests.proxy import SlowLink
from tests.support import wait_for

pytestmark = pytest.mark.integration


def test_our_associations_send_at_once(storescp: StoreSCP) -> None:
    # storescp writes each answer in two pieces and leaves Nagle's algorithm on; our side
    # sends at once and acknowledges at once (dicom_io.tcp), or every C-STORE waits 40 ms.
    assoc = open_association(
        storescp.ae_title,
        "127.0.0.1",
        storescp.port,
        calling_ae_title="BONEAGE",
        contexts=[(VERIFICATION_SOP_CLASS, None)],
        timeout=10,
    )
    try:
        assert assoc.dul.socket is not None
        sock = assoc.dul.socket.socket
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _delayed_acknowledgements() -> int | None:
    """Linux's count of acknowledgements sent late, by the delayed-ACK timer (this
    network namespace, every socket), or ``None`` where it cannot be read."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(counters["DelayedACKs"]) if "DelayedACKs" in counters else None
    return None


def test_a_large_object_is_answered_without_waiting_for_a_delayed_ack(tmp_path: Path) -> None:
    # storescp writes each answer in two pieces with Nagle's algorithm on. After a large
    # object the first piece waited for Linux's delayed acknowledgement (40 ms) in 26 of
    # 30 deliveries of the heat-map SC with 128 KiB PDUs, though our side re-arms quick
    # acknowledgement after each send; it now also does before each read (dicom_io.tcp).
    # The kernel counts each acknowledgement its timer sends; nothing is timed here.
    if _delayed_acknowledgements() is None:
        pytest.skip("the kernel's TCP counters (/proc/net/netstat) are not readable here")
    peer = StoreSCP(tmp_path / "pacs", options=("--accept-all", "--max-pdu", "131072")).start()
    try:
        rng = np.random.default_rng(3)
        small, large = tmp_path / "small.dcm", tmp_path / "large.dcm"
        for path, side in ((small, 32), (large, 1024)):
            make_radiograph_dataset(
                rng.random((side, side), dtype=np.float32),
                birth_date=None,
                study_date=dt.date(2026, 1, 1),
            ).save_as(path, enforce_file_format=True)
        before = _delayed_acknowledgements()
        for _ in range(30):  # as deliveries go: a small object, then a large one
            outcomes = send_files(
                [small, large],
                ae_title=peer.ae_title,
                host="127.0.0.1",
                port=peer.port,
                calling_ae_title="BONEAGE",
            )
            assert all(outcome.ok for outcome in outcomes)
        after = _delayed_acknowledgements()
    finally:
        peer.stop()
    assert before is not None and after is not None
    # before the change 7 to 19 of the thirty waited here; a stray timer elsewhere on the machine
    # may count too
    assert after - before <= 3


def test_several_files_are_sent_and_answered_in_order(storescp: StoreSCP, tmp_path: Path) -> None:
    paths = []
    for index in range(3):
        ds = make_radiograph_dataset(
            np.full((64, 64), 0.25 * (index + 1), dtype=np.float32),
            birth_date=None,
            study_date=dt.date(2026, 1, 1),
        )
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    outcomes = send_files(
        paths,
        ae_title=storescp.ae_title,
        host="127.0.0.1",
        port=storescp.port,
        calling_ae_title="BONEAGE",
    )
    assert [o.path for o in outcomes] == paths
    assert all(o.ok and o.status == 0x0000 for o in outcomes)
    received = {dcmread(p).SOPInstanceUID for p in storescp.wait_for_objects(3, timeout=30)}
    assert received == {dcmread(p).SOPInstanceUID for p in paths}


def test_files_go_out_in_their_own_transfer_syntax_with_their_contents(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    # (Whether the bytes are sent as stored or decoded and encoded again cannot be told
    # from what storescp keeps: pydicom re-encodes a clean file to the same bytes. That
    # a delivery hands the file itself to pynetdicom is checked in test_delivery.py.)
    ds = make_radiograph_dataset(
        np.full((64, 64), 0.5, dtype=np.float32), birth_date=None, study_date=dt.date(2026, 1, 1)
    )
    ds.PatientComments = "kept as written"
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)

    [outcome] = send_files(
        [path],
        ae_title=storescp.ae_title,
        host="127.0.0.1",
        port=storescp.port,
        calling_ae_title="BONEAGE",
    )

    assert outcome.ok
    [received] = storescp.wait_for_objects(1, timeout=30)
    theirs = dcmread(received)
    assert theirs.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert theirs.PixelData == ds.PixelData and theirs.PatientComments == "kept as written"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a DICOM file at all", "is no DICOM Part 10 file"),
        (None, "has no Transfer Syntax UID"),
    ],
)
def test_a_file_that_cannot_be_offered_is_refused_before_any_association(
    storescp: StoreSCP, tmp_path: Path, content: bytes | None, says: str
) -> None:
    good = tmp_path / "good.dcm"
    make_radiograph_dataset(
        np.zeros((8, 8), dtype=np.float32), birth_date=None, study_date=dt.date(2026, 1, 1)
    ).save_as(good, enforce_file_format=True)
    bad = tmp_path / "bad.dcm"
    if content is None:  # a Part 10 file whose meta lacks the transfer syntax
        ds = dcmread(good)
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(bad, enforce_file_format=False)
        content = bad.read_bytes()
    bad.write_bytes(content)

    with pytest.raises(NotSendable, match=says):
        send_files(
            [good, bad],
            ae_title=storescp.ae_title,
            host="127.0.0.1",
            port=storescp.port,
            calling_ae_title="BONEAGE",
        )
    assert storescp.associations() == 0 and storescp.received() == []


def test_a_destination_that_never_answers_the_tls_handshake_fails_in_bounded_time(
    tmp_path: Path,
) -> None:
    # The port accepts TCP (the kernel completes the handshake for the listen backlog)
    # and nothing ever answers the TLS ClientHello: a hung TLS proxy, or a node serving
    # plain DICOM whose peer waits for us to speak first.
    path = tmp_path / "one.dcm"
    make_radiograph_dataset(
        np.zeros((8, 8), dtype=np.float32), birth_date=None, study_date=dt.date(2026, 1, 1)
    ).save_as(path, enforce_file_format=True)
    outcome: list[BaseException | list[SendOutcome]] = []

    def send() -> None:
        try:
            outcome.append(
                send_files(
                    [path],
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=silent.getsockname()[1],
                    calling_ae_title="BONEAGE",
                    timeout=2,
                    ssl_context=ssl.create_default_context(),
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        started = time.monotonic()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(30)  # unbounded before: the handshake waited for ever
        elapsed = time.monotonic() - started
    assert not sender.is_alive()
    [raised] = outcome
    assert isinstance(raised, SendError)
    assert "no connection" in str(raised) and "TLS handshake in 2 s" in str(raised)
    assert elapsed < 15


@pytest.mark.parametrize("trusting", ["our CA", "the system's"])
def test_a_destination_whose_certificate_is_refused_says_why(tmp_path: Path, trusting: str) -> None:
    """pynetdicom logs a failed TLS handshake and goes on as if nothing connected: a
    certificate of another name, or of an authority not trusted, was recorded as "no
    connection", a network outage, and retried for a day. What TLS refused is said."""
    from tests.integration.test_security import Certificates

    certificates = Certificates(tmp_path / "pki")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*certificates.client)  # names pacs.invalid, not 127.0.0.1
    stop = threading.Event()

    def serve(listening: socket.socket) -> None:
        while not stop.is_set():
            try:
                connection, _ = listening.accept()
            except OSError:
                return
            with connection, contextlib.suppress(OSError):
                server.wrap_socket(connection, server_side=True).close()

    client = (
        certificates.client_context(with_certificate=False)
        if trusting == "our CA"
        else ssl.create_default_context()
    )
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        thread = threading.Thread(target=serve, args=(listening,), daemon=True)
        thread.start()
        try:
            said = _refused_over_tls(tmp_path, listening.getsockname()[1], client)
        finally:
            stop.set()
    assert "TLS: the destination's certificate is refused (" in said, said
    assert ("IP address mismatch" if trusting == "our CA" else "unable to get local issuer") in (
        said
    )


def test_a_tls_destination_that_closes_at_once_is_no_certificate_matter(tmp_path: Path) -> None:
    """A TLS proxy with no backend takes the connection and closes it: an outage, not a
    refusal of certificates, which would send the administrator to the wrong place."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)

        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    listening.accept()[0].close()

        threading.Thread(target=close_each, daemon=True).start()
        said = _refused_over_tls(tmp_path, listening.getsockname()[1], ssl.create_default_context())
    assert "failed: no connection (" in said, said


def _refused_over_tls(tmp_path: Path, port: int, client: ssl.SSLContext) -> str:
    """Why a send of a small image over TLS to the loopback ``port`` failed."""
    with pytest.raises(SendError) as raised:
        send_files(
            [_radiograph(tmp_path / "hand.dcm", 64)],
            ae_title="PACS",
            host="127.0.0.1",
            port=port,
            calling_ae_title="BONEAGE",
            timeout=5,
            ssl_context=client,
        )
    return str(raised.value)


def test_a_destination_taking_only_implicit_vr_gets_the_object_re_encoded_whole(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    # Explicit VR Little Endian as stored, Implicit VR Little Endian (PS3.5 10.1: every
    # implementation supports it) as a fall-back: storescp +xi takes only the latter.
    peer = StoreSCP(tmp_path / "pacs", options=("+xi",)).start()
    try:
        path = tmp_path / "one.dcm"
        ds = make_radiograph_dataset(
            np.random.default_rng(2).random((64, 48), dtype=np.float32),
            birth_date=None,
            study_date=dt.date(2026, 1, 1),
        )
        ds.save_as(path, enforce_file_format=True)
        assert dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

        [outcome] = send_files(
            [path],
            ae_title=peer.ae_title,
            host="127.0.0.1",
            port=peer.port,
            calling_ae_title="BONEAGE",
        )

        assert outcome.ok
        [received] = peer.wait_for_objects(1, timeout=30)
    finally:
        peer.stop()
    theirs, ours = dcmread(received), dcmread(path)
    assert theirs.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert theirs == ours  # every element, each value as it was
    assert np.array_equal(theirs.pixel_array, ours.pixel_array)


def test_a_sop_class_the_destination_does_not_take_is_named_in_the_error(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    from tests.integration.test_delivery import SR_ONLY

    profile = tmp_path / "sr-only.cfg"
    profile.write_text(SR_ONLY)
    peer = StoreSCP(tmp_path / "pacs", options=("--config-file", str(profile), "SROnly")).start()
    try:
        path = tmp_path / "one.dcm"
        make_radiograph_dataset(
            np.zeros((8, 8), dtype=np.float32), birth_date=None, study_date=dt.date(2026, 1, 1)
        ).save_as(path, enforce_file_format=True)
        with pytest.raises(SendError) as raised:
            send_files(
                [path],
                ae_title=peer.ae_title,
                host="127.0.0.1",
                port=peer.port,
                calling_ae_title="BONEAGE",
            )
    finally:
        peer.stop()
    assert str(raised.value).startswith(
        "no presentation context accepted for Digital X-Ray Image Storage - For Presentation "
        f"by AE PACS at 127.0.0.1:{peer.port}"
    )
    assert peer.received() == []


def test_offered_syntaxes_add_the_uncompressed_fall_backs_only_where_nothing_is_lost() -> None:
    assert offered_syntaxes(ExplicitVRLittleEndian) == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    assert offered_syntaxes(DeflatedExplicitVRLittleEndian) == [
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    assert offered_syntaxes(JPEGLSLossless) == [JPEGLSLossless]  # never decoded to send
    assert offered_syntaxes(ExplicitVRBigEndian) == [ExplicitVRBigEndian]


def test_every_object_with_an_accepted_context_is_sent_and_the_refused_one_named(
    tmp_path: Path,
) -> None:
    from tests.integration.test_delivery import PynetdicomPACS

    paths = []
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ds = make_radiograph_dataset(
            np.zeros((8, 8), dtype=np.float32), birth_date=None, study_date=dt.date(2026, 1, 1)
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        path = tmp_path / f"{sop_class}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    pacs = PynetdicomPACS([SecondaryCaptureImageStorage])  # a PACS that takes no SR
    try:
        with pytest.raises(SendError) as raised:
            send_files(
                paths,
                ae_title=pacs.ae_title,
                host="127.0.0.1",
                port=int(pacs.destination.rsplit(":", 1)[1]),
                calling_ae_title="BONEAGE",
            )
    finally:
        pacs.stop()
    assert pacs.received == [SecondaryCaptureImageStorage]  # sent after the refused SR
    [not_sent, status] = raised.value.answered
    assert isinstance(not_sent, NotAccepted) and status == 0x0000
    assert not_sent.reason.startswith(
        "no presentation context accepted for Comprehensive SR Storage by AE PACS"
    )
    assert str(raised.value).endswith(
        f"({paths[0].name}: not sent, {paths[1].name}: status 0x0000)"
    )


def test_a_host_that_drops_the_connection_attempt_fails_within_the_connect_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A listen backlog already full: the kernel drops the next SYN, as a host gone
    # silently (or a firewall dropping packets) does. A C-MOVE's association has a
    # 10-minute timeout, and its connect took all of it (backfill: 3 series of it).
    monkeypatch.setattr(scu, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # the one the backlog holds
            started = time.monotonic()
            with pytest.raises(SendError) as raised:
                open_association(
                    "PACS",
                    "127.0.0.1",
                    port,
                    calling_ae_title="BONEAGE",
                    contexts=[(VERIFICATION_SOP_CLASS, None)],
                    timeout=600,
                )
            elapsed = time.monotonic() - started
    assert "no connection" in str(raised.value) and "TCP connection in 1 s" in str(raised.value)
    assert elapsed < 30


def _radiograph(path: Path, side: int) -> Path:
    make_radiograph_dataset(
        np.random.default_rng(side).random((side, side), dtype=np.float32),
        birth_date=None,
        study_date=dt.date(2026, 1, 1),
    ).save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("warning", [0x0001, 0x0107, 0x0116, 0xB000])
def test_a_warning_outside_0xbxxx_is_stored(
    tmp_path: Path, warning: int, caplog: pytest.LogCaptureFixture
) -> None:
    # PS3.7 Annex C: 0x0001, 0x0107 and 0x0116 are warnings, the object stored; they were
    # taken for failures, and the object sent again on every retry.
    from tests.integration.test_delivery import PynetdicomPACS

    path = _radiograph(tmp_path / "one.dcm", 8)
    pacs = PynetdicomPACS([str(dcmread(path).SOPClassUID)], warning)
    try:
        with caplog.at_level("WARNING", logger="dicom_io.scu"):
            [outcome] = send_files(
                [path],
                ae_title=pacs.ae_title,
                host="127.0.0.1",
                port=int(pacs.destination.rsplit(":", 1)[1]),
                calling_ae_title="BONEAGE",
            )
    finally:
        pacs.stop()
    assert outcome.status == warning and outcome.ok
    assert scu.stored(warning) and scu.warning(warning)
    assert f"stored an object with warning status 0x{warning:04X}" in caplog.text


def test_failures_and_success_are_no_warnings() -> None:
    for status in (0x0000, 0xA700, 0xA900, 0xC000, 0x0110, 0x0122):
        assert not scu.warning(status)
    assert [scu.stored(s) for s in (0x0000, 0xA700, 0x0110)] == [True, False, False]
    assert not scu.stored(NotAccepted("no presentation context"))


def _rejecting_scp(**requires: Any) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    for name, value in requires.items():
        setattr(ae, name, value)
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    return ae.start_server(("127.0.0.1", 0), block=False)


@pytest.mark.parametrize(
    ("requires", "called", "reason"),
    [
        ({"require_called_aet": True}, "OTHER", "Called AE title not recognised"),
        ({"require_calling_aet": ["PACSADMIN"]}, "PACS", "Calling AE title not recognised"),
    ],
)
def test_a_rejected_association_says_why(
    requires: dict[str, Any], called: str, reason: str
) -> None:
    server = _rejecting_scp(**requires)
    try:
        port = server.server_address[1]
        with pytest.raises(SendError) as raised:
            scu.echo(called, "127.0.0.1", port, calling_ae_title="BONEAGE")
        accepted = scu.echo("PACS", "127.0.0.1", port, calling_ae_title="PACSADMIN")
    finally:
        server.shutdown()
    assert str(raised.value) == (
        f"association with {called}@127.0.0.1:{port} failed: rejected (permanent): {reason}"
    )
    assert accepted == 0x0000


def test_the_echo_command_prints_why_it_got_no_answer() -> None:
    from click.testing import CliRunner

    from worker.cli import main

    server = _rejecting_scp(require_called_aet=True)
    try:
        port = server.server_address[1]
        rejected = CliRunner().invoke(main, ["echo", f"OTHER@127.0.0.1:{port}"])
        answered = CliRunner().invoke(main, ["echo", f"PACS@127.0.0.1:{port}"])
    finally:
        server.shutdown()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: the connection is refused
        refused = CliRunner().invoke(main, ["echo", f"PACS@127.0.0.1:{closed.getsockname()[1]}"])
    assert rejected.exit_code == 1
    assert "no C-ECHO answer: association with OTHER@127.0.0.1" in rejected.output
    assert "rejected (permanent): Called AE title not recognised" in rejected.output
    assert answered.exit_code == 0 and "C-ECHO succeeded" in answered.output
    assert refused.exit_code == 1 and "failed: no connection (refused" in refused.output


def test_a_host_name_that_does_not_resolve_is_said(tmp_path: Path) -> None:
    """pynetdicom raises the resolver's error in the caller's thread: `echo` ended in a
    traceback, `send` said "cannot read None", a delivery recorded "gaierror". The
    name and the resolver's words, as any other association that failed. (.invalid
    never resolves, RFC 6761.)"""
    from click.testing import CliRunner

    from worker.cli import main

    host = "pacs.boneage-test.invalid"
    echoed = CliRunner().invoke(main, ["echo", f"PACS@{host}:104"])
    assert echoed.exit_code == 1, echoed.output
    assert echoed.exception is None or isinstance(echoed.exception, SystemExit)
    assert f"association with PACS@{host}:104 failed: host name '{host}' not resolved (" in (
        " ".join(echoed.output.split())
    )
    with pytest.raises(SendError, match=f"failed: host name '{host}' not resolved"):
        send_files(
            [_radiograph(tmp_path / "hand.dcm", 64)],
            ae_title="PACS",
            host=host,
            port=104,
            calling_ae_title="BONEAGE",
        )


def test_a_send_slower_than_the_timeout_that_keeps_going_is_answered(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    # pynetdicom waits its DIMSE timeout from the moment it queued every PDU: a heat map
    # over a slow link was aborted on every attempt while its data flowed. 2 s timeout,
    # about 6.5 s on the way.
    path = _radiograph(tmp_path / "large.dcm", 1400)  # 3.9 MB of pixels
    link = SlowLink(storescp.port, rate=600_000)
    try:
        started = time.monotonic()
        [outcome] = send_files(
            [path],
            ae_title=storescp.ae_title,
            host="127.0.0.1",
            port=link.port,
            calling_ae_title="BONEAGE",
            timeout=2.0,
        )
        elapsed = time.monotonic() - started
    finally:
        link.close()
    assert outcome.ok
    assert elapsed > 4  # the timeout twice over, and more
    [received] = storescp.wait_for_objects(1, timeout=30)
    assert dcmread(received).SOPInstanceUID == dcmread(path).SOPInstanceUID


def test_a_destination_that_stops_reading_still_fails_within_the_timeout(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    path = _radiograph(tmp_path / "large.dcm", 1400)
    link = SlowLink(storescp.port, rate=600_000)
    outcome: list[BaseException | list[SendOutcome]] = []

    def send() -> None:
        try:
            outcome.append(
                send_files(
                    [path],
                    ae_title=storescp.ae_title,
                    host="127.0.0.1",
                    port=link.port,
                    calling_ae_title="BONEAGE",
                    timeout=2.0,
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    try:
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        wait_for(lambda: link.forwarded > 500_000, timeout=30, what="half a megabyte carried")
        link.stop_reading()
        stopped = time.monotonic()
        sender.join(30)
        elapsed = time.monotonic() - stopped
    finally:
        link.close()
    assert not sender.is_alive()
    [raised] = outcome
    assert isinstance(raised, SendError)
    assert "did not answer a C-STORE" in str(raised) and raised.unanswered
    assert elapsed < 15  # 2 s without progress, then the abort (its send bounded too)


def test_a_send_that_keeps_going_past_its_deadline_fails_at_the_deadline(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    # A delivery's claim ends at the deadline: past it another worker may send the same
    # objects, so the send ends there, unanswered, however it progresses. About 6.5 s on
    # the way, a 2 s timeout it never runs into, a deadline 3 s after the start.
    path = _radiograph(tmp_path / "large.dcm", 1400)
    link = SlowLink(storescp.port, rate=600_000)
    try:
        started = time.monotonic()
        with pytest.raises(SendError) as raised:
            send_files(
                [path],
                ae_title=storescp.ae_title,
                host="127.0.0.1",
                port=link.port,
                calling_ae_title="BONEAGE",
                timeout=2.0,
                deadline=started + 3.0,
            )
        elapsed = time.monotonic() - started
    finally:
        link.close()
    assert "did not answer a C-STORE" in str(raised.value) and raised.value.unanswered
    assert 3.0 <= elapsed < 5.5  # at the deadline, before the object could have arrived
