"""Reduced-resolution JPEG 2000 and HTJ2K decoding: the shape asked for, close to a box average."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from dicom_io.pixels import (
    PixelDataError,
    decode_for_display,
    decode_frame,
    decode_reduction,
    jpeg2000_reduction,
    read_image,
    set_jpeg2000_threads,
)
from dicom_io.synthetic import make_radiograph_dataset

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

pytest.importorskip("openjpeg")
PIL_features = pytest.importorskip("PIL.features")
if not PIL_features.check("jpg_2000"):
    pytest.skip("Pillow was built without OpenJPEG", allow_module_level=True)

ROWS, COLUMNS = 600, 440


def _cr(*, rows: int = ROWS, columns: int = COLUMNS, bits: int = 12) -> Dataset:
    """An uncompressed hand-like CR."""
    return make_radiograph_dataset(
        hand_like(rows, columns),
        modality="CR",
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=bits,
    )


def _j2k(tmp_path: Path, *, rows: int = ROWS, columns: int = COLUMNS, bits: int = 12) -> Dataset:
    """The same CR, JPEG 2000 lossless (pylibjpeg-openjpeg), as read back from a file."""
    ds = _cr(rows=rows, columns=columns, bits=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = tmp_path / "j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def _box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    rows, columns = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    return blocks.mean(axis=(1, 3))


@pytest.mark.parametrize("reduce", [1, 2])
def test_reduced_decode_has_the_reduced_shape(tmp_path: Path, reduce: int) -> None:
    ds = _j2k(tmp_path)
    image = decode_for_display(ds, reduce=reduce)
    factor = 1 << reduce
    assert image.shape == (-(-ROWS // factor), -(-COLUMNS // factor))
    assert image.dtype == np.float32
    assert 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


@pytest.mark.parametrize("reduce", [1, 2])
def test_reduced_decode_is_close_to_a_downscaled_full_decode(tmp_path: Path, reduce: int) -> None:
    ds = _j2k(tmp_path)
    factor = 1 << reduce
    full = _box_downscale(decode_frame(ds).astype(np.float64), factor)
    reduced = decode_frame(ds, reduce=reduce).astype(np.float64)
    reduced = reduced[: full.shape[0], : full.shape[1]]
    assert reduced.max() <= 4095  # stored values, not Pillow's 16-bit scale
    # within 2% of the 12-bit range on average: the wavelet low band, not a box filter
    assert np.abs(reduced - full).mean() < 0.02 * 4095
    assert np.corrcoef(reduced.ravel(), full.ravel())[0, 1] > 0.99


def test_reduce_zero_is_the_lossless_full_decode(tmp_path: Path) -> None:
    ds = _j2k(tmp_path)
    np.testing.assert_array_equal(decode_frame(ds, reduce=0), ds.pixel_array)


def test_reduction_keeps_the_sides_the_consumer_needs(tmp_path: Path) -> None:
    ds = _j2k(tmp_path)
    assert jpeg2000_reduction(ds, min_short_side=220) == 1  # 440 / 2 = 220
    assert jpeg2000_reduction(ds, min_short_side=221) == 0
    assert jpeg2000_reduction(ds, min_short_side=100) == 2  # 440 / 4 = 110
    assert jpeg2000_reduction(ds, min_short_side=100, min_long_side=300) == 1
    assert jpeg2000_reduction(ds, min_short_side=1) <= 5  # never past the codestream's levels


class _NativeOptions(TypedDict, total=False):
    """The keyword arguments of make_radiograph_dataset that _native passes on."""

    bits_stored: int
    photometric: str


def _native(**kwargs: Unpack[_NativeOptions]) -> Dataset:
    kwargs.setdefault("bits_stored", 12)
    ds = make_radiograph_dataset(
        hand_like(ROWS, COLUMNS), birth_date=BIRTH_DATE, study_date=STUDY_DATE, **kwargs
    )
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    return ds


def test_uncompressed_reduction_keeps_the_sides_the_consumer_needs() -> None:
    ds = _native()
    assert jpeg2000_reduction(ds, min_short_side=32) == 0  # not JPEG 2000
    assert decode_reduction(ds, min_short_side=220) == 1  # 440 // 2 = 220
    assert decode_reduction(ds, min_short_side=221) == 0
    assert decode_reduction(ds, min_short_side=100, min_long_side=300) == 1  # 600 // 2
    assert decode_reduction(ds, min_short_side=1) == 4  # at most 16 x 16 blocks


def test_jpeg2000_reduction_is_decode_reduction_for_jpeg2000(tmp_path: Path) -> None:
    ds = _j2k(tmp_path)
    for short in (1, 100, 220, 221):
        assert decode_reduction(ds, min_short_side=short) == jpeg2000_reduction(
            ds, min_short_side=short
        )


@pytest.mark.parametrize("reduce", [1, 2, 3])
def test_uncompressed_reduced_decode_is_the_box_average(reduce: int) -> None:
    """Stored values averaged in blocks, then the same (linear) window: a box filter."""
    ds = _native()
    factor = 1 << reduce
    full = decode_for_display(ds)
    reduced = decode_for_display(ds, reduce=reduce)
    assert reduced.shape == (ROWS // factor, COLUMNS // factor)  # partial blocks left out
    assert reduced.dtype == np.float32
    # the percentile window comes from the averaged (less noisy) values, so it differs
    # a little from the full decode's; shapes and levels agree closely
    expected = _box_downscale(full.astype(np.float64), factor)
    assert np.abs(reduced - expected).mean() < 0.02
    assert np.corrcoef(reduced.ravel(), expected.ravel())[0, 1] > 0.995


def test_uncompressed_reduced_decode_with_a_window_matches_exactly() -> None:
    ds = _native()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # wide enough that nothing clips
    full = decode_for_display(ds).astype(np.float64)
    np.testing.assert_allclose(decode_for_display(ds, reduce=1), _box_downscale(full, 2), atol=1e-5)


def test_uncompressed_reduced_decode_keeps_padding_out() -> None:
    """A block touching padding is padding: 0, and left out of the percentile window."""
    ds = _native()
    stored = ds.pixel_array.copy()
    stored[:, :101] = 0  # a padded band 101 columns wide: block 50 of 2 is half padding
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = 0
    reduced = decode_for_display(ds, reduce=1)
    assert np.all(reduced[:, :51] == 0.0)
    assert float(reduced[:, 51:].min()) >= 0.0
    # the window spans the unpadded anatomy, as in the full decode
    full = decode_for_display(ds)
    assert (
        abs(float(np.percentile(reduced[:, 51:], 50)) - float(np.percentile(full[:, 102:], 50)))
        < 0.02
    )


# A hand behind a shutter, of sides that the codec's ceil(side / 2**r) tells from the
# block average's floor and that Pillow decodes at 1 to 5 levels; the shutter's edges lie
# inside blocks of 2, 4, 8 ...
PADDED_ROWS, PADDED_COLUMNS = 607, 447
SHUTTER_COLUMNS, SHUTTER_ROWS = 101, 75
#: The padding's reach into its neighbours at 1, 2, 3 levels (dicom_io.pixels
#: _j2k_padding_reach): what is masked past the padding found.
SEAM = {1: 2, 2: 3, 3: 4}


def _behind_shutter(
    tmp_path: Path, photometric: str, limit: int | None, *, window: bool, fill: int | None = None
) -> tuple[Dataset, Dataset]:
    """The hand with Pixel Padding Value 0 (through ``limit``: Range Limit) in the
    shutter, uncompressed and JPEG 2000 lossless (read back from a file); with the
    window centre 2048 and width 4096 in the header, where anatomy shows above 0, or
    none (a percentile window). ``fill``: the shutter holds that value instead."""
    native = make_radiograph_dataset(
        hand_like(PADDED_ROWS, PADDED_COLUMNS),
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=12,
        photometric=photometric,
    )
    if window:
        native.WindowCenter, native.WindowWidth = 2048, 4096
    else:
        del native.WindowCenter, native.WindowWidth
    stored = native.pixel_array.copy()
    assert int(stored[SHUTTER_ROWS:, SHUTTER_COLUMNS:].min()) > (limit or 0)  # not padding
    stored[:, :SHUTTER_COLUMNS] = 0
    stored[:SHUTTER_ROWS] = 0
    if limit is not None:
        stored[:, :50] = limit
        native.PixelPaddingRangeLimit = limit
    if fill is not None:
        stored[:, :SHUTTER_COLUMNS] = stored[:SHUTTER_ROWS] = fill
    native.PixelData = stored.tobytes()
    native.PixelPaddingValue = 0
    j2k = copy.deepcopy(native)  # (Dataset.copy shares the file meta and pixel data)
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = tmp_path / f"j2k-{fill}.dcm"
    j2k.save_as(path, enforce_file_format=True)
    return native, read_image(path)


@pytest.mark.parametrize("reduce", [1, 2, 3])
@pytest.mark.parametrize("limit", [None, 3], ids=["value", "range"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossless_jpeg2000_with_padding_masks_the_seam_at_the_reduced_level(
    tmp_path: Path, photometric: str, limit: int | None, reduce: int
) -> None:
    """JPEG 2000's own reduction (its low-pass band) mixed padding into the pixels along
    a shutter's edge, where no value was padding any more: they were shown, and with no
    window in the header they moved the percentile window (found in review). The codec
    still decodes at the reduced level, and every pixel whose value the padding reaches
    (it changes when the shutter holds another value) is padding; anatomy more than the
    seam and the filters' reach (under 2 pixels) past the shutter is not."""
    _, j2k = _behind_shutter(tmp_path, photometric, limit, window=True)
    _, other = _behind_shutter(tmp_path, photometric, limit, window=True, fill=2048)
    factor = 1 << reduce
    image = decode_for_display(j2k, reduce=reduce)
    # the codec's level: ceil(side / 2**r), where averaging blocks leaves the partial out
    assert image.shape == (-(-PADDED_ROWS // factor), -(-PADDED_COLUMNS // factor))
    reached = decode_frame(j2k, reduce=reduce) != decode_frame(other, reduce=reduce)
    assert reached[:, : SHUTTER_COLUMNS // factor].all()
    assert np.all(image[reached] == 0.0)
    masked = image == 0.0  # anatomy shows above 0 through this window, either way up
    beyond = SEAM[reduce] + 2
    columns = int(np.ceil(SHUTTER_COLUMNS / factor + beyond))
    rows = int(np.ceil(SHUTTER_ROWS / factor + beyond))
    assert not masked[rows:, columns:].any()


@pytest.mark.parametrize("reduce", [1, 2, 3])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossless_jpeg2000_with_padding_is_windowed_as_the_uncompressed_image_is(
    tmp_path: Path, photometric: str, reduce: int
) -> None:
    """With no window in the header, the percentile window of the reduced JPEG 2000
    image is the uncompressed one's: the anatomy shows within 0.025 of it on average
    (with the seam shown, 0.05 to 0.085 off), within 0.06 at the 99th percentile."""
    native, j2k = _behind_shutter(tmp_path, photometric, None, window=False)
    factor = 1 << reduce
    reduced = decode_for_display(j2k, reduce=reduce)
    expected = decode_for_display(native, reduce=reduce)  # blocks: the partial ones left out
    reduced = reduced[: expected.shape[0], : expected.shape[1]]
    anatomy = np.zeros(expected.shape, dtype=bool)
    anatomy[SHUTTER_ROWS // factor + 8 :, SHUTTER_COLUMNS // factor + 8 :] = True  # unmasked
    difference = np.abs(reduced - expected)[anatomy]
    assert float(difference.mean()) < 0.025
    assert float(np.percentile(difference, 99)) < 0.06


def test_lossless_jpeg2000_with_padding_keeps_the_codecs_reduction(tmp_path: Path) -> None:
    """Pixel padding declared, JPEG 2000 is still decoded at the codec's reduced level
    (up to its decomposition levels), not in full and averaged (at most 4 halvings)."""
    native, j2k = _behind_shutter(tmp_path, "MONOCHROME1", None, window=True)
    for short in (1, 100, 220):
        assert decode_reduction(j2k, min_short_side=short) == jpeg2000_reduction(
            j2k, min_short_side=short
        )
    assert decode_reduction(j2k, min_short_side=1) == 5 > decode_reduction(native, min_short_side=1)


def test_uncompressed_monochrome1_reduced_is_inverted_like_the_full_decode() -> None:
    ds = _native(photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    full = decode_for_display(ds).astype(np.float64)
    np.testing.assert_allclose(decode_for_display(ds, reduce=1), _box_downscale(full, 2), atol=1e-5)


def test_colour_images_and_unknown_encodings_are_not_reduced() -> None:
    one = _native()
    one.NumberOfFrames = 1  # still one frame: reduced
    assert decode_reduction(one, min_short_side=32) > 0
    rgb = make_radiograph_dataset(
        hand_like(ROWS, COLUMNS), birth_date=BIRTH_DATE, study_date=STUDY_DATE, bits_stored=8
    )
    rgb.PhotometricInterpretation = "RGB"
    rgb.SamplesPerPixel = 3
    assert decode_reduction(rgb, min_short_side=32) == 0
    ds = _native()
    del ds.file_meta.TransferSyntaxUID  # unknown encoding: decoded as it is
    assert decode_reduction(ds, min_short_side=32) == 0


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_full_and_reduced_decodes_are_pydicoms_on_any_thread_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, bits: int
) -> None:
    """Full size through imagecodecs, reduced through Pillow; neither falls back."""
    ds = _j2k(tmp_path, bits=bits)
    expected = ds.pixel_array  # pydicom's own decoder (pylibjpeg-openjpeg)
    assert int(expected.max()) >= 1 << (bits - 2)  # the high bits are in use
    monkeypatch.setenv("OPJ_NUM_THREADS", "1")  # and restored after the test
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        np.testing.assert_array_equal(decode_frame(ds), expected)
        one_thread_reduced = decode_frame(ds, reduce=1)
        set_jpeg2000_threads(2)
        assert os.environ["OPJ_NUM_THREADS"] == "2"
        np.testing.assert_array_equal(decode_frame(ds), expected)
        np.testing.assert_array_equal(decode_frame(ds, reduce=1), one_thread_reduced)
    assert "decode failed" not in caplog.text


@pytest.mark.parametrize("bits", [6, 7])
def test_samples_of_fewer_than_8_bits_keep_their_scale_at_a_reduced_level(
    tmp_path: Path, bits: int
) -> None:
    """Pillow shifts 6- and 7-bit samples to the top of its 8-bit mode: reduced, they
    came out 4 and 2 times too large, past Bits Stored, and the header's window,
    rescale and padding value were applied to values they do not describe."""
    ds = _cr(bits=8)  # (the synthetic radiographs have 8 bits or more)
    ds.PixelData = np.right_shift(ds.pixel_array, 8 - bits).astype(np.uint8).tobytes()
    ds.BitsStored, ds.HighBit = bits, bits - 1
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    ds = dcmread(tmp_path / "j2k.dcm")
    full = decode_frame(ds)
    assert int(full.max()) >= 1 << (bits - 1)
    reduced = decode_frame(ds, reduce=1)
    assert reduced.shape == (-(-ROWS // 2), -(-COLUMNS // 2))  # Pillow's, no fallback
    assert int(reduced.max()) < 1 << bits
    expected = _box_downscale(full.astype(np.float64), 2)
    got = reduced[: expected.shape[0], : expected.shape[1]].astype(np.float64)
    assert float(np.abs(got - expected).mean()) < 0.05 * (1 << bits)  # wavelet, not box


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize(
    ("rows", "columns", "reduce"),
    [(601, 441, 2), (601, 441, 3), (1419, 1040, 3), (599, 439, 4)],
    ids=["601x441-2", "601x441-3", "1419x1040-3", "599x439-4"],
)
def test_jpeg2000_is_decoded_at_the_codecs_level_where_pillow_rounds_half_up(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    rows: int,
    columns: int,
    reduce: int,
    bits: int,
) -> None:
    """Pillow (13) sizes a reduced JPEG 2000 image round(side / 2**r), OpenJPEG decodes
    ceil(side / 2**r): a side whose remainder lies under half of 2**r (601 at 2 levels)
    was refused as a broken data stream, and the image decoded in full through pydicom
    on one thread and averaged in blocks (several times slower, the floor's shape). It is
    decoded at the codec's level, to the values of the same image padded to whole blocks
    (a size Pillow always decoded) but where the wavelet filters reach the padding."""
    ds = _j2k(tmp_path, rows=rows, columns=columns, bits=bits)
    factor = 1 << reduce
    shape = (-(-rows // factor), -(-columns // factor))
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        reduced = decode_frame(ds, reduce=reduce)
        image = decode_for_display(ds, reduce=reduce)
    assert "decode failed" not in caplog.text
    assert reduced.shape == image.shape == shape
    stored = ds.pixel_array
    whole = _cr(rows=shape[0] * factor, columns=shape[1] * factor, bits=bits)
    padding = ((0, shape[0] * factor - rows), (0, shape[1] * factor - columns))
    whole.compress(
        JPEG2000Lossless, np.pad(stored, padding, mode="edge"), encoding_plugin="pylibjpeg"
    )
    expected = decode_frame(whole, reduce=reduce)
    assert expected.shape == shape
    # the 5/3 low band at level r reaches 2**(r+1) - 2 samples either way
    inside = (slice(0, (rows >> reduce) - 2), slice(0, (columns >> reduce) - 2))
    np.testing.assert_array_equal(reduced[inside], expected[inside])
    assert np.abs(reduced.astype(np.float64) - expected).mean() < 0.01 * (1 << bits)


@pytest.mark.parametrize("rows", [65535, ROWS - 8])
def test_a_codestream_of_another_size_is_left_to_pydicom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rows: int
) -> None:
    """The SIZ marker segment is read before OpenJPEG decodes (and allocates) through
    imagecodecs or Pillow; a codestream of another size than the dataset's is pydicom's
    to decode, and to report, where it is no larger than the dataset says; a larger one
    is decoded by none (test_pixels_frame_size)."""
    ds = _j2k(tmp_path)
    stream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = stream.index(b"\xff\x51")
    assert int.from_bytes(stream[siz + 10 : siz + 14], "big") == ROWS  # Ysiz, YOsiz 0
    stream[siz + 10 : siz + 14] = rows.to_bytes(4, "big")
    ds.PixelData = encapsulate([bytes(stream)])
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(PixelDataError) as refused,
    ):
        decode_frame(ds)
    said = f"the codestream holds (rows, columns, components) ({rows}, {COLUMNS}, 1)"
    if rows > ROWS:
        assert f"frame holds {rows} x {COLUMNS} x 1 samples" in str(refused.value)
        assert said not in caplog.text
    else:
        assert said in caplog.text


def test_jpeg2000_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        set_jpeg2000_threads(0)


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_htj2k_is_decoded_like_jpeg2000(
    caplog: pytest.LogCaptureFixture, syntax: UID, bits: int
) -> None:
    """High-Throughput JPEG 2000 (here written by OpenJPH, through imagecodecs): the
    full decode is pydicom's, and a reduced one is close to the box-averaged full one."""
    imagecodecs = pytest.importorskip("imagecodecs")
    ds = _cr(bits=bits)
    stored = ds.pixel_array
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(stored)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    expected = ds.pixel_array  # pydicom's own decoder (pylibjpeg-openjpeg)
    np.testing.assert_array_equal(expected, stored)
    # wavelet levels skipped, as for JPEG 2000 (jpeg2000_reduction is 0 for other syntaxes)
    assert jpeg2000_reduction(ds, min_short_side=220) == 1
    assert decode_reduction(ds, min_short_side=220) == 1
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        np.testing.assert_array_equal(decode_frame(ds), expected)
        full = decode_for_display(ds).astype(np.float64)
        reduced = decode_for_display(ds, reduce=1)
    assert "decode failed" not in caplog.text
    assert reduced.shape == (ROWS // 2, COLUMNS // 2)
    assert np.abs(reduced - _box_downscale(full, 2)).mean() < 0.02


@pytest.mark.parametrize("reduce", [0, 1, 2])
@pytest.mark.parametrize("where", ["no EOC", "90 %", "half"])
@pytest.mark.parametrize("syntax", [JPEG2000Lossless, HTJ2KLossless])
def test_a_codestream_cut_short_is_refused_at_any_size(
    tmp_path: Path, syntax: UID, where: str, reduce: int
) -> None:
    """JPEG and JPEG-LS frames need our EOI check (their decoders make the missing rows
    up); OpenJPEG refuses a JPEG 2000 or HTJ2K codestream that stops early by itself,
    also when the wavelet levels it lacks would be skipped. This keeps it so."""
    if syntax == HTJ2KLossless:
        imagecodecs = pytest.importorskip("imagecodecs")
        ds = _cr()
        stream = bytes(imagecodecs.htj2k_encode(ds.pixel_array))
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds = _j2k(tmp_path)
        stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    body = stream.rstrip(b"\0")
    assert body.endswith(b"\xff\xd9")  # EOC
    cut = {"no EOC": body[:-2], "90 %": body[: len(body) * 9 // 10], "half": body[: len(body) // 2]}
    ds.PixelData = encapsulate([cut[where]])
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        decode_for_display(ds, reduce=reduce)
