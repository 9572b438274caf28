"""Pixel data left in the file until decoded, and then only what is decoded read from it.

:func:`dicom_io.pixels.read_image` leaves the pixel data in the file. Of several frames,
:func:`dicom_io.pixels.decode_frame` then reads only the frame it decodes; of a single
uncompressed grey frame decoded reduced, :func:`dicom_io.pixels.decode_for_display`
reads a strip of rows at a time; of a single compressed grey frame, the codestream is
read for the decoder only. The cases compare each with the same image decoded from the
whole instance read into memory (:func:`pydicom.dcmread`, the way every instance was read
before), and strips with a reference of their own too, and check that the pixel data
never left the file; that what is refused read whole is refused read this way; that the
memory an image takes does not grow with its frames, nor with the rows of an
uncompressed one; and that the pixels are read only from the file whose header was read.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
)

from dicom_io import pixels
from dicom_io.pixels import (
    FileChangedError,
    PixelDataError,
    decode_for_display,
    decode_frame,
    decode_reduction,
    read_image,
)
from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import run_tool

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

ROWS, COLUMNS = 300, 220
FRAMES = 3
PIXEL_DATA = 0x7FE00010

Writer = Callable[[Path], Path]  # writes a test instance into a folder


def _grey_frames(rows: int = ROWS, columns: int = COLUMNS, frames: int = FRAMES) -> np.ndarray:
    """``frames`` different 12-bit grey frames: the hand, each shifted and dimmed more."""
    hand = np.rint(hand_like(rows, columns) * 4000).astype(np.uint16)
    return np.stack([np.roll(hand, 7 * k, axis=1) // (k + 1) for k in range(frames)])


def _multiframe(stack: np.ndarray) -> Dataset:
    """A multi-frame SC (grey word, or true colour for (frames, H, W, 3)) of ``stack``."""
    colour = stack.ndim == 4
    ds = make_radiograph_dataset(
        np.zeros(stack.shape[1:3], dtype=np.uint16),
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=12,
    )
    sop_class = (
        MultiFrameTrueColorSecondaryCaptureImageStorage
        if colour
        else MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.NumberOfFrames = stack.shape[0]
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        for keyword in ("WindowCenter", "WindowWidth", "PixelIntensityRelationship"):
            if keyword in ds:
                delattr(ds, keyword)
    ds.PixelData = stack.tobytes()
    return ds


def _written(tmp_path: Path, ds: Dataset, name: str = "multiframe.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _still_in_the_file(ds: Dataset) -> bool:
    return ds.get_item(PIXEL_DATA, keep_deferred=True).value is None


@pytest.fixture
def defer_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave in the file any value over 1 KiB: these small test images have such values."""
    monkeypatch.setattr(pixels, "DEFERRED_BYTES", 1024)


def _native_grey(tmp_path: Path) -> Path:
    return _written(tmp_path, _multiframe(_grey_frames()))


def _native_rgb(tmp_path: Path) -> Path:
    grey = (_grey_frames() >> 4).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    return _written(tmp_path, _multiframe(rgb))


def _compressed(syntax: UID, plugin: str) -> Writer:
    def write(tmp_path: Path) -> Path:
        ds = _multiframe(_grey_frames())
        ds.compress(syntax, encoding_plugin=plugin)
        return _written(tmp_path, ds)

    return write


def _extended_offsets(tmp_path: Path) -> Path:
    """RLE frames behind an empty Basic Offset Table and an Extended Offset Table."""
    ds = _multiframe(_grey_frames())
    ds.compress(RLELossless, encoding_plugin="pydicom")
    frames = [bytes(f) for f in generate_frames(ds.PixelData, number_of_frames=FRAMES)]
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
        frames
    )
    return _written(tmp_path, ds)


def _dcmtk(tool: str, *options: str) -> Writer:
    def write(tmp_path: Path) -> Path:
        native = _native_grey(tmp_path)
        target = tmp_path / f"{tool}.dcm"
        run_tool(tool, *options, native, target)
        return target

    return write


