"""worker.datasets: the labelled sets of `train` and `evaluate` (DICOM folders, RSNA)."""

from __future__ import annotations

import csv
import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest

from dicom_io.synthetic import make_radiograph_dataset
from models.data import LabelledImage
from worker.datasets import (
    EVALUATION_PHANTOM_SEED_OFFSET,
    load_items,
    patient_group,
    read_dicom_folder,
)


def _write_dicom(
    folder: Path, name: str, *, patient_id: str, sex: str | None = "M", side: int = 32
) -> None:
    pixels = np.random.default_rng(0).integers(0, 4096, size=(side, side), dtype=np.uint16)
    ds = make_radiograph_dataset(
        pixels,
        sex=sex,
        birth_date=dt.date(2010, 1, 1),
        study_date=dt.date(2020, 1, 1),
        patient_id=patient_id,
    )
    ds.save_as(folder / name, enforce_file_format=True)


def _write_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_images_of_one_patient_share_a_group_that_does_not_show_the_id(tmp_path: Path) -> None:
    for name, patient in (("a.dcm", "MRN-4711"), ("b.dcm", "MRN-4711"), ("c.dcm", "MRN-0815")):
        _write_dicom(tmp_path, name, patient_id=patient)
    _write_dicom(tmp_path, "d.dcm", patient_id="")
    labels = _write_labels(
        tmp_path / "labels.csv",
        [{"file": name, "boneage": "100"} for name in ("a.dcm", "b.dcm", "c.dcm", "d.dcm")],
    )

    items = read_dicom_folder(tmp_path, labels)

    a, b, c, d = (item.group for item in items)
    assert a == b == patient_group("MRN-4711")
    assert c not in ("", a)
    assert d not in ("", a, c)  # no PatientID: its own group, that of its instance
    for item in items:
        assert "4711" not in item.group and "0815" not in item.group
        assert "MRN" not in item.key


def test_the_patient_column_overrides_the_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # e.g. a set whose PatientIDs were replaced per image, with the link kept in the CSV
    for name, patient in (("a.dcm", "ANON1"), ("b.dcm", "ANON2"), ("c.dcm", "ANON3")):
        _write_dicom(tmp_path, name, patient_id=patient)
    labels = _write_labels(
        tmp_path / "labels.csv",
        [
            {"file": "a.dcm", "boneage": "100", "patient": "child-7"},
            {"file": "b.dcm", "boneage": "112", "patient": "child-7"},
            {"file": "c.dcm", "boneage": "90", "patient": " "},  # empty: the header's
        ],
    )

    with caplog.at_level(logging.WARNING, logger="worker.datasets"):
        a, b, c = read_dicom_folder(tmp_path, labels)

    assert a.group == b.group == patient_group("child-7")
    assert c.group == patient_group("ANON3")
    # a cell left blank may split a child across training and validation: said
    assert "1 images of" in caplog.text and "no patient in its patient column" in caplog.text


def test_one_image_listed_twice_without_a_patient_is_one_group(tmp_path: Path) -> None:
    """With no PatientID each row was a group of its own ``""``: one image listed twice,
    or copied under another name, could be trained on and validated on."""
    _write_dicom(tmp_path, "a.dcm", patient_id="")
    _write_dicom(tmp_path, "b.dcm", patient_id="")
    (tmp_path / "a-copy.dcm").write_bytes((tmp_path / "a.dcm").read_bytes())  # same UID
    labels = _write_labels(
        tmp_path / "labels.csv",
        [
            {"file": name, "boneage": "100"}
            for name in ("a.dcm", "b.dcm", "a.dcm", "./a.dcm", "a-copy.dcm")
        ],
    )

    a, b, again, dotted, copy = (item.group for item in read_dicom_folder(tmp_path, labels))

    assert a == again == dotted == copy != b
    assert "" not in (a, b)


@pytest.mark.parametrize("age", ["nan", "inf", "-40", "300", "ten"])
def test_a_bone_age_that_is_not_months_names_the_line_and_the_file(
    tmp_path: Path, age: str
) -> None:
    for name in ("a.dcm", "b.dcm"):
        _write_dicom(tmp_path, name, patient_id=name)
    labels = _write_labels(
        tmp_path / "labels.csv",
        [{"file": "a.dcm", "boneage": "100"}, {"file": "b.dcm", "boneage": age}],
    )
    with pytest.raises(ValueError, match=r"labels\.csv:3: boneage .*b\.dcm"):
        read_dicom_folder(tmp_path, labels)


