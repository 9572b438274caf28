"""The README's first command, `scripts/demo.sh`, run as a new user runs it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_sends_a_hand_through_and_shows_its_results(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    # The demo runs on the embedded defaults: nothing of the test run's own settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env["BONEAGE_DEMO_DIR"] = str(demo)

    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]

    # The SR that came back, as dsrdump prints it: the bone age, the chronological age
    # of the phantom (110 months) and the warnings a radiologist reads.
    assert re.search(r'NUM:\(,,"Bone age"\)="\d+\.\d+" \(mo,UCUM,"month"\)', out), out
    assert 'NUM:(,,"Subject Age")="110.0" (mo,UCUM,"month")' in out
    assert "UNTRAINED MODEL - NOT FOR C" in out
    assert '"AI result - requires review"' in out

    # The heat-map SC, rendered by dcmtk: a real picture with the panel above the hand.
    with Image.open(demo / "heatmap.png") as png:
        assert png.format == "PNG"
        assert min(png.size) >= 1000
        assert png.mode == "RGB"

    # Both objects reached the stand-in PACS whole, and `status` says so.
    assert len(list((demo / "stored").iterdir())) == 2
    assert re.search(r"│ assessed\s+│\s+1 │", out), out
    assert re.search(r"│ delivered\s+│\s+2 │", out), out
    assert re.search(r"│ failed\s+│\s+0 │", out), out

    # The service was stopped on the way out: nothing listens on its port any more.
    serve = re.search(r"boneage-worker serve on port (\d+)", out)
    assert serve, out
    port = int(serve.group(1))
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
