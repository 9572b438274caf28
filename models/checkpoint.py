"""Checkpoint format: one ``.safetensors`` file, metadata as JSON under the key ``boneage``.

safetensors holds tensors and a str -> str metadata map and nothing executable, so a
checkpoint from elsewhere cannot run code when loaded (no pickle, no ``torch.load``).
The model id is the SHA-256 of the file's bytes; it is recorded with every result.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from models.net import ARCHITECTURES, BoneAgeNet, build_model
from models.preprocess import PREPROCESS_VERSION

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""Newest metadata layout: 2 adds ``clahe``, 3 a ``preprocess_version`` other than 1. A
checkpoint is written as the oldest version that holds what it says (see
:attr:`CheckpointMeta.format_version`)."""

READABLE_FORMAT_VERSIONS: tuple[int, ...] = (1, 2, 3)
"""Metadata layouts :meth:`CheckpointMeta.from_json` reads."""

METADATA_KEY = "boneage"
"""safetensors metadata key holding the JSON of :class:`CheckpointMeta`."""

DEFAULT_TARGET_MEAN = 127.0
"""Default bone-age mean (months) for the z-scored target, close to the RSNA training set."""

DEFAULT_TARGET_SD = 41.0
"""Default bone-age SD (months) for the z-scored target, close to the RSNA training set."""

LEGACY_PREPROCESS_VERSION = 1
"""The preprocessing version of a checkpoint whose metadata names none: written before the
version was recorded, by releases that all prepared images as version 1."""

INTERVAL_LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)
"""Coverage levels of the split-conformal prediction intervals."""


def software_version() -> str:
    """Return the installed boneage-worker version (``"unknown"`` when not installed)."""
    try:
        return importlib_metadata.version("boneage-worker")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite, at any depth, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


#: The largest network input a checkpoint may name: BONEAGE_INPUT_SIZE's bound
#: (worker.settings, which a test keeps equal). A warm-up at 30 000 px needs tens of GB.
MAX_INPUT_SIZE = 2048


