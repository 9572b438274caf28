"""worker.cgroups: a container's CPU quota and memory limit, read as the kernel lays them
out, and the processes and threads the worker sizes to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import in_group, limited_group
from worker import settings as settings_module
from worker.cgroups import cpu_quota, memory_limit
from worker.settings import (
    CPU_INFERENCE_PROCESS_MEMORY,
    GPU_INFERENCE_PROCESSES,
    INFERENCE_WORKER_MEMORY,
    Settings,
    usable_cpus,
)

# mountinfo lines as Linux writes them; {root} and {point} are filled in per case
_V2 = "30 23 0:26 {root} {point} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw"
_V1_CPU = (
    "35 26 0:31 {root} {point} rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup "
    "rw,cpu,cpuacct"
)
_V1_MEMORY = "36 26 0:32 {root} {point} rw,relatime shared:12 - cgroup cgroup rw,memory"
_ROOT_FS = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"


def _lay_out(
    tmp_path: Path, memberships: list[str], mounts: list[str], files: dict[str, str]
) -> tuple[Path, Path]:
    """A /proc/self and a file system under ``tmp_path``; returns (proc, root)."""
    proc, root = tmp_path / "proc" / "self", tmp_path / "root"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("".join(f"{line}\n" for line in memberships))
    (proc / "mountinfo").write_text("".join(f"{line}\n" for line in [_ROOT_FS, *mounts]))
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root


def test_a_cgroup_v2_container_sees_its_own_quota(tmp_path: Path) -> None:
    # docker run --cpus 4 with a cgroup namespace: the container's group is its root
    proc, root = _lay_out(
        tmp_path,
        ["0::/"],
        [_V2.format(root="/", point="/sys/fs/cgroup")],
        {"/sys/fs/cgroup/cpu.max": "400000 100000\n"},
    )
    assert cpu_quota(proc, root=root) == 4.0


def test_no_quota_is_none(tmp_path: Path) -> None:
    proc, root = _lay_out(
        tmp_path,
        ["0::/user.slice/session-1.scope"],
        [_V2.format(root="/", point="/sys/fs/cgroup")],
        {"/sys/fs/cgroup/user.slice/session-1.scope/cpu.max": "max 100000\n"},
    )
    assert cpu_quota(proc, root=root) is None


def test_a_parent_groups_quota_holds_its_children(tmp_path: Path) -> None:
    # a Kubernetes pod's limit sits on the pod's group; the container's own may be lower
    pod = "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice"
    proc, root = _lay_out(
        tmp_path,
        ["0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope"],
        [_V2.format(root="/", point="/sys/fs/cgroup")],
        {
            f"{pod}/cpu.max": "250000 100000\n",
            f"{pod}/cri-containerd-1.scope/cpu.max": "max 100000\n",
        },
    )
    assert cpu_quota(proc, root=root) == 2.5
    (root / pod.lstrip("/") / "cri-containerd-1.scope" / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(proc, root=root) == 0.5
    # nothing above the mount point is read: the host's groups are not the container's
    (root / "sys" / "fs" / "cpu.max").write_text("10000 100000\n")
    assert cpu_quota(proc, root=root) == 0.5


def test_a_cgroup_v1_container_without_a_namespace(tmp_path: Path) -> None:
    # Docker on cgroup v1: the container's own group is mounted, and /proc/self/cgroup
    # names it by its path in the host's hierarchy
    point = "/sys/fs/cgroup/cpu,cpuacct"
    proc, root = _lay_out(
        tmp_path,
        ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "0::/docker/abc"],
        [
            _V1_MEMORY.format(root="/docker/abc", point="/sys/fs/cgroup/memory"),
            _V1_CPU.format(root="/docker/abc", point=point),
        ],
        {f"{point}/cpu.cfs_quota_us": "150000\n", f"{point}/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(proc, root=root) == 1.5


def test_a_cgroup_v1_host_with_no_quota(tmp_path: Path) -> None:
    # v1 controllers beside a v2 hierarchy that has none of them (as on this project's
    # build machines)
    point = "/sys/fs/cgroup/cpu"
    proc, root = _lay_out(
        tmp_path,
        ["4:cpu,cpuacct:/", "0::/"],
        [
            _V1_CPU.format(root="/", point=point),
            _V2.format(root="/", point="/sys/fs/cgroup/unified"),
        ],
        {f"{point}/cpu.cfs_quota_us": "-1\n", f"{point}/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(proc, root=root) is None


def test_a_mount_point_with_a_space(tmp_path: Path) -> None:
    proc, root = _lay_out(
        tmp_path,
        ["0::/a"],
        [_V2.format(root="/", point=r"/cgroup\040fs")],
        {"/cgroup fs/a/cpu.max": "300000 200000\n"},
    )
    assert cpu_quota(proc, root=root) == 1.5


def test_a_group_outside_what_is_mounted_is_not_read(tmp_path: Path) -> None:
    # the process's group lies outside its cgroup namespace, or outside the part of the
    # hierarchy mounted: the quota found there belongs to another group
    proc, root = _lay_out(
        tmp_path,
        ["0::/../../other", "4:cpu,cpuacct:/docker/other"],
        [
            _V2.format(root="/", point="/sys/fs/cgroup"),
            _V1_CPU.format(root="/docker/abc", point="/sys/fs/cgroup/cpu"),
        ],
        {
            "/sys/fs/cgroup/cpu.max": "200000 100000\n",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "100000\n",
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cpu_quota(proc, root=root) is None


def test_nothing_to_read_is_no_quota(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cpu_quota(tmp_path / "no-such-proc", root=tmp_path) is None  # not Linux
    proc, root = _lay_out(tmp_path, ["0::/"], [], {})  # no cgroup file system mounted
    assert cpu_quota(proc, root=root) is None
    (proc / "mountinfo").write_text(_V2.format(root="/", point="/cg") + "\n")
    assert cpu_quota(proc, root=root) is None  # mounted, no cpu.max: no cpu controller
    (root / "cg").mkdir(parents=True)
    (root / "cg" / "cpu.max").write_text("lots 100000\n")
    assert cpu_quota(proc, root=root) is None
    assert "unreadable CPU quota" in caplog.text


def test_usable_cpus_are_the_affinity_within_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: None)
    assert usable_cpus() == 64
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: 4.0)
    assert usable_cpus() == 4
    # a CPU worker on a 64-core host limited to 4 CPUs: 4 processes of 1 thread, not
    # 4 processes of 16
    assert Settings(device="cpu").effective_inference_processes == 4
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: 1.5)
    assert usable_cpus() == 2  # rounded up: the half core is used, by a second thread
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: 0.25)
    assert usable_cpus() == 1
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: 128.0)
    assert usable_cpus() == 64  # a quota above the cores runs on the cores


def test_memory_limits_v2_and_v1(tmp_path: Path) -> None:
    pod = "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice"
    proc, root = _lay_out(
        tmp_path / "v2",
        ["0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope"],
        [_V2.format(root="/", point="/sys/fs/cgroup")],
        {
            f"{pod}/memory.max": "17179869184\n",  # the pod's: 16 GiB
            f"{pod}/cri-containerd-1.scope/memory.max": "max\n",
        },
    )
    assert memory_limit(proc, root=root) == 16 * 2**30
    (root / pod.lstrip("/") / "cri-containerd-1.scope" / "memory.max").write_text("2147483648\n")
    assert memory_limit(proc, root=root) == 2 * 2**30  # the lowest along the way
    # memory.high (systemd's MemoryHigh=, Kubernetes' memory QoS): over it the kernel
    # throttles and reclaims without end, so it bounds the worker as memory.max does
    (root / pod.lstrip("/") / "memory.high").write_text("1073741824\n")
    assert memory_limit(proc, root=root) == 2**30
    (root / pod.lstrip("/") / "memory.high").write_text("max\n")
    assert memory_limit(proc, root=root) == 2 * 2**30
    # Docker on cgroup v1: the container's own group mounted; v1 writes "none" as a
    # page-aligned 2**63 - 1
    point = "/sys/fs/cgroup/memory"
    proc, root = _lay_out(
        tmp_path / "v1",
        ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc"],
        [_V1_MEMORY.format(root="/docker/abc", point=point)],
        {f"{point}/memory.limit_in_bytes": "9223372036854771712\n"},
    )
    assert memory_limit(proc, root=root) is None
    (root / point.lstrip("/") / "memory.limit_in_bytes").write_text("1610612736\n")
    assert memory_limit(proc, root=root) == 3 * 2**29
    assert cpu_quota(proc, root=root) is None  # no cpu hierarchy mounted here


def test_inference_processes_within_the_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 16)
    monkeypatch.setattr(settings_module, "memory_limit", lambda: None)
    cpu, gpu = Settings(device="cpu"), Settings(device="cuda")
    assert (cpu.effective_inference_processes, gpu.effective_inference_processes) == (4, 4)
    # the worker's own share, then one process's peak per process
    monkeypatch.setattr(settings_module, "memory_limit", lambda: 2 * 2**30)
    assert cpu.effective_inference_processes == 1
    assert gpu.effective_inference_processes == 1
    three = INFERENCE_WORKER_MEMORY + 3 * CPU_INFERENCE_PROCESS_MEMORY
    monkeypatch.setattr(settings_module, "memory_limit", lambda: three)
    assert cpu.effective_inference_processes == 3
    monkeypatch.setattr(settings_module, "memory_limit", lambda: three - 1)
    assert cpu.effective_inference_processes == 2
    # the Kubernetes GPU pod's limit holds the default batching processes
    monkeypatch.setattr(settings_module, "memory_limit", lambda: 16 * 2**30)
    assert gpu.effective_inference_processes == GPU_INFERENCE_PROCESSES
    # one at least, however little (the worker warns at start); a count set is kept
    monkeypatch.setattr(settings_module, "memory_limit", lambda: 256 * 2**20)
    assert cpu.effective_inference_processes == 1
    assert Settings(device="cpu", inference_processes=3).effective_inference_processes == 3


# -- a real control group ----------------------------------------------------------------

# Prints what the worker makes of the group this interpreter runs in, and how many threads
# torch starts with once the command line (worker.cli) or the benchmarks (tests.bench)
# have set themselves up.
_IN_GROUP = """
import contextlib, io, json
from worker.cgroups import cpu_quota
from worker.settings import usable_cpus
{set_up}
import torch
print(json.dumps({{"quota": cpu_quota(), "cpus": usable_cpus(), "torch": torch.get_num_threads()}}))
"""

#: what runs before torch is imported: a command (its group's callback), or a benchmark
_SET_UPS = {
    "command line": (
        "from worker import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['db', '--help'], standalone_mode=False)"
    ),
    "benchmarks": "import tests.bench",
}


@pytest.mark.parametrize("set_up", sorted(_SET_UPS))
def test_a_process_in_a_real_group_sizes_its_threads_to_the_quota(set_up: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with limited_group(cpus=0.5) as groups:
        done = subprocess.run(
            in_group(groups, sys.executable, "-c", _IN_GROUP.format(set_up=_SET_UPS[set_up])),
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    seen = json.loads(done.stdout)
    assert seen == {"quota": 0.5, "cpus": 1, "torch": 1}
