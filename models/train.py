"""Train a :class:`~models.net.BoneAgeNet` and write a checkpoint with conformal intervals.

:func:`train` is what ``boneage-worker train`` calls. The data are a list of
:class:`~models.data.LabelledImage` (:func:`~models.data.read_rsna`,
:func:`~models.data.phantom_items`, or images the caller decoded). Split: by patient
(``LabelledImage.group``), stratified by sex and age
(:func:`~models.data.stratified_split`). Optimiser AdamW; schedule cosine with warm-up
(per step) or reduce-on-plateau (per epoch, on validation MAE); early stopping on
validation MAE; the best epoch's weights are kept. On CUDA: mixed precision and
channels-last. The checkpoint carries validation metrics and split-conformal quantiles of
the absolute validation residuals at 80/90/95 % (a level is left out when the validation
split is too small for a finite one: :func:`~models.data.calibration_size_needed`).

Resuming: with ``state_dir`` set, the training state is written after every epoch as
``train_state-<digest>.safetensors`` (weights, best weights, optimiser tensors, the CPU's
random state and, on CUDA, the GPU's) plus ``train_state.json`` (counters, history,
schedule, configuration, the name and SHA-256 of the tensors file and
:func:`data_fingerprint` of the data) — no pickle. The tensors go under a new name first,
then the JSON that names them replaces the old one, then the old tensors are removed:
a run killed at any point leaves a JSON whose tensors file is there (:func:`_save_state`;
a state of the earlier layout, ``train_state.safetensors``, is still resumed). ``resume=True``
continues from there, and refuses other data or other training settings (only
``patience``, and ``epochs`` with the plateau schedule, may change;
:data:`RESUME_MAY_CHANGE`): a resumed run's learning rates are those of the same run
uninterrupted. The cosine schedule is planned over ``epochs`` when a run starts, and the
plan (its steps) is kept in the state and the checkpoint. A state folder that holds a saved
run is not overwritten by a new one unless ``restart=True``. :func:`check_destinations`
refuses what could not be written, or resumed, before any image is read.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.checkpoint import (
    INTERVAL_LEVELS,
    LEGACY_PREPROCESS_VERSION,
    MAX_INPUT_SIZE,
    CheckpointMeta,
    check_checkpoint_path,
    save_checkpoint,
)
from models.data import (
    IMAGE_GROUP,
    LabelledImage,
    PreparedDataset,
    calibration_size_needed,
    conformal_quantile,
    source_counts,
    split_groups,
    stratified_split,
)
from models.evaluate import predict_ages, regression_metrics
from models.net import BoneAgeNet, build_model
from models.predictor import cuda_computes_bfloat16, resolve_device
from models.preprocess import PREPROCESS_VERSION, require_clahe

logger = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
"""The tensors file of a state saved before they were named by their digest."""
STATE_JSON = "train_state.json"
_TENSORS_NAME = re.compile(r"train_state-[0-9a-f]{16}\.safetensors")
_STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Training settings (all stored in the checkpoint's ``extra["train_config"]``).

    Attributes
    ----------
    arch : str
        ``resnet18``/``resnet34``/``resnet50``.
    input_size : int
        Network input side, pixels.
    pretrained : {"imagenet", None}
        Start the trunk from torchvision's ImageNet weights.
    epochs : int
        Maximum number of epochs.
    batch_size : int
        Images per step.
    lr, weight_decay : float
        AdamW settings.
    loss : {"l1", "mse", "huber"}
        Loss on the z-scored target.
    huber_delta : float
        Huber threshold in z units (0.25 ≈ 10 months with an SD of 41).
    schedule : {"cosine", "plateau"}
        Learning-rate schedule.
    warmup_steps : int
        Linear warm-up steps of the cosine schedule.
    patience : int
        Early stopping: epochs without a better validation MAE before stopping.
    val_fraction : float
        Share of the patients held out for validation and conformal calibration, to the
        nearest whole patient (:func:`~models.data.validation_group_count`); the shares
        of patients and images held out are logged and recorded in the checkpoint's
        ``extra["split"]``.
    augment : bool
        Random flip, rotation, scale, shift, brightness and contrast.
    amp : bool
        Mixed precision on CUDA (ignored on CPU).
    clahe : bool
        CLAHE in preprocessing.
    cache : bool or None
        Preprocess everything once in memory; ``None``: only when all images are arrays.
    num_workers : int
        DataLoader worker processes (preprocessing in parallel).
    seed : int
        Seed of the split, the initialisation, the shuffling and the augmentation.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    head_hidden, dropout : int, float
        Head settings.
    data_description : str
        Text for the checkpoint's ``data`` field.
    version : str
        Model version written into outputs (``meta.extra["version"]``); empty: none.
    """

    arch: str = "resnet50"
    input_size: int = 512
    pretrained: Literal["imagenet"] | None = None
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    loss: Literal["l1", "mse", "huber"] = "l1"
    huber_delta: float = 0.25
    schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_steps: int = 100
    patience: int = 6
    val_fraction: float = 0.15
    augment: bool = True
    amp: bool = True
    clahe: bool = False
    cache: bool | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    head_hidden: int = 256
    dropout: float = 0.2
    data_description: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if self.loss not in ("l1", "mse", "huber"):
            raise ValueError(f"loss must be l1, mse or huber, got {self.loss!r}")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be cosine or plateau, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be at least 1")
        # here, not when the checkpoint is written after the last epoch (which refuses it)
        if not 32 <= self.input_size <= MAX_INPUT_SIZE:
            raise ValueError(
                f"input_size must be from 32 to {MAX_INPUT_SIZE}, got {self.input_size}"
            )
        # here, not only in stratified_split: before a folder of images is read
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    checkpoint : pathlib.Path
        The checkpoint written.
    model_id : str
        Its SHA-256.
    meta : CheckpointMeta
        Its metadata (metrics, quantiles, ...).
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``train_mae``, ``val_mae``, ``lr``.
    best_epoch : int
        Epoch (1-based) whose weights were kept.
    """

    checkpoint: Path
    model_id: str
    meta: CheckpointMeta
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def make_loss(config: TrainConfig) -> nn.Module:
    """Return the loss module of a configuration."""
    if config.loss == "mse":
        return nn.MSELoss()
    if config.loss == "huber":
        return nn.HuberLoss(delta=config.huber_delta)
    return nn.L1Loss()


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random flip, rotation (±15°), scale (0.9–1.1), shift (±5 %), contrast and brightness.

    Parameters
    ----------
    x : Tensor
        Standardised images ``(N, 1, S, S)``.
    generator : torch.Generator
        Source of randomness, on ``x``'s device.

    Returns
    -------
    Tensor
        Augmented images, same shape.
    """
    n = x.shape[0]
    dev = x.device

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(n, device=dev, generator=generator) * (high - low) + low

    angle = uniform(-15.0, 15.0) * (math.pi / 180.0)
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = uniform(-0.05, 0.05)
    theta[:, 1, 2] = uniform(-0.05, 0.05)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1)
    brightness = uniform(-0.2, 0.2).view(n, 1, 1, 1)
    return (out * contrast + brightness).to(x.dtype)


