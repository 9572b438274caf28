"""Labelled data sets for `train` and `evaluate`: the RSNA layout, DICOM folders, phantoms.

`models/` never reads DICOM; a DICOM folder is turned here into lazily decoded
images (`dicom_io.pixels`) that `models` trains and evaluates on. For `evaluate` they are
decoded as the service decodes them (:func:`dicom_io.pixels.decode_as_assessed`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dicom_io.gate import check, patient_facts
from dicom_io.pixels import decode_as_assessed, decode_for_display, read_image
from models.data import (
    IMAGE_GROUP,
    LabelledImage,
    LabelledSet,
    parse_age_months,
    parse_sex,
    phantom_items,
    read_rsna,
    warn_if_years,
)
from worker.settings import SC_MIN_LONG_SIDE, MissingSex

logger = logging.getLogger(__name__)


def _loader(
    path: Path, where: str, input_size: int | None, sc_min_long_side: int
) -> Callable[[], np.ndarray]:
    """Decode ``path`` when training or evaluation first needs it; a file that cannot be
    decoded is named, with the labels file and line that list it (``where``)."""

    def load() -> np.ndarray:
        try:
            ds = read_image(path)
            if input_size is None:
                return decode_for_display(ds)
            return decode_as_assessed(ds, input_size=input_size, sc_min_long_side=sc_min_long_side)
        except MemoryError:
            raise
        except Exception as exc:  # pydicom's and the codecs' errors are of many types
            raise ValueError(f"{where}: cannot decode {path}: {exc}") from exc

    return load


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


def instance_group(dicom_header: Any, path: Path) -> str:
    """The split group of an image with no patient: a hash of its SOP Instance UID, or of
    its resolved path where it has none, so that one image listed twice, or copied under
    another name, is one group (it would otherwise be trained and validated on).

    Parameters
    ----------
    dicom_header : pydicom.Dataset
        The file's header.
    path : pathlib.Path
        The file.

    Returns
    -------
    str
        :data:`~models.data.IMAGE_GROUP` and 32 hex digits, never equal to a
        :func:`patient_group`.
    """
    uid = str(dicom_header.get("SOPInstanceUID", "") or "").strip()
    value = f"uid\0{uid}" if uid else f"path\0{path.resolve()}"
    digest = hashlib.sha256(b"boneage-split-instance\0" + value.encode()).hexdigest()[:32]
    return IMAGE_GROUP + digest


def read_dicom_folder(
    folder: Path,
    labels_csv: Path,
    *,
    limit: int | None = None,
    input_size: int | None = None,
    sc_min_long_side: int = SC_MIN_LONG_SIDE,
    progress: bool = True,
    gate: bool = False,
    missing_sex: MissingSex | None = None,
) -> LabelledSet:
    """A folder of DICOM radiographs with a CSV of labels.

    The CSV (UTF-8, with or without the byte-order mark Excel writes) has a ``file``
    column (path relative to ``folder``) and ``boneage`` (months); ``male`` (true/false,
    1/0, M/F) is optional, otherwise PatientSex is read from the file. Report keys are
    hashes of the file names, never patient data.

    Images of one patient go to the same side of the training split: each image's group
    is a hash of the PatientID in its header, or of the optional ``patient`` column where
    that is filled in (for sets whose PatientIDs were replaced per image, say); an image
    with neither is grouped by its SOP Instance UID (or its path: :func:`instance_group`),
    so that one listed twice stays on one side.

    ``boneage`` is in months, a finite number from 0 to 240
    (:func:`~models.data.parse_age_months`); labels all under 20 (more than five) are
    warned of as years.

    With ``input_size`` (a model's input side) each image is decoded as the service
    decodes it for that model (:func:`decode_as_assessed`, with the site's
    ``sc_min_long_side``); without it, in full. Images are decoded when first used; one
    that cannot be is a ValueError naming the labels file, its line and the image file.

    A listed file that does not exist is skipped and counted, as
    :func:`~models.data.read_rsna` counts a missing PNG: ``evaluate`` refuses such a set
    unless allowed to miss images, ``train`` goes on with a warning. ``progress`` shows a
    progress bar while the headers are read.

    With ``gate``, only the images the service assesses are kept: each header goes through
    its input gate (:func:`dicom_io.gate.check`, asking for a sex where ``missing_sex``,
    the site's ``BONEAGE_MISSING_SEX``, is ``reject``), and those it refuses are left out
    and counted by reason (:attr:`~models.data.LabelledSet.left_out`); ``limit`` counts
    the images kept.

    With ``missing_sex`` (``evaluate``), the model is given the sex the service gives
    it: the header's PatientSex where it is M or F, whatever the ``male`` column says.
    Where the header has none, the ``male`` column (a de-identified set's headers are
    emptied, and the service would read the patient's), else the site's ``female`` or
    ``male``. Each departure from the labels or from the service is counted and warned
    of. Without it (``train``): the ``male`` column, else the header.

    Raises
    ------
    ValueError
        If a column is missing, a row is cut short or holds a value that cannot be read
        (a bone age that is not a number of months from 0 to 240: the file is named too),
        a listed file is not DICOM, or no listed file exists; each names the labels file
        and its line. Not when the gate refused every image: the set is then empty.
    """
    items: list[LabelledImage] = []
    left_out: dict[str, int] = {}
    listed = missing = 0
    # labels whose sex the header contradicts; headers with no sex, the labels' given or
    # the site's
    disagree = unrecorded = assumed = 0
    unnamed = 0  # images of a blank cell in the patient column
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        fields = {name.strip().lower(): name for name in header}
        for column in ("file", "boneage"):
            if column not in fields:
                raise ValueError(
                    f"{labels_csv} has no '{column}' column (needs file, boneage[, male])"
                )
        used = [fields[c] for c in ("file", "boneage", "male", "patient") if c in fields]
        rows = list(enumerate(reader, start=2))
        for line, row in tqdm(rows, desc="read DICOM headers", disable=not progress, leave=False):
            if limit is not None and len(items) >= limit:
                break
            where = f"{labels_csv}:{line}"
            if any(row.get(name) is None for name in used):
                cells = sum(row.get(name) is not None for name in header)
                raise ValueError(
                    f"{where}: the row has {cells} of the header's {len(header)} cells (cut short?)"
                )
            listed += 1
            if not row[fields["file"]].strip():
                raise ValueError(f"{where}: no file named")
            path = folder / row[fields["file"]]
            try:
                age = parse_age_months(row[fields["boneage"]])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc} (the label of {path})") from exc
            if not path.is_file():
                missing += 1
                continue
            try:
                # the header as the worker reads it (the gate checks that pixel data is
                # there; its value is not read), a deflated one inflated within a bound:
                # dcmread inflates it whole, even for two attributes (a deflate bomb)
                dicom_header = read_image(path)
            except MemoryError:
                raise
            except Exception as exc:  # InvalidDicomError, OSError, and a broken file's others
                raise ValueError(
                    f"{where}: {path} is not a DICOM file pydicom reads: {exc}"
                ) from exc
            if gate:
                decision = check(dicom_header, require_sex=missing_sex == "reject")
                if not decision.accepted:
                    reason = decision.reason or "not assessable"
                    left_out[reason] = left_out.get(reason, 0) + 1
                    continue
            labelled: bool | None = None
            if "male" in fields and row[fields["male"]].strip():
                try:
                    labelled = parse_sex(row[fields["male"]])
                except ValueError as exc:
                    raise ValueError(f"{where}: male: {exc}") from exc
            recorded = patient_facts(dicom_header).male  # the header's, as the gate reads it
            male: bool
            if missing_sex is not None and recorded is not None:
                male = recorded  # as the worker gives it (worker.pipeline)
                disagree += labelled is not None and labelled != recorded
            elif labelled is not None:
                # a de-identified set's header, emptied: the label is the patient's
                male = labelled
                unrecorded += missing_sex is not None
            elif missing_sex in ("female", "male"):
                male = missing_sex == "male"
                assumed += 1
            elif recorded is not None:
                male = recorded
            else:
                sex = str(dicom_header.get("PatientSex", "") or "").strip()
                raise ValueError(
                    f"{where}: no male column and the PatientSex of {path} is {sex or 'empty'}"
                )
            patient = row[fields["patient"]].strip() if "patient" in fields else ""
            unnamed += "patient" in fields and not patient
            group = patient_group(patient or str(dicom_header.get("PatientID", "") or ""))
            if not group:  # one image: listed twice (or copied), both stay on one side
                group = instance_group(dicom_header, path)
            key = hashlib.sha256(row[fields["file"]].encode()).hexdigest()[:16]
            items.append(
                LabelledImage(
                    image=_loader(path, where, input_size, sc_min_long_side),
                    age_months=age,
                    male=male,
                    key=key,
                    group=group,
                )
            )
    if not items and not left_out:
        if missing:
            raise ValueError(f"none of the {listed} files {labels_csv} lists is in {folder}")
        raise ValueError(f"{labels_csv} lists no images")
    if missing:
        logger.warning("%d files listed in %s are missing from %s", missing, labels_csv, folder)
    if unnamed:
        # the column is there for headers whose PatientIDs were replaced per image: one
        # left blank puts an image of a child named elsewhere in a group of its own, which
        # may then be validated on beside the child's trained images
        logger.warning(
            "%d images of %s have no patient in its patient column: each is grouped by the "
            "PatientID in its header instead, which may not be the patient's other images'",
            unnamed,
            labels_csv,
        )
    if disagree:
        logger.warning(
            "%d images' sex in %s is not their header's PatientSex: scored, and counted by "
            "sex, with the header's, as the service assesses them",
            disagree,
            labels_csv,
        )
    if unrecorded:
        service = (
            "refuses them"
            if missing_sex == "reject"
            else f"assesses them as {missing_sex} (BONEAGE_MISSING_SEX)"
        )
        logger.warning(
            "%d images have no PatientSex of M or F (a de-identified set?): scored, and "
            "counted by sex, with the labels' sex; the service %s",
            unrecorded,
            service,
        )
    if assumed:
        logger.warning(
            "%d images have no PatientSex of M or F and no label of it: scored, and "
            "counted by sex, as %s (BONEAGE_MISSING_SEX), as the service assesses them",
            assumed,
            missing_sex,
        )
    warn_if_years([item.age_months for item in items], labels_csv)
    return LabelledSet(items, n_listed=listed, n_missing=missing, left_out=left_out)


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
    progress: bool = True,
    gate: bool = False,
    missing_sex: MissingSex | None = None,
) -> tuple[list[LabelledImage], str]:
    """The items from exactly one source, and a description for the checkpoint.

    An RSNA set or a DICOM folder is a :class:`~models.data.LabelledSet`: it counts the
    images its CSV listed and those missing, which ``evaluate`` reports (or refuses) and
    ``train`` records. ``progress`` shows a bar while a DICOM folder's headers are read.
    Phantoms are drawn from ``seed + phantom_seed_offset``
    (:data:`EVALUATION_PHANTOM_SEED_OFFSET` for an evaluation). With ``input_size``, DICOM
    images are decoded as the service decodes them for a model of that input, and with
    ``gate`` only those the service's input gate accepts are kept (:func:`read_dicom_folder`:
    RSNA PNGs and phantoms have no header for it).
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
        found = read_dicom_folder(
            dicom_dir,
            labels,
            limit=limit,
            input_size=input_size,
            sc_min_long_side=sc_min_long_side,
            progress=progress,
            gate=gate,
            missing_sex=missing_sex,
        )
        gaps = f" ({found.n_missing} of {found.n_listed} listed missing)" if found.n_missing else ""
        if found.left_out:
            gaps += f" ({sum(found.left_out.values())} left out by the service's gate)"
        decoded = (
            ""
            if input_size is None
            else f" decoded as the service does (input {input_size} px, "
            f"BONEAGE_SC_MIN_LONG_SIDE {sc_min_long_side})"
        )
        description = f"DICOM folder with labels {labels.name}, {len(found)} images{gaps}{decoded}"
        return found, description
    assert phantoms is not None
    drawn = seed + phantom_seed_offset
    items = phantom_items(phantoms, size=phantom_size, seed=drawn)
    return items, f"synthetic phantoms: {phantoms} images of {phantom_size} px (seed {drawn})"
