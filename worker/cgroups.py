"""What a container may use: its control groups' CPU quota and memory limit.

A container given a share of a host's CPUs (``docker run --cpus 4``, a Compose service's
``cpus:``, a Kubernetes container's ``limits.cpu``) still sees every core of the host in
its affinity mask: the kernel lets its threads run on any core, and throttles the whole
group once it has used its quota of CPU time in a period (100 ms by default). A worker
that sized its processes and threads by the host's cores would run far more threads than
its quota feeds: on a 64-core host with a 4-CPU limit, four processes of 16 torch threads
each, which would use a period's quota in its first few milliseconds and then stand
still, together, for the rest of it.

A memory limit (``docker run --memory``, ``limits.memory``) is not seen anywhere else
either: a worker that starts more inference processes than it holds has one of them
killed by the kernel in the middle of a study.

:func:`cpu_quota` and :func:`memory_limit` read them from cgroup v2 (``cpu.max``;
``memory.max`` and ``memory.high``) or v1 (``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``; ``memory.limit_in_bytes``) for the group this process is in and
each group above it, and return the lowest; :mod:`worker.settings` sizes the worker to
them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T", int, float)

__all__ = ["cpu_quota", "memory_limit"]

_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040

#: cgroup v1 writes "no limit" as the largest number of pages it counts, in bytes
_V1_NO_MEMORY_LIMIT = 1 << 62


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
    return _lowest("cpu", _read_cpu_quota, proc, root)


def memory_limit(proc: Path = Path("/proc/self"), *, root: Path = Path("/")) -> int | None:
    """Bytes of memory this process's control groups allow it and their other processes
    together: the lowest limit along its cgroup and those above it (on cgroup v2 the lower
    of ``memory.max`` and ``memory.high``). ``None`` where no group sets one, or where the
    groups cannot be read. Parameters as :func:`cpu_quota`.
    """
    return _lowest("memory", _read_memory_limit, proc, root)


def _lowest(
    controller: str, read: Callable[[Path, int], _T | None], proc: Path, root: Path
) -> _T | None:
    """The lowest value ``read`` finds in the process's groups of ``controller``."""
    try:
        memberships = (proc / "cgroup").read_text()
        mounts = _mounts((proc / "mountinfo").read_text(), controller)
    except OSError:
        return None
    values: list[_T] = []
    for line in memberships.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            version = 2
        elif controller in controllers.split(","):
            version = 1
        else:
            continue
        for mount in mounts:
            group = _group_directory(root, mount, path) if mount.version == version else None
            if group is not None:
                point = root / mount.point.lstrip("/")
                values.extend(_values_up_to(group, point, read, version))
    return min(values, default=None)


def _mounts(mountinfo: str, controller: str) -> list[_Mount]:
    """Mounts of the cgroup v2 hierarchy and of the v1 hierarchy with ``controller``."""
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
        elif fs_type == "cgroup" and controller in super_options:
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


def _values_up_to(
    group: Path, mount_point: Path, read: Callable[[Path, int], _T | None], version: int
) -> list[_T]:
    """What ``read`` finds in ``group`` and each group above it, up to the mount point."""
    values = []
    directory = group
    while True:
        value = read(directory, version)
        if value is not None:
            values.append(value)
        if directory == mount_point or mount_point not in directory.parents:
            return values
        directory = directory.parent


def _read_cpu_quota(directory: Path, version: int) -> float | None:
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


def _read_memory_limit(directory: Path, version: int) -> int | None:
    # cgroup v2 has two: memory.max, over which the kernel kills, and memory.high (systemd's
    # MemoryHigh=, Kubernetes' memory QoS), over which it throttles the group's allocations
    # and reclaims from it without end: a worker sized past either is stopped or crawls.
    names = ("memory.max", "memory.high") if version == 2 else ("memory.limit_in_bytes",)
    limits = []
    for name in names:
        try:
            text = (directory / name).read_text().strip()
        except OSError:  # not there: the root group, or the controller is off here
            continue
        try:
            if text != "max" and int(text) < _V1_NO_MEMORY_LIMIT:
                limits.append(int(text))
        except ValueError:
            logger.warning("unreadable memory limit in %s: %r", directory / name, text)
    return min(limits, default=None)