def test_labels_that_look_like_years_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = []
    for index, years in enumerate((3, 7, 12, 15, 9, 17)):
        _write_dicom(tmp_path, f"{index}.dcm", patient_id=f"P{index}")
        rows.append({"file": f"{index}.dcm", "boneage": str(years)})
    labels = _write_labels(tmp_path / "labels.csv", rows)
    with caplog.at_level(logging.WARNING):
        assert len(read_dicom_folder(tmp_path, labels, progress=False)) == 6
    assert "look like years" in caplog.text and "labels.csv" in caplog.text


def test_patient_group_is_a_stable_hash() -> None:
    assert patient_group("X1") == patient_group(" X1 ") != patient_group("X2")
    assert len(patient_group("X1")) == 32
    assert patient_group("") == patient_group("  ") == ""


@pytest.mark.parametrize("rows", [[{"file": "a.dcm", "age": "100"}]])
def test_labels_without_boneage_are_named(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    _write_dicom(tmp_path, "a.dcm", patient_id="P")
    labels = _write_labels(tmp_path / "labels.csv", rows)
    with pytest.raises(ValueError, match="has no 'boneage' column"):
        read_dicom_folder(tmp_path, labels)


def test_a_male_value_that_is_not_a_sex_is_an_error_with_its_line(tmp_path: Path) -> None:
    _write_dicom(tmp_path, "a.dcm", patient_id="P1", sex="M")
    _write_dicom(tmp_path, "b.dcm", patient_id="P2", sex="M")
    labels = _write_labels(
        tmp_path / "labels.csv",
        [
            {"file": "a.dcm", "boneage": "100", "male": "F"},
            {"file": "b.dcm", "boneage": "100", "male": "maybe"},  # used to read as female
        ],
    )
    with pytest.raises(ValueError, match=r"labels\.csv:3: male: cannot read sex from 'maybe'"):
        read_dicom_folder(tmp_path, labels)


def test_male_column_values_and_the_header_fallback(tmp_path: Path) -> None:
    values = ["M", "female", "1", "no", "T", ""]
    rows = []
    for index, value in enumerate(values):
        _write_dicom(tmp_path, f"{index}.dcm", patient_id=f"P{index}", sex="F")
        rows.append({"file": f"{index}.dcm", "boneage": "100", "male": value})
    items = read_dicom_folder(tmp_path, _write_labels(tmp_path / "labels.csv", rows))
    # the empty value falls back to PatientSex (F)
    assert [item.male for item in items] == [True, False, True, False, True, False]


def test_evaluation_phantoms_are_not_the_training_phantoms_of_the_same_seed() -> None:
    def phantoms(offset: int) -> tuple[list[LabelledImage], str]:
        return load_items(
            rsna_csv=None,
            rsna_images=None,
            dicom_dir=None,
            labels=None,
            phantoms=20,
            phantom_size=64,
            phantom_seed_offset=offset,
        )

    trained, _ = phantoms(0)
    evaluated, description = phantoms(EVALUATION_PHANTOM_SEED_OFFSET)
    assert f"seed {EVALUATION_PHANTOM_SEED_OFFSET}" in description
    trained_ages = {item.age_months for item in trained}
    assert trained_ages.isdisjoint(item.age_months for item in evaluated)
    for a, b in zip(trained, evaluated, strict=True):
        assert isinstance(a.image, np.ndarray) and isinstance(b.image, np.ndarray)
        assert not np.array_equal(a.image, b.image)


def test_evaluate_help_states_the_phantom_seed_offset() -> None:
    from click.testing import CliRunner

    from worker.cli import main

    result = CliRunner().invoke(main, ["evaluate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"seed + {EVALUATION_PHANTOM_SEED_OFFSET}" in " ".join(result.output.split())


def test_the_gate_leaves_out_what_the_service_refuses_and_the_limit_counts_what_it_keeps(
    tmp_path: Path,
) -> None:
    """``evaluate``'s gate: an image the worker would refuse (here one too small) is left
    out and counted by the gate's reason; the images kept are those the limit counts."""
    _write_dicom(tmp_path, "small.dcm", patient_id="P0")
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        _write_dicom(tmp_path, name, patient_id="P1", side=256)
    _write_dicom(tmp_path, "unknown-sex.dcm", patient_id="P2", sex="O", side=256)
    names = ("small.dcm", "a.dcm", "unknown-sex.dcm", "b.dcm", "c.dcm")
    labels = _write_labels(
        tmp_path / "labels.csv", [{"file": n, "boneage": "100", "male": "1"} for n in names]
    )
    small = "image is 32x32 pixels, smaller than 128x128"

    ungated = read_dicom_folder(tmp_path, labels)
    assert len(ungated) == 5 and ungated.left_out == {}

    gated = read_dicom_folder(tmp_path, labels, gate=True)
    assert len(gated) == 4 and gated.left_out == {small: 1}
    assert (gated.n_listed, gated.n_missing) == (5, 0)

    # a site that refuses images without a sex: the worker refuses it whatever the labels say
    strict = read_dicom_folder(tmp_path, labels, gate=True, missing_sex="reject")
    assert len(strict) == 3 and sum(strict.left_out.values()) == 2
    assert strict.left_out[small] == 1

    limited = read_dicom_folder(tmp_path, labels, gate=True, limit=2)
    assert [item.key for item in limited] == [item.key for item in gated[:2]]

    # every image refused: an empty set that says why, not an error about the labels
    only_small = _write_labels(tmp_path / "small.csv", [{"file": "small.dcm", "boneage": "100"}])
    refused = read_dicom_folder(tmp_path, only_small, gate=True)
    assert len(refused) == 0 and refused.left_out == {small: 1}

    items, description = load_items(
        rsna_csv=None,
        rsna_images=None,
        dicom_dir=tmp_path,
        labels=labels,
        phantoms=None,
        gate=True,
        progress=False,
    )
    assert len(items) == 4
    assert "4 images (1 left out by the service's gate)" in description


@pytest.mark.parametrize("gate", [False, True], ids=["train", "evaluate"])
def test_a_deflate_bomb_in_a_folder_is_refused_not_inflated(tmp_path: Path, gate: bool) -> None:
    """A deflated file of a few hundred kilobytes that inflates to 256 MiB: refused by its
    bound (dicom_io.pixels.MAX_INFLATED_BYTES), for train as for evaluate; pydicom
    inflated it whole to read two attributes of its header."""
    from tests.unit.dicom_io.test_pixels_deflated import BOMB_ZEROS, write_deflated

    pixels = np.random.default_rng(0).integers(0, 4096, size=(256, 256), dtype=np.uint16)
    ds = make_radiograph_dataset(
        pixels, sex="F", birth_date=dt.date(2010, 1, 1), study_date=dt.date(2020, 1, 1)
    )
    ds["PixelData"].VR = "OW"  # encoded alone, as the bomb's last piece
    write_deflated(ds, tmp_path / "bomb.dcm", BOMB_ZEROS)
    labels = _write_labels(tmp_path / "labels.csv", [{"file": "bomb.dcm", "boneage": "100"}])

    with pytest.raises(ValueError, match=r"labels.csv:2: .*bomb.dcm.*inflates past 64 MiB"):
        read_dicom_folder(tmp_path, labels, gate=gate)


def test_evaluate_gives_the_model_the_sex_the_service_gives_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker gives the model the header's PatientSex, else the site's
    BONEAGE_MISSING_SEX: so does `evaluate` where the header has M or F, whatever the
    labels say (before, the labels won, and the figures were not the service's), and
    where neither says (before, the evaluation stopped). A header with none and a label
    (a de-identified set) takes the label. Each departure is said. `train` keeps the
    labels first."""
    for name, sex in (("m.dcm", "M"), ("none.dcm", None), ("f.dcm", "F"), ("o.dcm", "O")):
        _write_dicom(tmp_path, name, patient_id=name, sex=sex, side=256)
    rows = [
        {"file": "m.dcm", "boneage": "100", "male": "0"},  # the header says M
        {"file": "none.dcm", "boneage": "100", "male": "1"},  # de-identified: the label's
        {"file": "f.dcm", "boneage": "100", "male": "0"},
        {"file": "o.dcm", "boneage": "100", "male": ""},  # neither: the site's
    ]
    labels = _write_labels(tmp_path / "labels.csv", rows)
    with caplog.at_level(logging.WARNING, logger="worker.datasets"):
        evaluated = read_dicom_folder(tmp_path, labels, gate=True, missing_sex="female")
    assert [item.male for item in evaluated] == [True, True, False, False]
    said = " ".join(caplog.text.split())
    assert "1 images' sex in" in said and "with the header's" in said
    assert (
        "1 images have no PatientSex of M or F (a de-identified set?): scored, and counted "
        "by sex, with the labels' sex; the service assesses them as female" in said
    )
    assert "1 images have no PatientSex of M or F and no label of it: scored" in said
    everything = read_dicom_folder(tmp_path, labels, missing_sex="male")  # --all-images
    assert [item.male for item in everything] == [True, True, False, True]

    refusing = read_dicom_folder(tmp_path, labels, gate=True, missing_sex="reject")
    assert [item.male for item in refusing] == [True, False]
    assert sum(refusing.left_out.values()) == 2

    with pytest.raises(ValueError, match=r"no male column and the PatientSex of .*o\.dcm is O"):
        read_dicom_folder(tmp_path, labels)  # train: the labels, else the header
    trained = read_dicom_folder(tmp_path, _write_labels(tmp_path / "t.csv", rows[:3]))
    assert [item.male for item in trained] == [False, True, False]
