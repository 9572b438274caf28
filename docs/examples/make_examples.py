"""Regenerate the rendered SR and SC examples in this folder.

Run from the repository root with dcmtk installed::

    python docs/examples/make_examples.py [path/to/hand.png]

The radiograph is a real pediatric left hand from radinformatics/bone-age (MIT licence);
the numbers and the heat map are invented for illustration, so the model is marked
untrained and every output says so.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from dicom_io.content import BoneAgeFinding
from dicom_io.pixels import decode_for_display
from dicom_io.sc import build_heatmap_sc, render_overlay
from dicom_io.sr import build_bone_age_sr, build_not_assessed_sr
from dicom_io.synthetic import make_radiograph_dataset
from worker.pipeline import SC_SERIES_NUMBER, SR_SERIES_NUMBER

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_HAND = Path("/work/shared/data/real-hands/0.png")


def fake_cam(height: int, width: int) -> np.ndarray:
    """A smooth made-up heat map over the wrist (carpals and distal radius)."""
    yy, xx = np.mgrid[0:height, 0:width]
    cam = np.exp(
        -(
            ((yy - 0.78 * height) / (0.13 * height)) ** 2
            + ((xx - 0.45 * width) / (0.2 * width)) ** 2
        )
    )
    cam += 0.6 * np.exp(
        -(((yy - 0.5 * height) / (0.1 * height)) ** 2 + ((xx - 0.6 * width) / (0.15 * width)) ** 2)
    )
    return cam / cam.max()


def main(hand: Path) -> None:
    grey = np.asarray(Image.open(hand).convert("L"), dtype=np.uint16)
    source = make_radiograph_dataset(
        grey << 4,  # 8-bit PNG to 12 bits stored
        birth_date=datetime.date(2014, 3, 2),
        study_date=datetime.date(2024, 6, 3),
        sex="M",
        laterality="L",
    )
    finding = BoneAgeFinding(
        bone_age_months=124.3,
        chronological_age_months=123.0,
        sds=0.14,
        intervals={0.8: (114.0, 134.6), 0.9: (110.2, 138.9), 0.95: (106.9, 142.0)},
        model_id="0" * 64,
        model_name="BoneAgeNet ResNet-50",
        model_version="example",
        model_trained=False,
        laterality="L",
    )
    device = generate_uid()
    sr = build_bone_age_sr(
        source,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        device_observer_uid=device,
    )
    not_assessed = build_not_assessed_sr(
        source,
        "Body Part Examined is CHEST, not HAND",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        device_observer_uid=device,
    )
    image = decode_for_display(source)
    rgb = render_overlay(image, fake_cam(*image.shape), finding)
    sc = build_heatmap_sc(
        source,
        rgb,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.dcm" for name in ("sr", "na", "sc")}
        for name, ds in (("sr", sr), ("na", not_assessed), ("sc", sc)):
            ds.save_as(paths[name], enforce_file_format=True)
        with open(HERE / "bone-age-sr.txt", "w") as out:
            subprocess.run(["dsrdump", "+Pl", paths["sr"]], stdout=out, check=True)
        for name, html in (("sr", "bone-age-sr.html"), ("na", "not-assessed-sr.html")):
            subprocess.run(["dsr2html", paths[name], HERE / html], check=True)
        subprocess.run(
            ["dcmj2pnm", "--write-png", "--nointerlace", paths["sc"], HERE / "heatmap-sc.png"],
            check=True,
        )
    logger.info("examples written to %s", HERE)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_HAND)
