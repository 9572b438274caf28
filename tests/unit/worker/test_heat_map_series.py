"""An earlier heat-map series is read once for each assessment that asks about it.

A later assessment asks about the series its heat map joins several times: which series
(:func:`worker.pipeline.heat_map_series`, by its side), the Body Part Examined and
Laterality the new SC carries, and those of each withdrawal notice. Retention may remove
the series' first heat map between two of those questions; every answer must still come
from the one read, or the SC's Laterality would come from the result recorded beside a
Body Part Examined from the file.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from worker.pipeline import (
    HeatMap,
    HeatMapSeries,
    first_heat_map_as_written,
    series_side,
    write_atomically,
)


def _written_heat_map(path: Path, laterality: str) -> HeatMap:
    """A heat map's header, as the outbox holds it, of a series whose Laterality is
    ``laterality``; its result recorded the other side (a side corrected since)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Laterality = laterality
    ds.BodyPartExamined = "HAND"
    sha256 = write_atomically(ds, path)
    return HeatMap(uid, path, sha256, assessment=1, side="R" if laterality == "L" else "L")


def _series(heat_map: HeatMap) -> HeatMapSeries:
    return HeatMapSeries(
        "model", "Model", True, generate_uid(), generate_uid(), heat_maps=(heat_map,)
    )


def test_a_series_side_comes_from_the_heat_map_read_even_once_its_file_is_gone(
    tmp_path: Path,
) -> None:
    heat_map = _written_heat_map(tmp_path / "sc.dcm", "L")
    series = _series(heat_map)

    written = first_heat_map_as_written(series)
    assert written is not None and written.Laterality == "L"
    heat_map.path.unlink()  # retention, between two questions of one assessment

    assert first_heat_map_as_written(series) is written
    assert series_side(series) == "L"  # the file's, not the result's "R"


def test_the_next_assessment_reads_the_series_again(tmp_path: Path) -> None:
    heat_map = _written_heat_map(tmp_path / "sc.dcm", "L")
    assert series_side(_series(heat_map)) == "L"
    heat_map.path.unlink()

    # the series as the next assessment finds it: no heat map of it can be read, and its
    # side is the one its first heat map's result recorded
    later = _series(heat_map)
    assert first_heat_map_as_written(later) is None
    assert series_side(later) == "R"
