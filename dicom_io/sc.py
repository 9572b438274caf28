"""Grad-CAM Secondary Capture: the radiograph, its heat map and the result burned in.

:func:`render_overlay` makes the RGB picture (numpy + Pillow only);
:func:`build_heatmap_sc` wraps it in a Secondary Capture Image (highdicom
``SCImage.from_ref_dataset``) in the radiograph's study, new series.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.content import (
    AI_RESULT_NOTICE,
    CODE_STRING,
    UNTRAINED_WARNING,
    BoneAgeFinding,
    body_part_to_write,
    check_positive_int,
    check_uid,
    image_side,
)
from dicom_io.sr import (
    MANUFACTURER,
    PATIENT_AND_STUDY,
    PATIENT_AND_STUDY_IF_PRESENT,
    copy_patient_and_study,
    date_in_sources_time_zone,
    number_of_frames,
    series_description,
    software_version,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CAM_THRESHOLD",
    "MAX_LONG_SIDE",
    "NOTICE_BODY_PART",
    "REPLACES_HEAT_MAP",
    "WITHDRAWN",
    "build_heatmap_sc",
    "build_withdrawal_sc",
    "image_side",
    "notice_body_part",
    "overlay_factor",
    "overlay_shape",
    "render_notice",
    "render_overlay",
    "series_laterality",
    "turbo_lut",
]

#: Images whose long side exceeds this are shrunk by a whole factor before rendering.
MAX_LONG_SIDE = 2048
#: Heat map values below this are not drawn (the radiograph shows through).
CAM_THRESHOLD = 0.2
#: Opacity of the heat map where the map is 1.
MAX_ALPHA = 0.55
_FONT_FRACTION = 0.03  # font size as a share of the image width
_MIN_FONT_PX = 14
# The narrowest panel: at the smallest font (Pillow's bundled one) it has room, 246 px,
# for the longest line that states a value (the interval, 228 px at most) and for the
# review notice, so no age is split over two lines. Twice the gate's smallest image: a
# narrower picture is drawn enlarged 2x (3x ...) under its panel.
_MIN_PANEL_WIDTH = 256
_WHITE = (255, 255, 255)
_YELLOW = (255, 220, 0)
_RED = (255, 60, 60)
_DERIVATION = (
    "Bone age estimated by an AI model; heat map is Grad-CAM of the model output; "
    "result text burned in"
)

# Turbo colormap, polynomial approximation (Mikhailov 2019, Google AI blog; Apache-2.0).
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


@lru_cache(maxsize=1)
def turbo_lut() -> np.ndarray:
    """The 256-entry Turbo colormap (perceptually ordered, blue to red).

    Returns
    -------
    numpy.ndarray
        uint8 array (256, 3); read-only.
    """
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.polynomial.polynomial.polyval(x, c) for c in (_TURBO_R, _TURBO_G, _TURBO_B)]
    lut = np.clip(np.stack(channels, axis=-1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


@lru_cache(maxsize=1)
def _blend_table() -> np.ndarray:
    """uint8 RGB for every (heat level, grey level), flattened to (65536, 3).

    Heat below :data:`CAM_THRESHOLD` leaves the grey level unchanged; above it the
    Turbo colour is blended in with opacity rising linearly to :data:`MAX_ALPHA`.
    """
    heat = np.arange(256, dtype=np.float32) / np.float32(255.0)
    alpha = np.clip((heat - CAM_THRESHOLD) / (1.0 - CAM_THRESHOLD), 0.0, 1.0) * MAX_ALPHA
    weight = alpha[:, None, None].astype(np.float32)
    grey = np.arange(256, dtype=np.float32)[None, :, None]
    colour = turbo_lut().astype(np.float32)[:, None, :]
    mixed = grey * (1.0 - weight) + colour * weight
    table = np.clip(mixed + 0.5, 0, 255).astype(np.uint8).reshape(65536, 3)
    table.setflags(write=False)
    return table


def _check_unit_image(name: str, array: object) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f'Argument "{name}" must be a numpy array, not {type(array).__name__}.')
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f'Argument "{name}" must be a non-empty (H, W) array, got {array.shape}.')
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f'Argument "{name}" must be a float array in [0, 1], not {array.dtype}.')
    values = array.astype(np.float32, copy=False)
    # min and max propagate NaN and show infinities: two passes instead of four.
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f'Argument "{name}" contains NaN or infinite values.')
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise ValueError(f'Argument "{name}" must lie in [0, 1].')
    if low < 0.0 or high > 1.0:
        return np.clip(values, 0.0, 1.0)
    return values


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A scalable TrueType font of ``size`` pixels: Pillow's bundled one, else DejaVu."""
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        pass
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "DejaVuSans.ttf",
    ):
        try:
            return ImageFont.truetype(path, size=size)
        except OSError:
            continue
    logger.warning("no TrueType font available; burned-in text uses the small bitmap font")
    return ImageFont.load_default()


