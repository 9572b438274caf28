"""Space left where the node keeps received images and its outputs."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOW_FREE_BYTES",
    "LOW_FREE_FRACTION",
    "LOW_FREE_FRACTION_CAP",
    "DiskSpace",
    "disk_space",
]

#: Below either, `status` calls the node unhealthy: a full disk makes the listener
#: answer 0xA700 (Out of Resources) to every C-STORE, so the PACS queues and retries.
LOW_FREE_BYTES = 2 << 30
LOW_FREE_FRACTION = 0.05
#: The most the fraction asks for: 5 % of a 10 TiB volume is 512 GiB, months of images
#: for a node, and a volume with 400 GiB free is not low.
LOW_FREE_FRACTION_CAP = 50 << 30


@dataclass(frozen=True)
class DiskSpace:
    """The file system holding a directory."""

    total_bytes: int
    free_bytes: int
    #: The file system's device (``st_dev``): two directories on one disk share it,
    #: where their free bytes, read a moment apart, may differ.
    device: int | None = None

    @property
    def low(self) -> bool:
        """Less than :data:`LOW_FREE_BYTES` left, or than :data:`LOW_FREE_FRACTION` of
        the disk up to :data:`LOW_FREE_FRACTION_CAP`."""
        share = min(LOW_FREE_FRACTION * self.total_bytes, LOW_FREE_FRACTION_CAP)
        return self.free_bytes < max(LOW_FREE_BYTES, share)


def disk_space(directory: Path) -> DiskSpace | None:
    """Space of the file system holding ``directory`` (or its nearest existing parent).

    Returns None when not even a parent can be inspected.
    """
    for candidate in (directory, *directory.parents):
        try:
            usage = shutil.disk_usage(candidate)
            device = os.stat(candidate).st_dev
        except OSError:
            continue
        return DiskSpace(total_bytes=usage.total, free_bytes=usage.free, device=device)
    return None
