"""Lossless JPEG and JPEG-LS through imagecodecs: pydicom's values, and one result per image.

The files are written by dcmtk's ``dcmcjpeg`` and ``dcmcjpls`` (the encoders a PACS
would use) and the reference decode is pydicom's own (pylibjpeg-libjpeg).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from dicom_io.pixels import PixelDataError, decode_for_display, decode_frame, decode_reduction
from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import run_tool

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

imagecodecs = pytest.importorskip("imagecodecs")

ROWS, COLUMNS = 600, 440
FALLBACK = "decode failed"
EOI = b"\xff\xd9"


def _native(bits: int = 12, **kwargs: object) -> Dataset:
    return make_radiograph_dataset(
        hand_like(ROWS, COLUMNS),
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=bits,
        **kwargs,  # type: ignore[arg-type]
    )


def _encoded(tmp_path: Path, ds: Dataset, tool: str, *options: str) -> Dataset:
    source, target = tmp_path / "native.dcm", tmp_path / f"{tool}.dcm"
    ds.save_as(source, enforce_file_format=True)
    run_tool(tool, *options, source, target)
    return dcmread(target)


@pytest.mark.parametrize(
    ("tool", "options", "syntax"),
    [
        ("dcmcjpeg", ("+e1",), JPEGLosslessSV1),
        *[("dcmcjpeg", ("+el", "+sv", str(sv)), JPEGLossless) for sv in range(1, 8)],
        ("dcmcjpls", (), JPEGLSLossless),
        ("dcmcjpls", ("+en",), JPEGLSNearLossless),
    ],
    ids=[
        "jpeg-lossless-sv1",
        *[f"jpeg-lossless-sv{sv}" for sv in range(1, 8)],
        "jpeg-ls",
        "jpeg-ls-near-lossless",
    ],
)
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_decoded_through_imagecodecs_bit_for_bit_as_pydicom_decodes(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tool: str,
    options: tuple[str, ...],
    syntax: str,
    bits: int,
) -> None:
    ds = _encoded(tmp_path, _native(bits), tool, *options)
    assert ds.file_meta.TransferSyntaxUID == syntax
    expected = ds.pixel_array  # pydicom's own decoder
    assert int(expected.max()) >= 1 << (bits - 2)  # the high bits are in use
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        decoded = decode_frame(ds)
    assert FALLBACK not in caplog.text  # imagecodecs decoded it: no fallback to pydicom
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.dtype == (np.uint8 if bits == 8 else np.uint16)


@pytest.mark.parametrize(
    ("tool", "options", "masked"),
    [
        ("dcmcjpeg", ("+e1",), True),
        ("dcmcjpeg", ("+el", "+sv", "6"), True),
        ("dcmcjpls", (), False),  # pydicom keeps a JPEG-LS stream's values as they are
    ],
    ids=["jpeg-lossless-sv1", "jpeg-lossless-sv6", "jpeg-ls"],
)
def test_bits_above_bits_stored_in_a_stream_of_higher_precision_are_pydicom_s(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tool: str,
    options: tuple[str, ...],
    masked: bool,
) -> None:
    """A 16-bit stream in pixels of Bits Allocated 16 and Bits Stored 12, its high bits
    holding data: pydicom clears them in a lossless JPEG frame, and values of 4096 and
    over from imagecodecs' decode reached the window (found in review)."""
    ds = _encoded(tmp_path, _native(16), tool, *options)
    ds.BitsStored, ds.HighBit = 12, 11
    raw = _native(16).pixel_array
    assert int(raw.max()) >= 1 << 12  # the stream holds bits above Bits Stored
    expected = ds.pixel_array  # pydicom's own decoder
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        decoded = decode_frame(ds)
    assert FALLBACK not in caplog.text  # imagecodecs decoded it: no fallback to pydicom
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, raw & 0x0FFF if masked else raw)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_a_point_transform_is_undone_as_dcmtk_undoes_it(tmp_path: Path, bits: int) -> None:
    """T.81 H.1.2.1: samples coded with point transform Pt come back shifted left by Pt,
    their Pt low bits lost. dcmtk's own decoder agrees; pydicom's pylibjpeg-libjpeg
    2.5.0 returns every sample at the maximum (65535 at 16 bits) for these files."""
    native = _native(bits)
    ds = _encoded(tmp_path, native, "dcmcjpeg", "+el", "+sv", "6", "+pt", "2")
    assert ds.file_meta.TransferSyntaxUID == JPEGLossless
    run_tool("dcmdjpeg", tmp_path / "dcmcjpeg.dcm", tmp_path / "dcmdjpeg.dcm")
    by_dcmtk = dcmread(tmp_path / "dcmdjpeg.dcm").pixel_array
    decoded = decode_frame(ds)
    np.testing.assert_array_equal(decoded, by_dcmtk)
    np.testing.assert_array_equal(decoded, (native.pixel_array >> 2) << 2)