CASES: dict[str, Writer] = {
    "native grey": _native_grey,
    "native RGB": _native_rgb,
    "RLE": _compressed(RLELossless, "pydicom"),
    "RLE, extended offset table": _extended_offsets,
    "JPEG-LS": _compressed(JPEGLSLossless, "pyjpegls"),
    "JPEG 2000": _compressed(JPEG2000Lossless, "pylibjpeg"),
    "JPEG Lossless SV1 (dcmcjpeg)": _dcmtk("dcmcjpeg", "+e1"),
    "JPEG-LS (dcmcjpls)": _dcmtk("dcmcjpls"),
}


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("write", list(CASES.values()), ids=list(CASES))
def test_a_frame_read_alone_is_the_frame_read_with_all_the_others(
    tmp_path: Path, write: Writer
) -> None:
    path = write(tmp_path)
    for index in (0, FRAMES - 1):
        whole = decode_frame(dcmread(path), index)
        ds = read_image(path)
        assert _still_in_the_file(ds)
        np.testing.assert_array_equal(decode_frame(ds, index), whole)
        assert _still_in_the_file(ds), "the whole pixel data was read for one frame"
    assert not np.array_equal(decode_frame(dcmread(path), 0), whole)  # frames differ


@pytest.mark.usefixtures("defer_everything")
def test_a_single_frame_is_read_whole_when_decoded(tmp_path: Path) -> None:
    ds = make_radiograph_dataset(
        hand_like(ROWS, COLUMNS), birth_date=BIRTH_DATE, study_date=STUDY_DATE
    )
    path = _written(tmp_path, ds, "single.dcm")
    deferred = read_image(path)
    assert _still_in_the_file(deferred)
    np.testing.assert_array_equal(decode_for_display(deferred), decode_for_display(dcmread(path)))
    assert not _still_in_the_file(deferred)


