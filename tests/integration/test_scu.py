"""Our Storage SCU against dcmtk's storescp."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_io.scp import VERIFICATION_SOP_CLASS
from dicom_io.scu import NotSendable, open_association, send_files
from dicom_io.synthetic import make_radiograph_dataset
from tests.conftest import StoreSCP

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
