"""Patient and study text our objects copy from an image is the image's bytes where they
are not valid in the character set it declares (docs/conformance.md 3 and 4): decoded,
pydicom replaces each such byte by U+FFFD, another Patient ID, which a PACS files under
another or a new patient."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.tag import Tag
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from dicom_io import gate
from dicom_io.content import BoneAgeFinding
from dicom_io.ko import Reference, build_rejection_note
from dicom_io.pixels import FileChangedError, read_image
from dicom_io.sc import build_heatmap_sc, build_withdrawal_sc, render_overlay
from dicom_io.sr import build_bone_age_sr, build_not_assessed_sr
from tests.dicomtools import dciodvfy_errors

from .conftest import hand_like

#: The Latin-1 bytes a misconfigured modality writes under "ISO_IR 192" (UTF-8), by the
#: ASCII placeholder of the same length the file is first written with.
LATIN1_IN_UTF8 = {
    b"PID~1234": b"PID\xd61234",  # PatientID: PID\u00d61234
    b"M~ller^J~rgen": b"M\xfcller^J\xfcrgen",  # PatientName
    b"H~PITAL A": b"H\xd4PITAL A",  # IssuerOfPatientID
    b"OTHER~ID": b"OTHER\xd6ID",  # the Patient ID in Other Patient IDs Sequence
}
#: Where each value is: a keyword, or (sequence, keyword) of its first item.
WHERE: dict[bytes, str | tuple[str, str]] = {
    b"PID\xd61234": "PatientID",
    b"M\xfcller^J\xfcrgen": "PatientName",
    b"H\xd4PITAL A": "IssuerOfPatientID",
    b"OTHER\xd6ID": ("OtherPatientIDsSequence", "PatientID"),
}
#: What pydicom writes for a byte it replaced (U+FFFD in UTF-8).
REPLACED = "\ufffd".encode()

pytestmark = pytest.mark.filterwarnings("ignore:Failed to decode byte string")


def write_with_latin1_text(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` to ``path`` declaring "ISO_IR 192", its Patient ID, Patient's Name,
    Issuer of Patient ID and the Patient ID of an Other Patient IDs item in Latin-1
    bytes (:data:`LATIN1_IN_UTF8`), as a misconfigured modality sends them."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "PID~1234"
    ds.PatientName = "M~ller^J~rgen"
    ds.IssuerOfPatientID = "H~PITAL A"
    other = Dataset()
    other.PatientID = "OTHER~ID"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    for placeholder, latin1 in LATIN1_IN_UTF8.items():
        assert data.count(placeholder) == 1
        data = data.replace(placeholder, latin1)
    path.write_bytes(data)
    return path


def as_written(path: Path, where: str | tuple[str, str]) -> bytes:
    """The bytes of an element of the file at ``path``, as written, padding aside."""
    ds = dcmread(path)
    if isinstance(where, tuple):
        sequence, keyword = where
        ds = ds[sequence].value[0]
    else:
        keyword = where
    value = ds.get_item(Tag(keyword)).value
    assert isinstance(value, bytes)
    return value.rstrip(b" ")


def assert_copied_as_received(path: Path) -> None:
    """The file at ``path`` holds each value of :data:`WHERE` as the source's bytes, no
    U+FFFD anywhere, and dciodvfy finds no error."""
    for received, where in WHERE.items():
        assert as_written(path, where) == received, (path.name, where)
    assert REPLACED not in path.read_bytes()
    assert dciodvfy_errors(path) == [], path.name


@pytest.fixture
def received(tmp_path: Path, source: Dataset) -> Dataset:
    """The image as the pipeline has it when it builds our objects: read from its file
    (read_image), its patient text decoded by the gate and everything else read too."""
    image = read_image(write_with_latin1_text(source, tmp_path / "image.dcm"))
    gate.check(image, require_sex=False)
    assert "\ufffd" in str(image.PatientID)  # what pydicom makes of the bytes
    for _ in image.iterall():  # every element decoded, in sequences too
        pass
    return image


def _sr(image: Dataset, finding: BoneAgeFinding) -> Dataset:
    return build_bone_age_sr(
        image,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        device_observer_uid=generate_uid(),
    )


def _not_assessed_sr(image: Dataset, _finding: BoneAgeFinding) -> Dataset:
    return build_not_assessed_sr(
        image,
        "Body Part Examined is CHEST, not HAND",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        device_observer_uid=generate_uid(),
    )


def _heat_map(image: Dataset, finding: BoneAgeFinding) -> Dataset:
    return build_heatmap_sc(
        image,
        render_overlay(hand_like(), hand_like(seed=1), finding),
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9902,
    )


def _withdrawal(image: Dataset, finding: BoneAgeFinding) -> Dataset:
    return build_withdrawal_sc(
        image,
        "the image was received again and is not assessed",
        model_name=finding.model_name,
        model_trained=True,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=2,
        body_part_examined="HAND",
    )


@pytest.mark.parametrize(
    "build",
    [_sr, _not_assessed_sr, _heat_map, _withdrawal],
    ids=["SR", "not-assessed SR", "heat map", "withdrawal notice"],
)
def test_text_invalid_in_the_declared_character_set_is_copied_as_the_bytes_received(
    tmp_path: Path,
    received: Dataset,
    finding: BoneAgeFinding,
    build: Callable[[Dataset, BoneAgeFinding], Dataset],
) -> None:
    path = tmp_path / "ours.dcm"
    built = build(received, finding)
    built.save_as(path, enforce_file_format=True)
    assert_copied_as_received(path)
    assert dcmread(path).SpecificCharacterSet == "ISO_IR 192"


def test_all_objects_of_one_image_carry_the_bytes_received(
    tmp_path: Path, received: Dataset, finding: BoneAgeFinding
) -> None:
    """The SR, the heat map and a notice built one after the other from one image, as the
    pipeline builds them: the first build reads every element, none loses its bytes."""
    for number, build in enumerate((_sr, _heat_map, _withdrawal, _not_assessed_sr)):
        path = tmp_path / f"ours-{number}.dcm"
        build(received, finding).save_as(path, enforce_file_format=True)
        assert_copied_as_received(path)


def test_a_rejection_note_of_our_object_read_back_carries_the_bytes_received(
    tmp_path: Path, received: Dataset, finding: BoneAgeFinding
) -> None:
    """The note withdrawing our SR copies the SR as its file holds it, read from memory
    and its Patient ID read first (worker.pipeline._as_written, note_series_uid)."""
    buffer = io.BytesIO()
    _sr(received, finding).save_as(buffer, enforce_file_format=True)
    header = dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)
    assert "\ufffd" in str(header.PatientID) and "\ufffd" in str(header.IssuerOfPatientID)
    note = build_rejection_note(
        header,
        "113001",
        [
            Reference(
                header.StudyInstanceUID,
                header.SeriesInstanceUID,
                ComprehensiveSRStorage,
                header.SOPInstanceUID,
            )
        ],
        description="Bone age withdrawn: its source image was rejected",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9903,
    )
    path = tmp_path / "ko.dcm"
    note.save_as(path, enforce_file_format=True)
    assert_copied_as_received(path)


def test_text_valid_in_the_declared_character_set_is_copied_as_decoded(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """The usual case is as before: the decoded values, which pydicom encodes back to the
    same bytes."""
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientID = "PID\u00d61234"
    source.PatientName = "M\u00fcller^J\u00fcrgen"
    path = tmp_path / "image.dcm"
    source.save_as(path, enforce_file_format=True)
    image = read_image(path)
    gate.check(image, require_sex=False)
    sr = _sr(image, finding)
    assert sr.PatientID == "PID\u00d61234"
    assert str(sr.PatientName) == "M\u00fcller^J\u00fcrgen"
    written = tmp_path / "sr.dcm"
    sr.save_as(written, enforce_file_format=True)
    assert as_written(written, "PatientID") == "PID\u00d61234".encode()
    assert as_written(written, "PatientName") == "M\u00fcller^J\u00fcrgen".encode()


def test_an_image_whose_file_another_copy_replaced_is_read_again(
    tmp_path: Path, received: Dataset, finding: BoneAgeFinding
) -> None:
    """Its bytes are read again from the file read_image read it from: where the same
    instance received again took that file's place, the build says so (as reading its
    pixels does), and the attempt reads the new copy; it never copies U+FFFD."""
    path = Path(str(received.filename))
    replacement = tmp_path / "again.dcm"
    replacement.write_bytes(path.read_bytes())
    replacement.replace(path)
    with pytest.raises(FileChangedError):
        _sr(received, finding)


def test_an_item_element_nothing_read_is_copied_as_received_however_damaged(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """A copied sequence's items are copied with their elements undecoded, as received:
    the check for lost text decoded each one, and an element pydicom cannot convert (an
    unknown VR here; a length wrong for its VR alike) raised, failing the image's every
    attempt, where it had been copied as its bytes (found in the second review)."""
    other = Dataset()
    other.PatientID = "OTHERID1"
    other.TypeOfPatientID = "TEXT"
    other.add_new(0x00091010, "US", 1)
    source.OtherPatientIDsSequence = [other]
    path = tmp_path / "image.dcm"
    source.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(b"\x09\x00\x10\x10US\x02\x00\x01\x00") == 1
    path.write_bytes(data.replace(b"\x09\x00\x10\x10US", b"\x09\x00\x10\x10JA"))
    image = read_image(path)
    gate.check(image, require_sex=False)
    ours = tmp_path / "ours.dcm"
    _sr(image, finding).save_as(ours, enforce_file_format=True)
    assert b"\x09\x00\x10\x10JA\x02\x00\x01\x00" in ours.read_bytes()
    assert dcmread(ours).OtherPatientIDsSequence[0].PatientID == "OTHERID1"


def test_text_whose_bytes_cannot_be_read_again_is_said(
    received: Dataset, finding: BoneAgeFinding, caplog: pytest.LogCaptureFixture
) -> None:
    """A data set read from neither a file nor memory keeps no bytes to copy: its text
    goes as decoded, U+FFFD and all, and a warning names the attribute, not its value."""
    plain = Dataset()
    plain.update(received)
    with caplog.at_level(logging.WARNING, logger="dicom_io.sr"):
        _sr(plain, finding)
    said = [r.getMessage() for r in caplog.records if r.name == "dicom_io.sr"]
    assert any(m.startswith("PatientID holds text invalid") for m in said), said
    assert not any("PID" in m.removeprefix("PatientID") for m in said), said