@pytest.mark.usefixtures("defer_everything")
def test_a_deflated_file_is_decoded_from_its_inflated_bytes(tmp_path: Path) -> None:
    ds = _multiframe(_grey_frames())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = _written(tmp_path, ds)
    np.testing.assert_array_equal(decode_frame(read_image(path), 1), decode_frame(dcmread(path), 1))
    np.testing.assert_array_equal(decode_frame(read_image(path), 1), _grey_frames()[1])


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize(
    "cut",
    [
        "data within the last frame",
        "data within the first frame",
        "file within the last frame",  # the element's length says more than the file has
    ],
)
def test_pixel_data_shorter_than_its_frames_is_refused_as_when_read_whole(
    tmp_path: Path, cut: str
) -> None:
    """Even where the frame decoded is whole: the instance is not what it says it is."""
    ds = _multiframe(_grey_frames())
    frame = ROWS * COLUMNS * 2
    keep = frame // 2 if cut == "data within the first frame" else FRAMES * frame - frame // 2
    if cut.startswith("data"):
        ds.PixelData = ds.PixelData[:keep]  # the header still says three frames
    path = _written(tmp_path, ds)
    if cut.startswith("file"):
        path.write_bytes(path.read_bytes()[: -(frame // 2)])
    with pytest.raises(PixelDataError) as whole:
        decode_frame(dcmread(path), 0)
    with pytest.raises(PixelDataError) as alone:
        decode_frame(read_image(path), 0)
    assert str(alone.value) == str(whole.value)
    _refused_as_when_read_whole(path)  # and decoded reduced, where it would be in strips


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("frames", [1, FRAMES])
def test_a_file_gone_before_its_pixels_are_read_is_an_os_error(tmp_path: Path, frames: int) -> None:
    """Not "pixel data cannot be decoded": the pipeline retries what the file system
    may cure, and refuses for good only what the PACS sent."""
    path = _written(tmp_path, _multiframe(_grey_frames(frames=frames)))
    ds = read_image(path)
    os.remove(path)
    with pytest.raises(OSError):
        decode_for_display(ds)


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("frames", [1, FRAMES])
@pytest.mark.parametrize("stored", ["uncompressed", "JPEG 2000"])
@pytest.mark.parametrize("encoding", ["re-encoded", "the same bytes"])
def test_pixels_are_never_read_from_another_file_than_the_header(
    tmp_path: Path, frames: int, stored: str, encoding: str
) -> None:
    """The listener puts an instance received again where the first copy was
    (``os.replace``): behind the first copy's header its pixels would be read at the
    wrong offsets, or be another image's. Decoded as the pipeline does it: the reduction
    (which reads a JPEG 2000 codestream's header) first, then the image."""
    ds = _multiframe(_grey_frames(frames=frames))
    if stored == "JPEG 2000":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = _written(tmp_path, ds)
    ds = read_image(path)
    again = dcmread(path)
    if encoding == "re-encoded" and stored == "JPEG 2000":
        again.decompress()
    elif encoding == "re-encoded":
        again.compress(RLELossless, encoding_plugin="pydicom")
    os.replace(_written(tmp_path, again, "incoming.dcm"), path)  # as the listener does
    with pytest.raises(FileChangedError):
        reduce = decode_reduction(ds, min_short_side=64, min_long_side=64)
        decode_for_display(ds, reduce=reduce)
    # read again, the instance is the new file throughout
    np.testing.assert_array_equal(decode_frame(read_image(path), 0), _grey_frames()[0])


@pytest.mark.usefixtures("defer_everything")
def test_float_pixel_data_is_read_from_the_file_read_too(tmp_path: Path) -> None:
    ds = _multiframe(_grey_frames(frames=1))
    values = _grey_frames(frames=1)[0].astype(np.float32) / 4000
    ds.FloatPixelData = values.tobytes()
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    path = _written(tmp_path, ds)
    np.testing.assert_array_equal(decode_frame(read_image(path)), values)
    deferred = read_image(path)
    assert deferred.get_item("FloatPixelData", keep_deferred=True).value is None
    os.replace(_written(tmp_path, dcmread(path), "incoming.dcm"), path)
    with pytest.raises(FileChangedError):
        decode_frame(deferred)


def test_the_memory_to_decode_a_frame_does_not_grow_with_the_frames(tmp_path: Path) -> None:
    """At the default threshold: 2 and 24 frames of 1024 x 1024 (2 MiB each)."""
    side = 1024
    frame = side * side * 2
    hand = np.rint(hand_like(side, side) * 4000).astype(np.uint16)

    def peak(read: Callable[[Path], Dataset], frames: int) -> int:
        path = _written(tmp_path, _multiframe(np.repeat(hand[None], frames, axis=0)))
        tracemalloc.start()
        try:
            image = decode_for_display(read(path))
            assert image.shape == (side, side)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # read whole, each frame more is in memory; read alone, none is
    assert peak(dcmread, 24) - peak(dcmread, 2) > 20 * frame
    assert peak(read_image, 24) - peak(read_image, 2) < frame / 8


def _single(
    *,
    rows: int = ROWS,
    columns: int = COLUMNS,
    bits: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
) -> Dataset:
    """A single-frame uncompressed hand, its values spread over ``bits`` bits."""
    if signed:
        # centred on 0: negative stored values, sign-extended from ``bits`` bits
        hand = np.rint((hand_like(rows, columns) - 0.5) * ((1 << (bits - 1)) - 1))
        stored = hand.astype(np.int16 if bits <= 16 else np.int32)
    else:
        hand = np.rint(hand_like(rows, columns) * ((1 << bits) - 1))
        stored = hand.astype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)
    ds = make_radiograph_dataset(
        np.zeros((rows, columns), dtype=np.uint16),
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=12,
    )
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)  # the percentile window: what every value moves
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = photometric
    ds.PixelData = stored.tobytes()
    return ds


SINGLE_FRAMES: dict[str, Callable[[], Dataset]] = {
    "8 bits, odd columns": lambda: _single(columns=COLUMNS + 1, bits=8),
    "12 bits": lambda: _single(),
    "16 bits, odd rows": lambda: _single(rows=ROWS + 3, bits=16),
    "12 bits signed": lambda: _single(signed=True),
    "20 bits in 32": lambda: _single(bits=20),
    "MONOCHROME1": lambda: _single(photometric="MONOCHROME1"),
}


def _padded(ds: Dataset, *, range_limit: bool = False) -> Dataset:
    """Padding in a band of rows near the top only, and a column block at the side."""
    stored = ds.pixel_array.copy()
    stored[5:29, :] = 0
    stored[200:, :13] = 7 if range_limit else 0
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = 0
    if range_limit:
        ds.PixelPaddingRangeLimit = 9
    return ds


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("reduce", [1, 2, 3])
@pytest.mark.parametrize(
    "make",
    [
        *SINGLE_FRAMES.values(),
        lambda: _padded(_single()),
        lambda: _padded(_single(), range_limit=True),
    ],
    ids=[*SINGLE_FRAMES, "padding", "padding range"],
)
def test_an_uncompressed_frame_reduced_is_read_a_strip_at_a_time_to_the_same_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[], Dataset], reduce: int
) -> None:
    """Strips of about 40 rows, the last one shorter: the image is the one that decoding
    the frame whole and then averaging it gives, value for value."""
    monkeypatch.setattr(pixels, "_STRIP_BYTES", 40 * COLUMNS * 2)
    path = _written(tmp_path, make(), "single.dcm")
    whole = decode_for_display(dcmread(path), reduce=reduce)
    ds = read_image(path)
    image = decode_for_display(ds, reduce=reduce)
    assert _still_in_the_file(ds), "the frame was read whole"
    np.testing.assert_array_equal(image, whole)
    assert image.shape == (dcmread(path).Rows >> reduce, dcmread(path).Columns >> reduce)


