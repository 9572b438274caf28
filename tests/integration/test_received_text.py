"""Through the pipeline: our SR, heat map and rejection notes carry the image's patient
text as its bytes where they are invalid in the character set it declares, and an image
whose data set has no SOP Class UID gets the SR that says it was not assessed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, Instance, InstanceState
from dicom_io.synthetic import make_radiograph_dataset
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_received_again import deliver
from tests.support import pacs_rejection_note
from tests.unit.dicom_io.conftest import BIRTH_DATE, STUDY_DATE, hand_like
from tests.unit.dicom_io.test_received_text import (
    assert_copied_as_received,
    write_with_latin1_text,
)
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Failed to decode byte string"),
]

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def _latin1_under_utf8(tmp_path: Path) -> Dataset:
    """A hand whose patient text is Latin-1 under "ISO_IR 192", read back from its file."""
    image = make_radiograph_dataset(
        (hand_like(256, 200) * 4095).astype("uint16"),
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        sex="F",
        laterality="L",
    )
    return dcmread(write_with_latin1_text(image, tmp_path / "image.dcm"))


def test_our_objects_carry_the_patient_text_as_received_in_a_wrong_character_set(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """A modality writes Latin-1 under "ISO_IR 192": the SR, the heat map and, once the
    PACS rejects the image, our rejection notes (copied from our objects' files) keep
    its Patient ID, name and issuers as its bytes, not U+FFFD (another patient)."""
    image = _latin1_under_utf8(tmp_path)
    image_id = spool_dataset(runtime, image)
    assessed = assess_instance(runtime, image_id)
    assert assessed.state == "assessed", assessed.reason
    ours = deliver(runtime, storescp, assessed.delivery_ids)
    assert sorted(dcmread(path).Modality for path in ours) == ["OT", "SR"]
    for path in ours:
        assert_copied_as_received(path)

    with session_scope(runtime.database_url) as session:
        spooled = dcmread(session.get_one(Instance, image_id).spool_path)
    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(spooled)))
    assert len(applied.delivery_ids) == 2, applied
    for path in deliver(runtime, storescp, applied.delivery_ids):
        assert dcmread(path).Modality == "KO"
        assert_copied_as_received(path)


@pytest.mark.parametrize("how", ["implicit VR only", "a row with no checksum"])
def test_objects_read_again_to_be_sent_carry_the_patient_text_as_received(
    tmp_path: Path, tiny_checkpoint: Path, dcmtk: dict[str, str], how: str
) -> None:
    """Our objects are sent as their files are, byte for byte, but read and encoded
    again for a destination that takes only Implicit VR Little Endian, and for a row
    whose checksum was not recorded (an older node's). The text that lost characters in
    decoding went as U+FFFD in UTF-8: the PACS filed the SR and SC under another
    Patient ID. It goes as the bytes received."""
    pacs = StoreSCP(tmp_path / "pacs", options=("+xi",) if how == "implicit VR only" else ())
    pacs.start()
    try:
        rt = received_again_tests.make_runtime(
            tmp_path, tiny_checkpoint, destinations=pacs.destination
        )
        image = _latin1_under_utf8(tmp_path)
        assessed = assess_instance(rt, spool_dataset(rt, image))
        assert assessed.state == "assessed", assessed.reason
        if how == "a row with no checksum":
            with session_scope(rt.database_url) as session:
                for delivery_id in assessed.delivery_ids:
                    session.get_one(Delivery, delivery_id).sha256 = None
        ours = deliver(rt, pacs, assessed.delivery_ids)
    finally:
        pacs.stop()
    assert sorted(dcmread(path).Modality for path in ours) == ["OT", "SR"]
    syntax = ImplicitVRLittleEndian if how == "implicit VR only" else ExplicitVRLittleEndian
    for path in ours:
        assert dcmread(path).file_meta.TransferSyntaxUID == syntax
        assert_copied_as_received(path)


def test_an_image_without_sop_class_uid_gets_the_sr_that_says_it_was_not_assessed(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The listener takes a data set without SOP Class UID (it refuses one without SOP
    Class and SOP Instance UID); with BONEAGE_SEND_NOT_ASSESSED the SR references it by
    the class it was stored as, the file meta's (the build raised on every attempt, and
    the image ended in error)."""
    loud = Runtime(runtime.settings.model_copy(update={"send_not_assessed": True}))
    instance_id = spool_instance(loud, attributes={"SOPClassUID": None})
    outcome = assess_instance(loud, instance_id)
    assert outcome.state == "not_assessed", outcome
    assert outcome.reason is not None and "SOP class missing" in outcome.reason
    with session_scope(loud.database_url) as session:
        instance = session.scalars(select(Instance).where(Instance.id == instance_id)).one()
        assert instance.state is InstanceState.NOT_ASSESSED
        spooled = dcmread(instance.spool_path)
    assert "SOPClassUID" not in spooled
    [path] = deliver(loud, storescp, outcome.delivery_ids)
    [study] = dcmread(path).CurrentRequestedProcedureEvidenceSequence
    [referenced] = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert referenced.ReferencedSOPClassUID == spooled.file_meta.MediaStorageSOPClassUID
    assert referenced.ReferencedSOPInstanceUID == spooled.SOPInstanceUID
