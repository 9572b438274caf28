"""Heat-map Secondary Capture: rendering, round trip, dciodvfy and dcmj2pnm."""

from __future__ import annotations

import dataclasses
import datetime
import io
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_io.content import AI_RESULT_NOTICE, UNTRAINED_WARNING, BoneAgeFinding
from dicom_io.gate import MIN_SIZE
from dicom_io.pixels import decode_for_display
from dicom_io.sc import (
    MAX_LONG_SIDE,
    NOTICE_BODY_PART,
    WITHDRAWN,
    build_heatmap_sc,
    build_withdrawal_sc,
    notice_body_part,
    overlay_factor,
    overlay_shape,
    render_notice,
    render_overlay,
    turbo_lut,
)
from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import dciodvfy_errors, dcmj2pnm

from .conftest import STUDY_DATE, hand_like


def _cam(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.exp(
        -(((yy - 0.7 * height) / (0.15 * height)) ** 2 + ((xx - 0.5 * width) / (0.2 * width)) ** 2)
    )


class _Uids(TypedDict):
    """The UIDs build_heatmap_sc takes as keyword arguments."""

    series_instance_uid: str
    sop_instance_uid: str


def _uids() -> _Uids:
    return {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}


def test_turbo_lut_runs_blue_to_red() -> None:
    lut = turbo_lut()
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8
    assert lut[51, 2] > 2 * lut[51, 0]  # blue at the low end (where the map is drawn)
    assert lut[-1, 0] > lut[-1, 2]  # dark red end
    assert not lut.flags.writeable


def test_overlay_shape_and_blending(finding: BoneAgeFinding) -> None:
    image = hand_like(400, 300)
    cam = np.zeros((400, 300))
    cam[300:, :] = 1.0
    rgb = render_overlay(image, cam, finding)
    assert rgb.dtype == np.uint8
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[1] == 300
    panel = rgb.shape[0] - 400
    assert panel > 0
    body = rgb[panel:].astype(int)
    # no heat: pure grey, the radiograph unchanged
    grey = body[:300]
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])
    expected = np.rint(image[:300] * 255)
    assert np.abs(grey[..., 0] - expected).max() <= 1
    # full heat: coloured (red end of turbo dominates)
    hot = body[300:]
    assert (hot[..., 0] - hot[..., 2]).mean() > 40
    # the panel holds text: some bright pixels on black
    assert rgb[:panel].max() > 200 and np.median(rgb[:panel]) == 0


def test_overlay_text_colours(finding: BoneAgeFinding, untrained_finding: BoneAgeFinding) -> None:
    image = hand_like(300, 300)
    cam = np.zeros_like(image)
    trained = render_overlay(image, cam, finding)
    untrained = render_overlay(image, cam, untrained_finding)
    red = (untrained[..., 0] > 200) & (untrained[..., 1] < 120) & (untrained[..., 2] < 120)
    assert red.sum() > 50  # the red untrained warning
    red_trained = (trained[..., 0] > 200) & (trained[..., 1] < 120) & (trained[..., 2] < 120)
    assert red_trained.sum() == 0


def test_overlay_downscales_large_images_by_a_whole_factor(finding: BoneAgeFinding) -> None:
    image = hand_like(3000, 2400)
    rgb = render_overlay(image, _cam(30, 24), finding)  # a small cam is resized
    assert overlay_factor(image.shape) == 2
    assert rgb.shape[1] == 1200  # 2400 / 2: pixels stay square
    panel = rgb.shape[0] - 1500
    assert panel > 0
    # each picture pixel is the mean of a 2 x 2 block (no heat drawn below threshold)
    cold = render_overlay(image, np.zeros((30, 24)), finding)[panel:, :, 0].astype(float)
    block = image[:2, :2].mean() * 255
    assert abs(cold[0, 0] - block) <= 1.0
    assert max(overlay_shape(image.shape)) <= MAX_LONG_SIDE
    assert overlay_shape((2048, 100)) == (2048, 100)  # at the limit: untouched
    assert overlay_shape((4097, 3000)) == (1366, 1000)


#: The note of a result whose patient's sex was not recorded: the panel's longest line.
_ASSUMED_SEX = "Patient sex not recorded: assessed as female (site setting BONEAGE_MISSING_SEX)"
#: Capitals of the smallest panel font (14 px) are 10 px tall; one less for anti-aliasing.
_MIN_CAPITALS_PX = 9


def _text_bands(mask: np.ndarray) -> list[int]:
    """Heights of the runs of rows in which ``mask`` has a pixel: one per line of text."""
    rows = mask.any(axis=1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], rows, [0]))))
    return (edges[1::2] - edges[::2]).tolist()


