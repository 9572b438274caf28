"""The CPU time a container may use: its control group's quota.

A container given a share of a host's CPUs (``docker run --cpus 4``, a Compose service's
``cpus:``, a Kubernetes container's ``limits.cpu``) still sees every core of the host in
its affinity mask: the kernel lets its threads run on any core, and throttles the whole
group once it has used its quota of CPU time in a period (100 ms by default). A worker
that sized its processes and threads by the host's cores would run far more threads than
its quota feeds: on a 64-core host with a 4-CPU limit, four processes of 16 torch threads
each, which would use a period's quota in its first few milliseconds and then stand
still, together, for the rest of it.

:func:`cpu_quota` reads that quota from cgroup v2 (``cpu.max``) or v1
(``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``) for the group this process is in and
each group above it, and returns the lowest; :func:`worker.settings.usable_cpus` takes
it into account.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

__all__ = ["cpu_quota"]

_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040


@dataclass(frozen=True)
class _Mount:
    root: str  # the part of the hierarchy mounted here
    point: str  # where
    version: int  # 1 or 2


def cpu_quota(proc: Path = Path("/proc/self"), *, root: Path = Path("/")) -> float | None:
    """CPUs' worth of time a period that this process's control groups allow it.

    The lowest quota along the process's cgroup and those above it (a parent's limit
    holds its children too), as a number of CPUs: 1.5 is 150 ms of CPU time every
    100 ms. ``None`` where no group sets one, or where the groups cannot be read (not
    Linux, no cgroup file system mounted).

    Parameters
    ----------
    proc
        The process's ``/proc`` directory; its ``cgroup`` and ``mountinfo`` are read.
    root
        What the mount points in ``mountinfo`` are relative to (tests give a directory
        laid out like the file system).
    """
    try:
        memberships = (proc / "cgroup").read_text()
        mounts = _cpu_mounts((proc / "mountinfo").read_text())
    except OSError:
        return None
    quotas: list[float] = []
    for line in memberships.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            version = 2
        elif "cpu" in controllers.split(","):
            version = 1
        else:
            continue
        for mount in mounts:
            group = _group_directory(root, mount, path) if mount.version == version else None
            if group is not None:
                quotas.extend(_quotas_up_to(group, root / mount.point.lstrip("/"), version))
    return min(quotas, default=None)


def _cpu_mounts(mountinfo: str) -> list[_Mount]:
    """Mounts of the cgroup v2 hierarchy and of the v1 hierarchy with the cpu controller."""
    mounts = []
    for line in mountinfo.splitlines():
        fields, sep, tail = line.partition(" - ")
        parts = fields.split()
        described = tail.split()
        if not sep or len(parts) < 5 or len(described) < 3:
            continue
        fs_type, super_options = described[0], described[2].split(",")
        if fs_type == "cgroup2":
            version = 2
        elif fs_type == "cgroup" and "cpu" in super_options:
            version = 1
        else:
            continue
        mounts.append(_Mount(root=_unescape(parts[3]), point=_unescape(parts[4]), version=version))
    return mounts


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _group_directory(root: Path, mount: _Mount, path: str) -> Path | None:
    """Where a cgroup's files are: its path, made relative to the part of the hierarchy
    that is mounted (Docker on cgroup v1 mounts only the container's own group, which
    /proc/self/cgroup names by its path on the host). ``None`` for a group outside what
    is mounted: its files cannot be read, and another group's are not its."""
    group = PurePosixPath(path)
    if mount.root != "/":
        try:
            group = PurePosixPath("/") / group.relative_to(mount.root)
        except ValueError:
            return None
    if ".." in group.parts:  # outside this process's cgroup namespace
        return None
    return root / mount.point.lstrip("/") / str(group).lstrip("/")


def _quotas_up_to(group: Path, mount_point: Path, version: int) -> list[float]:
    """The quotas set on ``group`` and each group above it, up to the mount point."""
    quotas = []
    directory = group
    while True:
        quota = _read_quota(directory, version)
        if quota is not None:
            quotas.append(quota)
        if directory == mount_point or mount_point not in directory.parents:
            return quotas
        directory = directory.parent


def _read_quota(directory: Path, version: int) -> float | None:
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:  # not there: this group sets no quota, or the controller is off here
        return None
    try:
        if quota == "max" or int(quota) < 0:  # v1 writes -1 for no quota
            return None
        return int(quota) / int(period)
    except ValueError:
        logger.warning("unreadable CPU quota in %s: %r %r", directory, quota, period)
        return None