@pytest.mark.parametrize(
    ("tool", "options"),
    [("dcmcjpeg", ("+e1",)), ("dcmcjpls", ()), ("dcmcrle", ())],
    ids=["jpeg-lossless-sv1", "jpeg-ls", "rle"],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_radiograph_comes_out_the_same_whatever_lossless_syntax_it_came_in(
    tmp_path: Path, tool: str, options: tuple[str, ...], photometric: str
) -> None:
    """The same reduction (averaged blocks of stored values) and the same pixels, so a
    PACS that compresses what it forwards does not change the model's input."""
    native = _native(photometric=photometric)
    native.PixelPaddingValue = 0
    compressed = _encoded(tmp_path, native, tool, *options)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    for short, long in ((220, 0), (100, 300), (1, 1), (221, 0)):
        reduce = decode_reduction(native, min_short_side=short, min_long_side=long)
        assert decode_reduction(compressed, min_short_side=short, min_long_side=long) == reduce
        np.testing.assert_array_equal(
            decode_for_display(compressed, reduce=reduce), decode_for_display(native, reduce=reduce)
        )
    assert decode_reduction(compressed, min_short_side=220) == 1  # 440 // 2 = 220


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        (JPEGLosslessSV1, "JPEG Lossless"),
        (JPEGLossless, "JPEG Lossless"),
        (JPEGLSLossless, "JPEG-LS"),
        (JPEGLSNearLossless, "JPEG-LS"),
    ],
)
def test_a_damaged_stream_falls_back_to_pydicom_which_reports_it(
    caplog: pytest.LogCaptureFixture, syntax: UID, name: str
) -> None:
    ds = _native()
    # a frame header of the dataset's size and a scan's header (without them a frame is
    # not decoded at all: test_pixels_frame_size), then no scan a decoder can read
    sof = b"\xff\xc3\x00\x0b\x0c" + ROWS.to_bytes(2, "big") + COLUMNS.to_bytes(2, "big")
    sof += b"\x01\x01\x11\x00"
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"
    ds.PixelData = encapsulate([b"\xff\xd8" + sof + sos + b" a damaged stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(PixelDataError, match=name),
    ):
        decode_for_display(ds)
    assert FALLBACK in caplog.text


def _damaged(stream: bytes, how: str) -> bytes:
    """``stream`` damaged in its scan, halfway along, and still ending in EOI."""
    body = stream.rstrip(b"\0")
    middle = len(body) // 2
    return {
        "cut, then closed": body[:middle] + EOI,
        "1 KiB zeroed": body[:middle] + bytes(1024) + body[middle + 1024 :],
        "100 bytes lost": body[:middle] + body[middle + 100 :],
        "a byte altered": body[:middle] + bytes([body[middle] ^ 0x5A]) + body[middle + 1 :],
    }[how]


DAMAGE = ["cut, then closed", "1 KiB zeroed", "100 bytes lost", "a byte altered"]
JPEG_LS_ENCODERS = {"jpeg-ls": ("dcmcjpls",), "jpeg-ls-near-lossless": ("dcmcjpls", "+en")}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("encoder", list(JPEG_LS_ENCODERS))
def test_a_jpeg_ls_stream_charls_finds_damaged_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoder: str, how: str
) -> None:
    """CharLS (as dcmtk's ``dcmdjpls``) stops at damage inside the scan; pydicom's
    decoder, the fallback, would make a full-size image of it with half its pixels
    wrong and say nothing. The frame goes to neither."""
    ds = _encoded(tmp_path, _native(), *JPEG_LS_ENCODERS[encoder])
    whole = ds.pixel_array
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([_damaged(stream, how)])
    # what would have been assessed, and what dcmtk makes of it
    assert (ds.pixel_array != whole).sum() > whole.size // 10
    ds.save_as(tmp_path / "damaged.dcm")
    dcmtk = run_tool("dcmdjpls", tmp_path / "damaged.dcm", tmp_path / "out.dcm", check=False)
    assert dcmtk.returncode != 0
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(
            PixelDataError,
            match=r"codestream is damaged \(CharLS: Invalid JPEG-LS stream, the encoded bit",
        ),
    ):
        decode_for_display(ds)
    assert FALLBACK not in caplog.text


@pytest.mark.parametrize("name", ["SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"])
def test_a_colour_jpeg_ls_frame_is_checked_by_charls_too(name: str) -> None:
    """pydicom's decoder decodes colour JPEG-LS (pydicom's own test files, line and
    sample interleaved), once CharLS has decoded the frame and found no damage."""
    path = get_testdata_file(name)
    assert isinstance(path, str)  # bundled with pydicom, never downloaded
    ds = dcmread(path)
    expected = ds.pixel_array
    np.testing.assert_array_equal(decode_frame(ds), expected)
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    quarter = len(stream) // 4
    ds.PixelData = encapsulate([stream[:quarter] + bytes(32) + stream[quarter + 32 :]])
    with pytest.raises(PixelDataError, match="codestream is damaged"):
        decode_frame(ds)


