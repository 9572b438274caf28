"""Bone age, Grad-CAM and prediction intervals for one radiograph."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointMeta, LoadedModel
from models.fused import cpu_inference_copy, is_fused
from models.gradcam import predict_with_cam
from models.net import BoneAgeNet, fold_batch_norm
from models.preprocess import CropBox, Prepared, cam_to_image, prepare, require_clahe

logger = logging.getLogger(__name__)

MIN_BONE_AGE_MONTHS = 0.0
"""Lower bound of reported bone ages."""

MAX_BONE_AGE_MONTHS = 240.0
"""Upper bound of reported bone ages (20 years)."""


@dataclass
class Prediction:
    """Result of :meth:`BoneAgePredictor.predict`.

    Attributes
    ----------
    bone_age_months : float
        Estimated bone age, clipped to [0, 240] months
        (:data:`MIN_BONE_AGE_MONTHS`, :data:`MAX_BONE_AGE_MONTHS`).
    crop_cam : numpy.ndarray
        Grad-CAM map over the square crop the network saw, float32 ``(h, w)`` in [0, 1].
    crop_box : tuple of int
        ``(top, left, bottom, right)`` of that crop in image pixels.
    image_shape : tuple of int
        ``(H, W)`` of the image that was assessed.
    intervals : dict
        Coverage level (0.8, 0.9, 0.95) -> ``(low, high)`` months, from the checkpoint's
        split-conformal quantiles; empty when the checkpoint has none.
    raw_bone_age_months : float or None
        The model's estimate before clipping; None where it is not known (then taken as
        ``bone_age_months``). Outside [0, 240] months, the estimate is :attr:`clipped`.
    input_size : int or None
        Side of the network input the crop was resized to, which places the map's cells
        on the crop (:func:`~models.preprocess.cam_to_image`); None: the map's side times
        :data:`~models.net.FEATURE_STRIDE`.
    """

    bone_age_months: float
    crop_cam: np.ndarray
    crop_box: CropBox
    image_shape: tuple[int, int]
    intervals: dict[float, tuple[float, float]] = field(default_factory=dict)
    raw_bone_age_months: float | None = None
    input_size: int | None = None

    @property
    def clipped(self) -> bool:
        """Whether the model's estimate lay outside [0, 240] months, and
        :attr:`bone_age_months` is the limit it was clipped to, not the estimate.

        Such a number is not a bone age to compare with the patient's age: an infant's
        estimate of -9 months read as a bone age of 0 months and an SDS of -4.4 (found
        in review).
        """
        raw = self.raw_bone_age_months
        return raw is not None and not MIN_BONE_AGE_MONTHS <= raw <= MAX_BONE_AGE_MONTHS

    @cached_property
    def cam(self) -> np.ndarray:
        """Grad-CAM heat map over the full image, float32 ``(H, W)`` in [0, 1].

        Computed on first use: upsampling to a multi-megapixel image costs more than the
        heat-map picture needs (see :meth:`cam_at`).
        """
        return cam_to_image(
            self.crop_cam, self.crop_box, self.image_shape, input_size=self.input_size
        )

    def cam_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The heat map on an ``(h, w)`` grid covering the whole image (a resized image).

        Parameters
        ----------
        shape : tuple of int
            ``(h, w)`` of the resized image.

        Returns
        -------
        numpy.ndarray
            float32 ``(h, w)`` map in [0, 1], zero outside the crop.
        """
        height, width = self.image_shape
        if (int(shape[0]), int(shape[1])) == (height, width):
            return self.cam
        sy, sx = shape[0] / height, shape[1] / width
        top, left, bottom, right = self.crop_box
        box = (round(top * sy), round(left * sx), round(bottom * sy), round(right * sx))
        if box[2] <= box[0] or box[3] <= box[1]:
            box = (box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1))
        return cam_to_image(
            self.crop_cam, box, (int(shape[0]), int(shape[1])), input_size=self.input_size
        )