def _panel_of(rgb: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """The text panel of ``rgb``, the rows above its radiograph (enlarged or not)."""
    factor = rgb.shape[1] // image_shape[1]
    return rgb[: rgb.shape[0] - image_shape[0] * factor].astype(int)


def _red_and_yellow(panel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the untrained warning (red) and of the review notice (yellow) on black."""
    r, g, b = panel[..., 0], panel[..., 1], panel[..., 2]
    return (r > 100) & (g < 0.4 * r), (r > 100) & (g > 0.6 * r) & (b < 0.3 * r)


def test_font_scales_with_image(finding: BoneAgeFinding) -> None:
    small = render_overlay(hand_like(200, 150), np.zeros((200, 150)), finding)
    large = render_overlay(hand_like(2000, 1500), np.zeros((2000, 1500)), finding)
    small_notice = _text_bands(_red_and_yellow(_panel_of(small, (200, 150)))[1])
    large_notice = _text_bands(_red_and_yellow(_panel_of(large, (2000, 1500)))[1])
    assert max(large_notice) > 2.5 * max(small_notice)  # 3 % of the width against 14 px


@pytest.mark.parametrize(
    "shape",
    [
        (2048, 2048),
        (840, 600),
        (560, 400),
        (358, 256),
        (280, 200),
        (MIN_SIZE, MIN_SIZE),
        (179, MIN_SIZE),
        (2048, MIN_SIZE),
    ],
    ids=lambda shape: f"{shape[1]}x{shape[0]}",
)
def test_the_safety_lines_stay_legible_at_every_accepted_width(
    untrained_finding: BoneAgeFinding, shape: tuple[int, int]
) -> None:
    """Long lines are wrapped, never shrunk below 14 px: the review notice and the
    untrained warning keep capitals at least as tall as those of a 14 px font, and no
    line runs past the picture's edge."""
    noted = dataclasses.replace(untrained_finding, notes=(_ASSUMED_SEX,))
    rgb = render_overlay(hand_like(*shape), np.zeros(shape), noted)
    panel = _panel_of(rgb, shape)
    red, yellow = _red_and_yellow(panel)
    for lines in (_text_bands(red), _text_bands(yellow)):
        assert lines, "a safety line is missing"
        # the tallest: a line wrapped off it ("review") may have no capitals
        assert max(lines) >= _MIN_CAPITALS_PX
    # every line inside the picture: the margins on either side are black
    assert panel[:, :2].max() == 0 and panel[:, -2:].max() == 0


def test_a_narrow_picture_is_enlarged_pixel_for_pixel(finding: BoneAgeFinding) -> None:
    """A picture too narrow for its panel at 14 px is drawn enlarged by a whole factor,
    each pixel repeated: the heat map keeps its place and colours on the radiograph."""
    image = hand_like(179, MIN_SIZE)
    cam = np.zeros(image.shape)
    cam[120:150, 40:90] = 1.0
    rgb = render_overlay(image, cam, finding)
    assert rgb.shape[1] == 2 * MIN_SIZE
    picture = rgb[rgb.shape[0] - 2 * 179 :]
    native = picture[::2, ::2]
    for rows in (0, 1):
        for columns in (0, 1):
            np.testing.assert_array_equal(picture[rows::2, columns::2], native)
    # the radiograph where there is no heat, the heat map exactly where the cam is
    grey = native[..., 0].astype(int)
    assert np.abs(grey[:120] - np.rint(image[:120] * 255)).max() <= 1
    hot = (native[..., 0].astype(int) - native[..., 2]) > 40
    assert np.array_equal(np.flatnonzero(hot.any(axis=1)), np.arange(120, 150))
    assert np.array_equal(np.flatnonzero(hot.any(axis=0)), np.arange(40, 90))


def test_an_sc_of_the_smallest_image_passes_dciodvfy_and_renders(
    tmp_path: Path, untrained_finding: BoneAgeFinding
) -> None:
    small = make_radiograph_dataset(
        hand_like(179, MIN_SIZE), birth_date=None, study_date=STUDY_DATE, sex=None
    )
    noted = dataclasses.replace(untrained_finding, notes=(_ASSUMED_SEX,))
    rgb = render_overlay(decode_for_display(small), _cam(179, MIN_SIZE), noted)
    path = tmp_path / "sc.dcm"
    build_heatmap_sc(small, rgb, noted, series_number=902, **_uids()).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []
    back = dcmread(path)
    assert (back.Columns, back.BurnedInAnnotation) == (2 * MIN_SIZE, "YES")
    rendered = np.asarray(Image.open(dcmj2pnm(path, tmp_path / "sc.png")).convert("RGB"))
    np.testing.assert_array_equal(rendered, rgb)


@pytest.mark.parametrize(
    ("image", "cam", "error", "match"),
    [
        (np.zeros((10, 10, 3)), np.zeros((10, 10)), ValueError, "image"),
        (np.full((10, 10), 2.0), np.zeros((10, 10)), ValueError, "image"),
        (np.zeros((10, 10)), np.full((10, 10), np.nan), ValueError, "cam"),
        ([[0.0]], np.zeros((10, 10)), TypeError, "image"),
    ],
)
def test_overlay_rejects(
    finding: BoneAgeFinding, image: object, cam: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        render_overlay(image, cam, finding)  # type: ignore[arg-type]


def test_sc_round_trip(source: Dataset, finding: BoneAgeFinding) -> None:
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    uids = _uids()
    sc = build_heatmap_sc(source, rgb, finding, series_number=902, **uids)
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    back = dcmread(io.BytesIO(buffer.getvalue()))

    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID == uids["series_instance_uid"]
    assert back.SOPInstanceUID == uids["sop_instance_uid"]
    assert back.PatientID == source.PatientID
    assert back.PhotometricInterpretation == "RGB"
    assert back.BurnedInAnnotation == "YES"
    assert back.Laterality == "L"
    assert "AI" in back.SeriesDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.DerivationDescription
    np.testing.assert_array_equal(back.pixel_array, rgb)


def test_sc_untrained_says_so(source: Dataset, untrained_finding: BoneAgeFinding) -> None:
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), untrained_finding)
    sc = build_heatmap_sc(source, rgb, untrained_finding, series_number=902, **_uids())
    assert UNTRAINED_WARNING in sc.SeriesDescription
    assert UNTRAINED_WARNING in sc.DerivationDescription
    assert sc.Laterality == "L"  # from the source's Image Laterality


def test_sc_image_comments_carry_the_panels_caveats(
    source: Dataset, untrained_finding: BoneAgeFinding
) -> None:
    noted = dataclasses.replace(
        untrained_finding, notes=("Patient sex not recorded: assessed as female", "Another")
    )
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), noted)
    sc = build_heatmap_sc(source, rgb, noted, series_number=902, **_uids())
    assert sc.ImageComments == (
        f"Patient sex not recorded: assessed as female. Another. {UNTRAINED_WARNING}. "
        f"{AI_RESULT_NOTICE}"
    )


