"""The listener against dcmtk's storescu and a pynetdicom client, over loopback."""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    JPEGLosslessSV1,
    JPEGLSLossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from sqlalchemy import select

from db.engine import session_scope, upgrade
from db.schema import Instance, InstanceState
from dicom_io import scp as scp_module
from dicom_io.scp import (
    MAXIMUM_PDU_SIZE,
    OUT_OF_RESOURCES,
    VERIFICATION_SOP_CLASS,
    WRITEBACK_BYTES,
    ReceivedInstance,
    StorageSCP,
    _start_writeback,
    _StreamingSocket,
    _WritingBackDIMSE,
    spool_path,
)
from dicom_io.synthetic import make_radiograph_dataset
from tests.support import (
    dcmtk_tool,
    free_port,
    pacs_rejection_note,
    storescu_command,
    wait_for,
)
from worker.listener import record_instance

pytestmark = pytest.mark.integration


def write_hand(path: Path, **kwargs: object) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.random((300, 240)) * 4000).astype(np.uint16)
    ds = make_radiograph_dataset(
        pixels,
        sex="M",
        birth_date=dt.date(2015, 5, 1),
        study_date=dt.date(2026, 5, 1),
        **kwargs,  # type: ignore[arg-type]
    )
    ds.save_as(path, enforce_file_format=True)
    return path


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        record: Callable[[ReceivedInstance], int] | None = None,
        allowed: list[tuple[str, str | None]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.url = f"sqlite:///{tmp_path / 'boneage.db'}"
        upgrade(self.url)
        self.notified: list[int] = []
        self.spool = tmp_path / "spool"
        self.scp = StorageSCP(
            ae_title="BONEAGE",
            spool_dir=self.spool,
            record=record or (lambda r: record_instance(self.url, r)),
            notify=self.notified.append,
            allowed_callers=allowed or [],
            host=host,
            port=free_port(),
        )

    def storescu(
        self, *files: Path, calling: str = "PACS", extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            storescu_command(self.scp.port, *files, calling=calling, extra=extra),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def rows(self) -> list[Instance]:
        with session_scope(self.url) as session:
            return list(session.scalars(select(Instance)))

    def only_row_holds(self, source: Path) -> Instance:
        """The one row recorded; its spool file has `source`'s pixels."""
        [row] = self.rows()
        assert np.array_equal(dcmread(row.spool_path).pixel_array, dcmread(source).pixel_array)
        return row


@pytest.fixture
def harness_factory(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: object) -> Harness:
        h = Harness(tmp_path, **kwargs)  # type: ignore[arg-type]
        h.scp.start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.scp.stop()


def test_storescu_instance_is_spooled_recorded_and_notified(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener's associations read through our streaming socket (few large reads).
    reads: list[int] = []
    read_into = _StreamingSocket.read_into

    def counted(self: _StreamingSocket, view: memoryview, deadline: float | None = None) -> int:
        reads.append(read_into(self, view, deadline))
        return reads[-1]

    monkeypatch.setattr(_StreamingSocket, "read_into", counted)
    h = harness_factory()
    source = write_hand(tmp_path / "hand.dcm")
    result = h.storescu(source)
    assert result.returncode == 0, result.stderr
    assert sum(reads) > source.stat().st_size  # the whole data set came through it
    [row] = h.rows()
    original = dcmread(source)
    assert row.sop_instance_uid == original.SOPInstanceUID
    assert row.study_instance_uid == original.StudyInstanceUID
    assert row.state is InstanceState.RECEIVED
    assert row.calling_ae_title == "PACS"
    assert h.notified == [row.id]
    spooled = Path(row.spool_path)
    assert spooled == spool_path(h.spool, original.SOPInstanceUID)
    assert original.SOPInstanceUID not in str(spooled)  # file names never carry UIDs
    stored = dcmread(spooled)
    assert np.array_equal(stored.pixel_array, original.pixel_array)
    assert stat.S_IMODE(os.stat(spooled).st_mode) == 0o600
    assert not list((h.spool / ".incoming").rglob("*.dcm"))  # no partial file left


def write_large_hand(path: Path, rows: int = 1200, columns: int = 1000) -> Path:
    """A hand of a few MB: many PDUs, several writeback steps."""
    pixels = (np.random.default_rng(1).random((rows, columns)) * 4000).astype(np.uint16)
    ds = make_radiograph_dataset(
        pixels, sex="F", birth_date=dt.date(2015, 5, 1), study_date=dt.date(2026, 5, 1)
    )
    ds.save_as(path, enforce_file_format=True)
    return path


def test_data_set_fragments_reach_the_file_as_views_of_the_pdu_read(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the socket and the spool file no copy is made: every PDV the DIMSE layer
    # gets is a view of the one buffer its PDU was read into.
    buffers: list[list[object]] = []
    receive = _WritingBackDIMSE.receive_primitive

    def seen(self: _WritingBackDIMSE, primitive: Any) -> None:
        values = [data for _, data in primitive.presentation_data_value_list]
        assert all(isinstance(data, memoryview) for data in values)
        buffers.append([data.obj for data in values])
        receive(self, primitive)

    monkeypatch.setattr(_WritingBackDIMSE, "receive_primitive", seen)
    h = harness_factory()
    source = write_large_hand(tmp_path / "hand.dcm")
    assert h.storescu(source).returncode == 0
    assert len(buffers) > source.stat().st_size // (128 * 1024)  # storescu's PDUs
    assert all(len({id(b) for b in pdu}) == 1 for pdu in buffers)  # one buffer a PDU
    assert all(isinstance(pdu[0], bytearray) for pdu in buffers)
    h.only_row_holds(source)


def test_a_handler_of_raw_pdus_still_gets_each_pdu_whole_as_bytes(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory()
    pdus: list[bytes] = []
    assert h.scp._server is not None
    h.scp._server.bind(evt.EVT_DATA_RECV, lambda event: pdus.append(event.data))
    source = write_large_hand(tmp_path / "hand.dcm", rows=400, columns=300)
    assert h.storescu(source).returncode == 0
    assert all(type(pdu) is bytes for pdu in pdus)
    p_data = [pdu for pdu in pdus if pdu[0] == 0x04]
    assert all(int.from_bytes(pdu[2:6], "big") == len(pdu) - 6 for pdu in p_data)
    assert sum(map(len, p_data)) > 400 * 300 * 2  # the pixels came through it


@pytest.mark.skipif(_start_writeback is None, reason="sync_file_range is Linux's")
def test_the_disk_is_given_each_megabyte_as_it_comes(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []  # file, range started from, file size then
    start = _start_writeback
    assert start is not None

    def recorded(fd: int, offset: int) -> None:
        status = os.fstat(fd)
        calls.append((status.st_ino, offset, status.st_size))
        start(fd, offset)

    monkeypatch.setattr("dicom_io.scp._start_writeback", recorded)
    h = harness_factory()
    first = write_large_hand(tmp_path / "first.dcm", rows=1500, columns=1200)
    second = write_large_hand(tmp_path / "second.dcm", rows=1000, columns=1100)
    assert h.storescu(first, second).returncode == 0  # one association, two data sets
    rows = h.rows()
    assert [os.stat(row.spool_path).st_ino for row in rows] == list(
        dict.fromkeys(inode for inode, _, _ in calls)
    )
    for row in rows:
        ranges = [
            (offset, size)
            for inode, offset, size in calls
            if inode == os.stat(row.spool_path).st_ino
        ]
        assert ranges[0][0] == 0  # each file from its start, in ranges that follow on
        assert all(b[0] == a[1] for a, b in itertools.pairwise(ranges))
        assert all(size - offset >= WRITEBACK_BYTES for offset, size in ranges)
        # what is left to the fsync: less than a range and the last PDU
        assert row.size_bytes - ranges[-1][1] < WRITEBACK_BYTES + MAXIMUM_PDU_SIZE


def test_a_failing_writeback_changes_nothing_but_speed(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, offset: int) -> None:
        raise OSError(errno.EIO, "writeback refused")

    monkeypatch.setattr("dicom_io.scp._start_writeback", failing)
    h = harness_factory()
    source = write_large_hand(tmp_path / "hand.dcm")
    result = h.storescu(source)
    assert result.returncode == 0, result.stderr
    h.only_row_holds(source)


def test_same_instance_twice_keeps_one_row(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory()
    source = write_hand(tmp_path / "hand.dcm")
    assert h.storescu(source).returncode == 0
    assert h.storescu(source).returncode == 0
    [row] = h.rows()
    assert row.times_received == 2


def test_uids_that_differ_in_a_character_no_uid_holds_keep_a_file_each(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    """Two instances whose SOP Instance UIDs differ in their last character alone, é and
    ü (pynetdicom checks a UID's length only): both were named by the UID's ASCII, "?"
    for either, so the second took the first's file, and the first's row was assessed
    from the second's pixels, another patient's."""
    h = harness_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(dcmread(write_hand(tmp_path / "hand.dcm")).SOPClassUID)
    assoc = ae.associate("127.0.0.1", h.scp.port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        for last, patient in (("\xe9", "PATIENT-A"), ("\xfc", "PATIENT-B")):
            ds = dcmread(write_hand(tmp_path / f"{patient}.dcm"))
            uid = UID(f"1.2.826.0.1.77{last}")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.PatientID = patient
            assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    rows = sorted(h.rows(), key=lambda row: row.sop_instance_uid)
    assert [row.sop_instance_uid for row in rows] == ["1.2.826.0.1.77\xe9", "1.2.826.0.1.77\xfc"]
    assert [dcmread(row.spool_path).PatientID for row in rows] == ["PATIENT-A", "PATIENT-B"]


def test_a_spool_folder_made_for_an_instance_is_made_durable_in_the_spool(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first instance in a spool folder makes it: the spool is fsynced then, so that
    a crash cannot take the folder, and the file answered 0x0000 in it, away (only the
    folder was fsynced). Which directories are fsynced is seen by a spy that fsyncs them;
    a crash itself cannot be had here."""
    fsynced: list[Path] = []
    fsync_directory = scp_module.fsync_directory

    def seen(path: Path) -> None:
        fsynced.append(Path(path))
        fsync_directory(path)

    h = harness_factory()
    monkeypatch.setattr(scp_module, "fsync_directory", seen)
    source = write_hand(tmp_path / "hand.dcm")
    folder = spool_path(h.spool, dcmread(source).SOPInstanceUID).parent
    assert not folder.exists()
    assert h.storescu(source).returncode == 0
    assert folder.is_dir()
    assert fsynced == [h.spool, folder]  # the new folder's entry, then the file's
    fsynced.clear()
    assert h.storescu(source).returncode == 0  # the folder is there: the file's alone
    assert fsynced == [folder]


def test_a_valid_uids_spool_name_is_as_it_always_was(tmp_path: Path) -> None:
    """The spool files of existing installs keep their names."""
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    digest = "0554f69d59921275b07120c699913d026ecd82155d354a146eda4228ba78c149"  # its ASCII's
    assert spool_path(tmp_path, uid) == tmp_path / digest[:2] / f"{digest[2:34]}.dcm"


@pytest.mark.parametrize(
    ("tool", "syntax", "propose"),
    [
        ("dcmcjpls", JPEGLSLossless, "-xt"),
        ("dcmcjpeg", JPEGLosslessSV1, "-xs"),
        ("dcmcrle", RLELossless, "-xr"),
    ],
)
def test_compressed_syntaxes_are_accepted(
    harness_factory: Callable[..., Harness], tmp_path: Path, tool: str, syntax: str, propose: str
) -> None:
    h = harness_factory()
    source = write_hand(tmp_path / "hand.dcm")
    compressed = tmp_path / "compressed.dcm"
    subprocess.run(
        [dcmtk_tool(tool), str(source), str(compressed)], check=True, capture_output=True
    )
    assert dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    # The compressed syntax is proposed first; our SCP must take it, not a conversion.
    result = h.storescu(compressed, extra=(propose, "-R"))
    assert result.returncode == 0, result.stderr
    [row] = h.rows()
    assert row.transfer_syntax_uid == syntax
    assert np.array_equal(dcmread(row.spool_path).pixel_array, dcmread(source).pixel_array)


def test_unknown_calling_ae_is_rejected(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory(allowed=[("PACS", None)])
    source = write_hand(tmp_path / "hand.dcm")
    refused = h.storescu(source, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert h.rows() == []
    assert h.storescu(source, calling="PACS").returncode == 0
    assert len(h.rows()) == 1


def test_calling_ae_pinned_to_another_host_is_rejected(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory(allowed=[("PACS", "10.99.99.99")])
    refused = h.storescu(write_hand(tmp_path / "hand.dcm"))
    assert refused.returncode != 0
    assert h.rows() == []


def test_a_pinned_caller_is_known_by_its_ipv4_address_on_a_dual_stack_listener(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    """A listener on ``::`` sees an IPv4 caller as ``::ffff:127.0.0.1``: it is the
    caller pinned to 127.0.0.1 (found in review: every association refused)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    h = harness_factory(allowed=[("PACS", "127.0.0.1")], host="::")
    sent = h.storescu(write_hand(tmp_path / "hand.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(h.rows()) == 1


def test_non_image_sop_class_is_refused_at_association(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory()
    sr_file = Path(get_testdata_file("test-SR.dcm"))  # type: ignore[arg-type]
    refused = h.storescu(sr_file, extra=("-R",))
    assert refused.returncode != 0
    assert "presentation context" in (refused.stdout + refused.stderr).lower()
    assert h.rows() == []


def test_a_rejection_note_is_taken_as_the_one_non_image(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    """dcmtk's storescu proposes the Key Object Selection class itself (no -R) and the
    note is stored like an image: the worker reads it (worker.pipeline)."""
    h = harness_factory()
    note = pacs_rejection_note(dcmread(write_hand(tmp_path / "hand.dcm")), "113001")
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    sent = h.storescu(path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [row] = h.rows()
    assert row.sop_instance_uid == note.SOPInstanceUID
    assert row.sop_class_uid == KeyObjectSelectionDocumentStorage
    assert row.modality == "KO"
    assert h.notified == [row.id]


def _pynetdicom_store(port: int, path: Path) -> int:
    ae = AE(ae_title="PACS")
    ds = dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_database_failure_answers_out_of_resources(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    def broken(_: ReceivedInstance) -> int:
        raise ConnectionError("database down")

    h = harness_factory(record=broken)
    status = _pynetdicom_store(h.scp.port, write_hand(tmp_path / "hand.dcm"))
    assert status == OUT_OF_RESOURCES
    assert h.notified == []


def test_disk_failure_answers_out_of_resources(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory()
    source = write_hand(tmp_path / "hand.dcm")
    # The final spool shard is a file, so the rename into it fails like a full/broken disk.
    target = spool_path(h.spool, dcmread(source).SOPInstanceUID)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    target.parent.write_bytes(b"not a directory")
    assert _pynetdicom_store(h.scp.port, source) == OUT_OF_RESOURCES
    assert h.rows() == []


def test_echo_command_reaches_the_listener(harness_factory: Callable[..., Harness]) -> None:
    from click.testing import CliRunner

    from worker.cli import main

    h = harness_factory(allowed=[("PACS", None)])
    ok = CliRunner().invoke(
        main, ["echo", f"BONEAGE@127.0.0.1:{h.scp.port}", "--calling-ae", "PACS"]
    )
    assert ok.exit_code == 0 and "C-ECHO succeeded" in ok.output
    refused = CliRunner().invoke(
        main, ["echo", f"BONEAGE@127.0.0.1:{h.scp.port}", "--calling-ae", "NOBODY"]
    )
    assert refused.exit_code == 1 and "no C-ECHO answer" in refused.output


def test_overlong_uid_is_not_understood_rather_than_retried_for_ever(
    harness_factory: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness_factory()
    source = write_hand(tmp_path / "hand.dcm")
    ds = dcmread(source)
    with pytest.warns(UserWarning, match="exceeds the maximum length of 64"):
        ds.StudyInstanceUID = "1.2." + "3" * 66  # 70 characters: no database column takes it
    ds.save_as(source, enforce_file_format=True)
    assert _pynetdicom_store(h.scp.port, source) == 0xC210
    assert h.rows() == []


def test_listener_sockets_send_at_once(harness_factory: Callable[..., Harness]) -> None:
    # Nagle's algorithm would hold back the tail of our answers until the PACS's delayed
    # acknowledgement (see dicom_io.tcp); the accepted socket has it off.
    h = harness_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", h.scp.port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        assert h.scp._server is not None
        [ours] = h.scp._server.active_associations
        assert ours.dul.socket is not None
        sock = ours.dul.socket.socket
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_association_threads_are_woken_by_what_they_wait_for(
    harness_factory: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's two threads per association look for work every millisecond; ours
    wait until the peer sends, an answer is queued, the peer releases or aborts, or the
    periodic look for timers comes. With that look pushed out to an hour, every step
    below must still happen at once: a missed wake-up would run into the peers' own
    10-second timeouts, or into `wait_for`'s."""
    monkeypatch.setattr(scp_module, "IDLE_CHECK_SECONDS", 3600.0)
    h = harness_factory()
    server = h.scp._server
    assert server is not None

    # three C-STOREs and their answers, then a release, on one dcmtk association
    files = [write_hand(tmp_path / f"hand{i}.dcm") for i in range(3)]
    sent = h.storescu(*files, extra=("-ta", "10", "-td", "10"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(h.rows()) == 3
    wait_for(
        lambda: not server.active_associations, timeout=10, what="the released association ending"
    )

    # an association that stays idle, then is released; one that is aborted
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    idle = ae.associate("127.0.0.1", h.scp.port, ae_title="BONEAGE")
    aborted = ae.associate("127.0.0.1", h.scp.port, ae_title="BONEAGE")
    assert idle.is_established and aborted.is_established
    assert int(idle.send_c_echo().Status) == 0
    aborted.abort()
    wait_for(
        lambda: len(server.active_associations) == 1,
        timeout=10,
        what="the aborted association ending",
    )
    idle.release()
    assert idle.is_released
    wait_for(
        lambda: not server.active_associations, timeout=10, what="the released association ending"
    )
