"""What the node costs while it waits: CPU of each process with no images coming in.

A node spends most of its day idle. Each stack (``serve`` on the embedded defaults, or
listener + workers on Redis + PostgreSQL, set up as in ``bench_e2e``) is started, one
study is sent through it (the model is loaded and every process is past its start),
and then nothing: the CPU of each of the node's processes is read from ``/proc`` over
``--seconds``, once a second (the busiest second is printed too). A second study is
sent afterwards, to show whether a node coming out of a quiet spell answers as fast as
one in use: its C-STORE-to-SR time is printed, and its stages beside the lone studies'
(below).

Some PACSes keep their associations open between images. With ``--held-open N`` (default
5; 0 skips it) a pynetdicom client in another process opens N associations to the
listener, and the node's CPU is read again over `HELD_OPEN_SECONDS` while they stay open
with nothing sent.

Then ``--lone`` more studies go through one at a time, each once the one before is
delivered, as a PACS forwards most of its studies: where such a study's time goes, from
the database's timestamps (median of them):

    received → queued     the listener's enqueuer taking the id up and publishing its
                          message (Queued At is the time of publishing)
    queued → started      the broker, and an inference worker taking the message up
    started → finished    the inference task; "model" is its forward pass and Grad-CAM
    finished → SR         the delivery worker taking up the SR and sending it

    .venv/bin/python -m tests.bench.bench_idle [--seconds 60] [--lone 5] [--held-open 5]
        [--stack embedded|redis-postgres|both]

No target of issue 6; the figures are quoted in the README and docs/performance.md
("The embedded broker at idle", "A study that comes alone").
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, ObjectKind, Result
from tests.bench.bench_e2e import (
    CALLED_AE,
    CALLING_AE,
    STACKS,
    Stack,
    machine_busy_seconds,
    make_inputs,
    progress,
    running_stack,
    send_and_wait,
    sop_uid,
    tree_cpu_by_process,
)
from tests.support import wait_for

#: The idle spell is read this often, to show its busiest second as well as its mean.
SAMPLE_SECONDS = 1.0

#: The stages of a lone study's time, in :func:`timeline`'s order.
STAGES = (
    "received → queued",
    "queued → started",
    "started → finished",
    "  model",
    "finished → SR",
    "received → SR",
    "sent → SR",
)


def process_label(pid: int) -> str:
    """What a node process runs: ``serve``, ``listen``, ``work -Q inference`` ..."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    argv = [a for a in argv if a]
    return " ".join(argv[argv.index("worker") + 1 :]) if "worker" in argv else Path(argv[0]).name


def _shares_by_label(roots: list[int]) -> dict[str, float]:
    """CPU seconds of each node process so far, named by what it runs.

    A prefork worker's children are summed as "(children)". Processes that exit between
    two readings drop out: a node at rest starts and ends none.
    """
    spent: dict[str, float] = {}
    for root in roots:
        tree = tree_cpu_by_process(root)
        labels = {pid: process_label(pid) for pid in tree}
        for pid, (parent, seconds) in tree.items():
            label = labels[pid]
            if labels.get(parent) == label:
                label += " (children)"
            spent[label] = spent.get(label, 0.0) + seconds
    return spent


def idle_cpu(roots: list[int], seconds: float) -> tuple[dict[str, float], float, float]:
    """Share of one core each node process used over ``seconds``; the node's busiest
    second; the machine's share."""
    ticker = threading.Event()  # never set: its wait is the sampling period
    begun = previous = _shares_by_label(roots)
    machine = machine_busy_seconds()
    start = last = time.monotonic()
    busiest = 0.0
    while last - start < seconds:
        ticker.wait(min(SAMPLE_SECONDS, seconds - (last - start)))
        now, reading = time.monotonic(), _shares_by_label(roots)
        spent = sum(reading.values()) - sum(previous.values())
        busiest = max(busiest, spent / (now - last))
        previous, last = reading, now
    elapsed = last - start
    shares = {label: (cpu - begun.get(label, 0.0)) / elapsed for label, cpu in previous.items()}
    return shares, busiest, (machine_busy_seconds() - machine) / elapsed


