"""The SOP class an SR references its image by, where the image's data set states none."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, generate_uid

from dicom_io import sr as sr_module
from dicom_io.pixels import read_image
from dicom_io.sr import build_not_assessed_sr
from tests.dicomtools import dciodvfy_errors, dsrdump


def _not_assessed(image: Dataset) -> Dataset:
    return build_not_assessed_sr(
        image,
        "SOP class missing is not a projection radiograph (CR, DX or Secondary Capture)",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        device_observer_uid=generate_uid(),
    )


def test_an_image_without_sop_class_uid_is_referenced_by_its_file_meta_class(
    tmp_path: Path, source: Dataset
) -> None:
    """The listener takes such a data set and spools it under the C-STORE's class (the
    file meta's Media Storage SOP Class UID): the SR saying it was not assessed
    references it by that class (it raised ValueError, and the image ended in error)."""
    stored_as = source.file_meta.MediaStorageSOPClassUID
    del source.SOPClassUID
    path = tmp_path / "image.dcm"
    source.save_as(path, enforce_file_format=True)
    image = read_image(path)
    assert "SOPClassUID" not in image
    written = tmp_path / "sr.dcm"
    _not_assessed(image).save_as(written, enforce_file_format=True)
    sr = dcmread(written)
    [study] = sr.CurrentRequestedProcedureEvidenceSequence
    [referenced] = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert referenced.ReferencedSOPClassUID == stored_as
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "Not assessed: SOP class missing" in dsrdump(written)
    assert dciodvfy_errors(written) == []


def test_the_data_sets_own_class_comes_first(source: Dataset) -> None:
    other = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    source.file_meta.MediaStorageSOPClassUID = other
    assert sr_module.referenced_sop_class(source) == source.SOPClassUID != other


def test_an_image_with_no_class_anywhere_is_refused(source: Dataset) -> None:
    del source.SOPClassUID
    del source.file_meta.MediaStorageSOPClassUID
    assert sr_module.referenced_sop_class(source) is None
    with pytest.raises(ValueError, match="has no SOPClassUID"):
        _not_assessed(source)
