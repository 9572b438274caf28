"""decode_for_display across what PACSes send: photometrics, depths, LUTs, syntaxes."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_io.pixels import PixelDataError, decode_for_display, drop_pixel_data, read_image
from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import run_tool

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like


def _stored(bits: int = 12, shape: tuple[int, int] = (96, 64)) -> np.ndarray:
    return np.rint(hand_like(*shape) * ((1 << bits) - 1)).astype(
        np.uint16 if bits > 8 else np.uint8
    )


class _RadiographOptions(TypedDict, total=False):
    """The keyword arguments of make_radiograph_dataset that these tests vary."""

    photometric: str
    modality: str


def _dataset(stored: np.ndarray, bits: int = 12, **kwargs: Unpack[_RadiographOptions]) -> Dataset:
    ds = make_radiograph_dataset(
        stored, bits_stored=bits, birth_date=BIRTH_DATE, study_date=STUDY_DATE, **kwargs
    )
    return ds


def _no_voi(ds: Dataset) -> Dataset:
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - 0.5 - (width - 1) / 2
    return np.clip((values - low) / (width - 1), 0, 1)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --- photometric, bit depth, LUTs ------------------------------------------------


def test_output_contract() -> None:
    out = decode_for_display(_dataset(_stored()))
    assert out.dtype == np.float32
    assert out.shape == (96, 64)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_window_is_applied() -> None:
    stored = _stored()
    ds = _dataset(stored)
    ds.WindowCenter, ds.WindowWidth = 2000, 1001
    expected = _linear_window(stored.astype(float), 2000, 1001)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_first_of_several_windows_is_used() -> None:
    stored = _stored()
    ds = _dataset(stored)
    ds.WindowCenter, ds.WindowWidth = [1500, 3000], [2001, 100]
    expected = _linear_window(stored.astype(float), 1500, 2001)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_sigmoid_window() -> None:
    stored = _stored()
    ds = _dataset(stored)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000, 1000, "SIGMOID"
    expected = 1 / (1 + np.exp(-4 * (stored - 2000.0) / 1000))
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_robust_range_without_voi() -> None:
    stored = _stored()
    stored[0, 0] = 4095  # one hot pixel must not compress the range
    out = decode_for_display(_no_voi(_dataset(stored)))
    assert out.min() == 0.0 and out.max() == 1.0
    order = np.argsort(stored.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotonic in the stored value
    # the 0.5-99.5 percentile range saturates a few pixels at each end, not just one
    assert (out == 1.0).sum() > 1 and (out == 0.0).sum() > 1
    assert np.median(out) > 0.05


def test_monochrome1_is_inverted() -> None:
    stored = _stored()
    mono2 = decode_for_display(_dataset(stored))
    mono1 = decode_for_display(_dataset(stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bit_depths(bits: int) -> None:
    stored = _stored(bits)
    out = decode_for_display(_no_voi(_dataset(stored, bits)))
    reference = decode_for_display(_no_voi(_dataset(_stored(12), 12)))
    assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.99


def test_signed_pixels_with_rescale() -> None:
    """CT-like: signed stored values, rescale intercept, window in output units."""
    hu = np.rint(hand_like() * 2000 - 1000).astype(np.int16)
    ds = _dataset(np.zeros((96, 64), np.uint16), 16, modality="CT")
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 0, 2001
    expected = _linear_window(hu.astype(float), 0, 2001)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_rescale_slope() -> None:
    stored = _stored()
    ds = _dataset(stored)
    ds.RescaleSlope, ds.RescaleIntercept = 2, 100
    ds.WindowCenter, ds.WindowWidth = 4100, 4001
    expected = _linear_window(stored * 2.0 + 100, 4100, 4001)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_voi_lut_sequence() -> None:
    stored = _stored()
    ds = _no_voi(_dataset(stored))
    table = np.clip(np.arange(4096) // 16, 0, 255).astype(np.uint16)  # 4096 entries, 8 bits
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = table.tolist()
    ds.VOILUTSequence = [item]
    expected = table[stored] / 255.0
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
def test_an_8_bit_lut_of_an_odd_number_of_entries_in_ow(sequence: str) -> None:
    """4095 one-byte entries are 4096 bytes in OW (padded to even length): they were read
    as 2048 two-byte entries, and the image came out wrong (found in review)."""
    stored = np.minimum(_stored(), 4094)
    ds = _no_voi(_dataset(stored))
    table = (np.arange(4095) * 255 // 4094).astype(np.uint8)  # 4095 entries, 8 bits
    item = Dataset()
    item.LUTDescriptor = [4095, 0, 8]
    item.add_new(0x00283006, "OW", table.tobytes() + b"\0")  # LUT Data
    if sequence == "ModalityLUTSequence":
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
        item.ModalityLUTType = "US"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        expected = _linear_window(table[stored].astype(float), 128, 256)
    else:
        expected = table[stored] / 255.0
    setattr(ds, sequence, [item])
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
@pytest.mark.parametrize("bits", [16, 8])
def test_a_lut_in_ow_of_a_big_endian_file_is_read_in_its_byte_order(
    tmp_path: Path, sequence: str, bits: int
) -> None:
    """The listener takes Explicit VR Big Endian, whose OW words are big-endian on disk,
    and pydicom leaves them so: the table was read as little-endian words, the image
    came out as noise (correlation 0.003 with the same image sent little-endian), and
    its bone age was still estimated. One-byte entries are two to a word, swapped too."""
    stored = np.minimum(_stored(), 4094)
    entries = 4095
    if bits == 16:
        table = (np.arange(entries) * 16).astype(np.uint16)
        on_disk = table.astype(">u2").tobytes() + b"\0\0"
        table_bits, top = 16, 65535.0
    else:
        table = (np.arange(entries) * 255 // (entries - 1)).astype(np.uint8)
        padded = np.append(table, np.uint8(0))
        on_disk = padded.reshape(-1, 2)[:, ::-1].tobytes()  # each word big-endian
        table_bits, top = 8, 255.0
    ds = _no_voi(_dataset(stored))
    item = Dataset()
    item.LUTDescriptor = [entries, 0, table_bits]
    item.add_new(0x00283006, "OW", on_disk)  # LUT Data
    if sequence == "ModalityLUTSequence":
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
        item.ModalityLUTType = "US"
        ds.WindowCenter, ds.WindowWidth = top / 2, top + 1
        expected = _linear_window(table[stored].astype(float), top / 2, top + 1)
    else:  # the VOI LUT's range is the window's
        expected = table[stored] / float(table.max())
    setattr(ds, sequence, [item])
    ds.PixelData = stored.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "big-endian.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    np.testing.assert_allclose(decode_for_display(read_image(path)), expected, atol=1e-5)


def test_modality_lut_sequence() -> None:
    stored = _stored()
    ds = _dataset(stored)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = (4095 - np.arange(4096)).astype(np.uint16).tolist()  # an inverting LUT
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    expected = _linear_window(4095.0 - stored, 2048, 4096)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
def test_a_lut_whose_descriptor_is_not_three_numbers_is_undecodable(sequence: str) -> None:
    """Not an unexpected TypeError, which failed the image three times over and ended in
    `error` (found in review): no knowing which value each entry maps."""
    ds = _dataset(_stored())
    item = Dataset()
    item.add_new(0x00283002, "US", 4096)  # LUT Descriptor: one value, not three
    item.LUTData = list(range(4096))
    setattr(ds, sequence, [item])
    with pytest.raises(PixelDataError, match="LUT Descriptor has 1 value"):
        decode_for_display(ds)


def test_a_rescale_slope_with_a_decimal_comma_is_undecodable() -> None:
    """``1,2500`` (a locale's decimal comma, written by some modalities) was read as no
    slope at all, 1, and set every window off (found in review)."""
    ds = _dataset(_stored())
    ds[0x00281053] = RawDataElement(Tag(0x00281053), "DS", 6, b"1,2500", 0, True, True)
    with pytest.raises(PixelDataError, match="RescaleSlope '1,2500' is not a number"):
        decode_for_display(ds)


def test_pixel_padding_is_excluded() -> None:
    stored = _stored()
    stored[:, :8] = 4095  # a padded frame around the image
    ds = _no_voi(_dataset(stored))
    ds.PixelPaddingValue = 4095
    out = decode_for_display(ds)
    assert np.all(out[:, :8] == 0.0)
    unpadded = _no_voi(_dataset(stored[:, 8:].copy()))
    np.testing.assert_allclose(out[:, 8:], decode_for_display(unpadded), atol=1e-6)


def test_pixel_padding_range_monochrome1() -> None:
    stored = _stored()
    stored[:4] = 0
    stored[4:8] = 3
    ds = _no_voi(_dataset(stored, photometric="MONOCHROME1"))
    ds.PixelPaddingValue = 0
    ds.PixelPaddingRangeLimit = 3
    out = decode_for_display(ds)
    assert np.all(out[:8] == 0.0)  # padding is background (dark), also after inversion
    assert out[8:].max() == 1.0


def _signed(values: np.ndarray, bits: int) -> Dataset:
    ds = _no_voi(_dataset(np.zeros(values.shape, np.uint16), bits, modality="CT"))
    ds.PixelRepresentation = 1
    ds.PixelData = values.astype("<i2").tobytes()
    return ds


@pytest.mark.parametrize(
    ("bits", "vr", "value", "limit"),
    [
        (16, "SS", -2000, None),
        (16, "US", 63536, None),  # -2000 as a 16-bit word
        (12, "US", 63536, None),
        (12, "US", 2096, None),  # -2000 in 12 bits
        (16, "US", 63536, 63546),  # -2000 to -1990
        (12, "US", 2106, 2096),  # -1990 to -2000 in 12 bits
    ],
)
def test_pixel_padding_of_signed_pixels_written_unsigned(
    bits: int, vr: str, value: int, limit: int | None
) -> None:
    """Of signed pixels, a Pixel Padding Value (or Range Limit) written with VR US, the
    bit pattern of a negative value, matched no pixel and the padding was shown through
    the window (found in review); the standard gives it the pixels' VR, SS."""
    hu = np.rint(hand_like() * 2000 - 1000).astype(np.int16)
    hu[:, :8] = -2000 if limit is None else -1995
    ds = _signed(hu, bits)
    ds.add_new(0x00280120, vr, value)  # Pixel Padding Value
    if limit is not None:
        ds.add_new(0x00280121, vr, limit)  # Pixel Padding Range Limit
    out = decode_for_display(ds)
    assert np.all(out[:, :8] == 0.0)
    unpadded = decode_for_display(_signed(hu[:, 8:].copy(), bits))
    np.testing.assert_allclose(out[:, 8:], unpadded, atol=1e-6)


def test_multiframe_first_frame() -> None:
    frames = np.stack([_stored(), 4095 - _stored()])
    ds = _no_voi(_dataset(_stored()))
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    expected = decode_for_display(_no_voi(_dataset(_stored())))
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-6)