@dataclass
class CheckpointMeta:
    """What a checkpoint says about its model.

    Attributes
    ----------
    arch : str
        Trunk architecture (``resnet18``/``resnet34``/``resnet50``).
    input_size : int
        Side of the square network input, pixels.
    target_mean, target_sd : float
        Mean and SD (months) used to z-score the bone-age target.
    trained : bool
        False for a randomly initialised model; outputs must say so.
    data : str
        Description of the training data.
    metrics : dict
        Validation metrics (e.g. ``{"mae": 6.1}``).
    quantiles : dict
        Split-conformal absolute-residual quantiles in months, keyed by level as a string
        (``{"0.8": q, "0.9": q, "0.95": q}``), each finite; a level is absent when the
        calibration set was too small for it, all are when unknown.
    head_hidden : int
        Width of the head's hidden layer.
    software_version : str
        boneage-worker version that wrote the checkpoint.
    created : str
        ISO 8601 UTC creation time ("" for the deterministic untrained model).
    clahe : bool
        The model was trained on CLAHE-equalised inputs
        (:func:`~models.preprocess.apply_clahe`); inference must preprocess the same way,
        which needs OpenCV.
    preprocess_version : int
        The :data:`~models.preprocess.PREPROCESS_VERSION` of the preprocessing the model
        was trained on (default: this software's). A checkpoint of another version is
        refused on load (:func:`model_from_bytes`); one whose metadata names none was
        written before the version was recorded and is version 1
        (:data:`LEGACY_PREPROCESS_VERSION`).
    format_version : int
        Metadata layout version, derived (not an argument): 3 when ``preprocess_version``
        is not 1, else 2 when ``clahe`` is set, else 1. Releases before ``clahe`` existed
        read only version 1 and would drop the field they do not know (with a warning)
        and serve the model without CLAHE; version 2 makes them refuse the file instead.
        Version 3 does the same for the releases before ``preprocess_version``, which
        would prepare the images as version 1.
    extra : dict
        Free-form additional information (training settings, seed, ...).
    """

    arch: str = "resnet50"
    input_size: int = 512
    target_mean: float = DEFAULT_TARGET_MEAN
    target_sd: float = DEFAULT_TARGET_SD
    trained: bool = False
    data: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    quantiles: dict[str, float] = field(default_factory=dict)
    head_hidden: int = 256
    software_version: str = field(default_factory=software_version)
    created: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    clahe: bool = False
    preprocess_version: int = PREPROCESS_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        for name in ("trained", "clahe"):  # "false" in the JSON would read as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # A checkpoint's metadata is read from a file: each value of the type it is used
        # as, or a worker fails at its warm-up, or at every image, with no word of why.
        for name in ("arch", "data", "software_version", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")
        for name in ("metrics", "quantiles", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be an object, got {getattr(self, name)!r}")
        for name, low, high in (("input_size", 32, MAX_INPUT_SIZE), ("head_hidden", 1, 4096)):
            value = getattr(self, name)
            # bounded: the network (its head built before the weights' shapes are
            # compared) and the warm-up's image are made at these sizes
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"{name} must be a whole number from {low} to {high}, got {value!r}"
                )
        for name in ("target_mean", "target_sd"):
            if isinstance(getattr(self, name), bool) or not isinstance(
                getattr(self, name), int | float
            ):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        version = self.preprocess_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"preprocess_version must be a whole number from 1, got {version!r}")
        self.format_version = 3 if version != 1 else 2 if self.clahe else 1
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if not math.isfinite(self.target_mean):
            raise ValueError(f"target_mean must be a finite number, got {self.target_mean}")
        if not 0 < self.target_sd < math.inf:
            raise ValueError(f"target_sd must be positive and finite, got {self.target_sd}")
        for name, value in self.metrics.items():
            # left out where undefined (R² of one image)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
        bounds: dict[float, float] = {}
        for level, q in self.quantiles.items():
            number = _level(level)
            if (
                number is None
                or number in bounds  # "0.9" and "0.90": one would silently win
                or isinstance(q, bool)
                or not isinstance(q, int | float)
                or not 0 <= q < math.inf
            ):
                raise ValueError(f"bad conformal quantile {level!r}: {q!r}")
            bounds[number] = q
        ordered = [bounds[level] for level in sorted(bounds)]
        if ordered != sorted(ordered):  # a wider interval at a lower level would not nest
            raise ValueError(f"conformal quantiles do not grow with their level: {self.quantiles}")

    def intervals_available(self) -> bool:
        """Return whether the checkpoint carries conformal quantiles."""
        return bool(self.quantiles)

    def to_json(self) -> str:
        """Serialise to the JSON string stored in the safetensors metadata.

        A version-1 checkpoint is written without ``clahe``, as releases before it wrote
        one.
        """
        raw = dataclasses.asdict(self)
        if self.format_version == 1:
            del raw["clahe"]
        # strict JSON, which every reader parses: a NaN or infinity in ``extra`` (a
        # training loss that diverged in one epoch of the history) is written as null
        return json.dumps(_finite_or_null(raw), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        """Parse the JSON written by :meth:`to_json`.

        Raises
        ------
        ValueError
            If the text is not JSON of a supported format version or a field is wrong.
        """
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:  # TypeError: no text at all
            raise ValueError(f"checkpoint metadata is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError("checkpoint metadata is not a JSON object")
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported checkpoint format version {version!r} (this code reads "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        if version == 1 and raw.get("clahe"):
            # a version-1 reader would drop it: no writer puts it into a version-1 file
            raise ValueError("checkpoint metadata of format version 1 says clahe")
        # written before the version was recorded: the preprocessing of those releases
        raw.setdefault("preprocess_version", LEGACY_PREPROCESS_VERSION)
        if version in (1, 2) and raw["preprocess_version"] != 1:
            # a reader of those layouts would ignore it: no writer puts it there
            raise ValueError(
                f"checkpoint metadata of format version {version} says preprocess_version "
                f"{raw['preprocess_version']!r}"
            )
        fields = dataclasses.fields(cls)
        unknown = sorted(set(raw) - {f.name for f in fields})
        if unknown:
            logger.warning("ignoring unknown checkpoint metadata fields %s", unknown)
        arguments = {f.name for f in fields if f.init}
        # Every writer has written each of them (clahe from format 2, preprocess_version
        # from 3): one left out would take its default here, a target mean of 127 months
        # for a model trained on others, and every bone age would be wrong.
        absent = sorted(arguments - set(raw) - {"clahe", "preprocess_version"})
        if absent:
            raise ValueError(f"checkpoint metadata lacks {', '.join(absent)}")
        metrics = raw.get("metrics")
        if isinstance(metrics, dict):  # earlier checkpoints wrote R² of one image as NaN
            raw["metrics"] = {
                k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)
            }
        try:
            return cls(**{k: v for k, v in raw.items() if k in arguments})
        except TypeError as exc:
            raise ValueError(f"checkpoint metadata is incomplete or malformed: {exc}") from exc


def _level(text: Any) -> float | None:
    """The coverage level a conformal quantile's key names, between 0 and 1; else None."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if 0.0 < number < 1.0 else None


@dataclass
class LoadedModel:
    """A model ready for inference with its metadata and id.

    Attributes
    ----------
    model : BoneAgeNet
        The network (eval mode).
    meta : CheckpointMeta
        Its metadata.
    model_id : str
        SHA-256 hex digest of the checkpoint bytes.
    """

    model: BoneAgeNet
    meta: CheckpointMeta
    model_id: str


def _state_tensors(model: BoneAgeNet) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def checkpoint_bytes(model: BoneAgeNet, meta: CheckpointMeta) -> bytes:
    """Serialise a model and its metadata to safetensors bytes.

    Parameters
    ----------
    model : BoneAgeNet
        The model to store.
    meta : CheckpointMeta
        Its metadata; ``meta.arch`` must match the model.

    Returns
    -------
    bytes
        The file content; its SHA-256 is the model id.
    """
    if meta.arch != model.arch:
        raise ValueError(f"metadata says {meta.arch!r} but the model is {model.arch!r}")
    return save_safetensors(_state_tensors(model), metadata={METADATA_KEY: meta.to_json()})


def check_checkpoint_path(path: str | os.PathLike[str]) -> None:
    """Refuse a destination :func:`save_checkpoint` could not write, before any work.

    Training writes its checkpoint only at the end: a folder that is missing or not
    writable would otherwise be found after the whole run.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.safetensors`` file.

    Raises
    ------
    ValueError
        If ``path`` is a folder, or its folder does not exist, is not a folder, or does
        not let a file be created in it (tried: a temporary file, removed at once).
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"cannot write the checkpoint {target}: it is a folder")
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"cannot write the checkpoint {target}: its folder {folder} {problem}")
    if (why := why_no_file_can_be_created_in(folder)) is not None:
        raise ValueError(
            f"cannot write the checkpoint {target}: no file can be created in {folder} ({why})"
        )