class DeviceFailure(RuntimeError):
    """The GPU itself failed during a forward pass (:func:`is_device_failure`): this
    process can assess nothing more, whatever the image, until it is restarted."""


#: What torch's messages start a CUDA, cuBLAS or cuDNN failure with (torch.OutOfMemoryError
#: says "CUDA out of memory", which passes once the memory is free, and is none of them).
_DEVICE_ERROR_WORDS = ("CUDA error", "CUBLAS_STATUS_", "cuDNN error", "CUDNN_STATUS_")


def is_device_failure(
    exc: BaseException,
    device: torch.device | str,
    *,
    probe: Callable[[torch.device], object] | None = None,
) -> bool:
    """Whether ``exc``, raised by work on ``device``, says the GPU itself failed.

    A CUDA error is sticky: after an illegal memory access, an uncorrectable ECC error or
    a GPU fallen off the bus, every later call in the process fails the same way, so an
    image that meets it is not at fault. Not every error that names CUDA, cuBLAS or
    cuDNN is: ``CUBLAS_STATUS_ALLOC_FAILED`` or ``CUDNN_STATUS_NOT_SUPPORTED`` at one
    batch size pass, and the batch's images are run one by one (models.batching). So the
    device is asked again (``probe``): only where that fails too is the GPU unusable. On
    a CPU nothing is (whatever the message), and nothing is asked.

    Parameters
    ----------
    exc : BaseException
        What the forward pass raised.
    device : torch.device or str
        The device it ran on.
    probe : callable, optional
        Given the device, raises where it is unusable; :func:`_probe_device` (a tiny
        computation on it, synchronised) by default.

    Returns
    -------
    bool
        True for ``torch.AcceleratorError`` (torch 2.8 and later) or a ``RuntimeError``
        whose message names a CUDA, cuBLAS or cuDNN error, on a CUDA device that fails
        the probe after it.
    """
    device = torch.device(device)
    if device.type != "cuda" or isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    named = (accelerator_error is not None and isinstance(exc, accelerator_error)) or (
        isinstance(exc, RuntimeError) and any(w in str(exc) for w in _DEVICE_ERROR_WORDS)
    )
    if not named:
        return False
    try:
        (probe or _probe_device)(device)
    except Exception:  # whatever it raises: the device cannot run this much
        return True
    return False


