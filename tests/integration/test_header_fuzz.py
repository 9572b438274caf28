"""Headers as modalities write them, wrong in every way seen: each image still ends
assessed or not assessed with a reason, never in an exception.

An exception in an assessment leaves the instance `processing`, to be tried again and
end in error with no SR or SC; and an exception's message, which the worker's log keeps,
may quote the value that caused it. Each example spools the phantom hand with some
attributes changed to values modalities, PACSes and hand-edited studies have sent, and
assesses it through the pipeline.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from db.engine import session_scope
from db.schema import Delivery, Instance
from tests.integration.test_pipeline import runtime, spool_instance  # noqa: F401
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: Values seen in the field for each attribute, good and bad; None removes it.
VALUES: dict[str, list[Any]] = {
    "PatientName": [None, "", "A" * 70, "Doe^Jane\\Doe^J", "Müller^Jürgen", "=^^=", " "],
    "PatientID": [None, "", "X" * 80, "12\\34", " 00123 "],
    "PatientBirthDate": [None, "", "2015", "20150000", "garbage!", "20151301", "2015-01-01"],
    "PatientSex": [None, "", "f", "m", "O", "X", "MALE", "M\\F", " M"],
    "PatientAge": [None, "", "010Y", "abc", "999D", "10Y", "010Y\\011Y"],
    "StudyDate": [None, "", "20251399", "2025", "19000101", "20250101-20250102"],
    "StudyTime": [None, "", "256161", "12", "120000.123456789", "12:00:00"],
    "AcquisitionDate": [None, "", "garbage", "20991231"],
    "SeriesInstanceUID": [None, "", "1.2.3.abc", "9" * 70],
    "SOPInstanceUID": [None, ""],
    "StudyInstanceUID": [None, "", "x" * 70],
    "AccessionNumber": [None, "", "Y" * 40],
    "StudyID": [None, "", "Z" * 30],
    "ReferringPhysicianName": [None, "", "Smith^John\\Jones^Ann"],
    "BodyPartExamined": ["HAND", "hand", "Hand ", "L HAND", "CHEST", "", None],
    "ImageLaterality": [None, "L", "R", "l", "B", "U", "X"],
    "Laterality": [None, "L", "R", "r", ""],
    "SpecificCharacterSet": [None, "ISO_IR 100", "ISO_IR100", "ISO_IR 192", "GARBAGE"],
    "PatientOrientation": [None, "", "A\\F", "X", "A", "L\\F\\H"],
    "PixelSpacing": [None, "0.1\\0.1", "abc", "0\\0", "-1\\-1", "0.1"],
    "ImagerPixelSpacing": [None, "0.1\\0.1", "abc", "0\\0"],
    "WindowCenter": [None, "2048", "abc", "1e309", "2048\\1024"],
    "WindowWidth": [None, "4096", "abc", "0", "-5", "4096\\2048"],
    "RescaleSlope": [None, "1", "0", "abc", "1e30"],
    "RescaleIntercept": [None, "0", "abc", "-1e30"],
    "InstitutionName": [None, "", "I" * 80],
    "Manufacturer": [None, "", "M" * 80],
    "SeriesNumber": [None, "", "abc", "-1", "99999999999"],
    "InstanceNumber": [None, "", "abc", "-1"],
    "Modality": ["DX", "CR", "dx", "", None, "OT", "CT"],
    "StudyDescription": [None, "", "XR HAND", "chest", "Hand bone age"],
    "SeriesDescription": [None, "", "L HAND PA", "\\"],
    "PhotometricInterpretation": ["MONOCHROME2", "MONOCHROME1", "monochrome2", "RGB", "", None],
    "NumberOfFrames": [None, "1", "0", "abc", "2"],
    "VOILUTFunction": [None, "SIGMOID", "LINEAR_EXACT", "abc"],
    # binary values (US), little endian
    "BitsStored": [b"\x0c\x00", b"\x10\x00", b"\x00\x00", b"\x11\x00"],
    "HighBit": [b"\x0b\x00", b"\x0f\x00", b"\x20\x00"],
    "PixelPaddingValue": [None, b"\x00\x00", b"\xff\x0f", b"\xff\xff"],
}


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    """A few attributes, each set to one of its values."""
    keywords = draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=4, unique=True))
    chosen = {keyword: draw(st.sampled_from(VALUES[keyword])) for keyword in keywords}
    # as bytes: written as they are, where pydicom would refuse to write some
    return {k: v.encode() if isinstance(v, str) else v for k, v in chosen.items()}


_runtimes: dict[int, Runtime] = {}


def _saying_why(base: Runtime) -> Runtime:
    """``base`` with BONEAGE_SEND_NOT_ASSESSED on, made once for all its examples."""
    if id(base) not in _runtimes:
        _runtimes.clear()
        settings = base.settings.model_copy(update={"send_not_assessed": True})
        _runtimes[id(base)] = Runtime(settings)
    return _runtimes[id(base)]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(attributes=headers())
def test_every_header_ends_assessed_or_not_assessed_with_a_reason(
    runtime: Runtime,  # noqa: F811
    attributes: dict[str, Any],
) -> None:
    # an image not assessed gets an SR saying why (BONEAGE_SEND_NOT_ASSESSED), which
    # copies the header too; deliveries are recorded, not sent
    rt = _saying_why(runtime)
    instance_id = spool_instance(rt, attributes=attributes)
    outcome = assess_instance(rt, instance_id)
    assert outcome.state in ("assessed", "not_assessed"), outcome
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.state.value == outcome.state
        if outcome.state == "not_assessed":
            assert instance.reason
        outputs = [d.path for d in session.query(Delivery).filter_by(instance_id=instance_id)]
    for path in outputs:
        written = dcmread(path)
        assert written.StudyInstanceUID and written.SOPInstanceUID