def test_sc_passes_dciodvfy_and_renders(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    path = tmp_path / "sc.dcm"
    build_heatmap_sc(source, rgb, finding, series_number=902, **_uids()).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []
    png = dcmj2pnm(path, tmp_path / "sc.png")
    rendered = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(rendered, rgb)


def test_sc_without_laterality_or_orientation_passes_dciodvfy(
    tmp_path: Path, source: Dataset, untrained_finding: BoneAgeFinding
) -> None:
    del source.ImageLaterality
    del source.PatientOrientation
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), untrained_finding)
    path = tmp_path / "sc.dcm"
    build_heatmap_sc(source, rgb, untrained_finding, series_number=902, **_uids()).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []


def test_sc_times_are_written_in_the_time_zone_the_source_states(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    source.TimezoneOffsetFromUTC = "+0100"
    source.AcquisitionDateTime = "20250101101500"
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    sc = build_heatmap_sc(source, rgb, finding, series_number=902, **_uids())
    after = datetime.datetime.now(datetime.UTC)
    assert sc.TimezoneOffsetFromUTC == "+0100"
    for date, time in (
        ("ContentDate", "ContentTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        moment = datetime.datetime.strptime(
            f"{sc[date].value}{sc[time].value}+0100", "%Y%m%d%H%M%S.%f%z"
        )
        assert before <= moment <= after, (date, time)
    # We contributed now; the modality that acquired the source, when it did.
    contributions = {
        item.PurposeOfReferenceCodeSequence[0].CodeMeaning: str(item.ContributionDateTime)
        for item in sc.ContributingEquipmentSequence
    }
    assert contributions["Acquisition Equipment"] == "20250101101500"
    ours = datetime.datetime.strptime(
        f"{contributions['Processing Equipment']}+0100", "%Y%m%d%H%M%S.%f%z"
    )
    assert before <= ours <= after
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("syntax", "attributes", "lossy"),
    [
        (ExplicitVRLittleEndian, {}, "00"),
        (
            ExplicitVRLittleEndian,
            {
                "LossyImageCompression": "01",
                "LossyImageCompressionRatio": [10.0],
                "LossyImageCompressionMethod": ["ISO_10918_1"],
            },
            "01",
        ),
        (JPEGBaseline8Bit, {}, "01"),  # always lossy, stated or not
        (JPEG2000Lossless, {"LossyImageCompression": "00"}, "00"),
    ],
    ids=["uncompressed", "stated lossy", "jpeg baseline", "j2k lossless"],
)
def test_an_sc_of_a_lossy_source_says_it_lost_detail(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    syntax: str,
    attributes: dict[str, object],
    lossy: str,
) -> None:
    """PS3.3 C.7.6.1.1.5: once lossy compressed, an image and what is derived from it
    keep Lossy Image Compression 01, with the ratio and method where the source had them."""
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    source.file_meta.TransferSyntaxUID = UID(syntax)
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    sc = build_heatmap_sc(source, rgb, finding, series_number=902, **_uids())
    assert sc.LossyImageCompression == lossy
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        assert (keyword in sc) is (keyword in attributes)
        assert sc.get(keyword) == source.get(keyword)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_a_notice_wraps_its_lines_and_colours_the_first(tmp_path: Path, source: Dataset) -> None:
    why = "the image was received again and is not assessed: " + "a long reason " * 12
    rgb = render_notice([WITHDRAWN, why.strip(), AI_RESULT_NOTICE], width=640)
    assert rgb.dtype == np.uint8 and rgb.shape[1] == 640
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 100)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 180) & (rgb[..., 2] < 80)
    rows_with = [np.flatnonzero(mask.any(axis=1)) for mask in (red, yellow)]
    assert rows_with[0].size and rows_with[1].size
    assert rows_with[0].max() < rows_with[1].min()  # red first, yellow last
    # the long line was wrapped, not shrunk: five or more lines at the usual size
    assert rgb.shape[0] > 5 * 640 * 0.03 * 1.2
    # ... and taller than the same notice with a short reason by two lines or more: a
    # long line shrunk to fit, unwrapped, would make it no taller
    short = render_notice([WITHDRAWN, "short", AI_RESULT_NOTICE], width=640)
    margin = 4 if 640 * 0.02 < 4 else round(640 * 0.02)
    line_height = (short.shape[0] - 2 * margin) / 3
    assert rgb.shape[0] >= short.shape[0] + 2 * line_height
    with pytest.raises(ValueError, match="lines"):
        render_notice([])