def _probe_device(device: torch.device) -> None:
    """Run a tiny computation on ``device`` and wait for it: raises where the GPU is
    unusable (a sticky CUDA error is raised again by every later call)."""
    torch.ones(1, device=device).add_(1).sum().item()
    torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a torch device.

    Parameters
    ----------
    device : str
        ``"auto"`` picks CUDA when available, else the CPU.

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ValueError
        If CUDA is asked for but not available, or the string is not a device.
    """
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"not a torch device: {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist")
        dev = torch.device("cuda", index)
    return dev


#: Arithmetic the network's trunk may run in (``BONEAGE_PRECISION``); the head, the
#: Grad-CAM weights and the reported numbers are always float32.
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how results, reports and the SR name it."""
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=1)
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16, AMX or Arm BF16).

    Without them oneDNN emulates bfloat16, slower than float32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cuda_computes_bfloat16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bfloat16 itself (compute capability 8.0 on, or
    ROCm), not by emulation.

    ``torch.cuda.is_bf16_supported()`` counts emulation by default (torch 2.3 on): a T4 or
    V100 "supports" bfloat16 because it can hold such a tensor, then computes it in
    float32, slowly, with no bfloat16 convolutions in cuDNN.
    """
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the argument, which counted no emulation
            return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the trunk runs in on ``device`` for a ``BONEAGE_PRECISION`` value.

    Parameters
    ----------
    precision : str
        One of :data:`PRECISIONS`. ``"auto"``: float16 autocast on CUDA, float32 on
        every other device. ``"bfloat16"`` on a CPU is an opt-in: about twice as fast
        where the CPU has bfloat16 instructions (:func:`cpu_computes_bfloat16`; slower
        without them), with 8 bits of mantissa in the trunk, so a site validates it
        first (``boneage-worker evaluate --precision bfloat16``).
    device : torch.device
        Where the model runs.

    Returns
    -------
    torch.dtype
        ``torch.float32`` (no autocast), ``torch.bfloat16`` or ``torch.float16``.

    Raises
    ------
    ValueError
        If the value is unknown or the device cannot run it: float16 only on CUDA,
        bfloat16 on a CPU or a GPU that computes it (compute capability 8.0 on: one that
        would only emulate it is refused, :func:`cuda_computes_bfloat16`), float32
        everywhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "float32":
        return torch.float32
    if device.type == "cuda":
        if precision == "bfloat16" and not cuda_computes_bfloat16(device):
            raise ValueError(
                f"{describe_device(device)} does not compute bfloat16 (it needs compute "
                "capability 8.0 or later; older GPUs emulate it, slowly): use float16 or float32"
            )
        return getattr(torch, precision)
    if device.type == "cpu" and precision == "bfloat16":
        if not cpu_computes_bfloat16():
            _warn_bfloat16_emulated()
        return torch.bfloat16
    usable = "bfloat16 or float32" if device.type == "cpu" else "float32"
    raise ValueError(f"{precision} does not run on {device.type}: use {usable}")


@lru_cache(maxsize=1)
def _warn_bfloat16_emulated() -> None:
    """Say once per process (not per evaluation step or predictor) that bf16 is emulated."""
    logger.warning(
        "bfloat16 asked for, but this CPU has no bfloat16 instructions: it is emulated, "
        "slower than float32"
    )


def describe_device(device: torch.device) -> str:
    """Return e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inference_copy(
    model: BoneAgeNet,
    device: torch.device,
    dtype: torch.dtype,
    *,
    input_size: int,
) -> BoneAgeNet:
    """The copy of ``model`` that inference runs (the worker, ``predict``, ``evaluate``).

    Batch norms folded into the convolutions (:func:`~models.net.fold_batch_norm`) and
    channels-last memory on every device; on a CPU in float32, the trunk also runs as
    oneDNN fused convolutions with weights laid out ahead of time
    (:func:`~models.fused.cpu_inference_copy`), when they agree with ``model`` on a test
    image. Results equal ``model``'s up to float rounding; ``model`` is not changed.

    Parameters
    ----------
    model : BoneAgeNet
        The model as loaded, in eval mode.
    device : torch.device
        Where it will run.
    dtype : torch.dtype
        What the trunk computes in (:func:`resolve_precision`).
    input_size : int
        Side of the square network input.

    Returns
    -------
    BoneAgeNet
        The inference copy, in eval mode, on ``device``.
    """
    if device.type == "cpu" and dtype == torch.float32:
        # built from the model itself, each batch norm folded on the way, and checked
        # against it: the folded copy is only built where the fused one is not used
        fused = cpu_inference_copy(model, input_size=input_size)
        if fused is not None:
            return fused
    return fold_batch_norm(model).to(device).to(memory_format=torch.channels_last)


def intervals_for(bone_age_months: float, meta: CheckpointMeta) -> dict[float, tuple[float, float]]:
    """Split-conformal intervals around a prediction.

    Parameters
    ----------
    bone_age_months : float
        Point prediction, months.
    meta : CheckpointMeta
        Checkpoint metadata holding the absolute-residual quantiles.

    Returns
    -------
    dict
        Level -> ``(low, high)`` months, clipped to [0, 240]; empty without quantiles.
    """
    out: dict[float, tuple[float, float]] = {}
    for level, q in sorted(meta.quantiles.items(), key=lambda kv: float(kv[0])):
        low = max(MIN_BONE_AGE_MONTHS, bone_age_months - float(q))
        high = min(MAX_BONE_AGE_MONTHS, bone_age_months + float(q))
        out[float(level)] = (low, high)
    return out