def why_no_file_can_be_created_in(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None where one can (tried: a
    temporary file, removed at once)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return str(exc.strerror or exc)
    os.close(fd)
    Path(name).unlink(missing_ok=True)
    return None


def save_checkpoint(path: str | os.PathLike[str], model: BoneAgeNet, meta: CheckpointMeta) -> str:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.safetensors`` file; its folder must exist
        (:func:`check_checkpoint_path` says so before the work that makes the model).
    model : BoneAgeNet
        The model to store.
    meta : CheckpointMeta
        Its metadata.

    Returns
    -------
    str
        The model id: SHA-256 hex digest of the bytes written.
    """
    target = Path(path)
    data = checkpoint_bytes(model, meta)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    model_id = hashlib.sha256(data).hexdigest()
    logger.info("saved checkpoint %s (%s, model id %s)", target, meta.arch, model_id[:12])
    return model_id


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read_header_metadata(data: bytes, name: str) -> dict[str, str]:
    """Read the ``__metadata__`` map of a safetensors header without loading tensors."""
    if len(data) < 8:
        raise ValueError(f"{name} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise ValueError(f"{name} is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{name} is not a safetensors file (header is not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{name} has malformed safetensors metadata")
    return meta


def check_preprocess_version(meta: CheckpointMeta, name: str = "checkpoint") -> None:
    """Refuse a model trained on images prepared otherwise than this software prepares them.

    Parameters
    ----------
    meta : CheckpointMeta
        The checkpoint's metadata.
    name : str
        How to name the checkpoint in the error.

    Raises
    ------
    ValueError
        If ``meta.preprocess_version`` is not :data:`~models.preprocess.PREPROCESS_VERSION`:
        the model would be given inputs it was not trained on, and its bone ages would
        be wrong without any sign of it.
    """
    if meta.preprocess_version != PREPROCESS_VERSION:
        raise ValueError(
            f"{name} was trained on images prepared as preprocessing version "
            f"{meta.preprocess_version}, and this software prepares them as version "
            f"{PREPROCESS_VERSION}: the model would be given inputs it was not trained on. "
            f"Use it with a release of preprocessing version {meta.preprocess_version}, or "
            "train it again with this one"
        )


def model_from_bytes(data: bytes, *, name: str = "checkpoint", device: str = "cpu") -> LoadedModel:
    """Build a :class:`LoadedModel` from checkpoint bytes.

    Parameters
    ----------
    data : bytes
        Content of a ``.safetensors`` checkpoint.
    name : str
        How to name the source in error messages.
    device : str
        Torch device to put the model on.

    Returns
    -------
    LoadedModel
        The model in eval mode, its metadata and id.

    Raises
    ------
    ValueError
        If the bytes are not a boneage checkpoint, do not fit the architecture, hold a
        NaN or infinite weight, or the model was trained on another preprocessing
        version than this software's (:data:`~models.preprocess.PREPROCESS_VERSION`).
    """
    raw_meta = _read_header_metadata(data, name)
    if METADATA_KEY not in raw_meta:
        raise ValueError(
            f"{name} is a safetensors file but not a boneage checkpoint "
            f"(no {METADATA_KEY!r} metadata)"
        )
    meta = CheckpointMeta.from_json(raw_meta[METADATA_KEY])
    check_preprocess_version(meta, name)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"{name} has unreadable tensors: {exc}") from exc
    model = build_model(arch=meta.arch, hidden=meta.head_hidden)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match architecture {meta.arch!r}: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [k for k, v in expected.items() if tuple(v.shape) != tuple(tensors[k].shape)]
    if wrong:
        raise ValueError(
            f"{name} does not match architecture {meta.arch!r}: wrong shapes for {wrong[:5]}"
        )
    # A NaN or infinite weight loads and predicts NaN for every image: refused here, where
    # the file can be named, not at the warm-up's first bone age. A sum is finite only if
    # every term is; a non-finite sum (or an overflow) is settled element by element: 6 ms
    # for ResNet-50's 25M weights here, where torch.isfinite on each took 35 ms.
    spoilt = [
        k
        for k, v in tensors.items()
        if v.is_floating_point()
        and not (bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all()))
    ]
    if spoilt:
        raise ValueError(
            f"{name} holds NaN or infinite values in {len(spoilt)} tensors {spoilt[:5]}: "
            "the model would predict nothing usable"
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return LoadedModel(model=model, meta=meta, model_id=hashlib.sha256(data).hexdigest())


def load_checkpoint(path: str | os.PathLike[str], *, device: str = "cpu") -> LoadedModel:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.safetensors`` file.
    device : str
        Torch device to put the model on.

    Returns
    -------
    LoadedModel
        The model in eval mode, its metadata, and the SHA-256 of the file as model id.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a boneage checkpoint, has an unknown architecture or format
        version, lacks tensors the architecture needs, or holds a NaN or infinite weight.
    """
    source = Path(path)
    data = source.read_bytes()
    loaded = model_from_bytes(data, name=str(source), device=device)
    logger.info(
        "loaded checkpoint %s (%s, trained=%s, model id %s)",
        source,
        loaded.meta.arch,
        loaded.meta.trained,
        loaded.model_id[:12],
    )
    return loaded


def untrained_model(*, arch: str = "resnet50", input_size: int = 512, seed: int = 0) -> LoadedModel:
    """Return a deterministic randomly initialised model (no checkpoint configured).

    Parameters
    ----------
    arch : str
        Trunk architecture.
    input_size : int
        Network input side, pixels.
    seed : int
        Seed of the initialisation; the global RNG state is left untouched.

    Returns
    -------
    LoadedModel
        ``meta.trained`` is False and there are no conformal quantiles; the model id is the
        SHA-256 of the safetensors serialisation, identical in every process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch=arch)
    meta = CheckpointMeta(
        arch=arch,
        input_size=input_size,
        trained=False,
        data=f"none: random initialisation (seed {seed})",
        created="",
        extra={"seed": seed},
    )
    data = checkpoint_bytes(model, meta)
    model.eval()
    model_id = hashlib.sha256(data).hexdigest()
    logger.warning(
        "using an UNTRAINED %s model (id %s): outputs are meaningless", arch, model_id[:12]
    )
    return LoadedModel(model=model, meta=meta, model_id=model_id)