def test_a_notice_breaks_a_word_too_long_for_a_line_and_keeps_its_font() -> None:
    uid = "1.2.826.0.1.3680043.8.498." + "1234567890" * 6  # wider than 640 px at 19 px
    long = render_notice([WITHDRAWN, f"because {uid} was sent", AI_RESULT_NOTICE], width=640)
    short = render_notice([WITHDRAWN, "short", AI_RESULT_NOTICE], width=640)
    headings = [_text_bands(_red_and_yellow(rgb.astype(int))[0]) for rgb in (long, short)]
    assert headings[0] == headings[1]  # the same font, not shrunk to fit the word
    assert long[:, -2:].max() == 0  # the word broken inside the picture, not cut off
    # "because", the word's first piece, its second and "was sent": three lines for one
    line_height = (short.shape[0] - 2 * round(640 * 0.02)) / 3
    assert long.shape[0] == short.shape[0] + 2 * line_height


def test_a_withdrawal_sc_passes_dciodvfy_and_renders(tmp_path: Path, source: Dataset) -> None:
    sc = build_withdrawal_sc(
        source,
        "the image was received again and is not assessed: patient sex is O",
        model_name="BoneAgeNet resnet50",
        model_trained=False,
        series_number=9902,
        instance_number=2,
        body_part_examined="HAND",
        **_uids(),
    )
    assert sc.ImageComments.startswith(f"{WITHDRAWN}: the image was received again")
    assert UNTRAINED_WARNING in sc.SeriesDescription  # as the heat maps of that model
    assert sc.BodyPartExamined == "HAND" and sc.LossyImageCompression == "00"
    path = tmp_path / "notice.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    rendered = np.asarray(Image.open(dcmj2pnm(path, tmp_path / "notice.png")).convert("RGB"))
    np.testing.assert_array_equal(rendered, sc.pixel_array)
    with pytest.raises(ValueError, match="why"):
        build_withdrawal_sc(
            source,
            " ",
            model_name="m",
            model_trained=True,
            series_number=1,
            instance_number=2,
            body_part_examined="HAND",
            **_uids(),
        )


