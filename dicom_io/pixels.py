"""Decode a received image to a display-ready float array, bone bright.

Tolerant when reading: whatever PACSes send (MONOCHROME1/2, 8-16 bits, signed or
not, rescale, VOI LUT or window, pixel padding, compressed transfer syntaxes that
pydicom's plugins decode, RGB/YBR colour) becomes a float32 (H, W) array in [0, 1]
where bone is bright. Only missing, incomplete (a JPEG frame cut short) or
undecodable pixel data raises :class:`PixelDataError`; an image that decodes but shows
nothing to assess (blank, or saturated by its window) raises its subclass
:class:`NoContrastError` where it is decoded for an assessment
(:func:`decode_as_assessed`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, cast

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_partial, read_preamble
from pydicom.multival import MultiValue
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from dicom_io.budget import BudgetedFile, HeaderTooLargeError, over_budget
from dicom_io.gate import MAX_PIXELS

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_INFLATED_BYTES",
    "FileChangedError",
    "HeaderTooLargeError",
    "InflatedTooLargeError",
    "NoContrastError",
    "PixelDataError",
    "decode_for_display",
    "decode_frame",
    "decode_reduction",
    "drop_pixel_data",
    "jpeg2000_reduction",
    "read_image",
    "require_contrast",
    "share_at_one_level",
]

# Robust min/max when the file carries no VOI: percentiles of the unpadded pixels.
_ROBUST_LOW_PERCENTILE = 0.5
_ROBUST_HIGH_PERCENTILE = 99.5
# Percentiles are taken on at most about this many pixels (strided sample).
_PERCENTILE_SAMPLE = 1 << 20
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_DATA_TAG = 0x7FE00010
#: Values longer than this stay in the file when :func:`read_image` reads an instance
#: (in practice only the pixel data), until they are used.
DEFERRED_BYTES = 1 << 20
#: Stored values read from the file at once when an uncompressed image is decoded reduced
#: (:func:`_blocks_from_file`).
_STRIP_BYTES = 1 << 22
#: The most a Deflated Explicit VR Little Endian data set may inflate to when
#: :func:`read_image` reads it. A hand radiograph is one frame, from a detector no larger
#: than 43 x 43 cm: at a 100 um pitch 4300 x 4300 pixels, 37 MB at 16 bits (55 MB as an
#: 8-bit RGB capture); hand cassettes are smaller. Past it a file of a few hundred
#: kilobytes (a deflate bomb) would inflate to gigabytes in memory; the listener refuses
#: deflated transfers for the same reason (dicom_io.scp.TRANSFER_SYNTAXES).
MAX_INFLATED_BYTES = 64 << 20
#: What :func:`read_image` reads of a data set besides its Pixel Data value at most
#: (:class:`dicom_io.budget.BudgetedFile`): reads of the file (an element or a sequence
#: item takes one to four) and bytes (values of at most :data:`DEFERRED_BYTES` each).
#: pydicom holds every element and item it reads, some 700 bytes for an empty item of 8:
#: past these the file is refused (:class:`HeaderTooLargeError`), before a million items
#: in 8 MB take gigabytes. A radiograph's header has a few hundred elements and holds
#: well under a megabyte (its overlays and ICC profile among them); an enhanced image's
#: functional groups, a few tens of elements a frame, fit for thousands of frames. At
#: most some 200 MiB.
MAX_HEADER_READS = 1 << 18
MAX_HEADER_BYTES = 16 << 20
# Deflated bytes read from the file at a time, and the most bytes inflated from them at
# a time: memory stays within the limit plus one piece.
_DEFLATED_READ_BYTES = 1 << 16
_INFLATED_PIECE_BYTES = 1 << 20
#: What a frame's stored values are decoded by (Image Pixel module, PS3.3 C.7.6.3).
FRAME_DESCRIPTION = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)
# JPEG 2000 codestream markers (ITU-T T.800 A.5.1, A.6.1): image size, coding style.
_J2K_SIZ = b"\xff\x51"
_J2K_COD = b"\xff\x52"
# JPEG 2000, and High-Throughput JPEG 2000 (the same codestream syntax, which OpenJPEG,
# behind Pillow and imagecodecs alike, decodes since 2.5.0).
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
# Lossless JPEG (ITU-T T.81 process 14) and JPEG-LS: decoded through imagecodecs
# (libjpeg-turbo 3, CharLS), outside the interpreter lock and four to five times faster
# than pydicom's pylibjpeg-libjpeg. The decodes are exact: its values, bit for bit (and,
# with a point transform, dcmtk's where pylibjpeg-libjpeg 2.5.0 saturates).
_LOSSLESS_JPEG_SYNTAXES = (JPEGLossless, JPEGLosslessSV1)
_JPEG_LS_SYNTAXES = (JPEGLSLossless, JPEGLSNearLossless)
_OWN_DECODER_SYNTAXES = (*_J2K_SYNTAXES, *_LOSSLESS_JPEG_SYNTAXES, *_JPEG_LS_SYNTAXES)
# JPEG (ITU-T T.81) and JPEG-LS (T.87) frames, each one codestream that must end in EOI.
# Their decoders fill a stream cut short with invented rows and say nothing (libjpeg-turbo,
# pylibjpeg-libjpeg), where dcmtk's refuse it; JPEG 2000's decoders (OpenJPEG) refuse it.
_JPEG_FAMILY_SYNTAXES = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    *_LOSSLESS_JPEG_SYNTAXES,
    *_JPEG_LS_SYNTAXES,
)
_JPEG_EOI = b"\xff\xd9"
# Frames whose own header says their size (:func:`_refuse_a_frame_larger_than_its_header`).
_ENCAPSULATED_SYNTAXES = (*_JPEG_FAMILY_SYNTAXES, *_J2K_SYNTAXES)
# How CharLS (charls_get_error_message, 2.x) says a JPEG-LS stream is damaged: bits that
# make no valid code ("general structural problem"), the data ending inside the scan, EOI
# or a restart marker where the scan or a marker segment must go on, and bytes between
# the scan's end and EOI. Legacy encoders wrote zero bytes there (the DICOM WG04 sample
# MR1_JLSL), so before the last three count as damage the stream is decoded once more
# without them (``_charls_decode``).
_CHARLS_AFTER_SCAN = (
    "still contains encoded data",
    "leading start byte (0xff) for a jpeg marker was not found",
    "missing end of image (eoi) marker",
)
_CHARLS_DAMAGE = (
    "general structural problem",
    "more input data was expected",
    "unexpected end of image (eoi) marker",
    "restart (rtsm) marker",
    *_CHARLS_AFTER_SCAN,
)
# Frame header markers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}
# Other grey images are reduced by averaging blocks of stored values, at most 16 x 16.
_MAX_BLOCK_REDUCTION = 4
# Transfer syntaxes whose stored values may differ from those encoded, where pixel padding
# is found near its value too (_lossy_padding). JPEG 2000 (.91) and HTJ2K (.203) carry
# lossless data as well: they count where Lossy Image Compression says "01" (_lossy).
_LOSSY_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)
#: How far from the padding value (or range) a pixel of a lossy image may lie and still be
#: padding (_lossy_padding), as a share of the span of the image's stored values (0.1 to
#: 99.9 percentile: padding and anatomy; not Bits Stored, which 12-bit data in 16 bits
#: overstates): about 127 for a 12-bit hand, 8 for an 8-bit one. Shutters of 12-bit hands,
#: JPEG 2000 at 10:1 to 40:1: 99.9 % of their pixels within 9 to 31 of the padding value,
#: all within 77 (a real hand), within 58 to 69, all within 128 (a noisy phantom); JPEG
#: at quality 75: within 6, all within 18 (12 bits), within 3, all within 8 (8 bits).
_LOSSY_PADDING_TOLERANCE = 1 / 32
#: How near (pixels, a square) a pixel in the padding range one within the tolerance may
#: lie and be padding, whatever borders it: bone beside the padded area loses at most this.
_LOSSY_PADDING_REACH = 2


class PixelDataError(ValueError):
    """The dataset has no pixel data, or it cannot be decoded."""


class NoContrastError(PixelDataError):
    """The pixel data decodes, but to an image without usable contrast: blank, or all but
    a few pixels at one end of its window (:func:`require_contrast`)."""


#: The share of an image's pixels at one grey level of :data:`CONTRAST_LEVELS`, after the
#: VOI LUT, from which it has no usable contrast (:func:`require_contrast`). Radiographs
#: are far below it: the three real hands in the project's data have 5 % at most at one
#: level (MONOCHROME2 or 1, decoded as assessed), the synthetic phantoms 20 % at most.
MAX_SHARE_AT_ONE_LEVEL = 0.98
#: Grey levels the share is counted in: a display's 8 bits.
CONTRAST_LEVELS = 256
# The share is counted on at most about this many pixels (strided sample).
_CONTRAST_SAMPLE = 1 << 16


class InflatedTooLargeError(ValueError):
    """A deflated data set inflates past :data:`MAX_INFLATED_BYTES`: more than any hand
    radiograph takes (a deflate bomb, or no radiograph), refused before it is held."""


class FileChangedError(OSError):
    """The file an instance was read from was replaced or changed before its pixels were.

    A listener puts an instance received again in the place of the first copy; its
    pixels are not mixed with the first copy's header. Reading the instance again reads
    one file throughout.
    """


def _first(value: Any) -> Any:
    """First value of a possibly multi-valued element."""
    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _float_or_none(value: Any) -> float | None:
    try:
        result = float(_first(value))
    except (TypeError, ValueError, IndexError):
        return None
    return result if np.isfinite(result) else None


# Enhanced (multi-frame) images keep these in functional groups (PS3.3 C.7.6.16).
_FUNCTIONAL_GROUP_OF = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
}


def _attr(ds: Dataset, keyword: str) -> Any:
    """Top-level value of ``keyword``, else the first frame's functional group value."""
    value = ds.get(keyword)
    if value is not None or keyword not in _FUNCTIONAL_GROUP_OF:
        return value
    macro = _FUNCTIONAL_GROUP_OF[keyword]
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        try:
            item = ds[groups].value[0][macro].value[0]
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        if item.get(keyword) is not None:
            return item.get(keyword)
    return None