def _text_lines(finding: BoneAgeFinding) -> list[tuple[str, tuple[int, int, int]]]:
    """Lines to burn in, with their colours."""
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for text in finding.summary_lines():
        if text == UNTRAINED_WARNING:
            lines.append((text, _RED))
        elif text == AI_RESULT_NOTICE:
            lines.append((text, _YELLOW))
        else:
            lines.append((text, _WHITE))
    return lines


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: int) -> list[str]:
    """``text`` in lines no wider than ``room`` pixels at ``font``: broken at its spaces,
    and a word wider than a whole line at its characters (the font is never shrunk)."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    if draw.textlength(text, font=font) <= room:
        return [text]  # most lines: measured once, not word by word
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if draw.textlength(trial, font=font) <= room:
            current = trial
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and draw.textlength(word, font=font) > room:
            cut = next(
                (
                    n
                    for n in range(len(word) - 1, 0, -1)
                    if draw.textlength(word[:n], font=font) <= room
                ),
                1,
            )
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    lines.append(current)
    return lines


def _enlargement(shape: tuple[int, int]) -> int:
    """The whole factor a picture of ``shape`` (rows, columns) is drawn enlarged by: the
    smallest that makes it at least ``_MIN_PANEL_WIDTH`` wide, without taking its long
    side past :data:`MAX_LONG_SIDE`; 1 for a picture that wide already."""
    rows, columns = shape
    factor = -(-_MIN_PANEL_WIDTH // columns)
    return max(1, min(factor, MAX_LONG_SIDE // max(rows, columns)))


def overlay_factor(image_shape: tuple[int, ...]) -> int:
    """The integer factor :func:`render_overlay` shrinks an image of ``image_shape`` by.

    The smallest whole factor that brings the long side to at most
    :data:`MAX_LONG_SIDE`: a whole factor is a plain box average, several times cheaper
    than resampling to an arbitrary size, and keeps pixels square.
    """
    long_side = max(int(image_shape[0]), int(image_shape[1]))
    return max(1, -(-long_side // MAX_LONG_SIDE))


def overlay_shape(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, columns)`` of the radiograph part of :func:`render_overlay`'s picture.

    Parameters
    ----------
    image_shape : tuple of int
        ``(H, W)`` of the image.

    Returns
    -------
    tuple of int
        The image's shape divided by :func:`overlay_factor` (rounded up), so the long
        side is at most :data:`MAX_LONG_SIDE`. A heat map of this shape is drawn as it
        is, without resizing (on a picture narrower than 256 px, enlarged with it by
        a whole factor, each pixel repeated).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    factor = overlay_factor(image_shape)
    return -(-height // factor), -(-width // factor)


def render_overlay(image: np.ndarray, cam: np.ndarray, finding: BoneAgeFinding) -> np.ndarray:
    """Render the radiograph with the heat map and a panel of burned-in result text.

    Parameters
    ----------
    image : numpy.ndarray
        Display-ready radiograph, float (H, W) in [0, 1], bone bright (as from
        :func:`dicom_io.pixels.decode_for_display`).
    cam : numpy.ndarray
        Heat map, float in [0, 1]; any (h, w) shape, resized to the image.
    finding : BoneAgeFinding
        The result whose text is burned in.

    Returns
    -------
    numpy.ndarray
        uint8 RGB (H', W', 3): a text panel above the radiograph, which is downscaled to
        :func:`overlay_shape` (long side at most :data:`MAX_LONG_SIDE`). A picture
        narrower than 256 px is then drawn enlarged by a whole factor, each pixel as a
        2 x 2 (3 x 3 ...) block, so that the panel above it has room for its text at the
        smallest font (14 px): lines are wrapped, never shrunk below it.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When an array has the wrong shape or values outside [0, 1].
    """
    picture = _check_unit_image("image", image)
    heat = _check_unit_image("cam", cam)
    if not isinstance(finding, BoneAgeFinding):
        raise TypeError(
            f'Argument "finding" must be a BoneAgeFinding, not {type(finding).__name__}.'
        )
    rows, columns = overlay_shape(picture.shape)
    size = (columns, rows)
    # 8-bit grey and heat levels at the picture's size: quantised first, so the resize
    # runs on bytes (Pillow "L"), several times faster than on float32 ("F")
    grey = _resize_levels(_to_levels(picture), size)
    level = _resize_levels(_to_levels(heat), size).astype(np.uint16)  # room for the index

    # text panel above the image, so no anatomy is hidden under the text; a picture too
    # narrow for the text at the smallest font is enlarged, the text never shrunk
    factor = _enlargement((rows, columns))
    panel = _text_panel(_text_lines(finding), columns * factor)
    panel_height = panel.height

    rgb = np.empty((panel_height + rows * factor, columns * factor, 3), dtype=np.uint8)
    rgb[:panel_height] = np.asarray(panel, dtype=np.uint8)
    # radiograph in grey, heat map alpha-blended only where it is significant: one
    # lookup of (heat level, grey level) in a precomputed 256 x 256 RGB table, written
    # straight into the picture below the panel
    index = np.left_shift(level, 8, out=level)
    index |= grey
    if factor == 1:
        np.take(_blend_table(), index, axis=0, out=rgb[panel_height:])
        return rgb
    # Enlarged by pixel replication: each pixel becomes a factor x factor block at
    # (factor * row, factor * column), so the heat map keeps its place, shape and
    # colours on the radiograph (no resampling that would blur or shift its edges)
    blocks = rgb[panel_height:].reshape(rows, factor, columns, factor, 3)
    blocks[...] = np.take(_blend_table(), index, axis=0)[:, None, :, None]
    return rgb


def _panel_margin(width: int) -> int:
    return max(4, round(width * 0.02))


def _panel_font_size(width: int) -> int:
    return max(_MIN_FONT_PX, round(width * _FONT_FRACTION))


def _text_panel(lines: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> Image.Image:
    """``lines`` of (text, colour) on black, ``width`` pixels wide, one under the other
    at the panel's font size (:func:`_panel_font_size`, never less than
    ``_MIN_FONT_PX``); a line too long for the width is wrapped (:func:`_wrap`)."""
    margin = _panel_margin(width)
    font = _font(_panel_font_size(width))
    wrapped = [
        (part, fill) for text, fill in lines for part in _wrap(text, font, width - 2 * margin)
    ]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line_height = round((ascent + descent) * 1.2)
    panel = Image.new("RGB", (width, 2 * margin + line_height * len(wrapped)), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    for row, (text, fill) in enumerate(wrapped):
        draw.text((margin, margin + row * line_height), text, font=font, fill=fill)
    return panel


def _to_levels(values: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] to uint8 levels 0..255, rounded."""
    scaled = np.multiply(values, np.float32(255.0), dtype=np.float32)
    scaled += np.float32(0.5)
    return scaled.astype(np.uint8)


