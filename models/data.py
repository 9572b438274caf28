"""Labelled images for training and evaluation: RSNA layout, phantoms, or any loader.

An image source is an array, a PNG/JPEG path, or a zero-argument callable returning an
array (how ``worker`` hands in DICOM files it decoded with ``dicom_io``: this package never
reads DICOM itself).
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from models.phantoms import make_phantom
from models.preprocess import prepare

logger = logging.getLogger(__name__)

ImageSource = np.ndarray | Path | Callable[[], np.ndarray]
"""An image, a path to a PNG/JPEG file, or a callable that loads the image."""


#: How the group of an image with no patient begins: the image's own, by its SOP
#: Instance UID, so that one listed twice stays on one side of the split.
IMAGE_GROUP = "image:"


@dataclass(frozen=True)
class LabelledImage:
    """One training or evaluation example.

    Attributes
    ----------
    image : numpy.ndarray or pathlib.Path or callable
        2-D grey image (bone bright), a path to an 8/16-bit grey PNG/JPEG, or a loader.
    age_months : float
        Reference bone age, months.
    male : bool
        Patient sex.
    key : str
        Identifier for reports (file id, phantom number); never a patient name.
    group : str
        The patient the image belongs to, as an opaque token (a hash, never the Patient
        ID itself): images of one group go to the same side of the train/validation
        split (:func:`stratified_split`). ``""``: the image is its own group. One that
        begins with :data:`IMAGE_GROUP` stands for one image, under whatever names it is
        listed (``worker.datasets.instance_group``).
    """

    image: ImageSource
    age_months: float
    male: bool
    key: str = ""
    group: str = ""


def split_groups(items: Sequence[LabelledImage]) -> list[Hashable]:
    """The ``groups`` argument of :func:`stratified_split` for labelled images.

    Parameters
    ----------
    items : sequence of LabelledImage
        Images; those with an empty ``group`` are each a group of their own.

    Returns
    -------
    list
        One hashable per image.
    """
    return [item.group if item.group else ("image", index) for index, item in enumerate(items)]


class LabelledSet(list[LabelledImage]):
    """Labelled images read from a source that may list more than it holds.

    A list of :class:`LabelledImage`, plus how many the source listed and how many of
    those were missing (:func:`read_rsna` skips a row whose PNG is absent), so that an
    evaluation can say it covers a subset, or refuse to.

    Parameters
    ----------
    items : iterable of LabelledImage
        The images found.
    n_listed : int
        Rows the source listed (read up to the ``limit``).
    n_missing : int
        Of those, rows whose image was missing.
    left_out : Mapping[str, int], optional
        Of those, images the service's input gate refuses, left out: reason -> how many
        (``worker.datasets.read_dicom_folder`` with ``gate``).
    """

    def __init__(
        self,
        items: Iterable[LabelledImage] = (),
        *,
        n_listed: int,
        n_missing: int,
        left_out: Mapping[str, int] | None = None,
    ):
        super().__init__(items)
        self.n_listed = n_listed
        self.n_missing = n_missing
        self.left_out: dict[str, int] = dict(left_out or {})


def source_counts(items: Sequence[LabelledImage]) -> tuple[int, int]:
    """``(n_listed, n_missing)`` of a set of images: a :class:`LabelledSet`'s counts, or
    ``(len(items), 0)`` for a plain sequence (nothing was left out reading it)."""
    if isinstance(items, LabelledSet):
        return items.n_listed, items.n_missing
    return len(items), 0


def load_image(source: ImageSource) -> np.ndarray:
    """Return the image of a source as float32 in [0, 1] (integer images are scaled).

    Parameters
    ----------
    source : numpy.ndarray or pathlib.Path or callable
        See :data:`ImageSource`.

    Returns
    -------
    numpy.ndarray
        2-D float32 image.

    Raises
    ------
    ValueError
        If the file of a path cannot be read as an image (missing, truncated, not an
        image): the message names the path.
    """
    if isinstance(source, np.ndarray):
        arr = source
    elif isinstance(source, Path):
        try:
            with Image.open(source) as opened:
                grey = (
                    opened
                    if opened.mode in ("L", "I;16", "I;16B", "I", "F")
                    else opened.convert("L")
                )
                arr = np.asarray(grey)
        except MemoryError:
            raise
        except Exception as exc:  # PIL's errors are of many types (OSError, SyntaxError, ...)
            # named: a truncated PNG among thousands said only "image file is truncated"
            raise ValueError(f"cannot read {source}: {exc}") from exc
    else:
        arr = np.asarray(source())
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3].mean(axis=2)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max) if arr.max() > 255 else 255.0
        return (arr.astype(np.float32) / top).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def parse_sex(text: str) -> bool:
    """Read a sex label: True for male, False for female.

    Parameters
    ----------
    text : str
        ``true``/``false``, ``1``/``0``, ``m``/``f``, ``male``/``female``, ``yes``/``no``
        (case and surrounding spaces ignored; ``t`` and ``male``'s short forms too).

    Returns
    -------
    bool
        True for male.

    Raises
    ------
    ValueError
        If the text is none of these: a value never silently becomes one sex.
    """
    value = text.strip().lower()
    if value in ("true", "t", "1", "m", "male", "yes"):
        return True
    if value in ("false", "0", "f", "female", "no"):
        return False
    raise ValueError(f"cannot read sex from {text!r}")


MAX_AGE_MONTHS = 240.0
"""The largest bone age a label may give, months (20 years; the atlases end at 18-19)."""

YEARS_SUSPECTED_BELOW = 20.0
"""Labels all at or under this many months, in a set of more than
:data:`YEARS_SUSPECTED_MIN_ROWS`, look like ages in years: :func:`warn_if_years`."""

YEARS_SUSPECTED_MIN_ROWS = 5


def parse_age_months(text: str) -> float:
    """Read a bone-age label: a finite number of months in [0, :data:`MAX_AGE_MONTHS`].

    Parameters
    ----------
    text : str
        The cell of the labels file.

    Returns
    -------
    float
        Months.

    Raises
    ------
    ValueError
        If the text is not a number, or is NaN, infinite, negative or over 240 months:
        such a label would make training diverge (NaN) or teach the model nonsense, and
        an evaluation's MAE would silently be NaN.
    """
    value = text.strip()
    try:
        age = float(value)
    except ValueError:
        raise ValueError(f"boneage {value!r} is not a number") from None
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE_MONTHS:
        raise ValueError(f"boneage {value!r} is not a bone age in months (0 to {MAX_AGE_MONTHS:g})")
    return age


def warn_if_years(ages: Sequence[float], source: str | Path) -> bool:
    """Warn when every label of a set is so small that it looks like years, not months.

    Parameters
    ----------
    ages : sequence of float
        The labels read, months.
    source : str or pathlib.Path
        The labels file, for the message.

    Returns
    -------
    bool
        Whether it warned: more than :data:`YEARS_SUSPECTED_MIN_ROWS` labels, none over
        :data:`YEARS_SUSPECTED_BELOW`.
    """
    if len(ages) <= YEARS_SUSPECTED_MIN_ROWS or max(ages) > YEARS_SUSPECTED_BELOW:
        return False
    logger.warning(
        "all %d bone ages in %s are %g or under: they look like years, and the labels are "
        "months (multiply by 12)",
        len(ages),
        source,
        max(ages),
    )
    return True


RSNA_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id", "case id", "image id"),
    "boneage": ("boneage", "ground truth bone age (months)", "bone age (months)"),
    "male": ("male", "sex"),
}
"""Accepted header names of each RSNA column, lower case: the training set's
(``id,boneage,male``), the validation set's (``Image ID,male,Bone Age (months)``) and the
test set's (``Case ID,Sex,Ground truth bone age (months)``)."""


def _rsna_columns(csv_path: str | Path, header: Sequence[str]) -> dict[str, str]:
    """Map ``id``/``boneage``/``male`` to the header's own names (case and spaces ignored)."""
    present = {name.strip().lower(): name for name in header}
    columns: dict[str, str] = {}
    for needed, aliases in RSNA_COLUMNS.items():
        found = [present[a] for a in aliases if a in present]
        if not found:
            raise ValueError(
                f"{csv_path}: no {needed!r} column (one of {', '.join(map(repr, aliases))}; "
                f"have {list(header)})"
            )
        columns[needed] = found[0]
    return columns


def read_rsna(
    csv_path: str | Path, image_dir: str | Path, *, limit: int | None = None
) -> LabelledSet:
    """Read the RSNA Pediatric Bone Age layout.

    Parameters
    ----------
    csv_path : str or pathlib.Path
        CSV with an id (each once), the bone age (months, 0 to 240:
        :func:`parse_age_months`) and the sex, under the header names of the
        RSNA training, validation or test set (:data:`RSNA_COLUMNS`: ``id``, ``boneage``,
        ``male``; ``Image ID``, ``Bone Age (months)``; ``Case ID``,
        ``Ground truth bone age (months)``, ``Sex``), matched case-insensitively. Sex is
        True/False, 1/0 or M/F.
    image_dir : str or pathlib.Path
        Folder holding ``<id>.png``.
    limit : int, optional
        Keep only the first ``limit`` rows.

    Returns
    -------
    LabelledSet
        One image per row whose image exists; missing images are logged, skipped and
        counted (``n_listed``, ``n_missing``).

    Raises
    ------
    ValueError
        If a column is missing, a value cannot be read, a bone age is not a number of
        months from 0 to 240, or an id is listed twice; each names the file and line.
        All bone ages under 20 (with more than five rows) are only warned of: years?
    """
    folder = Path(image_dir)
    items: list[LabelledImage] = []
    missing = listed = 0
    lines: dict[str, int] = {}  # id -> the line that listed it
    ages: list[float] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = _rsna_columns(csv_path, reader.fieldnames or [])
        for line, row in enumerate(reader, start=2):
            if limit is not None and len(items) >= limit:
                break
            listed += 1
            if any(row[name] is None for name in fields.values()):  # a row cut short
                raise ValueError(f"{csv_path}:{line}: the row has fewer cells than the header")
            key = row[fields["id"]].strip()
            if key in lines:
                # one image twice: each row its own group, it could be trained and
                # validated on, flattering the validation MAE and the intervals
                raise ValueError(
                    f"{csv_path}:{line}: id {key!r} is listed again (first on line {lines[key]})"
                )
            lines[key] = line
            try:
                age = parse_age_months(row[fields["boneage"]])
                male = parse_sex(row[fields["male"]])
            except ValueError as exc:
                raise ValueError(f"{csv_path}:{line}: {exc}") from exc
            ages.append(age)
            path = folder / f"{key}.png"
            if not path.is_file():
                missing += 1
                continue
            items.append(LabelledImage(image=path, age_months=age, male=male, key=key))
    if missing:
        logger.warning("%d images listed in %s are missing from %s", missing, csv_path, folder)
    warn_if_years(ages, csv_path)
    logger.info("read %d labelled images from %s", len(items), csv_path)
    return LabelledSet(items, n_listed=listed, n_missing=missing)


def phantom_items(
    n: int, *, size: int = 128, seed: int = 0, max_age_months: float = 228.0
) -> list[LabelledImage]:
    """Draw ``n`` labelled phantoms (ages uniform, sex random).

    Parameters
    ----------
    n : int
        Number of images.
    size : int
        Image side, pixels.
    seed : int
        Seed of the generator.
    max_age_months : float
        Upper end of the age range.

    Returns
    -------
    list of LabelledImage
        Images held in memory.
    """
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        age = float(rng.uniform(0.0, max_age_months))
        male = bool(rng.random() < 0.5)
        image = make_phantom(age, male=male, size=size, rng=rng).image
        items.append(LabelledImage(image=image, age_months=age, male=male, key=f"phantom-{i}"))
    return items


def stratified_split(
    ages: Sequence[float],
    males: Sequence[bool],
    val_fraction: float,
    *,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Split indices into train and validation, stratified by sex and age, by patient.

    The units of the split are the groups (patients): ``val_fraction`` of them, rounded to
    a whole group (:func:`validation_group_count`), go to validation with all their
    images, shared between the sexes in proportion to their groups (largest remainder).
    Within each sex the groups are sorted by their mean age and cut into as many
    consecutive runs of (nearly) equal length as that sex has validation groups; one
    random group of each run is taken. Two images of one child (both hands, follow-ups)
    are never on both sides, which would make validation MAE and the conformal intervals
    optimistic. The share of *images* in validation follows that of the groups only as
    far as the groups have equal numbers of images: the caller reports both
    (:func:`models.train.train` logs them and records them in the checkpoint).

    Parameters
    ----------
    ages : sequence of float
        Bone ages.
    males : sequence of bool
        Sexes.
    val_fraction : float
        Share of groups for validation, in (0, 0.5].
    seed : int
        Seed of the random choice within runs.
    groups : sequence of hashable, optional
        The group of each image (equal values: one patient). None: each image is its own
        group. A group's sex is that of its first image.

    Returns
    -------
    train, val : list of int
        Sorted indices.

    Raises
    ------
    ValueError
        If ``val_fraction`` is out of range, the lengths differ, or there are fewer than
        two groups.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if len(ages) != len(males):
        raise ValueError("ages and males differ in length")
    if groups is not None and len(groups) != len(ages):
        raise ValueError(f"groups has {len(groups)} entries for {len(ages)} images")
    # units in order of first appearance: with no groups, the images themselves in order
    members: dict[Hashable, list[int]] = {}
    for index in range(len(ages)):
        members.setdefault(index if groups is None else groups[index], []).append(index)
    units = list(members.values())
    if len(units) < 2:
        raise ValueError(
            f"cannot split {len(ages)} images of {len(units)} patient(s) into training "
            "and validation"
        )
    ages_arr = np.asarray(ages, dtype=np.float64)
    unit_ages = np.array([ages_arr[m].mean() for m in units])
    unit_males = np.array([bool(males[m[0]]) for m in units], dtype=bool)
    rng = np.random.default_rng(seed)
    by_sex = [np.flatnonzero(unit_males == sex) for sex in (False, True)]
    # The number of validation groups is that of the fraction (not 1 / round(1 / f) of
    # them: runs of round(1 / 0.15) = 7 gave 14 %, of round(1 / 0.4) = 2 gave 50 %).
    wanted = validation_group_count(len(units), val_fraction)
    shares = [val_fraction * len(idx) for idx in by_sex]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(2), key=lambda sex: shares[sex] - counts[sex], reverse=True)
    for sex in by_remainder * 2:  # twice: a sex with no group left takes none
        if sum(counts) < wanted and counts[sex] < len(by_sex[sex]):
            counts[sex] += 1
    val_units: list[int] = []
    for idx, count in zip(by_sex, counts, strict=True):
        if not count:
            continue
        idx = idx[np.argsort(unit_ages[idx], kind="stable")]
        # ``count`` runs of consecutive ages, their lengths differing by one at most
        ends = [(run * len(idx)) // count for run in range(count + 1)]
        for start, stop in itertools.pairwise(ends):
            val_units.append(int(idx[rng.integers(start, stop)]))
    val = sorted(i for u in val_units for i in units[u])
    val_set = set(val)
    train = [i for i in range(len(ages)) if i not in val_set]
    return train, val


def validation_group_count(n_groups: int, val_fraction: float) -> int:
    """How many of ``n_groups`` groups :func:`stratified_split` puts into validation.

    Parameters
    ----------
    n_groups : int
        Groups (patients) to split, at least 2.
    val_fraction : float
        Share asked for.

    Returns
    -------
    int
        ``val_fraction * n_groups`` rounded to the nearest whole group (halves up), but
        at least one, and one fewer than all at most: each side needs a group.
    """
    return min(n_groups - 1, max(1, math.floor(val_fraction * n_groups + 0.5)))


class PreparedDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Preprocessed examples: ``(image (1, S, S), age in months, male 0/1)``.

    Parameters
    ----------
    items : sequence of LabelledImage
        Examples.
    size : int
        Network input side.
    clahe : bool
        Apply CLAHE in preprocessing.
    cache : bool
        Preprocess everything once up front and keep it in memory (float16) — right for
        phantoms and small local sets; leave off for RSNA-sized data (prepared on the fly,
        in DataLoader workers).
    progress : bool
        Show a progress bar while caching.
    """

    def __init__(
        self,
        items: Sequence[LabelledImage],
        size: int,
        *,
        clahe: bool = False,
        cache: bool = False,
        progress: bool = False,
    ) -> None:
        self.items = list(items)
        self.size = size
        self.clahe = clahe
        self._cache: Tensor | None = None
        if cache:
            tensors = [
                self._prepare(item)
                for item in tqdm(self.items, desc="preprocess", disable=not progress, leave=False)
            ]
            self._cache = (
                torch.stack(tensors).to(torch.float16)
                if tensors
                else torch.empty(0, 1, size, size, dtype=torch.float16)
            )

    def _prepare(self, item: LabelledImage) -> Tensor:
        return prepare(load_image(item.image), self.size, clahe=self.clahe).tensor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        item = self.items[index]
        x = self._cache[index].float() if self._cache is not None else self._prepare(item)
        age = torch.tensor(item.age_months, dtype=torch.float32)
        male = torch.tensor(1.0 if item.male else 0.0)
        return x, age, male


def conformal_quantile(residuals: np.ndarray, level: float) -> float:
    """Split-conformal quantile of absolute residuals.

    Parameters
    ----------
    residuals : numpy.ndarray
        Absolute residuals on a calibration set (n values).
    level : float
        Target coverage, e.g. 0.9.

    Returns
    -------
    float
        The ``ceil((n + 1) * level)``-th smallest residual, which gives coverage ≥ level
        for an exchangeable new example; ``math.inf`` when that rank exceeds n (fewer
        than :func:`calibration_size_needed` residuals): no finite interval has the
        guarantee then.
    """
    r = np.sort(np.abs(np.asarray(residuals, dtype=np.float64)))
    if r.size == 0:
        raise ValueError("no residuals to calibrate on")
    rank = math.ceil((r.size + 1) * level)
    if rank > r.size:
        return math.inf
    return float(r[rank - 1])


def calibration_size_needed(level: float) -> int:
    """The fewest calibration residuals that give a finite :func:`conformal_quantile`.

    Parameters
    ----------
    level : float
        Target coverage in (0, 1).

    Returns
    -------
    int
        The smallest n with ``ceil((n + 1) * level) <= n``, i.e. n ≥ level / (1 − level):
        4 for 0.8, 9 for 0.9, 19 for 0.95.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = 1
    # counted with the arithmetic conformal_quantile uses, so the two always agree
    while math.ceil((n + 1) * level) > n:
        n += 1
    return n
