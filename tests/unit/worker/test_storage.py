"""worker.storage: when the data directory's disk counts as low."""

from __future__ import annotations

import shutil
from pathlib import Path

from worker.storage import LOW_FREE_BYTES, LOW_FREE_FRACTION_CAP, DiskSpace, disk_space


def test_low_is_under_two_gib_or_five_percent() -> None:
    disk = 512 << 30
    assert DiskSpace(total_bytes=disk, free_bytes=LOW_FREE_BYTES - 1).low
    assert DiskSpace(total_bytes=disk, free_bytes=int(0.049 * disk)).low
    assert not DiskSpace(total_bytes=disk, free_bytes=int(0.06 * disk)).low
    assert not DiskSpace(total_bytes=10 * LOW_FREE_BYTES, free_bytes=LOW_FREE_BYTES * 2).low


def test_a_large_disk_is_low_under_fifty_gib_however_large() -> None:
    """5 % of a 10 TiB volume would be 512 GiB: a volume with 400 GiB free is not low."""
    volume = 10 << 40
    assert not DiskSpace(total_bytes=volume, free_bytes=400 << 30).low
    assert not DiskSpace(total_bytes=volume, free_bytes=LOW_FREE_FRACTION_CAP).low
    assert DiskSpace(total_bytes=volume, free_bytes=LOW_FREE_FRACTION_CAP - 1).low


def test_a_missing_directory_reports_its_nearest_parent(tmp_path: Path) -> None:
    space = disk_space(tmp_path / "not" / "yet" / "created")
    usage = shutil.disk_usage(tmp_path)
    assert space is not None and space.total_bytes == usage.total
    assert 0 < space.free_bytes <= space.total_bytes