class BoneAgePredictor:
    """Run a loaded model on radiographs.

    Parameters
    ----------
    loaded : LoadedModel
        Model, metadata and id (from :func:`~models.checkpoint.load_checkpoint` or
        :func:`~models.checkpoint.untrained_model`).
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : str
        What the trunk runs in (:func:`resolve_precision`): by default float16 autocast
        on CUDA, float32 elsewhere.
    cpu_threads : collection of int
        Torch thread counts it will also run at on a CPU, besides the count it is built
        at. In float32 the fused convolutions get a copy packed for each (see
        :attr:`thread_counts`); elsewhere nothing depends on the count.

    Raises
    ------
    ImportError
        If the checkpoint was trained with CLAHE (``meta.clahe``) and OpenCV is not
        installed.

    Notes
    -----
    The predictor runs an inference copy of the model (:func:`inference_copy`): batch
    norms folded into the convolutions and channels-last memory on every device, and on
    a CPU in float32 the trunk as fused oneDNN convolutions; results equal the
    checkpoint's model up to float rounding. Under autocast
    (float16 or bfloat16) only the trunk runs in the lower precision; the head and the
    Grad-CAM weights are computed in float32. ``loaded.model`` itself is left as it was.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str = "auto",
        precision: str = "auto",
        cpu_threads: Collection[int] = (),
    ) -> None:
        if loaded.meta.clahe:
            require_clahe()  # here, once, rather than on every image
        self._device = resolve_device(device)
        self._dtype = resolve_precision(precision, self._device)
        self._model = inference_copy(
            loaded.model, self._device, self._dtype, input_size=loaded.meta.input_size
        )
        # Fused convolutions' weights are laid out for the torch thread count they were
        # packed at; at another count oneDNN reorders them on every pass (measured: 1.6×
        # the time on one thread, 1.7× on two). Each other count asked for gets its own
        # copy, packed at it (the weights once more: about 100 MB for a ResNet-50).
        self._by_threads: dict[int, BoneAgeNet] = {}
        if is_fused(self._model):
            self._by_threads[torch.get_num_threads()] = self._model
            for threads in sorted(set(cpu_threads) - set(self._by_threads)):
                with torch_threads(threads):
                    packed = cpu_inference_copy(loaded.model, input_size=loaded.meta.input_size)
                if packed is not None:
                    self._by_threads[threads] = packed
        # Keep the metadata and id, not the caller's module: one copy of the weights.
        self._loaded = dataclasses.replace(loaded, model=self._model)
        logger.info(
            "predictor ready: %s, model id %s, trained=%s, device %s, %s%s",
            loaded.meta.arch,
            loaded.model_id[:12],
            loaded.meta.trained,
            self.device,
            self.precision,
            ", fused oneDNN convolutions" if self.fused_convolutions else "",
        )

    @property
    def model_id(self) -> str:
        """SHA-256 of the checkpoint (the id written into every result)."""
        return self._loaded.model_id

    @property
    def meta(self) -> CheckpointMeta:
        """Checkpoint metadata."""
        return self._loaded.meta

    @property
    def device(self) -> str:
        """The device in words, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``."""
        return describe_device(self._device)

    @property
    def precision(self) -> str:
        """What the trunk runs in: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
        return precision_name(self._dtype)

    @property
    def fused_convolutions(self) -> bool:
        """Whether the trunk runs as fused oneDNN convolutions (:mod:`models.fused`)."""
        return is_fused(self._model)

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """The torch thread counts this predictor's fused convolutions are packed for
        (``cpu_threads`` and the count when it was built); empty when not fused."""
        return tuple(sorted(self._by_threads))

    def inference_model(self, threads: int | None = None) -> BoneAgeNet:
        """The copy of the model that runs at ``threads`` torch threads (by default, the
        current count): the one packed for it, else the one built first."""
        count = torch.get_num_threads() if threads is None else threads
        return self._by_threads.get(count, self._model)

    @property
    def runs_on(self) -> str:
        """Device and, under autocast, precision: ``"cpu, bfloat16"`` (recorded per result)."""
        if self._dtype == torch.float32:
            return self.device
        return f"{self.device}, {self.precision}"

    @property
    def input_size(self) -> int:
        """Side of the square network input."""
        return self._loaded.meta.input_size

    def warm_up(self) -> float:
        """Run one throw-away prediction so the first real image is not the slow one.

        A fresh process pays for kernel selection and lazy imports on its first forward
        pass (seconds on a CPU); a worker calls this once after loading the model.

        Returns
        -------
        float
            Seconds the warm-up took.
        """
        started = time.perf_counter()
        image = np.random.default_rng(0).random((self.input_size, self.input_size))
        self.predict(image.astype(np.float32), male=True)
        return time.perf_counter() - started

    def prepare(self, image: np.ndarray) -> Prepared:
        """Preprocess one image at this model's input size (CPU work, can run ahead).

        Parameters
        ----------
        image : numpy.ndarray
            2-D grey image, bone bright.

        Returns
        -------
        Prepared
            Input tensor and crop box, with CLAHE when the checkpoint was trained with it.
        """
        return prepare(image, self.input_size, clahe=self._loaded.meta.clahe)

    def predict(self, image: np.ndarray, *, male: bool) -> Prediction:
        """Estimate bone age with a Grad-CAM map and prediction intervals.

        Parameters
        ----------
        image : numpy.ndarray
            2-D grey image ``(H, W)``, bone bright, float32 in [0, 1].
        male : bool
            Patient sex: True for male, False for female.

        Returns
        -------
        Prediction
            Bone age (months), heat map over the full image, intervals.
        """
        return self.predict_batch([image], [male])[0]

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        males: Sequence[bool],
        *,
        prepared: Sequence[Prepared] | None = None,
    ) -> list[Prediction]:
        """Estimate bone age for several images in one forward pass.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            2-D grey images, bone bright.
        males : sequence of bool
            Sex of each patient.
        prepared : sequence of Prepared, optional
            Output of :meth:`prepare` for each image, when already computed.

        Returns
        -------
        list of Prediction
            One per image, in order.

        Raises
        ------
        DeviceFailure
            If the GPU itself failed (:func:`is_device_failure`): no image is at fault.
        """
        if len(images) != len(males):
            raise ValueError(f"got {len(images)} images but {len(males)} sex values")
        if not images:
            return []
        preps = list(prepared) if prepared is not None else [self.prepare(im) for im in images]
        if len(preps) != len(images):
            raise ValueError("prepared must hold one entry per image")
        meta = self._loaded.meta
        try:
            x = torch.stack([p.tensor for p in preps]).to(self._device, non_blocking=True)
            sex = torch.tensor([1.0 if m else 0.0 for m in males], device=self._device)
            x = x.contiguous(memory_format=torch.channels_last)
            lower = self._dtype != torch.float32
            with torch.autocast(self._device.type, dtype=self._dtype, enabled=lower):
                z, cams = predict_with_cam(self.inference_model(), x, sex)
            months = (z.float() * meta.target_sd + meta.target_mean).cpu().numpy()
            cams_np = cams.float().cpu().numpy()
        except Exception as exc:
            if is_device_failure(exc, self._device):
                # its first line: the CUDA error's name, nothing of the image
                first = (str(exc).splitlines() or [""])[0][:200]
                raise DeviceFailure(f"{type(exc).__name__}: {first}") from exc
            raise
        out: list[Prediction] = []
        for image, prep, value, cam in zip(images, preps, months, cams_np, strict=True):
            age = float(np.clip(value, MIN_BONE_AGE_MONTHS, MAX_BONE_AGE_MONTHS))
            out.append(
                Prediction(
                    bone_age_months=age,
                    crop_cam=cam,
                    crop_box=prep.crop_box,
                    image_shape=(int(image.shape[0]), int(image.shape[1])),
                    intervals=intervals_for(age, meta),
                    raw_bone_age_months=float(value),
                    input_size=self.input_size,
                )
            )
        return out