def _notice(source: Dataset, body_part_examined: str | None = "HAND") -> Dataset:
    return build_withdrawal_sc(
        source,
        "the image was received again with other values and assessed again",
        model_name="BoneAgeNet resnet50",
        model_trained=True,
        series_number=9902,
        instance_number=2,
        body_part_examined=body_part_examined,
        **_uids(),
    )


def _written_back(tmp_path: Path, sc: Dataset, name: str) -> Dataset:
    """``sc`` as a file that passes dciodvfy, read back."""
    path = tmp_path / f"{name}.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return dcmread(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # RT-HAND, as some send it
@pytest.mark.parametrize(
    ("examined", "expected"),
    [
        ("HAND", "HAND"),
        ("WRIST", "WRIST"),  # not HAND: the series' own value, whatever the copy says
        ("L HAND", "HAND"),  # of a left hand's image: its heat maps carry HAND
        ("HANDS", None),  # no Defined Term: its heat maps carry none (body_part_to_write)
        (None, None),  # the image had none, nor have its heat maps: common, and assessed
        ("RT-HAND", None),  # on a left hand's image: its heat maps carry none either
    ],
)
def test_a_withdrawal_notice_carries_its_series_body_part(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    examined: str | None,
    expected: str | None,
) -> None:
    """Body Part Examined is a General Series attribute: the notice carries that of the
    heat maps whose series it joins, not that of the copy received again that withdraws
    their bone age (here corrected to CHEST). It took the copy's before: HAND where the
    heat maps had none, HAND where they said WRIST."""
    if examined is None:
        del source.BodyPartExamined
    else:
        source.BodyPartExamined = examined
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    heat_map = build_heatmap_sc(source, rgb, finding, series_number=9902, **_uids())
    path = tmp_path / "heat-map.dcm"
    heat_map.save_as(path, enforce_file_format=True)
    source.BodyPartExamined = "CHEST"  # the copy received again, corrected

    value = notice_body_part(dcmread(path, stop_before_pixels=True))
    back = _written_back(tmp_path, _notice(source, value), "notice")

    assert value == expected
    if expected is None:
        assert "BodyPartExamined" not in back
    else:
        assert back.BodyPartExamined == expected


def test_a_withdrawal_notice_whose_heat_maps_are_gone_names_the_hand(
    tmp_path: Path, source: Dataset
) -> None:
    """Where no heat map of the series can be read (retention removed their files), its
    value is unknown: the notice names the hand, so that it lands with the hand images."""
    source.BodyPartExamined = "CHEST"  # the copy, corrected
    assert notice_body_part(None) == NOTICE_BODY_PART == "HAND"
    back = _written_back(tmp_path, _notice(source, notice_body_part(None)), "notice")
    assert back.BodyPartExamined == "HAND"


@pytest.mark.parametrize("examined", ["RT-HAND", "hand", "A" * 17, ""])
def test_a_withdrawal_notice_refuses_a_body_part_it_cannot_write(
    source: Dataset, examined: str
) -> None:
    with pytest.raises(ValueError, match="body_part_examined"):
        _notice(source, examined)


def test_a_withdrawal_notice_runs_in_no_direction_of_the_patient(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """Its rows are lines of text: Patient Orientation present (Type 2C: an SC needs no
    Image Orientation) and empty, not the radiograph's A\\F that its heat map keeps."""
    assert list(source.PatientOrientation) == ["A", "F"]
    rgb = render_overlay(decode_for_display(source), _cam(96, 64), finding)
    heat_map = _written_back(
        tmp_path, build_heatmap_sc(source, rgb, finding, series_number=902, **_uids()), "sc"
    )
    assert list(heat_map.PatientOrientation) == ["A", "F"]
    notice = _written_back(tmp_path, _notice(source), "notice")
    assert "PatientOrientation" in notice
    assert notice["PatientOrientation"].is_empty


def test_a_notice_without_patient_orientation_would_not_be_valid(
    tmp_path: Path, source: Dataset
) -> None:
    """Why the notice's is empty and not absent: dciodvfy holds the SC to Type 2C."""
    notice = _notice(source)
    del notice.PatientOrientation
    path = tmp_path / "notice.dcm"
    notice.save_as(path, enforce_file_format=True)
    assert any("<PatientOrientation>" in line for line in dciodvfy_errors(path))


def test_sc_rejects_bad_rgb(source: Dataset, finding: BoneAgeFinding) -> None:
    with pytest.raises(TypeError, match="rgb"):
        build_heatmap_sc(source, np.zeros((4, 4, 3)), finding, series_number=1, **_uids())
    with pytest.raises(ValueError, match="rgb"):
        build_heatmap_sc(source, np.zeros((4, 4), np.uint8), finding, series_number=1, **_uids())