def _resize_levels(levels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (H, W) levels to (width, height) ``size``.

    A whole-factor reduction is a box average (``Image.reduce``); any other size is
    resampled (box filter down, bilinear up).
    """
    height, width = levels.shape
    if (width, height) == size:
        return levels
    image = Image.fromarray(levels, mode="L")
    if overlay_shape(levels.shape) == (size[1], size[0]):
        return np.asarray(image.reduce(overlay_factor(levels.shape)), dtype=np.uint8)
    resample = Image.Resampling.BOX if size[0] < width else Image.Resampling.BILINEAR
    return np.asarray(image.resize(size, resample=resample), dtype=np.uint8)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Source's Patient Orientation when it is two single biped directions."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    allowed = {"A", "P", "L", "R", "H", "F"}
    if row in allowed and column in allowed:
        return row, column
    return None


#: Body Part Examined of a notice whose series' own value is unknown: the heat maps of
#: that series can no longer be read (retention removed their files) (PS3.16 Annex L).
NOTICE_BODY_PART = "HAND"


def notice_body_part(heat_map: Dataset | None) -> str | None:
    """Body Part Examined of a withdrawal notice that joins the series of ``heat_map``,
    for :func:`build_withdrawal_sc`.

    Body Part Examined is a General Series attribute, one value for the series, by which
    hanging protocols place it: a notice carries the value of the heat maps it joins, not
    that of the copy received again that withdraws their bone age (corrected to another
    part, or naming none). A later heat map of the series carries it too
    (:func:`build_heatmap_sc`'s ``series_heat_map``).

    Parameters
    ----------
    heat_map : pydicom.Dataset or None
        A heat map of that series as it was written (its header is enough); None where
        none can be read any more (retention removed their files).

    Returns
    -------
    str or None
        The heat map's value; None where it has none (the image it shows had none);
        :data:`NOTICE_BODY_PART` where it is unknown, or is no Code String (``RT-HAND``,
        as some modalities send it and a heat map written before
        :func:`~dicom_io.content.body_part_to_write` copied it): a notice is written with
        valid values only. The notice, as a later heat map, writes it only as a Defined
        Term (``body_part_to_write``, with its own Laterality): a Code String that a heat
        map written before carried (``HAND_LT``, ``CARPUS``) may be written as ``HAND``,
        or not at all.
    """
    if heat_map is None:
        return NOTICE_BODY_PART
    value = heat_map.get("BodyPartExamined")
    if value is None or value == "":
        return None
    if isinstance(value, str) and CODE_STRING.fullmatch(value):
        return value
    return NOTICE_BODY_PART


def series_laterality(heat_map: Dataset) -> str | None:
    """Laterality (0020,0060) of the series ``heat_map`` belongs to, as it carries it
    (``L``, ``R``; None where it is empty): a General Series attribute, one value for the
    series, which a later heat map of the series and a withdrawal notice joining it carry
    too, whatever side their copy of the image states now (:func:`build_heatmap_sc`'s and
    :func:`build_withdrawal_sc`'s ``series_heat_map``). A heat map of an image whose side
    was corrected to another therefore joins no series of the other side: the pipeline
    opens one of its own for it (``worker.pipeline.heat_map_series``).

    Parameters
    ----------
    heat_map : pydicom.Dataset
        A heat map of that series as it was written (its header is enough).
    """
    side = str(heat_map.get("Laterality") or "").strip().upper()
    return side if side in ("L", "R") else None


def build_heatmap_sc(
    source: Dataset,
    rgb: np.ndarray,
    finding: BoneAgeFinding,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_heat_map: Dataset | None = None,
) -> Dataset:
    """Wrap a rendered overlay in a Secondary Capture Image in the source's study.

    Parameters
    ----------
    source : pydicom.Dataset
        The assessed radiograph (patient, study and referenced image).
    rgb : numpy.ndarray
        uint8 RGB (H, W, 3), as from :func:`render_overlay`.
    finding : BoneAgeFinding
        The result (laterality, model, untrained flag).
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and of the image.
    series_number : int
        Series Number of the new series (positive).
    instance_number : int
        Instance Number (positive).
    series_heat_map : pydicom.Dataset or None
        An earlier heat map of the series this one joins, as it was written (its header
        is enough): the first of them whose file can still be read. Its Laterality and
        Body Part Examined, General Series attributes, are the series' values, which
        this one carries too (:func:`series_laterality`, :func:`notice_body_part`, as a
        withdrawal notice does), whatever ``source`` and ``finding`` state now (the PACS
        corrected them): its Laterality empty where the series' is; its Body Part
        Examined as a Defined Term or not at all
        (:func:`~dicom_io.content.body_part_to_write`, with the series' Laterality): a
        value a heat map written before carried (``HAND_LT``, ``L HAND``) loses its side
        word only where that Laterality states that side. None: the first heat map of
        its series, or none of the earlier ones can be read any more (retention removed
        their files); it carries the side of ``finding``, else the one ``source`` states
        (:func:`~dicom_io.content.image_side`: its Image Laterality or Laterality, else a
        side word of its Body Part Examined, ``RT-HAND`` giving Laterality ``R`` and Body
        Part Examined ``HAND``), and the body part of ``source``
        (:func:`~dicom_io.content.body_part_to_write`), which may then differ from those
        of the earlier heat maps: nothing tells what theirs were.

    Returns
    -------
    pydicom.Dataset
        A :class:`highdicom.sc.SCImage`, Explicit VR Little Endian, with file meta.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When ``rgb`` has the wrong shape, a UID is invalid or ``source`` lacks UIDs.
    """
    if not isinstance(finding, BoneAgeFinding):
        raise TypeError(
            f'Argument "finding" must be a BoneAgeFinding, not {type(finding).__name__}.'
        )
    description = _DERIVATION
    warnings = [] if finding.model_trained else [UNTRAINED_WARNING]
    if warnings:
        description = f"{UNTRAINED_WARNING}. {description}"
    # the caveats of the panel (an assumed sex, a heat map replaced ...), in words
    comments = ". ".join([*finding.notes, *warnings, AI_RESULT_NOTICE])
    return _secondary_capture(
        source,
        rgb,
        laterality=finding.laterality,
        model_name=finding.model_name,
        model_trained=finding.model_trained,
        derivation=description,
        comments=comments,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        series_heat_map=series_heat_map,
    )


#: The note on a heat map that replaces an earlier one of the same image and model.
REPLACES_HEAT_MAP = "Replaces the earlier heat map (image received again)"
#: The first line of a notice that withdraws a heat map's bone age.
WITHDRAWN = "BONE AGE WITHDRAWN"
_NOTICE_WIDTH = 1024
_NOTICE_DERIVATION = (
    "Notice, rendered by software, that the AI bone age of an earlier heat map of the "
    "source image no longer stands; no heat map"
)


def render_notice(lines: Sequence[str], *, width: int = _NOTICE_WIDTH) -> np.ndarray:
    """A black picture of ``lines`` of text, ``width`` pixels wide: the first in red,
    :data:`~dicom_io.content.AI_RESULT_NOTICE` in yellow, the others in white; a line
    too long for the width is wrapped at its spaces.

    Returns
    -------
    numpy.ndarray
        uint8 RGB (H, ``width``, 3).
    """
    if not lines:
        raise ValueError('Argument "lines" must hold at least one line.')
    coloured = [
        (line, _RED if number == 0 else _YELLOW if line == AI_RESULT_NOTICE else _WHITE)
        for number, line in enumerate(lines)
    ]
    return np.asarray(_text_panel(coloured, width), dtype=np.uint8)


def build_withdrawal_sc(
    source: Dataset,
    why: str,
    *,
    model_name: str,
    model_trained: bool,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    body_part_examined: str | None,
    series_heat_map: Dataset | None = None,
    laterality: str | None = None,
) -> Dataset:
    """A Secondary Capture that withdraws the bone age of the heat maps before it in its
    series: a picture of text, no radiograph, for a viewer that shows images and not the
    SR that replaced their report.

    Parameters
    ----------
    source : pydicom.Dataset
        The image received again (patient, study and referenced image).
    why : str
        Why the earlier bone age no longer stands, in a sentence.
    model_name, model_trained
        Of the model whose heat maps it withdraws: the series' equipment and
        description are those of its heat maps.
    series_instance_uid : str
        That heat-map series.
    sop_instance_uid : str
        This notice.
    series_number, instance_number : int
        Of the series, and this notice's place in it (after the heat maps it withdraws).
    body_part_examined : str or None
        The series' Body Part Examined, as its heat maps carry it (None: they have none),
        see :func:`notice_body_part`: a General Series attribute, the same in each
        object of the series, not the value of ``source``, a copy that may name another
        part or none.
    series_heat_map : pydicom.Dataset or None
        The first heat map of that series still as written (its header is enough), whose
        Laterality, a General Series attribute, the notice carries
        (:func:`series_laterality`: empty where the heat map's is); None where none can
        be read any more (retention removed their files): ``laterality``.
    laterality : str or None
        The series' side where no heat map of it can be read any more (the side it was
        opened for, or its first heat map's result recorded); None: the side ``source``
        states (:func:`~dicom_io.content.image_side`).

    Returns
    -------
    pydicom.Dataset
        A :class:`highdicom.sc.SCImage` as :func:`build_heatmap_sc` makes, but for what
        follows from its showing no radiograph: Patient Orientation empty (its rows and
        columns run in no direction of the patient's), Body Part Examined
        ``body_part_examined`` (absent where None), so that it lands with the heat maps it
        withdraws, as a later heat map of the series carries it: a Defined Term, or
        absent (:func:`~dicom_io.content.body_part_to_write`, with the notice's
        Laterality: ``HAND_LT`` of a heat map written before is ``HAND`` where that
        Laterality is L, absent otherwise), and Lossy Image Compression ``00``.

    Raises
    ------
    ValueError
        When ``why`` is empty, or ``body_part_examined`` is no Code String value.
    """
    if not isinstance(why, str) or not why.strip():
        raise ValueError('Argument "why" must be a non-empty string.')
    if body_part_examined is not None and (
        not isinstance(body_part_examined, str) or not CODE_STRING.fullmatch(body_part_examined)
    ):
        raise ValueError(
            'Argument "body_part_examined" must be None or a Code String value (upper '
            f"case letters, digits, space and underscore, 16 at most), not {body_part_examined!r}."
        )
    if laterality not in (None, "L", "R"):
        raise ValueError(f'Argument "laterality" must be "L", "R" or None, got {laterality!r}.')
    lines = [WITHDRAWN, "The bone age of the earlier heat map of this image no longer stands:"]
    lines += [why.strip(), AI_RESULT_NOTICE]
    comments = f"{WITHDRAWN}: {why.strip()}"
    return _secondary_capture(
        source,
        render_notice(lines),
        laterality=laterality,
        model_name=model_name,
        model_trained=model_trained,
        derivation=_NOTICE_DERIVATION,
        comments=comments[:10240],
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        shows_source=False,
        body_part_examined=body_part_examined,
        series_heat_map=series_heat_map,
    )


def _secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    *,
    laterality: str | None,
    model_name: str,
    model_trained: bool,
    derivation: str,
    comments: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    shows_source: bool = True,
    body_part_examined: str | None = None,
    series_heat_map: Dataset | None = None,
) -> Dataset:
    """The SC of ``rgb`` in ``source``'s study, in a heat-map series of one model;
    ``shows_source``: its pixels are the source's, rendered (and lossy where those are),
    in the source's orientation and of its body part, or of that of ``series_heat_map``
    (:func:`build_heatmap_sc`); else a notice, of the series' body part
    ``body_part_examined`` (:func:`build_withdrawal_sc`). Its Laterality is that of
    ``series_heat_map`` (:func:`series_laterality`), where given, else ``laterality``, else
    the side ``source`` states (:func:`~dicom_io.content.image_side`)."""
    if not isinstance(source, Dataset):
        raise TypeError(
            f'Argument "source" must be a pydicom Dataset, not {type(source).__name__}.'
        )
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise TypeError('Argument "rgb" must be a uint8 numpy array.')
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f'Argument "rgb" must have shape (H, W, 3), got {rgb.shape}.')
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f'Argument "source" has no {keyword}; the SC cannot reference it.')
    check_uid("series_instance_uid", series_instance_uid)
    check_uid("sop_instance_uid", sop_instance_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)

    # General Series: Laterality is one value for the series, as Body Part Examined
    # below: that of the heat map the series was opened with, whatever the copy received
    # again states; the image's own side where no heat map of the series is left
    if series_heat_map is not None:
        laterality = series_laterality(series_heat_map)
    elif laterality is None:
        laterality = image_side(source)
    # a picture of text has no rows and columns in the patient: not the source's
    orientation = _patient_orientation(source) if shows_source else None
    reference = _reference_view(source)
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        laterality=laterality,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description("heat map", trained=model_trained),
        manufacturer_model_name=model_name[:64],
        software_versions=software_version(),
    )
    # Patient and General Study, and the character set, as the source has them
    # (highdicom was given placeholders: _reference_view)
    copy_patient_and_study(source, sc)
    date_in_sources_time_zone(source, sc)
    # General Image: Patient Orientation is Type 2C, required of an image that needs no
    # Image Orientation (Patient) or (Slide), as an SC needs neither (PS3.3 C.7.6.1), and
    # empty where unknown: the overlay keeps the source's row/column directions; where
    # they are unknown, or in a notice, whose rows of text run in no direction of the
    # patient's, it is present and empty (never absent: a Type 2C error)
    if orientation is None:
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    # General Series: Laterality is Type 2C, required of a paired part (a hand) where no
    # Image Laterality (General Image, Type 3) is sent, as none is: it alone states the
    # side; empty when the side is unknown
    if laterality is None:
        sc.Laterality = ""
    # General Series: Body Part Examined (Type 3), on which hanging protocols put a series
    # with the images of its part, one value for the series: a notice's and a later heat
    # map's are those of the heat maps they join, whatever the copy received again says;
    # a series' first heat map's is its source's. Each only as a Defined Term, or none: a
    # heat map written before they were (HAND_LT, L HAND) passes on no side word that
    # this object's Laterality does not state (a right hand's heat map named HAND_LT)
    examined: object = body_part_examined
    if shows_source:
        if series_heat_map is not None:
            examined = notice_body_part(series_heat_map)
        else:
            examined = source.get("BodyPartExamined")
    written = body_part_to_write(examined, laterality=laterality)
    if written is not None:
        sc.BodyPartExamined = written
    # SC Equipment: rendered by software on a workstation, not digitized
    sc.ConversionType = "WSD"
    # General Image: derivation and the source image
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    # Once lossy, always: a picture of an image that lost detail to compression says
    # so, with the source's ratio and method (PS3.3 C.7.6.1.1.5)
    if shows_source and source_was_compressed_lossily(source):
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if source.get(keyword):
                sc[keyword] = copy.deepcopy(source[keyword])
    else:
        sc.LossyImageCompression = "00"
    sc.DerivationDescription = derivation[:1024]
    derived_from = Dataset()
    derived_from.ReferencedSOPClassUID = source.SOPClassUID
    derived_from.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frames = number_of_frames(source)
    if frames is not None and frames > 1:
        derived_from.ReferencedFrameNumber = 1  # the frame assessed and shown
    purpose = Dataset()
    # DCM 121322 "Source image for image processing operation" (PS3.16 CID 7202)
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    derived_from.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [derived_from]
    # General Image: Image Comments carry the plain-language warnings
    sc.ImageComments = comments
    logger.debug("built heat-map SC %dx%d", sc.Rows, sc.Columns)
    return sc


_COPIED_AFTER = frozenset(
    ("SpecificCharacterSet", *PATIENT_AND_STUDY, *PATIENT_AND_STUDY_IF_PRESENT)
)


#: Transfer syntaxes that always lose detail: JPEG baseline and extended (PS3.5 A.4.1).
#: JPEG 2000, JPEG-LS and HTJ2K may be lossless or not; the source's Lossy Image
#: Compression says which.
_LOSSY_SYNTAXES = frozenset(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"))


def source_was_compressed_lossily(source: Dataset) -> bool:
    """Whether ``source``'s pixels have lost detail to compression: its Lossy Image
    Compression says so, or it came in a syntax that always does."""
    if str(source.get("LossyImageCompression", "") or "").strip() == "01":
        return True
    meta = getattr(source, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return syntax in _LOSSY_SYNTAXES


def _reference_view(source: Dataset) -> Dataset:
    """What ``from_ref_dataset`` reads of ``source``: its UIDs and equipment, with empty
    placeholders for the patient and study attributes and no character set. The caller
    puts the source's own on the SC afterwards (:func:`copy_patient_and_study`), as they
    came: highdicom refuses some values modalities write (a birth date "2015") and some
    character sets the standard allows (Japanese "\\ISO 2022 IR 87")."""
    reference = Dataset()
    for element in source:
        if element.keyword in _COPIED_AFTER:
            continue
        if element.tag.group in (0x0008, 0x0010, 0x0018, 0x0020) and element.VR != "SQ":
            reference.add(element)
    for keyword in PATIENT_AND_STUDY:
        setattr(reference, keyword, "")
    return reference