#: How long the node's CPU is read while ``--held-open`` associations are open.
HELD_OPEN_SECONDS = 20.0

# A PACS that holds associations open and sends nothing: opens them, says so, and
# releases them when its standard input closes.
_HOLDER = """
import sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification
calling, called, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ae = AE(ae_title=calling)
ae.add_requested_context(Verification)
held = [ae.associate("127.0.0.1", port, ae_title=called) for _ in range(count)]
if not all(assoc.is_established for assoc in held):
    sys.exit("an association was not accepted")
print("open", flush=True)
sys.stdin.read()
for assoc in held:
    assoc.release()
"""


def held_open_cpu(node: Stack, roots: list[int], count: int) -> float:
    """Share of one core the node's processes used while ``count`` associations to its
    listener stayed open, idle, over `HELD_OPEN_SECONDS`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, CALLING_AE, CALLED_AE, str(node.port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        if holder.stdout.readline().strip() != "open":
            raise RuntimeError(f"the {count} associations to hold open were not accepted")
        shares, _, _ = idle_cpu(roots, HELD_OPEN_SECONDS)
        holder.stdin.close()
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    return sum(shares.values())


def timeline(database_url: str, study: Path) -> tuple[float, ...]:
    """Seconds of each of :data:`STAGES` for a delivered ``study``, from the database."""
    with session_scope(database_url) as session:
        row = session.execute(
            select(
                Instance.received_at,
                Instance.queued_at,
                Instance.started_at,
                Instance.finished_at,
                Result.inference_seconds,
                Delivery.delivered_at,
            )
            .join(Result, Result.instance_id == Instance.id)
            .join(Delivery, Delivery.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_uid(study), Delivery.kind == ObjectKind.SR)
        ).one()
    received, queued, started, finished, model, delivered = row

    def between(earlier: dt.datetime | None, later: dt.datetime | None) -> float:
        if earlier is None or later is None:
            raise RuntimeError(f"{study.name}: a stage has no timestamp ({row})")
        return (later - earlier).total_seconds()

    return (
        between(received, queued),
        between(queued, started),
        between(started, finished),
        model,
        between(finished, delivered),
        between(received, delivered),
    )


def send_alone(node: Stack, study: Path, what: str) -> tuple[float, ...]:
    """Send ``study`` and wait until its SR and SC are delivered; its :func:`timeline`,
    then the seconds from its first C-STORE sent to its SR delivered (the sender's
    clock: these include starting ``storescu``, the association and the transfer)."""
    sent_to_sr = send_and_wait(node, study, f"{what}'s SR")
    wait_for(
        functools.partial(all_delivered, node, study),
        timeout=120,
        what=f"{what}'s SR and SC delivered",
    )
    return (*timeline(node.database_url, study), sent_to_sr)


def lone_studies(node: Stack, studies: list[Path]) -> list[tuple[float, ...]]:
    """Send ``studies`` one at a time, each once the one before is delivered; their
    :func:`send_alone` figures."""
    return [send_alone(node, study, "a lone study") for study in studies]


def run_stack(
    stack: str,
    work: Path,
    warm_up_study: Path,
    next_study: Path,
    seconds: float,
    lone: list[Path],
    held_open: int,
) -> tuple[str, tuple[float, ...], list[tuple[float, ...]]]:
    """Run ``stack``: its idle line for the table, the timeline of the study sent after
    the idle spell, and those of the lone studies."""
    folder = Path(tempfile.mkdtemp(prefix=f"{stack}-", dir=work))
    with running_stack(stack, folder) as node:
        try:
            send_and_wait(node, warm_up_study, "the warm-up SR")
            wait_for(
                lambda: all_delivered(node, warm_up_study),
                timeout=120,
                what="the warm-up study's SR and SC delivered",
            )
            print(f"[{stack}] warm-up study delivered; idle for {seconds:.0f} s", flush=True)
            roots = [proc.pid for _, proc, _ in node.processes.started]
            shares, busiest, machine = idle_cpu(roots, seconds)
            held = held_open_cpu(node, roots, held_open) if held_open else None
            after_idle = send_alone(node, next_study, "the study after the idle spell")
            times = lone_studies(node, lone)
        except Exception:
            print(f"[{stack}] failed; the processes' last log lines:\n{node.processes.tails()}")
            raise
    parts = ", ".join(f"{role} {100 * share:.2f}" for role, share in shares.items())
    held_text = "-" if held is None else f"{100 * held:.2f}"
    return (
        (
            f"{stack:<16}{100 * sum(shares.values()):>7.2f}{100 * busiest:>15.1f}"
            f"{100 * machine:>11.1f}{held_text:>14}{after_idle[-1]:>12.2f}   {parts}"
        ),
        after_idle,
        times,
    )


def all_delivered(node: Stack, study: Path) -> bool:
    """Every object made from ``study`` has been delivered (the SR and the SC)."""
    _, deliveries = progress(node.database_url, [sop_uid(study)])
    delivered = f" {DeliveryState.DELIVERED}"
    return sum(deliveries.values()) >= 2 and all(k.endswith(delivered) for k in deliveries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="idle time measured")
    parser.add_argument(
        "--lone", type=int, default=5, help="studies then sent one at a time (0: none)"
    )
    parser.add_argument(
        "--held-open",
        type=int,
        default=5,
        help="associations held open, idle, while the node's CPU is read again (0: none)",
    )
    parser.add_argument("--stack", choices=[*STACKS, "both"], default="both")
    parser.add_argument("--workdir", type=Path, default=None, help="where temp files go")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.lone < 0:
        parser.error("--lone must not be negative")
    if args.held_open < 0:
        parser.error("--held-open must not be negative")
    stacks = STACKS if args.stack == "both" else (args.stack,)
    work = Path(tempfile.mkdtemp(prefix="bench-idle-", dir=args.workdir))
    lines = []
    after_idle: dict[str, tuple[float, ...]] = {}
    timelines: dict[str, list[tuple[float, ...]]] = {}
    try:
        warm_up_study, files = make_inputs(work / "inputs", 1 + args.lone, 2)
        for stack in stacks:
            line, after_idle[stack], timelines[stack] = run_stack(
                stack, work, warm_up_study, files[0], args.seconds, files[1:], args.held_open
            )
            lines.append(line)
    except RuntimeError as exc:
        sys.exit(f"bench_idle: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"machine: {os.cpu_count()} cores; each stack idle {args.seconds:.0f} s once one study's "
        "SR and SC are delivered; share of one core, from /proc"
    )
    print(
        f"{'stack':<16}{'node %':>7}{'busiest 1 s %':>15}{'machine %':>11}"
        f"{'held open %':>14}{'next SR s':>12}   % of a core by process"
    )
    for line in lines:
        print(line)
    print(
        "node %: the node's processes together; busiest 1 s: theirs in the busiest second; "
        "machine %: every process (/proc/stat); held open %: the node's processes while "
        f"{args.held_open} associations to the listener stay open with nothing sent "
        f"({HELD_OPEN_SECONDS:.0f} s); next SR s: a study sent after the idle spell, "
        "C-STORE to SR delivered"
    )
    print()
    print(
        "where a study's time goes, from the database's timestamps: the study sent after the "
        f"idle spell, and the median of {args.lone} sent one at a time, each once the one "
        "before was delivered"
    )
    columns: list[tuple[str, str, list[tuple[float, ...]]]] = []
    for stack in stacks:  # each stack's study after the idle spell, then its lone ones
        columns.append((stack, "after idle", [after_idle[stack]]))
        if args.lone:
            columns.append((stack, "lone", timelines[stack]))
    print(f"{'':<22}" + "".join(f"{stack:>16}" for stack, _, _ in columns))
    print(f"{'stage':<22}" + "".join(f"{kind:>16}" for _, kind, _ in columns))
    for n, stage in enumerate(STAGES):
        medians = (statistics.median(t[n] for t in times) for _, _, times in columns)
        print(f"{stage:<22}" + "".join(f"{m:>16.3f}" for m in medians))
    print(
        "model: the forward pass and Grad-CAM (Result.inference_seconds), within "
        "started → finished; sent → SR: from storescu's start (the sender's clock), so it "
        "adds starting it, the association and the transfer to received → SR"
    )


if __name__ == "__main__":
    main()