def _cosine_factor(step: int, total: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    progress = min(1.0, step / max(1, total))
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@dataclass
class _Progress:
    epoch_done: int = 0
    step: int = 0
    best_mae: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _save_state(
    folder: Path,
    *,
    device: torch.device,
    model: BoneAgeNet,
    best: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    scaler: torch.amp.GradScaler,
    progress: _Progress,
    config: TrainConfig,
    target: tuple[float, float],
    fingerprint: str,
    val_fingerprint: str,
    schedule: dict[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in _cpu_state(model).items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    opt_state = optimizer.state_dict()
    for index, values in opt_state["state"].items():
        for name, value in values.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":  # dropout on the GPU draws from its generator, not the CPU's
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    data = save_safetensors(tensors)
    digest = hashlib.sha256(data).hexdigest()
    # Under a name of its own, never over the file the JSON names: a run killed between
    # the two writes leaves the previous epoch's pair whole (it was a tensors file the
    # JSON did not match, and a resume refused: the run lost).
    name = f"train_state-{digest[:16]}.safetensors"
    _atomic_write(folder / name, data)
    state = {
        "version": _STATE_VERSION,
        "tensors": name,
        "tensors_sha256": digest,
        "progress": dataclasses.asdict(progress),
        "param_groups": opt_state["param_groups"],
        "plateau": plateau.state_dict() if plateau is not None else None,
        "scaler": scaler.state_dict(),
        "schedule": schedule,
        "config": dataclasses.asdict(config),
        "target": list(target),
        "data_sha256": fingerprint,
        "val_sha256": val_fingerprint,
        "preprocess_version": PREPROCESS_VERSION,
    }
    _atomic_write(folder / STATE_JSON, json.dumps(state, indent=1).encode())
    # the JSON names the new tensors now: the earlier ones (and the old layout's) can go,
    # and what a run killed while writing tensors left (each the size of the state)
    for stale in _tensor_files(folder):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    for partial in folder.glob(".train_state-*.safetensors.tmp"):
        partial.unlink(missing_ok=True)


def _tensor_files(folder: Path) -> list[Path]:
    """The tensors files of saved states in ``folder``, of either layout."""
    if not folder.is_dir():
        return []
    return [
        path
        for path in folder.iterdir()
        if path.name == STATE_TENSORS or _TENSORS_NAME.fullmatch(path.name)
    ]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, and durably: the file, then its folder's entry,
    synced (the state's two files are written in order, and must land in that order)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError as exc:
        # a file system that syncs no folder (some network and FUSE ones): the rename
        # stands, as it did before the folder was synced
        if exc.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(directory)


#: How a file system that cannot sync a folder refuses to.
_NO_FOLDER_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


RESUME_MAY_CHANGE = frozenset(
    {"epochs", "patience", "num_workers", "device", "cache", "data_description", "version"}
)
"""The :class:`TrainConfig` fields a resumed run may change: how long it goes on (``epochs``
with the plateau schedule only: the cosine schedule is planned over the epochs, see
:func:`_resume_conflicts`), and how and where it runs and is described. Every other one is
what the saved run trained with (its learning rate, batch size, weight decay, loss,
warm-up, dropout, precision, ...): a resumed run with another would be recorded in the
checkpoint as trained with it throughout, and the cosine schedule would jump."""


def _resume_conflicts(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"lr was 0.0003, now 0.05"`` for each setting ``config`` changes but may not.

    ``epochs`` is one of them with the cosine schedule: the saved run's learning rates
    followed a cosine over its epochs, and another number of epochs would move the
    curve under the rest of the run (the rate jumps, and the run no longer ends at zero
    where it stops), while the checkpoint said it followed one curve throughout.
    """
    conflicts = []
    for spec in dataclasses.fields(TrainConfig):
        # a field the saved run's code did not have yet: it trained with its default
        before, now = saved.get(spec.name, spec.default), getattr(config, spec.name)
        if before == now:
            continue
        if spec.name == "epochs" and config.schedule == "cosine":
            conflicts.append(
                f"epochs was {before!r}, now {now!r} (the cosine schedule of the saved run "
                f"is planned over {before!r} epochs: its learning rates would jump)"
            )
        elif spec.name not in RESUME_MAY_CHANGE:
            conflicts.append(f"{spec.name} was {before!r}, now {now!r}")
    return conflicts


def _saved_config(folder: Path) -> dict[str, Any]:
    """The saved run's state (``train_state.json``), its version checked and its tensors
    file there."""
    state_path = folder / STATE_JSON
    if not state_path.is_file():
        raise FileNotFoundError(f"no training state to resume in {folder}")
    state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8"))
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{state_path}: unsupported training-state version {state.get('version')}")
    if not _state_tensors(folder, state).is_file():
        raise FileNotFoundError(f"no training state to resume in {folder}")
    return state


def _state_tensors(folder: Path, state: dict[str, Any]) -> Path:
    """The tensors file a saved state names (one of the earlier layout: its fixed name)."""
    name = state.get("tensors", STATE_TENSORS)
    if not isinstance(name, str) or not (name == STATE_TENSORS or _TENSORS_NAME.fullmatch(name)):
        raise ValueError(f"{folder / STATE_JSON}: names no tensors file of a state ({name!r})")
    return folder / name


def _check_resumable(folder: Path, state: dict[str, Any], config: TrainConfig) -> None:
    # a state written before the version was recorded: that of those releases
    saved_preprocess = state.get("preprocess_version", LEGACY_PREPROCESS_VERSION)
    if saved_preprocess != PREPROCESS_VERSION:
        raise ValueError(
            f"cannot resume: the run in {folder} trained on images prepared as "
            f"preprocessing version {saved_preprocess}, and this software prepares them as "
            f"version {PREPROCESS_VERSION}; start a new run (--restart)"
        )
    if "val_sha256" not in state:
        # known before any image is read: a release whose split was another's
        raise ValueError(
            f"cannot resume: the run in {folder} was saved by a release that did not record "
            "the images it validated on, and this one may split them otherwise (it would "
            "train on images the run validated on); start a new run (--restart)"
        )
    conflicts = _resume_conflicts(state["config"], config)
    if conflicts:
        raise ValueError(
            f"cannot resume: {'; '.join(conflicts)} (the run in {folder} trained with the "
            "former; a resumed run may change only patience, and epochs with the plateau "
            "schedule; --restart to train anew with these settings)"
        )


def check_destinations(
    output: str | Path,
    state_dir: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    restart: bool = False,
) -> None:
    """Refuse, before any image is read, a run whose results could not be written or
    that would resume wrongly or overwrite a saved run.

    :func:`train` calls it first; a command that reads its data before calling
    :func:`train` calls it before that.

    Parameters
    ----------
    output : str or pathlib.Path
        The checkpoint to write (:func:`~models.checkpoint.check_checkpoint_path`).
    state_dir : str or pathlib.Path, optional
        Folder of the per-epoch training state.
    config : TrainConfig, optional
        With ``resume``: the settings checked against the saved run's.
    resume : bool
        Continue the run saved in ``state_dir``.
    restart : bool
        Train anew in a ``state_dir`` that holds a saved run, replacing it.

    Raises
    ------
    ValueError
        If the checkpoint cannot be written; ``resume`` or ``restart`` is given without
        ``state_dir``, or both are; ``state_dir`` holds a saved run and neither is given;
        the state folder is not a writable folder; or ``config`` changes a setting the
        saved run trained with (each named, with its old and new value).
    FileNotFoundError
        If ``resume`` and ``state_dir`` holds no saved run.
    """
    check_checkpoint_path(output)
    if state_dir is None:
        if resume or restart:
            raise ValueError(f"{'resume' if resume else 'restart'}=True needs state_dir")
        return
    if resume and restart:
        raise ValueError("resume and restart exclude each other: continue the run, or replace it")
    folder = Path(state_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the training-state folder {folder} is not a folder")
    if resume:
        state = _saved_config(folder)
        if config is not None:
            _check_resumable(folder, state, config)
    elif _holds_a_run(folder) and not restart:
        raise ValueError(
            f"{folder} holds a saved training run{_saved_epochs(folder)}: --resume to "
            "continue it, --restart to train anew and replace it, or another state folder"
        )
    try:  # it is written after the first epoch: found unwritable then, an epoch is lost
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ValueError(
            f"cannot write the training state into {folder} ({exc.strerror or exc})"
        ) from exc
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def _holds_a_run(folder: Path) -> bool:
    return (folder / STATE_JSON).exists() or bool(_tensor_files(folder))


def _saved_epochs(folder: Path) -> str:
    """``" (3 of 30 epochs done)"``, or ``""`` where the state cannot be read."""
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        return f" ({state['progress']['epoch_done']} of {state['config']['epochs']} epochs done)"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def data_fingerprint(items: Sequence[LabelledImage]) -> str:
    """SHA-256 of the labelled data: the sorted ``(key, age, male, group)`` of every image.

    Parameters
    ----------
    items : sequence of LabelledImage
        The training data.

    Returns
    -------
    str
        Hex digest; equal for the same images, labels and patients in any order.
    """
    rows = sorted((it.key, float(it.age_months), bool(it.male), it.group) for it in items)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _fingerprints(items: Sequence[LabelledImage]) -> set[str]:
    """:func:`data_fingerprint` of ``items``, and the one an earlier release saved for
    them where that release split them the same: it left an image with no patient its
    own group (``""``), which this one names by its SOP Instance UID
    (:data:`~models.data.IMAGE_GROUP`), the same split where no image is listed twice.
    A run saved before the upgrade then resumes."""
    fingerprints = {data_fingerprint(items)}
    own = [item.group for item in items if item.group.startswith(IMAGE_GROUP)]
    if own and len(set(own)) == len(own):
        earlier = [
            dataclasses.replace(item, group="") if item.group.startswith(IMAGE_GROUP) else item
            for item in items
        ]
        fingerprints.add(data_fingerprint(earlier))
    return fingerprints


def _load_state(
    folder: Path, config: TrainConfig, fingerprints: set[str]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = _saved_config(folder)
    state_path, tensor_path = folder / STATE_JSON, _state_tensors(folder, state)
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != state["tensors_sha256"]:
        raise ValueError(f"{tensor_path} does not match {state_path} (interrupted write?)")
    _check_resumable(folder, state, config)
    if "data_sha256" not in state:  # written before the fingerprint existed
        logger.warning("%s has no fingerprint of its data: cannot check it is the same", state_path)
    elif state["data_sha256"] not in fingerprints:
        raise ValueError(
            "cannot resume: the training data changed (other images, labels or patients "
            f"than the run in {folder} trained on); start a new run in another state folder"
        )
    return state, load_safetensors(data)


def _restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """Give ``scaler`` the saved run's state; a run saved with its scaler off (on the CPU,
    in bfloat16, ``amp`` off) saved ``{}``, which an enabled scaler refuses: it starts
    from its initial scale, as a new run does."""
    if not saved:
        if scaler.is_enabled():
            logger.info("the saved run scaled no float16 gradients: the scaler starts afresh")
        return
    scaler.load_state_dict(saved)


def _restore_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    """Restore the saved random state: the CPU's, and on CUDA the GPU's (dropout there
    draws from it). A state saved on the CPU, or by a release that kept no GPU state,
    leaves the GPU's generator as seeded; a GPU's state is ignored on the CPU."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type != "cuda":
        return
    saved = tensors.get("rng.cuda")
    if saved is None:
        logger.warning(
            "the saved run kept no random state of a GPU (saved on the CPU, or by an "
            "earlier release): dropout on %s does not draw what the run uninterrupted would",
            device,
        )
        return
    try:
        torch.cuda.set_rng_state(saved, device)
    except (RuntimeError, ValueError) as exc:  # another kind of generator state
        logger.warning("cannot restore the GPU's random state on %s (%s)", device, exc)


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]], tensors: dict[str, Tensor]
) -> None:
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


def train(
    items: Sequence[LabelledImage],
    output: str | Path,
    *,
    config: TrainConfig | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a model and write its checkpoint.

    Parameters
    ----------
    items : sequence of LabelledImage
        All labelled images; a validation split is held out (``config.val_fraction``).
    output : str or pathlib.Path
        Checkpoint file to write (``.safetensors``).
    config : TrainConfig, optional
        Settings; defaults to ``TrainConfig()``.
    state_dir : str or pathlib.Path, optional
        Folder for the per-epoch training state (needed to resume). One that holds a
        saved run is refused unless ``resume`` or ``restart``.
    resume : bool
        Continue from the state in ``state_dir``, with the same data and training
        settings (only ``epochs`` and ``patience`` may change).
    restart : bool
        Train anew in a ``state_dir`` that holds a saved run: its state is replaced at
        the end of the first epoch.
    progress : bool
        Show progress bars (loss and MAE per step, the validation passes, validation
        MAE per epoch).

    Returns
    -------
    TrainResult
        Checkpoint path, model id, metadata and history.

    Raises
    ------
    ValueError
        Before any image is read: the checkpoint or the state cannot be written, or a
        saved run would be overwritten or resumed with other data or settings
        (:func:`check_destinations`); fewer than 10 images.

    Notes
    -----
    The validation split serves early stopping and conformal calibration alike: with many
    validation images the selection of one epoch out of a few dozen barely moves the
    residual quantiles, but the stated coverage is then approximate.
    """
    cfg = config or TrainConfig()
    folder = Path(state_dir) if state_dir is not None else None
    # before any image is read: the checkpoint is written only after the whole run
    check_destinations(output, folder, config=cfg, resume=resume, restart=restart)
    if restart and folder is not None and _holds_a_run(folder):
        logger.warning(
            "restart: the run saved in %s%s is replaced after this run's first epoch",
            folder,
            _saved_epochs(folder),
        )
    if cfg.clahe:
        require_clahe()  # before the data are read, not at the first batch
    if len(items) < 10:
        raise ValueError(f"need at least 10 labelled images, got {len(items)}")
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    amp = cfg.amp and cuda
    # bfloat16 only where the GPU computes it (Ampere on): a T4 or V100 emulates it,
    # slowly, where float16 with the gradient scaler runs on its tensor cores
    amp_dtype = torch.bfloat16 if cuda and cuda_computes_bfloat16(device) else torch.float16

    fingerprint = data_fingerprint(items)
    # the saved run's state and its checks, before any image is prepared
    resumed = (
        _load_state(folder, cfg, _fingerprints(items)) if resume and folder is not None else None
    )
    n_listed, n_missing = source_counts(items)
    if n_missing:
        logger.warning(
            "training without %d of the %d images the labels list (missing)", n_missing, n_listed
        )
    ages = [it.age_months for it in items]
    groups = split_groups(items)
    train_idx, val_idx = stratified_split(
        ages, [it.male for it in items], cfg.val_fraction, seed=cfg.seed, groups=groups
    )
    if not train_idx or not val_idx:
        empty = "validation" if train_idx else "training"
        raise ValueError(
            f"the split of {len(items)} images left no {empty} images: give more images "
            "(of more patients), or another val_fraction"
        )
    train_items = [items[i] for i in train_idx]
    val_items = [items[i] for i in val_idx]
    n_patients = len(set(groups))
    split = {
        "val_fraction": cfg.val_fraction,
        "val_patients": len({groups[i] for i in val_idx}),
        "patients": n_patients,
        "val_images": len(val_idx),
        "images": len(items),
    }
    # what was held out, as shares: a whole number of patients, of unequal image counts
    logger.info(
        "split by patient (val_fraction %g): validation %d of %d patients (%.1f %%), "
        "%d of %d images (%.1f %%)",
        cfg.val_fraction,
        split["val_patients"],
        n_patients,
        100.0 * split["val_patients"] / n_patients,
        len(val_idx),
        len(items),
        100.0 * len(val_idx) / len(items),
    )
    # the split is made again on resume: it must hold the same validation images (a
    # change of the splitting code, or of the order of images that tie, would otherwise
    # train on validation images and flatter its MAE and intervals)
    val_fingerprint = data_fingerprint(val_items)
    if resumed is not None and resumed[0].get("val_sha256") not in _fingerprints(val_items):
        raise ValueError(
            f"cannot resume: the run in {folder} validated on other images than this "
            "split holds (other images or labels, or images whose ages tie in another "
            "order); start a new run (--restart)"
        )
    train_ages = np.array([it.age_months for it in train_items], dtype=np.float64)
    target = (float(train_ages.mean()), float(max(train_ages.std(), 1.0)))
    logger.info(
        "training %s at %d px on %d images, validating on %d (%s)",
        cfg.arch,
        cfg.input_size,
        len(train_items),
        len(val_items),
        device,
    )

    cache = (
        cfg.cache
        if cfg.cache is not None
        else all(isinstance(it.image, np.ndarray) for it in items)
    )
    train_set = PreparedDataset(
        train_items, cfg.input_size, clahe=cfg.clahe, cache=cache, progress=progress
    )
    val_set = PreparedDataset(
        val_items, cfg.input_size, clahe=cfg.clahe, cache=cache, progress=progress
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(
            arch=cfg.arch, pretrained=cfg.pretrained, hidden=cfg.head_hidden, dropout=cfg.dropout
        )
    # Dropout draws from the global generator: seed it too, or two runs of the same
    # configuration train different models (a resumed run restores its saved state).
    torch.manual_seed(cfg.seed + 1)
    model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    # The learning-rate plan, fixed when the run starts: a resumed run follows the saved
    # one (its epochs cannot change with the cosine schedule: _resume_conflicts).
    schedule: dict[str, Any] = {
        "kind": cfg.schedule,
        "epochs": cfg.epochs,
        "total_steps": steps_per_epoch * cfg.epochs,
        "warmup_steps": cfg.warmup_steps,
    }
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
        if cfg.schedule == "plateau"
        else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    loss_fn = make_loss(cfg)
    state = _Progress()
    best = _cpu_state(model)

    if resumed is not None:
        saved, tensors = resumed
        target = (float(saved["target"][0]), float(saved["target"][1]))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        _restore_optimizer(optimizer, saved["param_groups"], tensors)
        if plateau is not None and saved["plateau"] is not None:
            plateau.load_state_dict(saved["plateau"])
        _restore_scaler(scaler, saved["scaler"])
        _restore_rng(tensors, device)
        state = _Progress(**saved["progress"])
        schedule = saved.get("schedule") or schedule  # a state from before it was saved
        logger.info("resuming after epoch %d (best MAE %.2f)", state.epoch_done, state.best_mae)

    mean, sd = target

    def validate(desc: str) -> np.ndarray:
        """The model's bone ages of the validation images, as the worker predicts them."""
        return predict_ages(
            model,
            val_set,
            target_mean=mean,
            target_sd=sd,
            device=device,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            progress=progress,
            desc=desc,
        )

    diverged = 0  # the epoch whose validation MAE was not finite
    for epoch in range(state.epoch_done, cfg.epochs):
        if state.bad_epochs >= cfg.patience:
            break
        model.train()
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        )
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=order.tolist(),
            drop_last=len(train_set) > cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=cuda,
        )
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        loss_sum = abs_sum = 0.0
        seen = 0
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False
        )
        for x, age, male in bar:
            x = x.to(device, non_blocking=True)
            if cfg.augment:
                x = augment_batch(x, aug_gen)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            z = ((age - mean) / sd).to(device)
            if plateau is None:
                factor = _cosine_factor(
                    state.step, schedule["total_steps"], schedule["warmup_steps"]
                )
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                pred = model(x, male.to(device))
            loss = loss_fn(pred.float(), z)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            n = x.shape[0]
            seen += n
            loss_sum += float(loss.detach()) * n
            abs_sum += float((pred.detach().float() - z).abs().sum()) * sd
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", mae=f"{abs_sum / seen:.1f}")
        val_pred = validate(f"validate {epoch + 1}/{cfg.epochs}")
        val_mae = float(np.mean(np.abs(val_pred - np.array([it.age_months for it in val_items]))))
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_mae": abs_sum / max(seen, 1),
            "val_mae": val_mae,
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        if not math.isfinite(val_mae):
            # the weights are NaN or infinite now (a learning rate too high, float16
            # overflow without the scaler): later epochs cannot recover, and this one is
            # not saved, so that a resume runs it again rather than from broken weights
            logger.error(
                "epoch %d: validation MAE is %s: training diverged; stopping", epoch + 1, val_mae
            )
            if progress:
                tqdm.write(f"epoch {epoch + 1}: validation MAE {val_mae}: training diverged")
            diverged = epoch + 1
            break
        state.history.append(record)
        if val_mae < state.best_mae:
            state.best_mae, state.best_epoch, state.bad_epochs = val_mae, epoch + 1, 0
            best = _cpu_state(model)
        else:
            state.bad_epochs += 1
        if plateau is not None:
            plateau.step(val_mae)
        state.epoch_done = epoch + 1
        logger.info(
            "epoch %d: train loss %.4f, train MAE %.2f, val MAE %.2f months%s",
            epoch + 1,
            record["train_loss"],
            record["train_mae"],
            val_mae,
            " (best)" if state.best_epoch == epoch + 1 else "",
        )
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: train MAE {record['train_mae']:.2f}, "
                f"val MAE {val_mae:.2f} months"
            )
        if folder is not None:
            _save_state(
                folder,
                device=device,
                model=model,
                best=best,
                optimizer=optimizer,
                plateau=plateau,
                scaler=scaler,
                progress=state,
                config=cfg,
                target=target,
                fingerprint=fingerprint,
                val_fingerprint=val_fingerprint,
                schedule=schedule,
            )
        if state.bad_epochs >= cfg.patience:
            logger.info("early stop: no better validation MAE for %d epochs", cfg.patience)

    if state.best_epoch == 0:
        raise ValueError(
            f"training diverged in epoch {diverged} (the validation MAE is not a "
            "number) before any epoch gave a usable model: no checkpoint written; try a "
            f"lower --lr than {cfg.lr:g}"
        )
    if diverged:
        logger.warning(
            "training diverged in epoch %d; the checkpoint holds epoch %d, the best before it",
            diverged,
            state.best_epoch,
        )
    model.load_state_dict(best)
    val_true = np.array([it.age_months for it in val_items], dtype=np.float64)
    val_pred = validate("calibrate")
    metrics = regression_metrics(val_pred, val_true)
    residuals = np.abs(val_pred - val_true)
    quantiles: dict[str, float] = {}
    for level in INTERVAL_LEVELS:
        q = conformal_quantile(residuals, level)
        if math.isfinite(q):
            quantiles[f"{level:g}"] = q
        else:  # no finite interval has the coverage: the SR then reports none at this level
            logger.warning(
                "no %g %% prediction interval in the checkpoint: it needs at least %d "
                "validation images (n >= level / (1 - level)), the split has %d",
                level * 100,
                calibration_size_needed(level),
                residuals.size,
            )
    meta = CheckpointMeta(
        arch=cfg.arch,
        input_size=cfg.input_size,
        target_mean=mean,
        target_sd=sd,
        trained=True,
        data=cfg.data_description or f"{len(items)} labelled images",
        # R² is undefined (NaN) for one validation image or one age: left out
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
        quantiles=quantiles,
        head_hidden=cfg.head_hidden,
        clahe=cfg.clahe,
        preprocess_version=PREPROCESS_VERSION,  # what PreparedDataset gave the model
        extra={
            "train_config": dataclasses.asdict(cfg),
            "n_train": len(train_items),
            "n_val": len(val_items),
            "split": split,
            # images the labels listed, and of those missing (trained without them)
            "n_listed": n_listed,
            "n_missing": n_missing,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch_done,
            "history": state.history,
            "lr_schedule": schedule,
            **({"version": cfg.version} if cfg.version else {}),
        },
    )
    model.to("cpu").to(memory_format=torch.contiguous_format)
    model_id = save_checkpoint(output, model, meta)
    logger.info(
        "validation MAE %.2f months; conformal 90%% half-width %.1f months",
        metrics.get("mae", math.nan),
        quantiles.get("0.9", math.nan),
    )
    return TrainResult(
        checkpoint=Path(output),
        model_id=model_id,
        meta=meta,
        history=state.history,
        best_epoch=state.best_epoch,
    )