class _SourceOpener:
    """Opens the file :func:`read_image` read an instance from, and no other.

    It is the dataset's ``fileobj_type``, which pydicom calls to open the file again for
    each value it left there, whoever asks for it; :func:`_frame_alone` opens the file
    through it too. So every deferred read of the instance checks that the file at the
    path is still the one read (device, inode, size, modification time).
    """

    def __init__(self, path: str, status: os.stat_result) -> None:
        self.path = path
        self.identity = _identity(status)

    def __call__(self, _name: object = None, _mode: str = "rb") -> BinaryIO:
        """The file, open for reading (pydicom passes its name and mode: the same).

        Raises
        ------
        FileChangedError
            When the file at that path is no longer the one read, or has changed.
        """
        fh = open(self.path, "rb")  # noqa: SIM115 (returned open, or closed here)
        if _identity(os.fstat(fh.fileno())) != self.identity:
            fh.close()
            raise FileChangedError(
                "the file was replaced or changed after its header was read; read it again"
            )
        return fh


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def read_image(path: str | os.PathLike[str]) -> Dataset:
    """Read an image instance from ``path``, its pixel data left in the file until used.

    The decoders then read from the file only what they decode, so that the memory an
    image takes to decode does not grow with what else the file holds:

    - of several frames, the one decoded (:func:`decode_frame`): an uncompressed
      40-frame 2500 x 2000 instance is 400 MB;
    - of an uncompressed grey frame decoded reduced, a strip of rows at a time
      (:func:`decode_for_display`), so a large radiograph takes no more than a small one;
    - of a compressed single grey frame decoded by imagecodecs or Pillow, its codestream,
      for the decoder only.

    Anything else is read whole when first used, as :func:`pydicom.dcmread` reads it.

    The pixels are read from the very file the header was read from: where another
    file has taken its place since (the same instance received again) or it changed,
    reading them raises :class:`FileChangedError`, and reading the instance again reads
    the new file throughout. Any other error reading the file then is raised as the
    :class:`OSError` it is, not as undecodable pixel data.

    A Deflated Explicit VR Little Endian file (one a user gives by hand: the listener
    takes none) is inflated a piece at a time, to at most :data:`MAX_INFLATED_BYTES`,
    and read from memory as :func:`pydicom.dcmread` reads it; dcmread itself would
    inflate the whole data set, however large, before it reads a byte of it.

    Raises
    ------
    OSError
        When the file cannot be read.
    InflatedTooLargeError
        When its data set is deflated and inflates past :data:`MAX_INFLATED_BYTES`.
    HeaderTooLargeError
        When it holds more besides its pixel data than :data:`MAX_HEADER_READS` reads
        or :data:`MAX_HEADER_BYTES` bytes take: the rest is not read.
    Exception
        Whatever :func:`pydicom.dcmread` raises for a file that is not DICOM
        (:class:`zlib.error` for a deflated data set that is corrupt or cut short).
    """
    with open(path, "rb") as fh:
        status = os.fstat(fh.fileno())
        if (deflated := _deflated_file_meta(fh)) is not None:
            return _read_deflated(fh, os.fspath(path), *deflated)
        budgeted = BudgetedFile(fh, max_reads=MAX_HEADER_READS, max_bytes=MAX_HEADER_BYTES)
        with _refused_past_budget(os.fspath(path)):
            ds = read_partial(
                cast(BinaryIO, budgeted),
                stop_when=budgeted.beside_pixel_data,
                defer_size=DEFERRED_BYTES,
            )
        # as dcmread leaves a dataset read from a file opened "rb" (dicom_io.sr reads
        # its buffer where it has one)
        ds.buffer, ds.fileobj_type = None, open
    syntax = _transfer_syntax(ds)
    if syntax is not None and not syntax.is_deflated:  # (deflated: read from memory)
        ds.fileobj_type = _SourceOpener(os.path.abspath(path), status)
    return ds


@contextlib.contextmanager
def _refused_past_budget(name: str) -> Iterator[None]:
    """Raises :class:`HeaderTooLargeError`, naming the file ``name``, where what it
    wraps does (pydicom raises an ``OSError`` for any error in a sequence item)."""
    try:
        yield
    except Exception as exc:
        if (over := over_budget(exc)) is None:
            raise
        raise HeaderTooLargeError(
            f"{name}: refused: {over}, more than any image's header holds"
        ) from exc


def _deflated_file_meta(fh: BinaryIO) -> tuple[bytes | None, FileMetaDataset] | None:
    """The preamble and File Meta Information of the Part 10 file open in ``fh`` where
    its data set is deflated, ``fh`` then at the data set's first byte; else None, and
    ``fh`` back at the start, for :func:`pydicom.dcmread` to read (and to say what is
    wrong with a file that is not DICOM)."""
    try:
        # read as dcmread reads them, so that it takes no file for deflated that this did
        # not (pydicom's own reader: it reads a writer's Implicit VR meta as well)
        preamble = read_preamble(fh, force=False)
        meta = _read_file_meta_info(fh)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # whatever it is, pydicom reads it or says why not
        deflated = False
    if deflated:
        return preamble, meta
    fh.seek(0)
    return None