def _rgb_dataset(rgb: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "X^Y", "1", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "", "", ""
    ds.ReferringPhysicianName = ""
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _rgb() -> np.ndarray:
    grey = np.rint(hand_like() * 255).astype(np.uint8)
    return np.stack([grey, grey, grey], axis=-1)


def test_rgb_secondary_capture_becomes_luminance() -> None:
    rgb = _rgb()
    rgb[0, 0] = (255, 0, 0)
    out = decode_for_display(_rgb_dataset(rgb))
    np.testing.assert_allclose(out[1:, 1:], rgb[1:, 1:, 0] / 255.0, atol=1e-5)
    assert out[0, 0] == pytest.approx(0.299, abs=1e-3)


# --- errors -------------------------------------------------------------------------


def test_missing_pixel_data() -> None:
    ds = _dataset(_stored())
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no Pixel Data"):
        decode_for_display(ds)


def test_dropped_pixel_data_takes_pydicoms_decoded_array_with_it() -> None:
    ds = _dataset(_stored())
    decoded = weakref.ref(ds.pixel_array)  # pydicom keeps the array it decoded
    drop_pixel_data(ds)
    gc.collect()
    assert "PixelData" not in ds
    assert decoded() is None
    assert ds.SOPInstanceUID and ds.PatientSex == "M"  # the rest of the dataset stays
    drop_pixel_data(ds)  # nothing left to drop: no error
    float_image = _dataset(_stored())
    float_image.FloatPixelData = float_image.pixel_array.astype(np.float32).tobytes()
    del float_image.PixelData
    drop_pixel_data(float_image)
    assert "FloatPixelData" not in float_image
    with pytest.raises(PixelDataError, match="no Pixel Data"):
        decode_for_display(float_image)


def test_pixel_data_error_is_value_error() -> None:
    assert issubclass(PixelDataError, ValueError)


def test_truncated_pixel_data() -> None:
    ds = _dataset(_stored())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        decode_for_display(ds)


def test_corrupt_compressed_data() -> None:
    ds = _dataset(_stored())
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    with pytest.raises(PixelDataError, match="JPEG-LS"):
        decode_for_display(ds)


def test_a_refusal_is_one_line_that_reads_the_same_every_time() -> None:
    """It is recorded as the instance's reason and shown by `status`: the decoders'
    lines joined, and no object's address (Pillow names its input by one)."""
    ds = _dataset(_stored())
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a JPEG 2000 codestream"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    reasons = set()
    for _ in range(2):
        with pytest.raises(PixelDataError, match="cannot be decoded") as refused:
            decode_for_display(ds)
        reasons.add(str(refused.value))
    [reason] = reasons
    assert "\n" not in reason and " at 0x" not in reason, reason
    assert "pillow" in reason, reason  # what each decoder said is kept


# --- transfer syntaxes ------------------------------------------------------------


def _uncompressed(bits: int = 12, photometric: str = "MONOCHROME2") -> Dataset:
    return _dataset(_stored(bits), bits, photometric=photometric)


class _CompressOptions(TypedDict, total=False):
    """Keyword options of pydicom's Dataset.compress."""

    encoding_plugin: str
    jls_error: int
    j2k_cr: list[float]
    j2k_psnr: list[float]


@pytest.mark.parametrize(
    ("syntax", "kwargs"),
    [
        (RLELossless, {}),
        (JPEGLSLossless, {}),
        (JPEG2000Lossless, {}),
    ],
    ids=["rle", "jpeg-ls", "jpeg2000-lossless"],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_lossless_pydicom_encoders(
    tmp_path: Path, syntax: str, kwargs: _CompressOptions, photometric: str
) -> None:
    ds = _uncompressed(photometric=photometric)
    expected = decode_for_display(ds)
    ds.compress(syntax, **kwargs)
    back = dcmread(_save(ds, tmp_path / "c.dcm"))
    assert back.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode_for_display(back), expected)


def test_jpeg_ls_near_lossless(tmp_path: Path) -> None:
    ds = _uncompressed()
    expected = decode_for_display(ds)
    ds.compress(JPEGLSNearLossless, jls_error=2)
    back = dcmread(_save(ds, tmp_path / "c.dcm"))
    assert np.abs(decode_for_display(back) - expected).max() < 0.01


@pytest.mark.parametrize(
    ("tool", "options", "bits", "tolerance"),
    [
        ("dcmcjpeg", ("+e1",), 12, 0.0),  # JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
        ("dcmcjpeg", ("+el",), 16, 0.0),  # JPEG Lossless (1.2.840.10008.1.2.4.57)
        ("dcmcjpeg", ("+eb",), 8, 0.03),  # JPEG Baseline 8-bit (1.2.840.10008.1.2.4.50)
        ("dcmcjpeg", ("+ee",), 12, 0.03),  # JPEG Extended 12-bit (1.2.840.10008.1.2.4.51)
        ("dcmcjpls", (), 12, 0.0),  # JPEG-LS Lossless
        ("dcmcjpls", ("+en",), 16, 0.01),  # JPEG-LS near-lossless
        ("dcmcrle", (), 16, 0.0),  # RLE Lossless
        ("dcmconv", ("+tb",), 12, 0.0),  # Explicit VR Big Endian (retired)
        ("dcmconv", ("+ti",), 12, 0.0),  # Implicit VR Little Endian
        ("dcmconv", ("+ti",), 8, 0.0),
    ],
    ids=[
        "jpeg-lossless-sv1",
        "jpeg-lossless-16",
        "jpeg-baseline",
        "jpeg-extended-12",
        "jpeg-ls",
        "jpeg-ls-near",
        "rle-16",
        "big-endian",
        "implicit-vr",
        "implicit-vr-8",
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dcmtk_transfer_syntaxes(
    tmp_path: Path,
    tool: str,
    options: tuple[str, ...],
    bits: int,
    tolerance: float,
    photometric: str,
) -> None:
    ds = _uncompressed(bits, photometric)
    expected = decode_for_display(ds)
    source = _save(ds, tmp_path / "in.dcm")
    target = tmp_path / "out.dcm"
    run_tool(tool, *options, source, target)
    back = dcmread(target)
    assert back.file_meta.TransferSyntaxUID != ds.file_meta.TransferSyntaxUID
    out = decode_for_display(back)
    if tolerance == 0.0:
        np.testing.assert_array_equal(out, expected)
    else:
        assert np.abs(out - expected).mean() < tolerance


def test_jpeg_baseline_colour_ybr(tmp_path: Path) -> None:
    """An RGB SC sent as JPEG Baseline arrives as YBR_FULL_422 and still decodes."""
    rgb = _rgb()
    expected = decode_for_display(_rgb_dataset(rgb))
    source = _save(_rgb_dataset(rgb), tmp_path / "in.dcm")
    target = tmp_path / "out.dcm"
    run_tool("dcmcjpeg", "+eb", source, target)
    back = dcmread(target)
    assert back.PhotometricInterpretation.startswith("YBR")
    assert np.abs(decode_for_display(back) - expected).mean() < 0.03


def test_img2dcm_secondary_capture(tmp_path: Path) -> None:
    """A JPEG wrapped by img2dcm (JPEG Baseline, no re-encoding) decodes."""
    from PIL import Image

    grey = np.rint(hand_like(120, 80) * 255).astype(np.uint8)
    jpeg = tmp_path / "hand.jpg"
    Image.fromarray(grey).save(jpeg, quality=95)
    target = tmp_path / "out.dcm"
    run_tool("img2dcm", "--no-checks", jpeg, target)
    out = decode_for_display(dcmread(target))
    assert out.shape == (120, 80)
    assert np.corrcoef(out.ravel(), grey.ravel())[0, 1] > 0.99


def test_enhanced_functional_group_window() -> None:
    stored = _stored()
    ds = _no_voi(_dataset(stored))
    del ds.RescaleSlope, ds.RescaleIntercept
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 1500, 1001
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, 500, "US"
    shared = Dataset()
    shared.FrameVOILUTSequence = [voi]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    expected = _linear_window(stored + 500.0, 1500, 1001)
    np.testing.assert_allclose(decode_for_display(ds), expected, atol=1e-5)


def test_palette_colour() -> None:
    indices = _stored(8)
    ds = _no_voi(_dataset(indices, 8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16) * 257  # grey palette, 16-bit entries
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", ramp.tobytes())
    np.testing.assert_allclose(decode_for_display(ds), indices / 255.0, atol=1e-5)
