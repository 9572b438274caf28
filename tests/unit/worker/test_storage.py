"""worker.storage: when the data directory's disk counts as low."""

from __future__ import annotations

import shutil
from pathlib import Path

from worker.storage import LOW_FREE_BYTES, DiskSpace, disk_space


def test_low_is_under_two_gib_or_five_percent() -> None:
    tib = 1 << 40
    assert DiskSpace(total_bytes=tib, free_bytes=LOW_FREE_BYTES - 1).low
    assert DiskSpace(total_bytes=tib, free_bytes=int(0.049 * tib)).low
    assert not DiskSpace(total_bytes=tib, free_bytes=int(0.06 * tib)).low
    assert not DiskSpace(total_bytes=10 * LOW_FREE_BYTES, free_bytes=LOW_FREE_BYTES * 2).low


def test_a_missing_directory_reports_its_nearest_parent(tmp_path: Path) -> None:
    space = disk_space(tmp_path / "not" / "yet" / "created")
    usage = shutil.disk_usage(tmp_path)
    assert space is not None and space.total_bytes == usage.total
    assert 0 < space.free_bytes <= space.total_bytes