def _read_deflated(
    fh: BinaryIO, name: str, preamble: bytes | None, meta: FileMetaDataset
) -> Dataset:
    """The deflated data set that follows in ``fh`` (the file ``name``), inflated within
    :data:`MAX_INFLATED_BYTES` (:func:`_inflate`) and read from memory, with ``meta``:
    what :func:`pydicom.dcmread` makes of the file."""
    buffer = DicomBytesIO(_inflate(fh, name))
    buffer.name = name
    budgeted = BudgetedFile(
        cast(BinaryIO, buffer), max_reads=MAX_HEADER_READS, max_bytes=MAX_HEADER_BYTES
    )
    with _refused_past_budget(name):
        dataset = read_dataset(
            cast(BinaryIO, budgeted),
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=budgeted.beside_pixel_data,
        )
    ds = FileDataset(buffer, dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _inflate(fh: BinaryIO, name: str) -> bytes:
    """The rest of ``fh`` (the file ``name``), raw deflate (PS3.5 A.5), inflated a
    piece at a time.

    Raises
    ------
    InflatedTooLargeError
        Once it has inflated past :data:`MAX_INFLATED_BYTES`: the rest is not inflated.
    zlib.error
        When the deflated stream is corrupt, or ends before its last block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces: list[bytes] = []
    size = 0
    while not inflater.eof:
        deflated = inflater.unconsumed_tail or fh.read(_DEFLATED_READ_BYTES)
        if not deflated:
            raise zlib.error(
                f"{name}: the deflated data set ends before its last block (cut short)"
            )
        # one byte past the limit at most, so that a data set of the limit exactly is read
        room = MAX_INFLATED_BYTES + 1 - size
        piece = inflater.decompress(deflated, min(room, _INFLATED_PIECE_BYTES))
        size += len(piece)
        if size > MAX_INFLATED_BYTES:
            raise InflatedTooLargeError(
                f"{name}: refused: its deflated data set inflates past "
                f"{MAX_INFLATED_BYTES >> 20} MiB, more than any hand radiograph takes"
            )
        pieces.append(piece)
    return b"".join(pieces)


def _open_source(ds: Dataset) -> BinaryIO | None:
    """The file ``ds`` was read from by :func:`read_image`, open; None if it was not.

    Raises
    ------
    FileChangedError
        When the file at that path is no longer the one read, or has changed.
    """
    opener = getattr(ds, "fileobj_type", None)
    return opener() if isinstance(opener, _SourceOpener) else None


def _deferred_pixel_data(ds: Dataset) -> RawDataElement | None:
    """``ds``'s Pixel Data element where its value is still in the file, else None."""
    try:
        element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    except KeyError:
        return None
    if isinstance(element, RawDataElement) and element.value is None and element.length:
        return element
    return None


def _read_deferred_pixels(ds: Dataset) -> None:
    """Read from the file any pixel data value :func:`read_image` left there.

    Done before decoding, so that a file that cannot be read raises its
    :class:`OSError` here, instead of being taken for undecodable pixel data.
    """
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            ds[keyword]  # reading the element reads a deferred value in (read_image's opener)


def _frame_alone(ds: Dataset, index: int) -> Dataset | None:
    """Frame ``index`` of ``ds``'s deferred pixel data as a single-frame dataset.

    Only the frame's bytes are read, from the file :func:`read_image` read ``ds`` from:
    at their offset for uncompressed data, through the offset tables or the fragments
    for encapsulated data. The dataset has the attributes that describe the frame's
    stored values and the transfer syntax, nothing else. None where the frame cannot be
    read alone (``ds`` was not read by :func:`read_image`, or from a deflated file; the
    data is shorter than the header says or the file than the data; frames that do not
    start on a byte; a malformed encapsulation): the caller then decodes as for any
    other dataset, and reports what is wrong.

    Raises
    ------
    OSError
        When the file cannot be read; :class:`FileChangedError` when it is no longer the
        file ``ds`` was read from.
    """
    if (in_file := _pixel_data_in_file(ds)) is None:
        return None
    element, syntax, frames = in_file
    if not 0 <= index < frames:
        return None
    length = 0 if syntax.is_encapsulated else _native_frame_bytes(ds, element, syntax, frames)
    if length is None:
        return None
    fh = _open_source(ds)
    if fh is None:
        return None
    with fh:
        if syntax.is_encapsulated:
            from pydicom.encaps import encapsulate

            fh.seek(element.value_tell)
            if (frame := _encapsulated_frame(ds, index, fh)) is None:
                return None
            return _stored_values_dataset(ds, syntax, encapsulate([frame]))
        if not _holds_value(fh, element):
            return None  # a file cut short: refused as when read whole, whole frame or not
        fh.seek(element.value_tell + index * length)
        value = fh.read(length)
    return _stored_values_dataset(ds, syntax, value) if len(value) == length else None


def _pixel_data_in_file(ds: Dataset) -> tuple[RawDataElement, UID, int] | None:
    """``ds``'s Pixel Data element where :func:`read_image` left its value in the file,
    the transfer syntax, and the number of frames; None where the value is not there."""
    element = _deferred_pixel_data(ds)
    syntax = _transfer_syntax(ds)
    if element is None or syntax is None:
        return None
    return element, syntax, int(_float_or_none(ds.get("NumberOfFrames")) or 1)


def _native_frame_bytes(
    ds: Dataset, element: RawDataElement, syntax: UID, frames: int
) -> int | None:
    """Bytes of one frame of ``ds``'s uncompressed pixel data where frames can be read
    from the file at their offsets; None where they cannot (frames that need not start on
    a byte, YBR_422, big endian, an undefined length, or data shorter than its frames).
    """
    allocated = int(ds.get("BitsAllocated") or 0)
    rows, columns = _stored_shape(ds)
    length = rows * columns * int(ds.get("SamplesPerPixel") or 1) * allocated // 8
    photometric = str(ds.get("PhotometricInterpretation") or "").upper()
    if (
        allocated not in (8, 16, 32)  # (1: frames need not start on a byte)
        or photometric.endswith("_422")
        or not syntax.is_little_endian
        or length == 0
        or element.length == 0xFFFFFFFF
        or element.length < frames * length
    ):
        return None
    return length


def _holds_value(fh: BinaryIO, element: RawDataElement) -> bool:
    """Whether the open file is long enough to hold ``element``'s whole value (one of
    undefined length, encapsulated, ends where its items say: reading them finds out)."""
    if element.length == 0xFFFFFFFF:
        return True
    return os.fstat(fh.fileno()).st_size >= element.value_tell + element.length


def _stored_values_dataset(
    ds: Dataset, syntax: UID, value: bytes, rows: int | None = None
) -> Dataset:
    """A dataset of one frame whose stored values are ``value``, described as ``ds``'s
    frames are (``rows`` of them where given: a strip of an uncompressed frame), that
    pydicom decodes as it would ``ds``'s own."""
    alone = Dataset()
    alone.file_meta = FileMetaDataset()
    alone.file_meta.TransferSyntaxUID = syntax
    for keyword in FRAME_DESCRIPTION:
        if keyword in ds:
            # elements of its own: a strip's Rows set on a shared element would be ds's
            element = ds[keyword]
            alone.add_new(element.tag, element.VR, element.value)
    if rows is not None:
        alone.Rows = rows
    vr = "OB" if syntax.is_encapsulated or int(ds.get("BitsAllocated") or 0) == 8 else "OW"
    alone.add_new(_PIXEL_DATA_TAG, vr, value)
    return alone


def _blocks_from_file(ds: Dataset, reduce: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`_reduced` of ``ds``'s first uncompressed grey frame, read from its file a
    strip of rows at a time.

    The same values as decoding the frame whole and then reducing it, with one strip of
    stored values (about :data:`_STRIP_BYTES`) in memory instead of the whole frame: a
    30-megapixel radiograph is 58 MB. None where the frame cannot be read so (only a
    grey image read by :func:`read_image` from a file that holds its whole pixel data
    can): the caller decodes the frame whole, and reports what is wrong.

    Raises
    ------
    OSError
        When the file cannot be read; :class:`FileChangedError` when it is no longer the
        file ``ds`` was read from.
    """
    if reduce < 1 or (in_file := _pixel_data_in_file(ds)) is None:
        return None
    element, syntax, frames = in_file
    if syntax.is_encapsulated or not _grey_frames(ds):
        return None
    if (length := _native_frame_bytes(ds, element, syntax, frames)) is None:
        return None
    rows, columns = _stored_shape(ds)
    row_bytes = length // rows
    if rows >> reduce == 0 or (fh := _open_source(ds)) is None:
        return None
    with fh:
        if not _holds_value(fh, element):
            return None
        fh.seek(element.value_tell)

        def strip(top: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
            value = fh.read(count * row_bytes)
            if len(value) != count * row_bytes:
                raise FileChangedError("the file was cut short while it was read")
            # decoded as the frame read whole is, and refused as it is (PixelDataError)
            stored = decode_frame(_stored_values_dataset(ds, syntax, value, rows=count))
            return stored, _padding_mask(stored, ds)

        return _reduced(strip, rows, columns, reduce, row_bytes=row_bytes)


def _reduced(
    strip: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]],
    rows: int,
    columns: int,
    reduce: int,
    *,
    row_bytes: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Means of the ``2**reduce`` x ``2**reduce`` blocks of a grey image of stored
    values (:func:`_block_mean`), and which blocks touch padding (:func:`_block_any`;
    None where none does), taken a strip of rows at a time: ``strip(top, count)``
    gives ``count`` rows from row ``top``, in order, each strip about
    :data:`_STRIP_BYTES` of ``row_bytes`` rows, and where they are padding (None: none
    is). So what is held at once besides the result is one strip and its sums, not the
    image's."""
    factor = 1 << reduce
    kept = rows // factor * factor  # partial blocks at the bottom are left out
    step = factor * max(1, _STRIP_BYTES // (factor * max(1, row_bytes)))
    blocks = np.empty((kept // factor, columns // factor), dtype=np.float32)
    padding: np.ndarray | None = None
    for top in range(0, kept, step):
        count = min(step, kept - top)
        stored, mask = strip(top, count)
        at = slice(top // factor, (top + count) // factor)
        blocks[at] = _block_mean(stored, factor)
        if mask is not None:
            if padding is None:
                padding = np.zeros(blocks.shape, dtype=bool)
            padding[at] = _block_any(mask, factor)
    return blocks, padding


def _transfer_syntax(ds: Dataset) -> UID | None:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _j2k_codestream(ds: Dataset) -> bytes | None:
    """The codestream of a single-frame, unsigned, grey JPEG 2000 (or HTJ2K) image, else None."""
    return _grey_codestream(ds, _J2K_SYNTAXES)


def _grey_codestream(ds: Dataset, syntaxes: Sequence[str]) -> bytes | None:
    """The codestream of a single-frame, unsigned, grey image in one of ``syntaxes``."""
    if _transfer_syntax(ds) not in syntaxes or "PixelData" not in ds:
        return None
    if int(_float_or_none(ds.get("NumberOfFrames")) or 1) != 1:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0):
        return None
    # Where read_image left the pixel data in the file, the frame is read from there and
    # the value is not: one copy of the codestream in memory, not two.
    element = _deferred_pixel_data(ds)
    if element is not None and (fh := _open_source(ds)) is not None:
        with fh:
            if _holds_value(fh, element):
                fh.seek(element.value_tell)
                return _encapsulated_frame(ds, 0, fh)
    return _encapsulated_frame(ds, 0)


def _encapsulated_frame(ds: Dataset, index: int, source: BinaryIO | None = None) -> bytes | None:
    """The bytes of frame ``index`` of ``ds``'s encapsulated Pixel Data, None where they
    cannot be had (a malformed encapsulation: the ordinary decoder will say why).

    ``source``: the file, positioned at the start of the value, to read the frame from
    instead of the value in memory (:func:`_frame_alone`).

    Raises
    ------
    OSError
        When the file cannot be read (:class:`FileChangedError` when it is no longer the
        one :func:`read_image` read).
    """
    from pydicom.encaps import get_frame

    # through the Basic or Extended Offset Table where there is one, not past the frames
    # before
    frames = int(_float_or_none(ds.get("NumberOfFrames")) or 1)
    eot = (ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths"))
    try:
        buffer = ds.PixelData if source is None else source
        return bytes(
            get_frame(
                buffer,
                index,
                number_of_frames=frames,
                extended_offsets=eot if None not in eot else None,
            )
        )
    except OSError:
        raise
    except Exception:
        return None


def _refuse_a_frame_larger_than_its_header(
    frame: bytes | None, ds: Dataset, syntax: UID | None
) -> None:
    """Refuse a JPEG, JPEG-LS or JPEG 2000 frame whose own header holds more samples than
    Rows, Columns and Samples per Pixel say, or does not say how many it holds.

    Its decoder allocates what the frame says, before anything compares it with the data
    set: a frame of a few kilobytes that says 60000 x 60000 (a constant image compresses
    to next to nothing) took gigabytes, and a worker killed for it was given the image
    again. Such a frame is damaged, or made to do harm; no decoder is asked to try. So is
    one whose size cannot be read where a decoder reads it (a JPEG 2000 frame that is
    neither a codestream nor a JP2 file holding one; a JPEG frame with no frame header
    before its scan), or is left for later (0 rows or columns: a DNL marker's, or a
    JPEG-LS LSE segment's, which no hand radiograph needs). Where the frame itself
    cannot be had from the encapsulation, pydicom's decoder says why.

    Raises
    ------
    PixelDataError
        When the frame holds more samples than the data set's header says, or says
        none that can be read.
    """
    if frame is None:
        return
    name = getattr(syntax, "name", None) or str(syntax)
    if syntax in _J2K_SYNTAXES:
        start = _j2k_codestream_start(frame)
        if start is None:
            raise PixelDataError(
                f"the {name} frame is neither a JPEG 2000 codestream (SOC and SIZ at its "
                "start) nor a JP2 file holding one; not decoded"
            )
        size = _j2k_image_size(frame[start : start + 64])
        if size is None:
            return  # its SIZ cut short: no decoder can size an image from it
    else:
        header = _jpeg_frame_header(frame, whole=True)
        if header is None:
            raise PixelDataError(
                f"the {name} frame has no frame header (SOFn) and scan (SOS) that can be "
                "read; not decoded"
            )
        size = header[:3]
    rows, columns, components = size
    if not rows or not columns:
        raise PixelDataError(
            f"the {name} frame's header says {rows} x {columns} samples, its size left to a "
            "later segment; not decoded"
        )
    said = _stored_shape(ds)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if rows * columns * components > said[0] * said[1] * samples:
        raise PixelDataError(
            f"the {name} frame holds {rows} x {columns} x {components} samples, more than "
            f"Rows, Columns and Samples per Pixel say ({said[0]} x {said[1]} x {samples}); "
            "not decoded"
        )


#: The signature box a JP2 file starts with (ISO/IEC 15444-1 I.5.1).
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_codestream_start(frame: bytes) -> int | None:
    """Where the codestream of a JPEG 2000 frame starts, as its decoder reads it: at once
    (SOC, its SIZ marker segment right after: T.800 A.4.1, A.5.1), or in a JP2 file's
    contiguous codestream box (a wrapper some modalities write, which pydicom's decoder
    takes too); None where it is neither."""
    start = _jp2_codestream_start(frame) if frame.startswith(_JP2_SIGNATURE) else 0
    if start is None or frame[start : start + 4] != b"\xff\x4f" + _J2K_SIZ:
        return None
    return start


def _jp2_codestream_start(frame: bytes) -> int | None:
    """Where the codestream of a JP2 file's first contiguous codestream box (``jp2c``)
    starts, walking its boxes (ISO/IEC 15444-1 I.4); None where there is none."""
    at = 0
    while at + 8 <= len(frame):
        length = int.from_bytes(frame[at : at + 4], "big")
        kind = frame[at + 4 : at + 8]
        header = 8
        if length == 1:  # the length in the 8 bytes after the type
            if at + 16 > len(frame):
                return None
            length, header = int.from_bytes(frame[at + 8 : at + 16], "big"), 16
        elif length == 0:  # the last box, to the end
            length = len(frame) - at
        if kind == b"jp2c":
            return at + header
        if length < header:
            return None
        at += length
    return None


def _require_end_of_image(codestream: bytes | None, syntax: UID | None) -> None:
    """Refuse a JPEG or JPEG-LS frame whose codestream stops before its EOI marker.

    A frame cut short (a faulty modality, archive or transfer upstream) decodes in
    libjpeg-turbo and pylibjpeg-libjpeg to a full-size image whose missing rows are
    made up, with no error; a bone age read off it would look like any other. EOI cannot
    occur inside entropy-coded data (T.81 B.1.1.2 and T.87 byte stuffing), so a frame
    that does not end in it, once the padding of an even-length fragment is set aside
    (a zero byte, or an 0xFF fill byte, which some encoders write), is incomplete.
    dcmtk's decoders refuse such a frame too, even one that lacks only the marker.

    Raises
    ------
    PixelDataError
        When the frame does not end in EOI.
    """
    if codestream is not None and not codestream.rstrip(b"\0\xff").endswith(_JPEG_EOI):
        name = getattr(syntax, "name", "JPEG")
        raise PixelDataError(
            f"The {name} codestream ends without its end-of-image marker (FFD9): "
            "the pixel data is incomplete."
        )


def _is_charls_error(error: BaseException) -> bool:
    """Whether ``error`` is CharLS's, as imagecodecs raises it."""
    try:
        from imagecodecs import JpeglsError
    except ImportError:
        return False
    return isinstance(error, JpeglsError)


def _charls_says(error: BaseException, phrases: Sequence[str]) -> bool:
    """Whether ``error`` is CharLS's, in one of ``phrases`` (lower case)."""
    message = str(error).lower()
    return _is_charls_error(error) and any(words in message for words in phrases)


def _charls_decode(codestream: bytes) -> np.ndarray:
    """A JPEG-LS codestream decoded by CharLS, zero bytes before its EOI set aside.

    T.87 puts EOI right after the scan; legacy encoders wrote zero bytes between them,
    which CharLS refuses. When it refuses what follows the scan, and the stream has
    zero bytes before its EOI, it is decoded again without them (or all but one, in
    case the scan's own last byte is zero): a stream damaged there, or elsewhere, still
    fails, with the first error.
    """
    import imagecodecs

    try:
        return np.asarray(imagecodecs.jpegls_decode(codestream))
    except Exception as exc:
        if not _charls_says(exc, _CHARLS_AFTER_SCAN):
            raise
        scan_and_padding = codestream.rstrip(b"\0\xff")[: -len(_JPEG_EOI)]
        scan = scan_and_padding.rstrip(b"\0")
        padding = len(scan_and_padding) - len(scan)
        for kept in range(min(padding, 2)):
            try:
                return np.asarray(imagecodecs.jpegls_decode(scan + bytes(kept) + _JPEG_EOI))
            except Exception:
                continue
        raise


def _refuse_what_charls_found_damaged(error: BaseException, syntax: UID | None) -> None:
    """Refuse a JPEG-LS frame that CharLS could not decode because the stream is damaged.

    CharLS, the decoder dcmtk uses too, checks the scan's structure as it decodes and
    stops at damage inside it (bytes lost, zeroed or altered, a stream cut and closed
    with EOI); pylibjpeg-libjpeg, pydicom's decoder and the fallback, decodes the same
    stream to a full-size image with up to half its pixels wrong, and says nothing. So
    such a frame goes no further (see ``_CHARLS_DAMAGE`` for which of CharLS's errors say
    so, and :func:`_charls_decode` for zero bytes before EOI); what CharLS does not
    support still goes to pydicom's decoder.

    Raises
    ------
    PixelDataError
        When ``error`` is CharLS's, and says the stream is damaged.
    """
    if _charls_says(error, _CHARLS_DAMAGE):
        name = getattr(syntax, "name", "JPEG-LS")
        detail = str(error).partition(" returned ")[2].strip("'") or str(error)
        raise PixelDataError(
            f"The {name} codestream is damaged (CharLS: {detail}); the pixel data is not decoded."
        ) from error


def _require_charls_to_find_no_damage(frame: bytes, ds: Dataset, syntax: UID | None) -> None:
    """Have CharLS decode a JPEG-LS frame that pydicom's decoder is to decode, as a check.

    For the frames imagecodecs does not decode itself (several frames, signed or colour
    samples): see :func:`_refuse_what_charls_found_damaged`. A frame whose header claims
    another size or number of samples than the dataset's is left to pydicom, which
    reports it, so that the decoder never allocates what a damaged header says.
    """
    header = _jpeg_frame_header(frame)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if header is None or header[:3] != (*_stored_shape(ds), samples):
        return
    try:
        _charls_decode(frame)
    except Exception as exc:
        _refuse_what_charls_found_damaged(exc, syntax)


def _j2k_header(codestream: bytes) -> tuple[int, int] | None:
    """``(precision, decomposition levels)`` from the SIZ and COD marker segments."""
    siz, cod = codestream.find(_J2K_SIZ, 0, 4096), codestream.find(_J2K_COD, 0, 4096)
    if siz < 0 or cod < 0 or len(codestream) < max(siz + 41, cod + 10):
        return None
    ssiz = codestream[siz + 40]  # first component's Ssiz: bit 7 signed, bits 0-6 depth - 1
    if ssiz & 0x80:
        return None
    return (ssiz & 0x7F) + 1, codestream[cod + 9]


def jpeg2000_reduction(ds: Dataset, *, min_short_side: int, min_long_side: int = 0) -> int:
    """How many halvings a reduced-resolution JPEG 2000 decode can afford.

    JPEG 2000 decodes the image at 1/2, 1/4 ... of its size for a fraction of the full
    cost (the higher wavelet levels are never reconstructed). This returns the largest
    ``r`` whose image, ``ceil(Rows / 2**r)`` by ``ceil(Columns / 2**r)``, still has a
    short side of at least ``min_short_side`` and a long side of at least
    ``min_long_side``, within the codestream's decomposition levels.

    Parameters
    ----------
    ds : pydicom.Dataset
        Image dataset.
    min_short_side, min_long_side : int
        Pixels the consumer needs along the short and the long side.

    Returns
    -------
    int
        0 for a full-resolution decode; always 0 unless the image is single-frame,
        unsigned, grey JPEG 2000 that Pillow can decode.
    """
    codestream = _j2k_codestream(ds)
    if codestream is None:
        return 0
    return _j2k_halvings(ds, codestream, min_short_side, min_long_side)


def _j2k_halvings(ds: Dataset, codestream: bytes, min_short_side: int, min_long_side: int) -> int:
    """:func:`jpeg2000_reduction` of ``ds``, whose codestream is ``codestream``."""
    header = _j2k_header(codestream)
    if header is None or not _pillow_decodes_j2k():
        return 0
    precision, levels = header
    if precision > 16:
        return 0
    return _affordable_halvings(
        ds, levels, min_short_side, min_long_side, lambda side, factor: -(-side // factor)
    )


def decode_reduction(ds: Dataset, *, min_short_side: int, min_long_side: int = 0) -> int:
    """How many halvings :func:`decode_for_display` can apply while decoding ``ds``.

    A radiograph often has several times the pixels its consumers need (the network
    input, the heat-map picture). Decoding it smaller saves most of the per-pixel work
    that follows:

    - JPEG 2000 skips the finest wavelet levels (:func:`jpeg2000_reduction`); where
      the image declares pixel padding, the pixels its low-pass band mixed padding into
      along the padded area's edge are padding too (:func:`_j2k_padding_reach`);
    - other grey integer images (uncompressed, or decoded in full: JPEG lossless,
      JPEG-LS, RLE, and JPEG 2000 of several frames ...; of several frames, the first)
      average blocks of ``2**r`` x ``2**r`` stored values
      before any LUT is applied, which is what the JPEG 2000 reduction does too (its
      low-pass band); the partial blocks at the bottom and right edges, fewer than
      ``2**r`` pixels, are left out. An image therefore comes out the same whichever
      of these syntaxes it came in, alone or as the first of several frames.

    Parameters
    ----------
    ds : pydicom.Dataset
        Image dataset with file meta (for its transfer syntax).
    min_short_side, min_long_side : int
        Pixels the consumer needs along the short and the long side.

    Returns
    -------
    int
        The number of halvings ``r`` (0: decode in full) for ``decode_for_display``'s
        ``reduce``.
    """
    if (codestream := _j2k_codestream(ds)) is not None:  # read once, for its header
        return _j2k_halvings(ds, codestream, min_short_side, min_long_side)
    if not _grey_frames(ds):
        return 0
    return _affordable_halvings(
        ds, _MAX_BLOCK_REDUCTION, min_short_side, min_long_side, lambda side, f: side // f
    )


def _affordable_halvings(
    ds: Dataset,
    limit: int,
    min_short_side: int,
    min_long_side: int,
    reduced: Callable[[int, int], int],
) -> int:
    """Largest ``r <= limit`` whose ``reduced(side, 2**r)`` sides still suffice."""
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    short, long = sorted((rows, columns))
    level = 0
    while level < limit:
        factor = 1 << (level + 1)
        if reduced(short, factor) < min_short_side or reduced(long, factor) < min_long_side:
            break
        level += 1
    return level


def _grey_frames(ds: Dataset) -> bool:
    """Whether ``ds``'s frames (one or several) are grey integer samples in a known
    transfer syntax."""
    if _transfer_syntax(ds) is None or "PixelData" not in ds:
        return False
    photometric = str(ds.get("PhotometricInterpretation") or "").upper()
    return int(ds.get("SamplesPerPixel") or 1) == 1 and photometric in (
        "MONOCHROME1",
        "MONOCHROME2",
    )


def _block_mean(stored: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of integer ``stored``, float32.

    Rows are summed first (whole contiguous rows), then columns of the smaller result;
    partial blocks at the bottom and right edges are left out.
    """
    rows, columns = stored.shape[0] // factor * factor, stored.shape[1] // factor * factor
    wide = np.dtype(np.int64 if stored.dtype.itemsize > 2 else np.int32)
    summed: np.ndarray = stored[0:rows:factor].astype(wide)
    for offset in range(1, factor):
        np.add(summed, stored[offset:rows:factor], out=summed)
    blocks: np.ndarray = summed[:, 0:columns:factor].copy()
    for offset in range(1, factor):
        np.add(blocks, summed[:, offset:columns:factor], out=blocks)
    out = blocks.astype(np.float32)
    out *= np.float32(1.0 / (factor * factor))
    return out


def _block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """True for each ``factor`` x ``factor`` block of ``mask`` holding any True."""
    rows, columns = mask.shape[0] // factor * factor, mask.shape[1] // factor * factor
    folded = mask[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    return np.asarray(folded.any(axis=(1, 3)))


def _pillow_decodes_j2k() -> bool:
    from PIL import features

    return bool(features.check("jpg_2000"))


def set_jpeg2000_threads(threads: int) -> None:
    """Have JPEG 2000 decodes in this process use ``threads`` threads.

    OpenJPEG decodes code-blocks in parallel on as many threads as the environment
    variable ``OPJ_NUM_THREADS`` says when each decode starts (one by default): Pillow's
    binding offers no other way to ask, and full-size decodes through imagecodecs are
    given the same count. With two threads a 1.5-megapixel lossless CR
    decodes in about half the time (0.24 -> 0.13 s here), bit for bit the same.

    Parameters
    ----------
    threads : int
        Threads per decode, at least 1.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    os.environ["OPJ_NUM_THREADS"] = str(threads)


def _j2k_image_size(codestream: bytes) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from the SIZ marker segment (T.800 A.5.1)."""
    siz = codestream.find(_J2K_SIZ, 0, 4096)
    if siz < 0 or len(codestream) < siz + 40:
        return None

    def field(at: int, size: int = 4) -> int:
        return int.from_bytes(codestream[siz + at : siz + at + size], "big")

    # Xsiz - XOsiz by Ysiz - YOsiz reference grid points, Csiz components
    return field(10) - field(18), field(6) - field(14), field(38, 2)


def _opj_threads() -> int:
    """Threads per JPEG 2000 decode, as :func:`set_jpeg2000_threads` left them."""
    try:
        return max(1, int(os.environ.get("OPJ_NUM_THREADS") or 1))
    except ValueError:
        return 1


def _decode_j2k(codestream: bytes, reduce: int, ds: Dataset) -> np.ndarray:
    """Stored values of a grey JPEG 2000 codestream at ``2**-reduce`` of its size.

    Both ways are OpenJPEG on :func:`set_jpeg2000_threads` threads, bit for bit
    pydicom's decode at full size. A full decode goes through imagecodecs, which releases
    the interpreter lock while it decodes, so a batching process's other task threads
    go on meanwhile. A reduced one goes through Pillow, whose binding can skip wavelet
    levels (imagecodecs' cannot) and holds the lock.

    Raises
    ------
    ValueError
        When the codestream is not the dataset's grey image, or neither way decodes it;
        pydicom's decoder then tries.
    """
    size = _j2k_image_size(codestream)
    if size != (*_stored_shape(ds), 1):
        # checked before decoding: the decoder allocates what the codestream says
        raise ValueError(f"the codestream holds (rows, columns, components) {size}")
    if reduce == 0:
        import imagecodecs

        return _stored_values(imagecodecs.jpeg2k_decode(codestream, numthreads=_opj_threads()), ds)
    if not _pillow_decodes_j2k():
        raise ValueError("Pillow was built without OpenJPEG")
    return _decode_j2k_pillow(codestream, reduce)


def _decode_j2k_pillow(codestream: bytes, reduce: int) -> np.ndarray:
    """Stored values of a grey JPEG 2000 codestream at ``2**-reduce`` of its size.

    Pillow's OpenJPEG binding decodes at a reduced resolution (``Image.reduce``), which
    pylibjpeg-openjpeg (pydicom's decoder) cannot, and on several threads
    (:func:`set_jpeg2000_threads`), which pylibjpeg-openjpeg ignores; at ``reduce=0`` its
    decode is bit for bit pydicom's. Pillow scales samples to 16 bits (or to 8, where
    they have fewer), so they are shifted back to the codestream's precision.
    """
    from PIL import Image

    header = _j2k_header(codestream)
    if header is None:
        raise ValueError("no JPEG 2000 SIZ/COD marker segments")
    precision, _levels = header
    if precision > 16:
        raise ValueError(f"{precision}-bit samples are beyond Pillow's 16")
    shape = _j2k_reduced_shape(codestream, reduce)
    if shape is None:
        raise ValueError("no JPEG 2000 SIZ marker segment")
    power, half = 1 << reduce, (1 << reduce) >> 1
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as image:
        # Jpeg2KImageFile.load() sizes the image int((side + half) / power), rounding
        # half up, where OpenJPEG decodes ceil(side / power) (a side of 601 at 2 levels:
        # 150, not 151) and Pillow refuses the tile as a broken data stream. Given the
        # side ceil * power - half, it sizes ceil, as a Pillow that rounds up would too
        # (ceil(ceil - 1/2) = ceil); one that sizes otherwise fails, or fails the shape
        # check below, and pydicom decodes instead.
        if isinstance(getattr(image, "_size", None), tuple):  # what Image.size reads
            image._size = (shape[1] * power - half, shape[0] * power - half)
        # Jpeg2KImageFile takes the level as an attribute that shadows Image.reduce()
        image.reduce = reduce  # type: ignore[method-assign,assignment]
        image.load()
        array = np.asarray(image)
    if array.shape != shape:
        raise ValueError(f"Pillow decoded {array.shape} where OpenJPEG's level is {shape}")
    if precision <= 8:  # Pillow's 8-bit mode holds fewer bits shifted to its top
        return np.right_shift(array.astype(np.uint8, copy=False), 8 - precision)
    return np.right_shift(array.astype(np.uint16, copy=False), 16 - precision)


def _j2k_reduced_shape(codestream: bytes, reduce: int) -> tuple[int, int] | None:
    """``(rows, columns)`` of a JPEG 2000 codestream decoded at ``2**-reduce`` of its size.

    OpenJPEG's image at that level spans ``ceil(Ysiz / 2**r) - ceil(YOsiz / 2**r)``
    rows by the same of X (T.800 B.5): ``ceil(Rows / 2**r)`` where the origin is 0.
    """
    siz = codestream.find(_J2K_SIZ, 0, 4096)
    if siz < 0 or len(codestream) < siz + 22:
        return None

    def reduced(at: int) -> int:  # ceil(end / 2**r) - ceil(origin / 2**r)
        end = int.from_bytes(codestream[siz + at : siz + at + 4], "big")
        origin = int.from_bytes(codestream[siz + at + 8 : siz + at + 12], "big")
        return -(-end >> reduce) + (-origin >> reduce)

    return reduced(10), reduced(6)  # Ysiz (YOsiz), Xsiz (XOsiz)


def _jpeg_frame_header(
    codestream: bytes, *, whole: bool = False
) -> tuple[int, int, int, int] | None:
    """``(rows, columns, components, precision)`` from a JPEG or JPEG-LS frame header
    (SOFn; or DHP, which gives a hierarchical image's size in the same layout).

    Walks the marker segments after SOI (ITU-T T.81 B.1.1.4; JPEG-LS, T.87, uses the same
    layout and its SOF55 marker) up to the first frame header, in the stream's first
    64 KiB, or in all of it up to its first scan where ``whole`` (a decoder reads as far:
    application segments, an ICC profile among them, may take more than 64 KiB), and
    then only where a scan follows it.
    """
    if codestream[:2] != b"\xff\xd8":
        return None
    end = len(codestream) if whole else min(len(codestream), 1 << 16)
    for marker, at, length in _jpeg_segments(codestream, 2, end):
        if marker == 0xDA:  # SOS: a scan, and no frame header before it
            return None
        if marker in _FRAME_SIZE_MARKERS:
            # a segment of 8 bytes and 3 a component (T.81 B.2.2), all of it in the
            # stream; another is no frame header, and its decoder says what it is
            if at + 10 > len(codestream) or length != 8 + 3 * codestream[at + 9]:
                return None
            if at + 2 + length > len(codestream):
                return None
            after = _jpeg_segments(codestream, at + 2 + length, len(codestream))
            if whole and not any(later == 0xDA for later, _, _ in after):
                return None  # no image: pylibjpeg-libjpeg made one up
            rows = int.from_bytes(codestream[at + 5 : at + 7], "big")
            columns = int.from_bytes(codestream[at + 7 : at + 9], "big")
            return rows, columns, codestream[at + 9], codestream[at + 4]
    return None


#: Markers of a segment that says an image's size: the frame headers, and DHP.
_FRAME_SIZE_MARKERS = _SOF_MARKERS | {0xDE}


def _jpeg_segments(codestream: bytes, at: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(marker, where, length)`` of the marker segments of a JPEG or JPEG-LS stream from
    ``at`` up to ``end`` or its first scan (SOS, yielded with the length its header
    says), each where its 0xFF is. Other bytes between segments are passed over up to
    the next 0xFF, and fill bytes (0xFF) and 0xFF00 with them, as libjpeg reads them
    (``next_marker``): some encoders leave such bytes, and the decoders take the stream."""
    while at + 4 <= end:
        if codestream[at] != 0xFF:
            at = codestream.find(b"\xff", at, end)
            if at < 0:
                return
            continue
        marker = codestream[at + 1]
        if marker in (0xFF, 0x00):
            at += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # EOI: the stream ends
            return
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # RSTn, SOI, TEM: no length
            at += 2
            continue
        length = int.from_bytes(codestream[at + 2 : at + 4], "big")
        yield marker, at, length
        if marker == 0xDA:
            return
        at += 2 + length


def _decode_jpeg_imagecodecs(codestream: bytes, ds: Dataset) -> np.ndarray:
    """Stored values of a grey lossless JPEG or JPEG-LS codestream, through imagecodecs.

    pydicom's decoder for these (pylibjpeg-libjpeg) holds the interpreter lock for the
    whole decode, about 0.2 s for a 5-megapixel radiograph here; libjpeg-turbo 3 (lossless
    JPEG) and CharLS (JPEG-LS), as imagecodecs binds them, take a quarter of that and let
    the process's other threads run. Both decodes are exact (JPEG-LS near-lossless too:
    its reconstruction is fixed by the standard), so the values are pydicom's.

    Raises
    ------
    ValueError
        When the result is not the dataset's grey image, so pydicom decodes instead.
    """
    import imagecodecs

    header = _jpeg_frame_header(codestream)
    if header is None:
        raise ValueError("no frame header (SOF marker segment) in the stream's first 64 KiB")
    rows, columns, components, precision = header
    if (rows, columns) != _stored_shape(ds) or components != 1:
        # checked before decoding: the decoder allocates what the stream says
        raise ValueError(f"the stream holds {rows} x {columns} x {components} samples")
    if _transfer_syntax(ds) in _JPEG_LS_SYNTAXES:
        # pydicom leaves a JPEG-LS stream's values as they are, whatever Bits Stored says
        return _stored_values(_charls_decode(codestream), ds)
    # libjpeg-turbo >= 3 decodes processes 1 to 14
    values = _stored_values(imagecodecs.jpeg8_decode(codestream), ds)
    return _within_bits_stored(values, ds, precision)


def _within_bits_stored(values: np.ndarray, ds: Dataset, precision: int) -> np.ndarray:
    """Unsigned stored ``values`` with the bits above Bits Stored cleared, as pydicom
    clears them in a lossless JPEG frame (its unused-bits correction).

    A stream of a higher precision than Bits Stored (16 in 12-bit pixels) can set them,
    and values over 4095 would reach the window. Only such a stream is masked, in place:
    in the ordinary one (precision at most Bits Stored) no value has those bits, and the
    hot path pays nothing. Signed pixels do not come here (:func:`_grey_codestream`);
    pydicom sign-extends them from Bits Stored.
    """
    stored = int(ds.get("BitsStored") or 0)
    if not 0 < stored < min(precision, 8 * values.itemsize):
        return values
    if not values.flags.writeable:
        values = values.copy()
    np.bitwise_and(values, values.dtype.type((1 << stored) - 1), out=values)
    return values


def _stored_values(decoded: Any, ds: Dataset) -> np.ndarray:
    """``decoded`` as the dataset's grey stored values, in its Bits Allocated.

    Raises
    ------
    ValueError
        When it is not an unsigned Rows x Columns array that fits them.
    """
    array = np.asarray(decoded)
    if array.shape != _stored_shape(ds) or array.dtype.kind != "u":
        raise ValueError(f"decoded a {array.dtype} {array.shape} array")
    allocated = int(ds.get("BitsAllocated") or 0)
    if allocated not in (8, 16) or array.dtype.itemsize > allocated // 8:
        raise ValueError(f"{array.dtype} samples in {allocated}-bit pixels")
    return array.astype(np.uint8 if allocated == 8 else np.uint16, copy=False)


def decode_frame(ds: Dataset, index: int = 0, *, reduce: int = 0) -> np.ndarray:
    """Decode one frame of stored pixel values (no LUTs applied).

    Colour images come back as RGB (H, W, 3), YBR converted to RGB. With ``reduce`` > 0
    a single-frame grey JPEG 2000 image is decoded at ``2**-reduce`` of its size
    (see :func:`jpeg2000_reduction`); other images ignore ``reduce`` here (a grey one is
    reduced by :func:`decode_for_display`, after padding is found). Single-frame grey
    JPEG 2000 (at full size), lossless JPEG and JPEG-LS images are decoded through
    imagecodecs, which releases the interpreter lock; everything else, and anything
    these cannot decode (but a JPEG-LS stream that CharLS finds damaged), through
    pydicom's decoders.

    Parameters
    ----------
    ds : pydicom.Dataset
        Image dataset with file meta (for its transfer syntax) or ``is_little_endian``
        / ``is_implicit_VR`` set.
    index : int
        Frame index, 0 for the first frame.
    reduce : int
        JPEG 2000 resolution levels to skip (each halves both sides).

    Returns
    -------
    numpy.ndarray
        (H, W) or (H, W, samples) array of stored values.

    Raises
    ------
    PixelDataError
        When there is no pixel data, a JPEG or JPEG-LS frame is cut short (see
        :func:`_require_end_of_image`), CharLS finds a JPEG-LS frame damaged (see
        :func:`_refuse_what_charls_found_damaged`), or the pixel data cannot be decoded.
    """
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise PixelDataError("The dataset has no Pixel Data element (7FE0,0010).")
    for keyword in ("Rows", "Columns"):
        if not int(ds.get(keyword) or 0):
            raise PixelDataError(f"The dataset has no usable {keyword}; cannot decode pixels.")
    rows, columns = _stored_shape(ds)
    if rows * columns > MAX_PIXELS:
        # the gate refuses it before the worker decodes; whoever else decodes (a copy
        # received again compared, training on a folder) is bounded the same
        raise PixelDataError(
            f"The image is {columns}x{rows} pixels, more than {MAX_PIXELS / 1e6:.0f} "
            "million; not decoded."
        )
    frames = int(_float_or_none(ds.get("NumberOfFrames")) or 1)
    if frames > 1 and (alone := _frame_alone(ds, index)) is not None:
        return decode_frame(alone, 0)  # one frame read from the file, not all of them
    syntax = _transfer_syntax(ds)
    # Single-frame grey JPEG 2000 and HTJ2K (Pillow when reduced, else imagecodecs; both on
    # several threads), lossless JPEG and JPEG-LS (imagecodecs): imagecodecs releases the
    # GIL, and Pillow skips wavelet levels, which pydicom's decoders do neither of.
    codestream = _grey_codestream(ds, _OWN_DECODER_SYNTAXES) if index == 0 else None
    frame = codestream
    if syntax in _ENCAPSULATED_SYNTAXES and "PixelData" in ds:
        if frame is None:
            frame = _encapsulated_frame(ds, index)
        _refuse_a_frame_larger_than_its_header(frame, ds, syntax)
        if syntax in _JPEG_FAMILY_SYNTAXES:
            _require_end_of_image(frame, syntax)
    if codestream is not None:
        try:
            if syntax in _J2K_SYNTAXES:
                return _decode_j2k(codestream, reduce, ds)
            return _decode_jpeg_imagecodecs(codestream, ds)
        except Exception as exc:  # pydicom's decoder tries in full, and reports errors
            _refuse_what_charls_found_damaged(exc, syntax)
            logger.info("decode failed (%s); decoding in full through pydicom", exc)
    elif syntax in _JPEG_LS_SYNTAXES and frame is not None:
        # a frame the fast path does not take (one of several, signed, colour)
        _require_charls_to_find_no_damage(frame, ds, syntax)
    _read_deferred_pixels(ds)
    try:
        from pydicom.pixels import pixel_array

        # that frame alone: Dataset.pixel_array decodes every frame the pixel data holds,
        # those past Number of Frames too (behind a frame of the header's size, one of
        # 8000 x 8000 in a few hundred kilobytes), before it compares their length
        array = pixel_array(ds, index=index)
    except MemoryError:  # the process's trouble, not the image's: tried again, not refused
        raise
    except Exception as exc:  # every decoder failure means the same to the caller
        name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise PixelDataError(f"Pixel data cannot be decoded ({name}): {_said(exc)}") from exc
    array = np.asarray(array)
    frame_ndim = 2 if int(ds.get("SamplesPerPixel") or 1) == 1 else 3
    if array.ndim == frame_ndim + 1:
        # Several frames where one was asked for: a decoder that ignored ``index``, or
        # pixel data longer than Number of Frames says (pydicom returns the excess
        # frames). Without this a (frames, H, W) stack of 3 would pass for RGB.
        array = array[index if array.shape[0] > index else 0]
    if array.size == 0:
        raise PixelDataError("The pixel data decoded to an empty array.")
    return array


def drop_pixel_data(ds: Dataset) -> None:
    """Remove ``ds``'s pixel data element, and the array pydicom decoded from it, if any.

    For a caller that has what it needs from the pixels (the image :func:`decode_for_display`
    made) and keeps the dataset for its other attributes: the stored values of a
    2500 x 2000 DX are 10 MB, and pydicom's decoded copy as much again.
    """
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)  # pydicom forgets its decoded array with it


#: An object's default repr, as some decoders name their input in a message.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _said(exc: BaseException) -> str:
    """What a decoder's exception says, as one line for a person: its lines joined, and
    no object's address (Pillow: "cannot identify image file <_io.BytesIO object at
    0x7f...>"), which differs from one attempt to the next and tells the reader nothing."""
    lines = (_OBJECT_REPR.sub("", line).strip() for line in str(exc).splitlines())
    return "; ".join(line for line in lines if line).replace(":;", ":")


def _stored_shape(ds: Dataset) -> tuple[int, int]:
    return int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)


def _luminance(rgb: np.ndarray, ds: Dataset) -> np.ndarray:
    """ITU-R BT.601 luminance of RGB, scaled to [0, 1] by the stored range."""
    bits = int(ds.get("BitsStored") or 8)
    scale = float((1 << bits) - 1) if not np.issubdtype(rgb.dtype, np.floating) else 1.0
    return _scaled_luminance(rgb, scale)


def _palette_luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luminance of palette output, scaled by its own 8- or 16-bit range."""
    scale = 255.0 if rgb.max() <= 255 else 65535.0
    return _scaled_luminance(rgb, scale)


#: Rows of a colour image whose luminance is computed at once (:func:`_scaled_luminance`).
_LUMINANCE_ROWS = 256


def _scaled_luminance(rgb: np.ndarray, scale: float) -> np.ndarray:
    """BT.601 luminance of ``rgb`` over ``scale``, clipped to [0, 1], as float32: a strip
    of rows at a time, so that the float copies it takes are a strip's, not the image's
    (at 8192 x 8192 pixels, 800 MB and as much again)."""
    out = np.empty(rgb.shape[:2], np.float32)
    for top in range(0, rgb.shape[0], _LUMINANCE_ROWS):
        part = rgb[top : top + _LUMINANCE_ROWS, :, :3].astype(np.float32)
        luma = part[..., 0] * 0.299 + part[..., 1] * 0.587 + part[..., 2] * 0.114
        np.clip(luma / scale, 0.0, 1.0, out=out[top : top + _LUMINANCE_ROWS])
    return out


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """The stored values that are pixel padding, ``(lowest, highest)``: Pixel Padding
    Value, through Pixel Padding Range Limit where there is one (PS3.3 C.7.5.1.1.2);
    None where no usable Pixel Padding Value is declared."""
    pad = _padding_value(ds, "PixelPaddingValue")
    if pad is None:
        return None
    limit = _padding_value(ds, "PixelPaddingRangeLimit")
    low, high = sorted((pad, pad if limit is None else limit))
    return low, high


def _padding_value(ds: Dataset, keyword: str) -> int | None:
    """Pixel Padding Value or Range Limit as a stored value, None where absent or no number.

    Of signed pixels it is signed: a value written with VR US where the standard asks for
    SS (PS3.3 C.7.5.1.1.2: its VR is that of the pixels) is the bit pattern of a negative
    one, 63536 for -2000 (:func:`_as_signed`).
    """
    value = ds.get(keyword)
    if value is None:
        return None
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if isinstance(value, bytes):  # US or SS left undecoded (implicit VR in a sequence)
        if len(value) < 2:
            return None
        value = int(np.frombuffer(value[:2], dtype="<i2" if signed else "<u2")[0])
    try:
        number = int(_first(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return _as_signed(number, ds) if signed else number


def _as_signed(value: int, ds: Dataset) -> int:
    """A padding value of signed pixels as the stored value it stands for.

    A value no signed stored value can take, from ``2**(Bits Stored - 1)`` up, is a two's
    complement bit pattern: of Bits Stored bits (the stored value's own, 2096 for -2000 in
    12 bits), else of Bits Allocated bits (the 16-bit word's, 63536); the pixels are read
    sign-extended from Bits Stored. Any other value is kept as it is.
    """
    for keyword in ("BitsStored", "BitsAllocated"):
        bits = int(ds.get(keyword) or 0)
        if 1 < bits <= 32 and 1 << (bits - 1) <= value < 1 << bits:
            return value - (1 << bits)
    return value


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """True where a stored value is pixel padding (General Equipment / Image Pixel).

    In a lossy transfer syntax the padding near the value is taken too, within bounds
    (:func:`_lossy_padding`).
    """
    if (padding := _padding_range(ds)) is None:
        return None
    low, high = padding
    mask = stored == low if low == high else (stored >= low) & (stored <= high)
    if not mask.any():
        return None
    if _lossy(ds):
        mask = _lossy_padding(stored, mask, low, high)
    return mask


def _lossy(ds: Dataset) -> bool:
    """Whether ``ds``'s stored values may differ from those its modality made: a lossy
    transfer syntax, or Lossy Image Compression (0028,2110) "01" (Type 1C wherever the
    image was compressed lossily: one decompressed since, or in a syntax that carries
    both). On lossless data the rule for lossy padding would take bone near the padding
    value beside the padding, and a medulla enclosed by a rim at the value (found in the
    second review)."""
    if str(ds.get("LossyImageCompression", "") or "").strip() == "01":
        return True
    return _transfer_syntax(ds) in _LOSSY_SYNTAXES


def _lossy_padding(stored: np.ndarray, exact: np.ndarray, low: int, high: int) -> np.ndarray:
    """``exact`` (where the stored values lie in the padding range, ``low`` to ``high``)
    with the pixels that lossy compression moved off it.

    A lossy codec does not keep a flat padded area at its value: JPEG 2000 at 20:1 left
    a fifth to a third of a shutter's pixels off it, by up to a few tens of 12-bit values,
    in patches reaching 20 pixels from any pixel still at it. A pixel within
    :data:`_LOSSY_PADDING_TOLERANCE` of the range (a share of the span of the stored
    values) is padding where

    - it lies within :data:`_LOSSY_PADDING_REACH` pixels (a square) of one in the range;
    - or it belongs to a patch of such pixels (8-connected) that no pixel beyond the
      tolerance borders: a patch enclosed by padding and the image's edges.

    Not every pixel near the value: with MONOCHROME1 and padding 0 the densest bone lies
    near 0 too. Bone borders soft tissue, beyond the tolerance, so it is never such a
    patch; beside the padded area it loses at most the reach.
    """
    step = max(1, int(np.sqrt(stored.size / _CONTRAST_SAMPLE)))
    lowest, highest = np.percentile(stored[::step, ::step], [0.1, 99.9])
    tolerance = max(2, int((highest - lowest) * _LOSSY_PADDING_TOLERANCE))
    near = _within(stored, low - tolerance, high + tolerance)
    candidates = near & ~exact
    if not candidates.any():
        return exact
    reach = _dilated(exact, _LOSSY_PADDING_REACH)
    mask = exact | (candidates & reach)
    candidates &= ~reach
    del reach
    # Within the box the candidates left span; boolean images and one of labels only:
    # an index array per candidate (16 bytes each) took 7 to 9 times the frame's memory
    # (found in the second review).
    rows = np.flatnonzero(candidates.any(axis=1))
    if rows.size == 0:
        return mask
    columns = np.flatnonzero(candidates.any(axis=0))
    # with a pixel's margin, where one beyond the tolerance may lie beside a candidate
    box = (
        slice(max(rows[0] - 1, 0), rows[-1] + 2),
        slice(max(columns[0] - 1, 0), columns[-1] + 2),
    )
    # the candidates a pixel beyond the tolerance lies beside (one off the image is none)
    beside = candidates[box] & _dilated(~near[box], 1)
    del near
    from scipy.ndimage import label

    patches, count = label(candidates[box], structure=np.ones((3, 3), dtype=bool))
    del candidates
    # the patches such a pixel borders, and the background (0): the rest are enclosed
    bordered = np.zeros(count + 1, dtype=bool)
    bordered[0] = True
    bordered[patches[beside]] = True
    del beside
    mask[box] |= ~bordered[patches]
    return mask


def _within(stored: np.ndarray, low: int, high: int) -> np.ndarray:
    """Where ``stored`` lies from ``low`` to ``high``: one comparison where the other end
    is beyond its integer type's."""
    if stored.dtype.kind not in "iu":
        return (stored >= low) & (stored <= high)
    limits = np.iinfo(stored.dtype)
    if low <= limits.min:
        return np.asarray(stored <= high)
    if high >= limits.max:
        return np.asarray(stored >= low)
    return (stored >= low) & (stored <= high)


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean ``mask`` grown by ``radius`` pixels every way (a square): 4 x ``radius``
    shifted ORs, a fraction of a generic maximum filter's cost."""
    tall = mask.copy()
    for shift in range(1, radius + 1):
        tall[shift:] |= mask[:-shift]
        tall[:-shift] |= mask[shift:]
    grown = tall.copy()
    for shift in range(1, radius + 1):
        grown[:, shift:] |= tall[:, :-shift]
        grown[:, :-shift] |= tall[:, shift:]
    return grown


def _j2k_padding_reach(reduce: int) -> int:
    """How many pixels beside the padding found in a JPEG 2000 image decoded ``reduce``
    levels down (its low-pass band) may mix padding with anatomy: 2 at one level, 3 at
    two, 4 from three.

    Each level's analysis low-pass filter reaches ``h`` samples either way (the
    reversible 5/3: 2), so ``r`` levels reach ``h (2**r - 1)`` pixels of the image,
    under ``h`` of the reduced one. A reduced pixel whose reach lies all in padding
    holds the padding value exactly (the 5/3 keeps a constant area's value, whatever
    the value); past the last such pixel up to ``ceil(2 h (1 - 2**-r))`` pixels hold
    padding and anatomy, and no padding value: on a real hand behind a shutter, 2, 3
    and 4 (the 4th at 4 levels 0.3 % padding, the 3rd 15 %). The irreversible 9/7
    reaches 4 samples a level, but its outer taps are small: past the pixels within
    :data:`_LOSSY_PADDING_TOLERANCE` of the padding (:func:`_lossy_padding`), as many
    pixels leave under 3 % padding (at 20:1 the codec's own error in anatomy reaches
    1 to 1.5 %). The pixels so near padding are padding, as a block touching padding
    is in an uncompressed image (:func:`_reduced`); anatomy loses 1 to 4 more pixels
    along the padding than there.
    """
    return 4 - (4 >> reduce) if reduce > 0 else 0  # ceil(2 h (1 - 2**-r)), h = 2


def _modality_lut(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT module: LUT sequence, else rescale slope/intercept."""
    values = stored.astype(np.float32)
    lut_seq = ds.get("ModalityLUTSequence")
    if lut_seq and "LUTDescriptor" in lut_seq[0] and "LUTData" in lut_seq[0]:
        lut = _lut(lut_seq[0], "Modality LUT Sequence")
        if lut is not None:
            return _apply_table(stored, *lut)
    slope = _rescale(ds, "RescaleSlope")
    intercept = _rescale(ds, "RescaleIntercept")
    if slope is not None and slope != 0 and slope != 1:
        values *= np.float32(slope)
    if intercept:
        values += np.float32(intercept)
    if not np.isfinite(values).all():
        # An absurd slope/intercept (1e30, say) overflows float32: no image is left.
        raise PixelDataError(
            f"Rescale Slope {slope} / Intercept {intercept} put pixel values out of range."
        )
    return values


def _rescale(ds: Dataset, keyword: str) -> float | None:
    """Rescale Slope or Intercept, None where absent or empty.

    Raises
    ------
    PixelDataError
        A value that is not a number (``1,2500``, a decimal comma some modalities
        write): the pixel values' scale is unknown, and taken as 1 it would set every
        window off.
    """
    value = _attr(ds, keyword)
    if value is None or not str(value).strip():
        return None
    number = _float_or_none(value)
    if number is None:
        raise PixelDataError(f"{keyword} {str(value).strip()[:16]!r} is not a number.")
    return number


def _lut(item: Dataset, sequence: str) -> tuple[np.ndarray, int] | None:
    """The table of a LUT item and the stored value its first entry maps; None where it
    has no data.

    Raises
    ------
    PixelDataError
        Its LUT Descriptor is not three numbers (entries, first value mapped, bits per
        entry): there is no knowing which value each entry maps.
    """
    data = item.get("LUTData")
    if data is None:
        return None
    descriptor = item.get("LUTDescriptor")
    values = list(descriptor) if isinstance(descriptor, (MultiValue, list, tuple)) else [descriptor]
    try:
        entries, first, bits = (int(v) for v in values)
    except (TypeError, ValueError):
        raise PixelDataError(
            f"The {sequence}'s LUT Descriptor has {len(values)} value(s), not the 3 it needs."
        ) from None
    if isinstance(data, bytes):
        # OW, as stored: words in the byte order of the transfer syntax it came in
        # (pydicom leaves OW's bytes as they were; a Big Endian file's table read as
        # little-endian words is noise, and the image was still assessed)
        big_endian = getattr(item, "original_encoding", (None, None))[1] is False
        entries = 65536 if entries == 0 else entries
        if bits <= 8 and len(data) in (entries, entries + 1):
            # one byte an entry, two to a word; an odd number of them is padded to even
            # length (OW)
            table = np.frombuffer(data, dtype="u1")
            if big_endian:
                table = table[: table.size // 2 * 2].reshape(-1, 2)[:, ::-1].ravel()
            table = table[:entries]
        else:
            table = np.frombuffer(data[: len(data) // 2 * 2], dtype=">u2" if big_endian else "<u2")
    else:
        table = np.asarray(data if isinstance(data, (list, MultiValue)) else [data])
    return (table.astype(np.float32), first) if table.size else None


def _apply_table(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """Look ``values`` up in ``table`` whose first entry maps the stored value ``first``."""
    if first >= 1 << 15 and np.min(values) < 0:  # first value mapped written as unsigned
        first -= 1 << 16
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, table.size - 1)
    return table[index]


def _voi(values: np.ndarray, ds: Dataset, sample: np.ndarray) -> np.ndarray:
    """VOI LUT module: VOI LUT sequence, else window, else robust min/max; to [0, 1]."""
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and "LUTDescriptor" in voi_seq[0]:
        lut = _lut(voi_seq[0], "VOI LUT Sequence")
        if lut is not None and lut[0].max() > lut[0].min():
            table = lut[0]
            out = _apply_table(values, *lut)
            return (out - table.min()) / (table.max() - table.min())
    center = _float_or_none(_attr(ds, "WindowCenter"))
    width = _float_or_none(_attr(ds, "WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(_first(_attr(ds, "VOILUTFunction")) or "LINEAR").upper()
        with np.errstate(all="ignore"):
            windowed = _window(values, center, width, function)
        if not np.isnan(windowed).any():
            return windowed
        # A window too narrow or too wide for float32 (width 1e-67, centre 1e300)
        # divides 0 by 0 or inf by inf; it says nothing usable, so it is ignored.
        logger.info("window centre %g width %g is unusable; using the pixel range", center, width)
    if sample.size:
        low, high = np.percentile(sample, [_ROBUST_LOW_PERCENTILE, _ROBUST_HIGH_PERCENTILE])
    else:
        low, high = float(values.min()), float(values.max())
    if not high > low:
        low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - np.float32(center)) / np.float32(width)))
    if function == "LINEAR_EXACT":
        low = center - width / 2.0
        return np.clip((values - np.float32(low)) / np.float32(width), 0.0, 1.0)
    if width < 1:  # LINEAR requires width >= 1; treat as a threshold
        return (values >= center).astype(np.float32)
    low = center - 0.5 - (width - 1.0) / 2.0
    return np.clip((values - np.float32(low)) / np.float32(width - 1.0), 0.0, 1.0)


def _sample(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Strided sample of the unpadded values, for percentiles."""
    step = max(1, int(np.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sub = values[::step, ::step]
    if mask is not None:
        sub = sub[~mask[::step, ::step]]
    return sub.ravel()


def decode_as_assessed(ds: Dataset, *, input_size: int, sc_min_long_side: int) -> np.ndarray:
    """``ds``'s image as an assessment gives it to the model and draws its heat map on:
    :func:`decode_for_display` at the reduction :func:`decode_reduction` allows.

    Decoded at 1/2, 1/4 ... of the image's size (JPEG 2000: skipping wavelet levels;
    uncompressed: averaging blocks) while the network input (``input_size``) and the
    heat-map picture (the site's ``sc_min_long_side``) still get enough pixels: most of
    the per-pixel work after decoding is saved. The service and ``evaluate`` both
    decode through here, so an evaluation is of what the service does. An image without
    usable contrast is refused (:func:`require_contrast`).

    Raises
    ------
    PixelDataError
        When pixel data is missing or cannot be decoded.
    NoContrastError
        When the image decodes to one without usable contrast (a :class:`PixelDataError`).
    """
    reduce = decode_reduction(ds, min_short_side=input_size, min_long_side=sc_min_long_side)
    image = decode_for_display(ds, reduce=reduce)
    require_contrast(image)
    return image


def require_contrast(image: np.ndarray) -> None:
    """Refuse a display image without usable contrast: one that shows nothing to assess.

    All-zero pixel data, a VOI window that sends nearly every pixel to one end of it
    (window centre 100, width 10 on a 12-bit radiograph), an image all padding: each
    decoded to an image of one grey, which preprocessing stretched or zeroed, and the
    model gave a confident bone age (found in review). Refused where at least
    :data:`MAX_SHARE_AT_ONE_LEVEL` of the pixels (of a strided sample of about 65 000)
    lie at one of :data:`CONTRAST_LEVELS` grey levels; then the 1st and 99th
    percentiles are equal too.

    Parameters
    ----------
    image : numpy.ndarray
        float32 (H, W) in [0, 1], as from :func:`decode_for_display`.

    Raises
    ------
    NoContrastError
        When the image has no usable contrast.
    """
    share, level = share_at_one_level(image)
    if share >= MAX_SHARE_AT_ONE_LEVEL:
        where = "black" if level == 0 else "white" if level == CONTRAST_LEVELS - 1 else "one grey"
        raise NoContrastError(
            f"the image has no usable contrast: {share:.1%} of its pixels are {where} "
            "after the window (blank, or saturated by its VOI LUT)"
        )


def share_at_one_level(image: np.ndarray) -> tuple[float, int]:
    """The largest share of a display image's pixels at one of :data:`CONTRAST_LEVELS`
    grey levels, and that level (0 black), over a strided sample of about 65 000 pixels.

    Parameters
    ----------
    image : numpy.ndarray
        float32 (H, W) in [0, 1], as from :func:`decode_for_display`.

    Returns
    -------
    tuple of (float, int)
        The share in [0, 1], and its level in ``[0, CONTRAST_LEVELS)``.
    """
    step = max(1, int(np.sqrt(image.size / _CONTRAST_SAMPLE)))
    sample = image[::step, ::step]
    levels = np.minimum(sample * CONTRAST_LEVELS, CONTRAST_LEVELS - 1).astype(np.intp)
    counts = np.bincount(levels.ravel(), minlength=CONTRAST_LEVELS)
    level = int(counts.argmax())
    return float(counts[level]) / max(1, sample.size), level


def decode_for_display(ds: Dataset, *, reduce: int = 0) -> np.ndarray:
    """Decode the first frame for display: float32 (H, W) in [0, 1], bone bright.

    Applies, in order: pixel padding mask (excluded from statistics, written as 0; in a
    lossy transfer syntax also the values near padding beside it, see
    :func:`_lossy_padding`), Modality LUT (LUT sequence or rescale slope/intercept),
    VOI LUT (LUT sequence, or the first window centre/width, or a robust 0.5-99.5
    percentile range), and the MONOCHROME1 inversion. Colour images become BT.601 luminance.

    Parameters
    ----------
    ds : pydicom.Dataset
        A single- or multi-frame image dataset.
    reduce : int
        Decode at ``2**-reduce`` of the image's size, from :func:`decode_reduction`:
        a single-frame grey JPEG 2000 image skips wavelet levels, the pixels beside
        padding that its low-pass band mixed padding into being padding
        (:func:`_j2k_padding_reach`); another grey one averages blocks of stored
        values, a block touching padding being padding; ignored for other images.
        More halvings than the image's short side allows are lowered to leave it one
        pixel.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) array in [0, 1]; smaller than Rows x Columns when reduced.

    Raises
    ------
    PixelDataError
        When pixel data is missing or cannot be decoded.
    """
    reduce = min(reduce, max(0, min(_stored_shape(ds)).bit_length() - 1))
    if (read := _blocks_from_file(ds, reduce)) is not None:
        # an uncompressed radiograph, reduced a strip at a time as it is read
        blocks, mask = read
        return _to_display(_modality_lut(blocks, ds), mask, ds)
    array = decode_frame(ds, 0, reduce=reduce)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if array.ndim == 3 and (samples > 1 or array.shape[-1] in (3, 4)):
        return _luminance(array, ds).astype(np.float32, copy=False)
    if array.ndim != 2:
        raise PixelDataError(f"Decoded pixel data has unexpected shape {array.shape}.")

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(array, ds)
        except Exception as exc:  # a broken palette is undecodable pixel data
            raise PixelDataError(f"Palette colour lookup failed: {_said(exc)}") from exc
        return _palette_luminance(rgb).astype(np.float32, copy=False)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        # NaN or infinite float pixels (or finite ones beyond float32) are treated like
        # padding: left out of the statistics, written as 0.
        invalid = ~np.isfinite(values)
        mask = invalid if invalid.any() else None
        if mask is not None:
            values[mask] = 0.0
    else:
        # of the whole frame: a lossy one's padding is found by its neighbours too
        mask = _padding_mask(array, ds)
        if reduce > 0 and array.shape == _stored_shape(ds) and _grey_frames(ds):
            # Averaged like JPEG 2000's low-pass band; a block touching padding is padding
            stored, padded, (rows, columns) = array, mask, array.shape
            array, mask = _reduced(
                lambda top, count: (
                    stored[top : top + count],
                    None if padded is None else padded[top : top + count],
                ),
                rows,
                columns,
                reduce,
                row_bytes=columns * array.itemsize,
            )
        elif mask is not None and reduce > 0 and array.shape != _stored_shape(ds):
            # JPEG 2000's low-pass band: the pixels beside the padding found in it mix
            # padding into anatomy, and hold no padding value
            mask = _dilated(mask, _j2k_padding_reach(reduce))
        values = _modality_lut(array, ds)
    return _to_display(values, mask, ds)


def _to_display(values: np.ndarray, mask: np.ndarray | None, ds: Dataset) -> np.ndarray:
    """Grey ``values`` after the Modality LUT, with padding at ``mask``: through the VOI
    LUT and the MONOCHROME1 inversion to float32 in [0, 1], padding 0."""
    sample = _sample(values, mask)
    out = _voi(values, ds, sample).astype(np.float32, copy=False)
    if str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper() == "MONOCHROME1":
        out = 1.0 - out
    if mask is not None:
        out[mask] = 0.0
    if np.isnan(out).any():  # the contract is [0, 1]; NaN must never reach the model
        raise PixelDataError("The pixel data decoded to values that are not numbers.")
    return np.clip(out, 0.0, 1.0, out=out)