@pytest.mark.parametrize("padding", [b"\0", b"\0\0", b"\0\0\0\0"], ids=["1", "2", "4"])
def test_a_jpeg_ls_stream_padded_before_its_eoi_is_decoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, padding: bytes
) -> None:
    """Legacy encoders wrote zero bytes between the scan and EOI (the DICOM WG04 sample
    MR1_JLSL). CharLS refuses them (2.4.3, here, even one after this stream: "the decoding
    process is ready but the source buffer still contains encoded data"); set aside, they
    leave a stream that CharLS decodes, to the image's values."""
    ds = _encoded(tmp_path, _native(), "dcmcjpls")
    expected = ds.pixel_array
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1))).rstrip(b"\0")
    ds.PixelData = encapsulate([stream[:-2] + padding + EOI])
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        np.testing.assert_array_equal(decode_frame(ds), expected)
    assert FALLBACK not in caplog.text


def test_padding_after_a_scan_whose_own_last_byte_is_zero_is_set_aside() -> None:
    """A scan may end in a zero byte of its own: with padding after it, the stream
    without any zero before EOI is cut short, and the one that keeps a zero is whole."""
    rng = np.random.default_rng(0)
    for _ in range(1000):  # about one scan in 256 ends in a zero byte
        pixels = rng.integers(0, 4096, size=(24, 20), dtype=np.uint16)
        stream = bytes(imagecodecs.jpegls_encode(pixels))
        if stream[-3] == 0:
            break
    else:
        pytest.fail("no scan that ends in a zero byte among 1000")
    ds = make_radiograph_dataset(
        pixels, birth_date=BIRTH_DATE, study_date=STUDY_DATE, bits_stored=12
    )
    ds.PixelData = encapsulate([stream[:-2] + b"\0\0" + EOI])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    np.testing.assert_array_equal(decode_frame(ds), pixels)


@pytest.mark.parametrize(
    ("end", "charls"),
    [
        (lambda scan: scan[:-1024] + bytes(1024), "general structural problem"),
        (lambda scan: scan + b"\x12\x34" + bytes(2), "still contains encoded data"),
    ],
    ids=["scan's last kilobyte zeroed", "other bytes than zeros before the padding"],
)
def test_what_ends_a_jpeg_ls_stream_is_not_taken_for_padding_unless_it_is(
    tmp_path: Path, end: Callable[[bytes], bytes], charls: str
) -> None:
    """Zeros that replace the end of the scan leave, set aside, a scan cut short; bytes
    other than zeros after the scan are there with or without the zeros that follow
    them. CharLS refuses both, as ``dcmdjpls`` does, and so does this node (the second
    is refused even though pydicom's decoder would read the image right: the stream is
    not what T.87 allows, and nothing tells junk after a scan from a scan that ended
    early)."""
    ds = _encoded(tmp_path, _native(), "dcmcjpls")
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1))).rstrip(b"\0")
    ds.PixelData = encapsulate([end(stream[:-2]) + EOI])
    with pytest.raises(PixelDataError, match=f"codestream is damaged .*{charls}"):
        decode_frame(ds)


def test_a_stream_charls_does_not_read_is_decoded_by_pydicom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CharLS says a lossless JPEG stream under a JPEG-LS transfer syntax (a mislabelled
    file) is not JPEG-LS, which is no damage: pydicom's decoder reads any JPEG process,
    and its values are the image's."""
    ds = _encoded(tmp_path, _native(), "dcmcjpeg", "+e1")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    with caplog.at_level(logging.INFO, logger="dicom_io.pixels"):
        decoded = decode_frame(ds)
    assert "not encoded with the JPEG-LS algorithm); decoding in full" in caplog.text
    np.testing.assert_array_equal(decoded, _native().pixel_array)


def test_a_stream_of_another_size_than_the_dataset_says_is_left_to_pydicom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The frame header is read before imagecodecs decodes (which allocates what the
    stream says); a stream of another size, no larger than the dataset says, is
    pydicom's to decode, and to report (a larger one: test_pixels_frame_size)."""
    ds = _encoded(tmp_path, _native(), "dcmcjpeg", "+e1")
    ds.Rows = ROWS + 10
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(PixelDataError, match="JPEG Lossless"),
    ):
        decode_frame(ds)
    assert f"{FALLBACK} (the stream holds {ROWS} x {COLUMNS} x 1 samples)" in caplog.text