def _refused_as_when_read_whole(path: Path) -> None:
    """Decoded at half size, read whole and read by ``read_image``: the same refusal."""
    with pytest.raises(PixelDataError) as whole:
        decode_for_display(dcmread(path), reduce=1)
    with pytest.raises(PixelDataError) as from_the_file:
        decode_for_display(read_image(path), reduce=1)
    assert str(from_the_file.value) == str(whole.value)


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize(
    "change",
    [
        {"BitsStored": 17},
        {"BitsStored": 0},
        {"PixelRepresentation": 2},
        {"SamplesPerPixel": 0},
        {"BitsAllocated": 12},
        {"Columns": COLUMNS + 1},
    ],
    ids=lambda change: ", ".join(f"{k} {v}" for k, v in change.items()),
)
def test_a_frame_described_wrongly_is_refused_as_when_read_whole(
    tmp_path: Path, change: dict[str, int]
) -> None:
    """What pydicom refuses to decode is a PixelDataError read a strip at a time too (the
    pipeline then records the instance as not assessed, with pydicom's reason), not
    another error that would have the task tried again and again."""
    ds = _single()
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    _refused_as_when_read_whole(_written(tmp_path, ds, "wrong.dcm"))


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("cut", ["data", "file"])
def test_a_single_frame_cut_short_is_refused_as_when_read_whole(tmp_path: Path, cut: str) -> None:
    """Even where the strips read before the end would be whole."""
    ds = _single()
    if cut == "data":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = _written(tmp_path, ds, "single.dcm")
    if cut == "file":
        path.write_bytes(path.read_bytes()[: -ROWS * COLUMNS // 2])
    _refused_as_when_read_whole(path)


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("stored", ["uncompressed, in strips", "JPEG 2000"])
def test_a_single_frame_whose_file_is_gone_before_it_is_decoded_is_an_os_error(
    tmp_path: Path, stored: str
) -> None:
    ds = _single()
    if stored == "JPEG 2000":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = _written(tmp_path, ds, "single.dcm")
    ds = read_image(path)
    os.remove(path)
    with pytest.raises(OSError):
        decode_for_display(ds, reduce=1)


def test_the_memory_to_decode_a_frame_reduced_does_not_grow_with_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1000 x 1000 and a 4000 x 4000 16-bit frame (1.9 and 30.5 MiB), decoded at 1/2
    and 1/8 to the same 500 x 500 image, in strips of 256 KiB: the larger takes next to
    nothing more, where decoded whole it takes its whole frame more."""
    monkeypatch.setattr(pixels, "_STRIP_BYTES", 1 << 18)
    sides = {1: 1000, 3: 4000}
    paths = {
        reduce: _written(tmp_path, _single(rows=side, columns=side, bits=16), f"{side}.dcm")
        for reduce, side in sides.items()
    }

    def peak(read: Callable[[Path], Dataset], reduce: int) -> int:
        ds = read(paths[reduce])
        tracemalloc.start()
        try:
            assert decode_for_display(ds, reduce=reduce).shape == (500, 500)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    more = (sides[3] ** 2 - sides[1] ** 2) * 2
    whole, in_strips = (peak(read, 3) - peak(read, 1) for read in (dcmread, read_image))
    assert whole > more * 3 / 4  # decoded whole, the larger frame is in memory once more
    assert in_strips < more / 100  # (7 KB here)


def _single_compressed(syntax: UID, plugin: str) -> Writer:
    def write(tmp_path: Path) -> Path:
        ds = _single()
        ds.compress(syntax, encoding_plugin=plugin)
        return _written(tmp_path, ds, "single.dcm")

    return write


def _single_dcmtk(tool: str, *options: str) -> Writer:
    def write(tmp_path: Path) -> Path:
        native = _written(tmp_path, _single(), "native.dcm")
        target = tmp_path / f"{tool}.dcm"
        run_tool(tool, *options, native, target)
        return target

    return write


SINGLE_COMPRESSED: dict[str, Writer] = {
    "JPEG 2000": _single_compressed(JPEG2000Lossless, "pylibjpeg"),
    "JPEG Lossless SV1 (dcmcjpeg)": _single_dcmtk("dcmcjpeg", "+e1"),
    "JPEG-LS (dcmcjpls)": _single_dcmtk("dcmcjpls"),
}


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("reduce", [0, 1])
@pytest.mark.parametrize("write", list(SINGLE_COMPRESSED.values()), ids=list(SINGLE_COMPRESSED))
def test_a_compressed_single_frame_is_decoded_from_its_file_its_value_left_there(
    tmp_path: Path, write: Writer, reduce: int
) -> None:
    """Its codestream is read from the file for the decoder, not into the dataset as
    well: one copy of it in memory, not two."""
    path = write(tmp_path)
    whole = decode_for_display(dcmread(path), reduce=reduce)
    ds = read_image(path)
    assert decode_reduction(ds, min_short_side=64, min_long_side=64) >= 1
    np.testing.assert_array_equal(decode_for_display(ds, reduce=reduce), whole)
    assert _still_in_the_file(ds), "the pixel data was read into the dataset"


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("write", list(SINGLE_COMPRESSED.values()), ids=list(SINGLE_COMPRESSED))
def test_a_compressed_frame_cut_short_is_refused_as_when_read_whole(
    tmp_path: Path, write: Writer
) -> None:
    """A codestream that stops at 60 %, in a well-formed encapsulation."""
    ds = dcmread(write(tmp_path))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) * 6 // 10]])
    path = _written(tmp_path, ds, "cut.dcm")
    _refused_as_when_read_whole(path)


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("reduce", [1, 2, 3])
@pytest.mark.parametrize("make", list(SINGLE_FRAMES.values()), ids=list(SINGLE_FRAMES))
def test_strips_are_the_block_averages_of_the_frame_decoded_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[], Dataset], reduce: int
) -> None:
    """Against a reference of its own: under a linear window that clips nothing, the
    image reduced in strips is the full-size image averaged in blocks."""
    monkeypatch.setattr(pixels, "_STRIP_BYTES", 40 * COLUMNS * 2)
    ds = make()
    stored = ds.pixel_array
    low, high = int(stored.min()), int(stored.max())
    ds.WindowCenter, ds.WindowWidth = (low + high) / 2, high - low + 3
    path = _written(tmp_path, ds, "single.dcm")
    full = decode_for_display(dcmread(path)).astype(np.float64)
    factor = 1 << reduce
    rows, columns = full.shape[0] // factor * factor, full.shape[1] // factor * factor
    blocks = full[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    np.testing.assert_allclose(
        decode_for_display(read_image(path), reduce=reduce), blocks.mean(axis=(1, 3)), atol=1e-5
    )


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("case", ["native grey", "RLE", "JPEG-LS", "JPEG 2000"])
def test_the_first_of_several_frames_is_reduced_as_the_same_image_alone(
    tmp_path: Path, case: str
) -> None:
    """The same hand, alone or as the first of several frames, comes out the same
    image, reduced the same way: the network is given the same input."""
    several = read_image(CASES[case](tmp_path))
    one = read_image(_written(tmp_path, _multiframe(_grey_frames()[:1]), "alone.dcm"))
    reduce = decode_reduction(several, min_short_side=64, min_long_side=64)
    assert reduce == decode_reduction(one, min_short_side=64, min_long_side=64) == 1
    image = decode_for_display(several, reduce=reduce)
    np.testing.assert_array_equal(image, decode_for_display(one, reduce=reduce))
    assert image.shape == (ROWS // 2, COLUMNS // 2)
    assert _still_in_the_file(several)


@pytest.mark.usefixtures("defer_everything")
def test_a_jpeg2000_codestream_is_read_once_for_the_reduction_and_once_for_the_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded as the pipeline does it: the reduction needs the codestream's header, the
    decoder the codestream; neither reads it twice."""
    path = SINGLE_COMPRESSED["JPEG 2000"](tmp_path)
    opened: list[Dataset] = []
    open_source = pixels._open_source

    def counting(ds: Dataset) -> Any:
        opened.append(ds)
        return open_source(ds)

    monkeypatch.setattr(pixels, "_open_source", counting)
    ds = read_image(path)
    reduce = decode_reduction(ds, min_short_side=64, min_long_side=64)
    assert len(opened) == 1
    decode_for_display(ds, reduce=reduce)
    assert len(opened) == 2


def _description(ds: Dataset) -> dict[int, str]:
    """Every element but the pixel data, as it reads: what decoding must leave alone.
    (The pixel data is not touched: reading it would take it out of the file, and
    iterating a dataset reads every element, so its tags are iterated.)"""
    tags = ds.keys()  # a Dataset iterates its elements, not its tags
    return {int(tag): repr(ds[tag].value) for tag in tags if tag != PIXEL_DATA}


def _single_written(make: Callable[[], Dataset]) -> Writer:
    return lambda folder: _written(folder, make(), "single.dcm")


WRITERS: dict[str, Writer] = {
    **{f"single, {name}": _single_written(make) for name, make in SINGLE_FRAMES.items()},
    **{f"single, {name}": write for name, write in SINGLE_COMPRESSED.items()},
    **{f"several, {name}": write for name, write in CASES.items()},
}


@pytest.mark.usefixtures("defer_everything")
@pytest.mark.parametrize("reduce", [0, 1, 2])
@pytest.mark.parametrize("write", list(WRITERS.values()), ids=list(WRITERS))
def test_decoding_leaves_the_dataset_as_it_was_and_decodes_again_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Writer, reduce: int
) -> None:
    """Strips of about 40 rows: the dataset a strip is decoded as must not share the
    source's elements (a strip's row count once became the source's Rows, and the next
    decode of the same dataset was refused)."""
    monkeypatch.setattr(pixels, "_STRIP_BYTES", 40 * COLUMNS * 2)
    ds = read_image(write(tmp_path))
    described = _description(ds)
    first = decode_for_display(ds, reduce=reduce)
    assert _description(ds) == described
    np.testing.assert_array_equal(decode_for_display(ds, reduce=reduce), first)
