"""Turn a decoded radiograph into the network's input tensor, and a CAM back onto the image.

Steps of :func:`prepare`: robust intensity normalisation (1st/99th percentiles), a square
crop around the hand (Otsu foreground on a thumbnail, largest connected component, its
bounding box padded to a square), optional CLAHE, resize to ``size x size`` and per-image
standardisation. No learned segmenter: the crop must behave on real radiographs (collimator
edges, rulers, side markers) and on the synthetic phantoms alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from models.gradcam import upsample_cam

logger = logging.getLogger(__name__)

CropBox = tuple[int, int, int, int]
"""``(top, left, bottom, right)`` in source pixels, bottom/right exclusive; may extend past
the image border, where the crop is padded with background."""

PREPROCESS_VERSION = 1
"""Version of what :func:`prepare` makes of an image: the intensity window, the crop, CLAHE,
the resize and the standardisation. Bump it with any change that alters the tensor the
network is given for the same image (a percentile, the margin, the thumbnail, the
interpolation, ...): a checkpoint records the version it was trained with
(:attr:`models.checkpoint.CheckpointMeta.preprocess_version`) and one of another version is
refused on load, rather than silently given inputs it was not trained on. A checkpoint
written before versions were recorded is taken as version 1."""

_THUMB_SIDE = 160  # thumbnail long side for foreground detection
_MARGIN = 0.04  # crop margin, fraction of the box side
_MIN_FOREGROUND = 0.02  # below this share of the thumbnail, fall back to the whole image


@dataclass
class Prepared:
    """A preprocessed image.

    Attributes
    ----------
    tensor : Tensor
        float32, shape ``(1, size, size)``, zero mean and unit SD over the crop.
    crop_box : tuple of int
        ``(top, left, bottom, right)`` of the square crop in source pixels (exclusive ends;
        may extend past the image border).
    """

    tensor: Tensor
    crop_box: CropBox


def intensity_window(
    image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0
) -> tuple[float, float]:
    """The ``low_pct``/``high_pct`` percentiles of an image.

    Percentiles of a regular subsample (about 65k pixels: the 1st and 99th percentiles
    then sit on some 650 samples each) are as good as those of the whole image and
    much cheaper.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, bone bright.
    low_pct, high_pct : float
        Percentiles to return.

    Returns
    -------
    tuple of float
        ``(low, high)``.
    """
    img = np.asarray(image)
    step = max(1, int(np.sqrt(img.size / 65_536)))
    lo, hi = np.percentile(img[::step, ::step], [low_pct, high_pct])
    return float(lo), float(hi)


def _window_tensor(image: Tensor, lo: float, hi: float) -> Tensor:
    """Map ``lo``/``hi`` to 0/1 and clip, in float32 (all zeros when ``hi <= lo``)."""
    if not hi > lo:
        return torch.zeros_like(image, dtype=torch.float32)
    return ((image.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _window_array(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo``/``hi`` to 0/1 and clip, in float32 (all zeros when ``hi <= lo``)."""
    img = np.asarray(image, dtype=np.float32)
    if not hi > lo:
        return np.zeros_like(img)
    # float32 throughout, in one buffer: float64 scalars would promote a multi-megapixel
    # image to float64 (numpy 2 promotion rules) and triple the memory traffic.
    out = np.subtract(img, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def normalise_intensity(
    image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0
) -> np.ndarray:
    """Map the ``low_pct``/``high_pct`` percentiles to 0/1 and clip.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, bone bright.
    low_pct, high_pct : float
        Percentiles mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray
        float32 image in [0, 1] (all zeros for a constant image).
    """
    lo, hi = intensity_window(image, low_pct, high_pct)
    return _window_array(image, lo, hi)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Return Otsu's threshold of values in [0, 1].

    Parameters
    ----------
    values : numpy.ndarray
        Samples in [0, 1].
    bins : int
        Histogram bins.

    Returns
    -------
    float
        The threshold maximising the between-class variance.
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _largest_component(mask: Tensor) -> Tensor:
    """Largest 8-connected component of a 2-D bool mask."""
    labels, count = ndimage.label(mask.numpy(), structure=_EIGHT_CONNECTED)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    return torch.from_numpy(labels == int(np.argmax(sizes)))


def _grow(seed: Tensor, allowed: Tensor) -> Tensor:
    """Pixels of ``allowed`` 8-connected to ``seed`` (plus the seed itself)."""
    seed_np = seed.numpy()
    labels, _ = ndimage.label(seed_np | allowed.numpy(), structure=_EIGHT_CONNECTED)
    touched = np.unique(labels[seed_np])
    return torch.from_numpy(np.isin(labels, touched[touched > 0]))


def _binary_open(mask: Tensor, radius: int = 1) -> Tensor:
    k = 2 * radius + 1
    m = mask[None, None].float()
    eroded = -F.max_pool2d(-m, k, stride=1, padding=radius)
    return F.max_pool2d(eroded, k, stride=1, padding=radius)[0, 0] > 0.5


def _thumbnail(image: np.ndarray) -> Tensor:
    """Antialiased thumbnail, long side :data:`_THUMB_SIDE`, as a ``(1, 1, h, w)`` tensor."""
    height, width = image.shape
    scale = _THUMB_SIDE / max(height, width)
    th, tw = max(8, round(height * scale)), max(8, round(width * scale))
    # Every k-th pixel of a large image still leaves the filter 4 samples per thumbnail
    # pixel and each way: as good for finding the hand, a fraction of the memory traffic.
    step = max(1, min(height // (4 * th), width // (4 * tw)))
    return F.interpolate(
        torch.from_numpy(np.ascontiguousarray(image[::step, ::step], dtype=np.float32))[None, None],
        size=(th, tw),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )


def hand_box(image: np.ndarray) -> CropBox:
    """Find a square box around the hand.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image normalised to [0, 1], bone bright.

    Returns
    -------
    tuple of int
        ``(top, left, bottom, right)`` of a square in source pixels. It stays inside the
        image when the square fits, else it is centred on the hand and extends past the
        border.
    """
    return _box_from_thumbnail(_thumbnail(image), image.shape)


def _box_from_thumbnail(thumb: Tensor, shape: tuple[int, ...]) -> CropBox:
    """:func:`hand_box` from a ``(1, 1, h, w)`` thumbnail in [0, 1] of an image of ``shape``."""
    height, width = int(shape[0]), int(shape[1])
    th, tw = int(thumb.shape[-2]), int(thumb.shape[-1])
    # A light blur keeps finger gaps and noise from splitting the hand into pieces.
    thumb = F.avg_pool2d(thumb, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    values = thumb.numpy()
    threshold = otsu_threshold(values)
    mask = _largest_component(_binary_open(thumb > threshold))
    # Otsu may split soft tissue from bone rather than hand from background (bright,
    # large bones); grow the component into pixels halfway down to the background level
    # so the wrist and distal forearm stay in the box (hysteresis thresholding).
    below = values[values <= threshold]
    if below.size:
        background = float(np.median(below))
        low = background + 0.5 * (threshold - background)
        mask = _grow(mask, _binary_open(thumb > low))
    if float(mask.float().mean()) < _MIN_FOREGROUND:
        logger.debug("no clear foreground; using the whole image")
        top, left, bottom, right = 0.0, 0.0, float(height), float(width)
    else:
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        top = float(rows[0]) / th * height
        bottom = float(rows[-1] + 1) / th * height
        left = float(cols[0]) / tw * width
        right = float(cols[-1] + 1) / tw * width
    side = max(bottom - top, right - left) * (1 + 2 * _MARGIN)
    side_px = max(1, round(side))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0 = _place(cy - side_px / 2, side_px, height)
    x0 = _place(cx - side_px / 2, side_px, width)
    return (y0, x0, y0 + side_px, x0 + side_px)


def _place(start: float, side: int, extent: int) -> int:
    """Shift a window of ``side`` inside ``[0, extent)`` when it fits; else centre it."""
    if side <= extent:
        return int(min(max(round(start), 0), extent - side))
    return round((extent - side) / 2)


def _crop(image: np.ndarray, box: CropBox, fill: float) -> np.ndarray:
    top, left, bottom, right = box
    height, width = image.shape
    if top >= 0 and left >= 0 and bottom <= height and right <= width:
        return image[top:bottom, left:right]  # a view: nothing to pad
    out = np.full((bottom - top, right - left), fill, dtype=np.float32)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(bottom, height), min(right, width)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    return out


CLAHE_MISSING = (
    "CLAHE needs OpenCV, which is not installed: install the 'train' extra "
    "(pip install 'boneage-worker[train]') or opencv-python-headless"
)
"""What :func:`require_clahe` says when OpenCV cannot be imported."""


def require_clahe() -> None:
    """Check that CLAHE can run here (OpenCV importable).

    Called where a model that needs CLAHE is set up, so that a missing OpenCV stops
    the start rather than every image.

    Raises
    ------
    ImportError
        If ``cv2`` cannot be imported; the message names the extra to install.
    """
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        raise ImportError(CLAHE_MISSING) from exc


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (needs OpenCV).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image in [0, 1].
    clip_limit : float
        OpenCV clip limit.
    tiles : int
        Tiles per side.

    Returns
    -------
    numpy.ndarray
        float32 image in [0, 1].
    """
    require_clahe()
    import cv2

    u16 = np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    out = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(u16)
    return (out.astype(np.float32) / 65535.0).astype(np.float32)


def prepare(image: np.ndarray, size: int, *, clahe: bool = False) -> Prepared:
    """Preprocess a radiograph for :class:`~models.net.BoneAgeNet`.

    Parameters
    ----------
    image : numpy.ndarray
        2-D grey image ``(H, W)``, bone bright (MONOCHROME2 sense), any float or integer
        range (float32 in [0, 1] expected).
    size : int
        Side of the square network input.
    clahe : bool
        Apply CLAHE to the crop before resizing.

    Returns
    -------
    Prepared
        Tensor ``(1, size, size)`` and the crop box in source pixels.

    Raises
    ------
    ValueError
        If the image is not 2-D, is empty or holds non-finite values.
    """
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"expected a 2-D grey image, got shape {arr.shape}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    arr = arr.astype(np.float32, copy=False)
    # A sum is finite only if every term is; a non-finite sum (NaN, inf, or float32
    # overflow of huge finite values) is settled element by element.
    if not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
        raise ValueError("image holds NaN or infinite values")
    # Only the window (two percentiles of a subsample), a thumbnail and the crop resized
    # to the network input are computed; the multi-megapixel image itself is never
    # rewritten. The intensity window is applied after the resize, so the network sees
    # the antialiased crop windowed to [0, 1] (for training and inference alike).
    lo, hi = intensity_window(arr)
    box = _box_from_thumbnail(_window_tensor(_thumbnail(arr), lo, hi), arr.shape)
    crop = _crop(arr, box, fill=lo)
    if clahe:
        crop = apply_clahe(_window_array(crop, lo, hi))
        lo, hi = 0.0, 1.0
    t = torch.from_numpy(crop)[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    t = _window_tensor(t[0], lo, hi)
    std = t.std()
    t = (t - t.mean()) / std.clamp_min(1e-3)
    return Prepared(tensor=t.contiguous(), crop_box=box)


def cam_to_image(
    cam: np.ndarray,
    crop_box: CropBox,
    image_shape: tuple[int, int],
    *,
    input_size: int | None = None,
) -> np.ndarray:
    """Put a CAM computed on the crop back onto the full image, each cell at the centre
    of its receptive field (:func:`~models.gradcam.upsample_cam`).

    Parameters
    ----------
    cam : numpy.ndarray
        Map ``(h, w)`` over the square crop, values in [0, 1].
    crop_box : tuple of int
        ``(top, left, bottom, right)`` from :func:`prepare`.
    image_shape : tuple of int
        ``(H, W)`` of the source image.
    input_size : int, optional
        The ``size`` the crop was prepared at; by default the map's side times
        :data:`~models.net.FEATURE_STRIDE`.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` map in [0, 1], zero outside the crop.
    """
    top, left, bottom, right = (int(v) for v in crop_box)
    height, width = int(image_shape[0]), int(image_shape[1])
    if bottom <= top or right <= left:
        raise ValueError(f"empty crop box {crop_box}")
    up = upsample_cam(
        np.asarray(cam, dtype=np.float32), (bottom - top, right - left), input_size=input_size
    )
    out = np.zeros((height, width), dtype=np.float32)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(bottom, height), min(right, width)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0:sy1, sx0:sx1] = up[sy0 - top : sy1 - top, sx0 - left : sx1 - left]
    return np.clip(out, 0.0, 1.0, out=out)