@pytest.mark.parametrize("rows", [65535, 1])
def test_a_stream_that_claims_another_size_is_not_decoded_by_imagecodecs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rows: int
) -> None:
    """A stream whose frame header claims 65535 rows would have imagecodecs allocate for
    them; it never gets the stream, nor does any decoder (test_pixels_frame_size). One
    that claims fewer rows is left to pydicom's decoder, which allocates no more than
    the data set says."""
    ds = _encoded(tmp_path, _native(), "dcmcjpeg", "+e1")
    stream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = stream.index(b"\xff\xc3")
    assert int.from_bytes(stream[sof + 5 : sof + 7], "big") == ROWS
    stream[sof + 5 : sof + 7] = rows.to_bytes(2, "big")
    ds.PixelData = encapsulate([bytes(stream)])
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(PixelDataError) as refused,
    ):
        decode_frame(ds)
    if rows > ROWS:
        assert f"frame holds {rows} x {COLUMNS} x 1 samples" in str(refused.value)
        assert FALLBACK not in caplog.text
    else:
        assert f"{FALLBACK} (the stream holds {rows} x {COLUMNS} x 1 samples)" in caplog.text


# -- a frame cut short --------------------------------------------------------------

JPEG_ENCODERS = {
    "jpeg-baseline": ("dcmcjpeg", "+eb"),
    "jpeg-extended": ("dcmcjpeg", "+ee"),
    "jpeg-lossless": ("dcmcjpeg", "+el"),
    "jpeg-lossless-sv1": ("dcmcjpeg", "+e1"),
    "jpeg-ls": ("dcmcjpls",),
    "jpeg-ls-near-lossless": ("dcmcjpls", "+en"),
}


def _cut(stream: bytes, where: str) -> bytes:
    body = stream.rstrip(b"\0\xff")
    assert body.endswith(EOI)
    return {
        "no EOI": body[:-2],
        "90 %": body[: len(body) * 9 // 10],
        "half": body[: len(body) // 2],
    }[where]


@pytest.mark.parametrize("where", ["half", "90 %", "no EOI"])
@pytest.mark.parametrize("encoder", list(JPEG_ENCODERS))
def test_a_frame_cut_short_is_refused_before_any_decoder_sees_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoder: str, where: str
) -> None:
    """libjpeg-turbo and pydicom's decoder would both make up the missing rows of such a
    frame and say nothing (dcmtk's decoders refuse it): without its EOI marker the frame
    is not decoded at all."""
    ds = _encoded(tmp_path, _native(), *JPEG_ENCODERS[encoder])
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([_cut(stream, where)])
    with (
        caplog.at_level(logging.INFO, logger="dicom_io.pixels"),
        pytest.raises(
            PixelDataError, match=r"end-of-image marker \(FFD9\): the pixel data is incomplete"
        ),
    ):
        decode_for_display(ds)
    assert FALLBACK not in caplog.text


@pytest.mark.parametrize("encoder", list(JPEG_ENCODERS))
def test_a_whole_frame_after_its_padding_is_decoded(tmp_path: Path, encoder: str) -> None:
    """The byte after EOI that an even-length fragment may need (zero, or an 0xFF fill
    byte as in pydicom's JPGExtended.dcm) is not part of the stream."""
    ds = _encoded(tmp_path, _native(), *JPEG_ENCODERS[encoder])
    expected = ds.pixel_array
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1))).rstrip(b"\0")
    for padding in (b"", b"\0", b"\xff", b"\0\0"):
        ds.PixelData = encapsulate([stream + padding])
        np.testing.assert_array_equal(decode_frame(ds), expected)


@pytest.mark.parametrize(
    ("encoder", "damage", "refusal"),
    [
        (("dcmcjpeg", "+e1"), lambda stream: _cut(stream, "90 %"), "end-of-image marker"),
        (("dcmcjpls",), lambda stream: _damaged(stream, "1 KiB zeroed"), "damaged"),
    ],
    ids=["jpeg-lossless-cut-short", "jpeg-ls-damaged-inside"],
)
def test_the_damaged_frame_of_several_is_the_one_refused(
    tmp_path: Path,
    encoder: tuple[str, ...],
    damage: Callable[[bytes], bytes],
    refusal: str,
) -> None:
    """Frames that pydicom's decoder decodes (here, one of several) are checked as the
    first frame of a single-frame image is: for EOI, and JPEG-LS by CharLS."""
    ds = _encoded(tmp_path, _native(), *encoder)
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([stream, damage(stream)])
    ds.NumberOfFrames = 2
    np.testing.assert_array_equal(
        decode_frame(ds, 0), dcmread(tmp_path / f"{encoder[0]}.dcm").pixel_array
    )
    with pytest.raises(PixelDataError, match=refusal):
        decode_frame(ds, 1)
