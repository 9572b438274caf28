"""Labelled data sets for `train` and `evaluate`: the RSNA layout, DICOM folders, phantoms.

`models/` never reads DICOM; a DICOM folder is turned here into lazily decoded
images (`dicom_io.pixels`) that `models` trains and evaluates on. For `evaluate` they are
decoded as the service decodes them (:func:`dicom_io.pixels.decode_as_assessed`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_io.pixels import decode_as_assessed, decode_for_display, read_image
from models.data import LabelledImage, parse_sex, phantom_items, read_rsna
from worker.settings import SC_MIN_LONG_SIDE


def _loader(path: Path, input_size: int | None, sc_min_long_side: int) -> Callable[[], np.ndarray]:
    if input_size is None:
        return lambda: decode_for_display(read_image(path))
    return lambda: decode_as_assessed(
        read_image(path), input_size=input_size, sc_min_long_side=sc_min_long_side
    )


def patient_group(patient: str) -> str:
    """The split group of a patient: a hash of the identifier, ``""`` when it is empty.

    The token stays in memory (and in the SHA-256 of the training data a resume checks);
    the identifier itself is never stored or logged.

    Parameters
    ----------
    patient : str
        Patient ID from the file header, or the ``patient`` column of the labels CSV.

    Returns
    -------
    str
        32 hex digits, or ``""`` (the image is a group of its own).
    """
    value = patient.strip()
    if not value:
        return ""
    return hashlib.sha256(b"boneage-split-group\0" + value.encode()).hexdigest()[:32]


def read_dicom_folder(
    folder: Path,
    labels_csv: Path,
    *,
    limit: int | None = None,
    input_size: int | None = None,
    sc_min_long_side: int = SC_MIN_LONG_SIDE,
) -> list[LabelledImage]:
    """A folder of DICOM radiographs with a CSV of labels.

    The CSV has a ``file`` column (path relative to ``folder``) and ``boneage``
    (months); ``male`` (true/false, 1/0, M/F) is optional, otherwise PatientSex is
    read from the file. Report keys are hashes of the file names, never patient data.

    Images of one patient go to the same side of the training split: each image's group
    is a hash of the PatientID in its header (an image without one is its own group),
    or of the optional ``patient`` column where that is filled in (for sets whose
    PatientIDs were replaced per image, say).

    With ``input_size`` (a model's input side) each image is decoded as the service
    decodes it for that model (:func:`decode_as_assessed`, with the site's
    ``sc_min_long_side``); without it, in full.
    """
    items: list[LabelledImage] = []
    with labels_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        for column in ("file", "boneage"):
            if column not in fields:
                raise ValueError(
                    f"{labels_csv} has no '{column}' column (needs file, boneage[, male])"
                )
        for line, row in enumerate(reader, start=2):
            path = folder / row[fields["file"]]
            if not path.is_file():
                raise ValueError(f"{labels_csv}:{line}: {path} does not exist")
            try:
                age = float(row[fields["boneage"]])
            except ValueError as exc:
                raise ValueError(f"{labels_csv}:{line}: boneage is not a number") from exc
            header = dcmread(
                path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientID"]
            )
            if "male" in fields and row[fields["male"]].strip():
                try:
                    male = parse_sex(row[fields["male"]])
                except ValueError as exc:
                    raise ValueError(f"{labels_csv}:{line}: male: {exc}") from exc
            else:
                sex = str(header.get("PatientSex", ""))
                if sex.upper() not in {"M", "F"}:
                    raise ValueError(
                        f"{labels_csv}:{line}: no male column and PatientSex is {sex or 'empty'}"
                    )
                male = sex.upper() == "M"
            patient = row[fields["patient"]].strip() if "patient" in fields else ""
            group = patient_group(patient or str(header.get("PatientID", "") or ""))
            key = hashlib.sha256(str(row[fields["file"]]).encode()).hexdigest()[:16]
            items.append(
                LabelledImage(
                    image=_loader(path, input_size, sc_min_long_side),
                    age_months=age,
                    male=male,
                    key=key,
                    group=group,
                )
            )
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{labels_csv} lists no images")
    return items


EVALUATION_PHANTOM_SEED_OFFSET = 1_000_000
"""Added to ``--seed`` for ``evaluate --phantoms``: the same seed drives ``train``'s
phantoms, so without it the first N evaluation phantoms would be training phantoms."""


def load_items(
    *,
    rsna_csv: Path | None,
    rsna_images: Path | None,
    dicom_dir: Path | None,
    labels: Path | None,
    phantoms: int | None,
    phantom_size: int = 128,
    limit: int | None = None,
    seed: int = 0,
    phantom_seed_offset: int = 0,
    input_size: int | None = None,
    sc_min_long_side: int = SC_MIN_LONG_SIDE,
) -> tuple[list[LabelledImage], str]:
    """The items from exactly one source, and a description for the checkpoint.

    An RSNA set is a :class:`~models.data.LabelledSet`: it counts the images its CSV
    listed and those missing, which ``evaluate`` reports (or refuses) and ``train``
    records. Phantoms are drawn from ``seed + phantom_seed_offset``
    (:data:`EVALUATION_PHANTOM_SEED_OFFSET` for an evaluation). With ``input_size``, DICOM
    images are decoded as the service decodes them for a model of that input
    (:func:`read_dicom_folder`).
    """
    chosen = [rsna_csv is not None, dicom_dir is not None, phantoms is not None]
    if sum(chosen) != 1:
        raise ValueError(
            "give exactly one data source: --rsna-csv/--rsna-images, "
            "--dicom-dir/--labels or --phantoms"
        )
    if rsna_csv is not None:
        if rsna_images is None:
            raise ValueError("--rsna-csv needs --rsna-images (the folder of <id>.png)")
        rsna = read_rsna(rsna_csv, rsna_images, limit=limit)  # counts what it missed
        gaps = f" ({rsna.n_missing} of {rsna.n_listed} listed missing)" if rsna.n_missing else ""
        return rsna, f"RSNA layout: {rsna_csv.name}, {len(rsna)} images{gaps}"
    if dicom_dir is not None:
        if labels is None:
            raise ValueError(
                "--dicom-dir needs --labels (CSV with file, boneage[, male][, patient])"
            )
        items = read_dicom_folder(
            dicom_dir,
            labels,
            limit=limit,
            input_size=input_size,
            sc_min_long_side=sc_min_long_side,
        )
        decoded = (
            ""
            if input_size is None
            else f" decoded as the service does (input {input_size} px, "
            f"BONEAGE_SC_MIN_LONG_SIDE {sc_min_long_side})"
        )
        return items, f"DICOM folder with labels {labels.name}, {len(items)} images{decoded}"
    assert phantoms is not None
    drawn = seed + phantom_seed_offset
    items = phantom_items(phantoms, size=phantom_size, seed=drawn)
    return items, f"synthetic phantoms: {phantoms} images of {phantom_size} px (seed {drawn})"
