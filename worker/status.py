"""`boneage-worker status`: one screen that tells an administrator whether the node is healthy."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from sqlalchemy.orm import Session

from db import queries
from db.engine import DatabaseNotReady, check_schema, session_scope
from db.schema import utcnow as now
from worker.celery_app import app as celery_app
from worker.celery_app import queue_depths
from worker.heartbeat import STALE_AFTER, live_workers_by_queue
from worker.settings import Destination, Settings
from worker.storage import disk_space

#: Dead processes are listed for this long, then no longer shown.
FORGET_AFTER = timedelta(hours=1)

#: Failed deliveries the screen lists one by one (`--json` lists them all).
FAILED_SHOWN = 10


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def collect(settings: Settings, *, details: bool = True) -> dict[str, Any]:
    """Everything `status` shows, as plain data (`--json` prints exactly this).

    ``details=False`` (`--quiet`, each container's health check every minute) leaves out
    what decides nothing of the health: the recent problems, whose reasons no index
    can find, so that every row would be read each minute.

    Its time is the database server's clock once the database answers (this host's
    until then): the heartbeats are written by that clock (`worker.heartbeat`), and
    this host's may differ from the hosts that wrote them.
    """
    report: dict[str, Any] = {
        "time": _iso(now()),
        "ae_title": settings.ae_title,
        "port": settings.port,
        "data_dir": str(settings.data_dir),
        "destinations": [str(d) for d in settings.destinations],
        "problems": [],
    }
    problems: list[str] = report["problems"]
    url = settings.effective_database_url
    try:
        check_schema(url)
        report["database"] = "ok"
    except DatabaseNotReady as exc:
        report["database"] = str(exc)
        problems.append(f"database: {exc}")
        report["healthy"] = False
        return report

    try:
        report["queues"] = queue_depths(celery_app)
        report["broker"] = "ok"
    except Exception as exc:
        report["queues"] = {}
        report["broker"] = f"unreachable ({type(exc).__name__})"
        problems.append("broker is unreachable: new instances wait as 'received'")

    with session_scope(url) as session:
        current = queries.database_now(session)
        report["time"] = _iso(current)
        beats = queries.heartbeats(session)
        report["instances"] = queries.instance_counts(session)
        report["deliveries"] = queries.delivery_counts(session)
        report["last_hour"] = queries.last_hour(session, current)
        retrying, last_error = queries.retrying_deliveries(session)
        report["deliveries_retrying"] = retrying
        report["recent_problems"] = [
            {**p, "at": _iso(p["at"])}
            for p in (queries.recent_problems(session) if details else [])
        ]
        spool_instances, spool_bytes = queries.spooled(session)
        waiting = queries.waiting(session)
        overdue = queries.overdue_deliveries(session, current)
        failed = queries.failed_deliveries(session)
        gone = _files_gone(session, failed, settings)
        abandoned_there = _abandoned_there(session, failed, settings, gone)
        abandoned, newest_abandoned = queries.abandoned_deliveries(session, FAILED_SHOWN)
        abandoned_notes = queries.abandoned_notes(session)
    space = disk_space(settings.data_dir)
    report["storage"] = {
        "free_bytes": space.free_bytes if space else None,
        "total_bytes": space.total_bytes if space else None,
        "spool_instances": spool_instances,
        "spool_bytes": spool_bytes,
        "retention_days": settings.retention_days,
    }
    # received images no row names, as retention dated them: None where unreadable,
    # or where there is no spool (another data directory than the listener's)
    # (pynetdicom comes with retention: imported here, as worker.delivery below)
    from worker.retention import unrecorded_images

    keep = timedelta(days=settings.retention_days) if settings.retention_days else None
    unrecorded = unrecorded_images(url, settings.spool_dir, keep)
    report["storage"]["unrecorded_images"] = unrecorded and {
        "images": unrecorded.images,
        "bytes": unrecorded.bytes,
        "first_goes_after": _iso(unrecorded.first_goes_after),
    }

    processes = []
    for beat in beats:
        if current - beat.seen_at > FORGET_AFTER:
            continue  # a process that died long ago without a clean stop
        alive = current - beat.seen_at <= STALE_AFTER
        processes.append(
            {
                "name": beat.name,
                "role": beat.role,
                "alive": alive,
                "seen": _iso(beat.seen_at),
                "since": _iso(beat.started_at),
                **beat.detail,
            }
        )
    report["processes"] = processes
    live = [p for p in processes if p["alive"]]
    if not any(p["role"] == "listener" for p in live):
        problems.append("no listener is running")
    for queue, count in live_workers_by_queue(beats, current).items():
        if not count:
            problems.append(f"no worker consumes the {queue} queue")
    problems.extend(_model_problems([p for p in live if "inference" in p.get("queues", [])]))
    problems.extend(_uid_root_problems([p for p in live if "inference" in p.get("queues", [])]))
    problems.extend(_destination_problems([p for p in live if p["role"] == "worker"]))
    if retrying:
        problems.append(f"{retrying} deliveries are being retried; latest error: {last_error}")
    report["failed_deliveries"] = _failed(failed, settings)
    if failed:
        problems.append(
            _failed_problem(failed, report["failed_deliveries"][0], settings, gone, abandoned_there)
        )
    # given up on purpose: no problem, but never out of sight (their errors say why)
    report["abandoned_deliveries"] = {
        "count": abandoned,
        # rejection notes of ours: the results they withdraw stay at the PACS
        "notes": abandoned_notes,
        "newest": [
            {
                "id": d.id,
                "instance": d.instance_id,
                "kind": d.kind,
                "destination": d.destination,
                "error": d.last_error,
            }
            for d in newest_abandoned
        ],
    }
    report["waiting"] = {
        "instances": waiting.count,
        "oldest_since": _iso(waiting.oldest_since),
        "last_finished_at": _iso(waiting.last_finished_at),
    }
    # Work that stopped moving: the reconciler queues a lost message again after
    # BONEAGE_REQUEUE_AFTER_SECONDS, so twice that with nothing finished is not a
    # backlog but a worker that hangs, a message no worker takes, or a broker apart.
    stuck_after = timedelta(seconds=2 * settings.requeue_after_seconds)
    stalled = _stalled_for(waiting.oldest_since, waiting.last_finished_at, current, stuck_after)
    if stalled is not None:
        problems.append(
            f"{waiting.count} instance(s) wait, the oldest for "
            f"{stalled.total_seconds() / 60:.0f} min, and none "
            f"finished in the last {stuck_after.total_seconds() / 60:.0f} min: is an "
            "inference worker hanging, or consuming another broker?"
        )
    report["overdue_deliveries"] = {
        "deliveries": overdue.count,
        "oldest_due": _iso(overdue.oldest_due),
        "last_delivered_at": _iso(overdue.last_delivered_at),
    }
    # The same for deliveries. A delivery worker claims a delivery by moving its due
    # time out by the time a send may take, a failed attempt by its back-off, and the
    # reconciler queues one overdue again every round: one overdue for as long, with
    # nothing delivered, is no worker's (hung, or consuming another broker), and its
    # SR and SC do not reach the PACS.
    overdue_for = _stalled_for(overdue.oldest_due, overdue.last_delivered_at, current, stuck_after)
    if overdue_for is not None:
        problems.append(
            f"{overdue.count} deliveries are due, the longest for "
            f"{overdue_for.total_seconds() / 60:.0f} min, and none was "
            f"delivered in the last {stuck_after.total_seconds() / 60:.0f} min: is a "
            "delivery worker hanging, or consuming another broker? Results are not "
            "reaching the PACS"
        )
    if errors := report["last_hour"]["error"]:
        # reprocess keeps a result unsent unless told (its default suits a new model)
        problems.append(
            f"{errors} instance(s) ended in error in the last hour (see recent problems); "
            "once the cause is fixed, 'boneage-worker reprocess --instance ID --send' "
            "assesses one again and sends its results"
        )
    if not settings.destinations:
        problems.append("no destinations configured (BONEAGE_DESTINATIONS): results are not sent")
    spool_space = disk_space(settings.spool_dir)  # where the listener keeps its reserve
    refusing = spool_space is not None and spool_space.free_bytes < settings.min_free_mb << 20
    if refusing and spool_space is not None:
        problems.append(
            f"the spool's disk has {spool_space.free_bytes >> 20} MiB free, less than the "
            f"{settings.min_free_mb} MiB the listener keeps (BONEAGE_MIN_FREE_MB): it "
            "refuses every image now (0xA700), and the PACS keeps them; add space or "
            "lower BONEAGE_RETENTION_DAYS"
        )
    # the spool's disk, refusing, is said once, above (its free bytes, read a moment
    # apart, may differ)
    same_disk = spool_space is not None and space is not None and space.device == spool_space.device
    if space is not None and space.low and not (refusing and same_disk):
        below = (
            f"below {settings.min_free_mb} MiB (BONEAGE_MIN_FREE_MB)"
            if settings.min_free_mb
            else "when it is full"
        )
        problems.append(
            f"the data directory's disk has {space.free_bytes / 2**30:.1f} GiB free of "
            f"{space.total_bytes / 2**30:.1f}: {below} the listener refuses images "
            "(0xA700); add space or lower BONEAGE_RETENTION_DAYS"
        )
    report["healthy"] = not problems
    return report


def _stalled_for(
    oldest: datetime | None, last_done: datetime | None, current: datetime, after: timedelta
) -> timedelta | None:
    """How long work waiting since ``oldest`` has waited, where that is longer than
    ``after`` with none done (``last_done``) for as long: stopped moving, not a backlog;
    None otherwise."""
    if oldest is None or current - oldest <= after:
        return None
    if last_done is not None and current - last_done <= after:
        return None
    return current - oldest


def _model_problems(inference: list[dict[str, Any]]) -> list[str]:
    """What is wrong with the models the live inference workers (their heartbeats'
    details) run: an untrained one, or not the same one."""
    problems = []
    if any(p.get("trained") is False for p in inference):
        # every SR and SC says so too, but the PACS files them with the images
        problems.append(
            "inference worker(s) run an UNTRAINED model: results are not for clinical "
            "use; set BONEAGE_MODEL"
        )
    models = sorted({str(p["model_id"]) for p in inference if p.get("model_id")})
    if len(models) > 1:
        problems.append(
            f"inference workers run different models ({', '.join(m[:12] for m in models)}): "
            "an image's bone age depends on which worker assesses it; restart them with "
            "the same BONEAGE_MODEL"
        )
    return problems


def _uid_root_problems(inference: list[dict[str, Any]]) -> list[str]:
    """Whether the live inference workers (their heartbeats' details) make new images'
    UIDs under different roots (BONEAGE_UID_ROOT): which one an image's objects get
    would depend on the worker that first assesses it. A worker of a release before the
    node's UIDs says none, and is left out."""
    roots = sorted({str(p["uid_root"]) for p in inference if p.get("uid_root")})
    if len(roots) > 1:
        return [
            f"inference workers make UIDs under different roots ({', '.join(roots)}): the "
            "root of an image's objects depends on which worker assesses it first; give "
            "every process the same BONEAGE_UID_ROOT and restart them"
        ]
    return []


def _destination_problems(workers: list[dict[str, Any]]) -> list[str]:
    """Whether the live workers (their heartbeats' details) have different
    BONEAGE_DESTINATIONS: a settings change some processes did not take (a ConfigMap
    applied, no pod restarted). An inference worker makes an image's deliveries for its
    own, and a delivery worker of other settings fails each to a destination it does not
    name ("destination no longer configured"), again after every `retry-deliveries`. A
    worker of a release before says none, and is left out."""
    lists = {
        frozenset(map(_destination_key, p["destinations"])): ", ".join(p["destinations"]) or "none"
        for p in workers
        if "destinations" in p
    }
    seen = sorted(lists.values())
    if len(seen) > 1:
        return [
            "workers have different BONEAGE_DESTINATIONS ("
            + "; ".join(seen)
            + "): an image's results go, or fail, by the workers that take them; give every "
            "process the same and restart them"
        ]
    return []


def _destination_key(text: str) -> tuple[str, str, int] | str:
    """A destination as deliveries tell it apart (worker.delivery.configured): its AE
    title, its host in any case, its port; text that is none, as it is."""
    try:
        destination = Destination.parse(text)
    except ValueError:
        return text
    return destination.ae_title, destination.host.lower(), destination.port


def _stranded(
    failed: list[queries.FailedDelivery], settings: Settings
) -> list[queries.FailedDelivery]:
    """The failed SRs and SCs whose destinations are no longer configured."""
    if not failed:
        return []
    # pynetdicom comes with it: imported only where a delivery failed
    from worker.delivery import configured

    return [d for d in failed if d.kind != "ko" and not configured(settings, d.destination)]


def _files_gone(
    session: Session, failed: list[queries.FailedDelivery], settings: Settings
) -> dict[int, bool]:
    """The ids of the failed SRs and SCs to destinations no longer configured whose
    files are gone, each with whether retention removed it: `retry-deliveries` leaves
    them failed (those not removed, until their files are back)."""
    stranded = _stranded(failed, settings)
    if not stranded:
        return {}
    from worker.delivery import files_gone

    return files_gone(session, [d.id for d in stranded])


def _abandoned_there(
    session: Session,
    failed: list[queries.FailedDelivery],
    settings: Settings,
    gone: dict[int, bool],
) -> dict[int, list[str]]:
    """The ids of the failed SRs and SCs to destinations no longer configured, their
    files there (not in ``gone``), whose objects were abandoned at every configured
    destination, none of which has them: `retry-deliveries` leaves them failed
    (`worker.delivery.abandoned_at_targets`, which it asks too), each with those
    destinations. One query, however many rows."""
    stranded = [d.id for d in _stranded(failed, settings) if d.id not in gone]
    if not stranded or not settings.destinations:
        return {}
    from worker.delivery import abandoned_at_targets

    return abandoned_at_targets(session, stranded, [str(d) for d in settings.destinations])


def _failed_problem(
    failed: list[queries.FailedDelivery],
    latest: dict[str, Any],
    settings: Settings,
    gone: dict[int, bool],
    abandoned_there: dict[int, list[str]] | None = None,
) -> str:
    """The problem line of the failed deliveries: what to do about them.

    `retry-deliveries` sends an SR or SC whose destination is no longer configured to
    the configured destinations instead (`worker.delivery.retry_failed`): for those,
    fixing the destination is done already. They are failed all the same until then:
    their results have not reached the PACS. Not those whose files are gone (``gone``,
    `worker.delivery.files_gone`), which `retry-deliveries` leaves failed: nothing can
    send those retention removed, and their results stay in the database only; the
    others' files are not found where they were written (an outbox volume not mounted,
    a data directory moved), and they go once their files are back there
    (`worker.delivery.PUT_BACK`). Retention is named only for those it removed. Nor
    those whose objects were abandoned at every configured destination
    (``abandoned_there``, `worker.delivery.abandoned_at_targets`): `retry-deliveries`
    leaves them failed, and says what it says here.
    """
    # pynetdicom comes with it: imported only where a delivery failed
    from worker.delivery import PUT_BACK

    stranded = _stranded(failed, settings)
    where = ", ".join(sorted({d.destination for d in stranded}))
    latest_error = f"latest error: {latest['error']}"
    retry = "'boneage-worker retry-deliveries'"
    fix = f"{len(failed)} deliveries failed: fix the destination, then run {retry}"
    if not stranded:
        return f"{fix}; {latest_error}"
    removed = sum(1 for d in stranded if gone.get(d.id))
    missing = sum(1 for d in stranded if gone.get(d.id) is False)
    abandoned_there = abandoned_there or {}
    left = len(abandoned_there)
    sendable = len(stranded) - removed - missing - left
    there = ", ".join(sorted({t for ts in abandoned_there.values() for t in ts}))
    # as retry-deliveries says it (`worker.cli.retry_deliveries`)
    given_up = (
        f"abandoned at the configured destination(s) {there}, which have them neither "
        f"delivered nor pending: {retry} leaves them failed; close them with "
        "'boneage-worker abandon-deliveries', or configure a destination that takes "
        f"them and run {retry} again"
    )
    if settings.destinations:
        put_back = PUT_BACK
        head = f"{retry} sends them to the configured destinations instead"
    else:
        put_back = f"configure BONEAGE_DESTINATIONS and {PUT_BACK}"
        head = f"configure BONEAGE_DESTINATIONS, then run {retry} to send them there"
    # retry_failed leaves them failed (no_file), with or without destinations configured
    unsendable = (
        f"{retry} leaves them failed; their results are in the database only, and "
        "'boneage-worker abandon-deliveries' closes them"
    )
    if left == len(stranded):
        redirect = f"their objects were {given_up}"
    elif removed == len(stranded):
        redirect = (
            f"their files are gone (retention removed them): nothing can send them, and "
            f"{unsendable}"
        )
    elif missing == len(stranded):
        redirect = f"their files are not found where they were written: {put_back}"
    elif not (removed or missing or left):
        redirect = head
    else:
        parts = []
        if left:
            parts.append(f"{left} {given_up}")
        if missing:
            parts.append(f"{missing} not found where they were written: {put_back}")
        if removed:
            parts.append(
                f"{removed} removed by retention: nothing can send those, and {unsendable}"
            )
        lost = "; ".join(parts)
        if sendable and not left:
            redirect = f"{head}, all but {removed + missing} whose files are gone: {lost}"
        elif sendable:
            redirect = f"{head}, all but {removed + missing + left}: {lost}"
        elif not left:
            redirect = f"their files are gone: {lost}"
        else:
            redirect = lost
    if len(stranded) == len(failed):
        return (
            f"{len(failed)} deliveries failed to destinations no longer configured "
            f"({where}): {redirect}; {latest_error}"
        )
    return (
        f"{fix}; {len(stranded)} of them to destinations no longer configured ({where}): "
        f"{redirect}; {latest_error}"
    )


def _failed(failed: list[queries.FailedDelivery], settings: Settings) -> list[dict[str, Any]]:
    """The failed deliveries, the one whose last attempt came last first (as far as the
    rows tell: `_last_attempt`)."""
    dated = sorted(
        ((_last_attempt(d, settings), d) for d in failed),
        key=lambda pair: (pair[0], pair[1].id),
        reverse=True,
    )
    return [
        {
            "id": d.id,
            "instance": d.instance_id,
            "kind": d.kind,
            "destination": d.destination,
            "attempts": d.attempts,
            "error": d.last_error,
            "last_attempt_at": _iso(at),
            # the earliest it can have begun: no row says when exactly (`_last_attempt`)
            "last_attempt_reckoned": True,
        }
        for at, d in dated
    ]


def _last_attempt(d: queries.FailedDelivery, settings: Settings) -> datetime:
    """When a failed delivery's last attempt began, at the earliest: reckoned, since no
    column records it.

    Two times bound it from below, and the later is taken. One is reckoned: its
    creation, or its last put-back by `retry-deliveries` (``created_at``, its attempts
    counted from nought again), and the back-off before each attempt after the first
    (`worker.delivery.backoff_seconds`), as if each retry went when it was due; it was
    later where the delivery waited behind others (earlier only where it was sent by
    hand before it was due). The
    other is ``sending_since``, where set: when an attempt whose answer never came
    began. That may be the last attempt, or an earlier one whose mark a later attempt
    that sent nothing kept (`worker.delivery._record_failure`), maybe days before the
    last: the row cannot tell which, so it is no exact time either.
    """
    # pynetdicom comes with it: imported only where a delivery failed
    from worker.delivery import backoff_seconds

    waited = sum(
        backoff_seconds(
            attempt, settings.delivery_backoff_seconds, settings.delivery_backoff_max_seconds
        )
        for attempt in range(1, d.attempts)
    )
    reckoned = d.created_at + timedelta(seconds=waited)
    return max(reckoned, d.sending_since or reckoned)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ago(now: str | None, then: str | None) -> str:
    """How long before the report's time ``now`` the time ``then`` was, both as
    :func:`_iso` writes them: "4 s ago", "12 min ago", "3 h ago"."""
    if not now or not then:
        return "-"
    seconds = max(0.0, (datetime.fromisoformat(now) - datetime.fromisoformat(then)).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _size(count: int) -> str:
    """A byte count in the unit that reads best: "512 B", "9.5 MB", "41.2 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _failed_table(failed: list[dict[str, Any]]) -> Table:
    table = Table(
        title="failed deliveries (fix the destination, then 'boneage-worker retry-deliveries')",
        expand=True,
    )
    for col in ("last attempt", "what", "attempts", "error"):
        table.add_column(col)
    for d in failed[:FAILED_SHOWN]:
        at = d["last_attempt_at"] or ""
        table.add_row(
            f"≈ {at}" if d["last_attempt_reckoned"] else at,  # reckoned, not recorded
            f"delivery {d['id']} ({d['kind']} to {d['destination']}) of instance {d['instance']}",
            str(d["attempts"]),
            d["error"] or "",
        )
    return table


def _failed_rest(rest: list[dict[str, Any]]) -> str:
    """The failed deliveries not listed, counted by error: each error stays in sight."""
    errors = Counter(d["error"] or "no error recorded" for d in rest)
    return f"{len(rest)} more failed deliveries ('status --json' lists them): " + "; ".join(
        f"{n} × {error}" for error, n in errors.most_common()
    )


def _abandoned_line(abandoned: dict[str, Any]) -> str:
    """The deliveries the administrator gave up, in one line: how many, the rejection
    notes of ours among them apart (what they withdraw stays at the PACS), and the
    newest one's error (who gave it up, when and why)."""
    newest = abandoned["newest"][0]
    notes = abandoned.get("notes") or 0
    withdrawn = (
        f"; {notes} of them are rejection notes of ours: the results they withdraw stay "
        "at the PACS unless withdrawn there by hand"
        if notes
        else ""
    )
    return (
        f"{abandoned['count']} deliveries abandoned by the administrator, never sent: their "
        f"results are in the database only ('status --json' lists the newest){withdrawn}; "
        "the newest, "
        f"delivery {newest['id']} ({newest['kind']} to {newest['destination']}): "
        f"{newest['error'] or 'no reason recorded'}"
    )


def render(report: dict[str, Any], console: Console) -> None:
    healthy = report.get("healthy", False)
    title = f"boneage-worker {report['ae_title']} on port {report['port']}"
    summary = Table.grid(padding=(0, 2))
    summary.add_row("health", "[green]healthy[/]" if healthy else "[red]UNHEALTHY[/]")
    summary.add_row("database", str(report.get("database")))
    summary.add_row("broker", str(report.get("broker", "-")))
    summary.add_row("destinations", ", ".join(report["destinations"]) or "[yellow]none[/]")
    queues = report.get("queues") or {}
    summary.add_row("queues", ", ".join(f"{k} {v}" for k, v in queues.items()) or "-")
    parts: list[Any] = [summary]

    processes = Table(title="processes", expand=True)
    for col in ("role", "name", "alive", "device / queues", "last seen"):
        processes.add_column(col)
    for p in report.get("processes", []):
        if p["role"] == "listener":
            what = f"AE {p.get('ae_title', '')} port {p.get('port', '')}"
            if refused := int(p.get("connections_refused") or 0):  # a scan, a flood
                what += f" · {refused} connections closed on arrival (too many at once)"
        else:
            batch = int(p.get("inference_batch") or 1)
            what = " · ".join(
                filter(
                    None,
                    [
                        ", ".join(p.get("queues", [])),
                        p.get("device"),
                        # float32 goes without saying; an autocast precision does not
                        p.get("precision") if p.get("precision") != "float32" else None,
                        f"batches of up to {batch}" if batch > 1 else None,
                        # a container's limits, which its processes are sized to
                        f"CPU limit {p['cpu_quota']:g}" if p.get("cpu_quota") else None,
                        f"memory limit {p['memory_limit'] / 2**30:.1f} GiB"
                        if p.get("memory_limit")
                        else None,
                        # the zone an SR or SC is dated in where its image states none
                        f"dates in {p['time_zone']}" if p.get("time_zone") else None,
                    ],
                )
            )
        if p.get("role") == "worker" and p.get("trained") is False:
            what += " [yellow](UNTRAINED model)[/]"
        processes.add_row(
            p["role"],
            p["name"],
            "[green]yes[/]" if p["alive"] else "[red]no[/]",
            what,
            _ago(report.get("time"), p["seen"]),
        )
    parts.append(processes)

    if "instances" in report:
        counts = Table(title="instances and deliveries", expand=True)
        counts.add_column("instances")
        counts.add_column("n", justify="right")
        counts.add_column("deliveries")
        counts.add_column("n", justify="right")
        inst = list(report["instances"].items())
        deliv = list(report["deliveries"].items())
        for i in range(max(len(inst), len(deliv))):
            a = inst[i] if i < len(inst) else ("", "")
            b = deliv[i] if i < len(deliv) else ("", "")
            counts.add_row(a[0], str(a[1]), b[0], str(b[1]))
        parts.append(counts)
        hour = report["last_hour"]
        parts.append(
            f"last hour: {hour['assessed']} assessed, {hour['not_assessed']} not assessed"
            + (f", {hour['rejected']} rejected by the PACS" if hour.get("rejected") else "")
            + "; "
            f"processing p50 {_seconds(hour['processing_p50_s'])} "
            f"p95 {_seconds(hour['processing_p95_s'])}; "
            f"received→delivered p50 {_seconds(hour['delivered_p50_s'])} "
            f"p95 {_seconds(hour['delivered_p95_s'])}"
        )
    storage = report.get("storage")
    if storage:
        free, total = storage["free_bytes"], storage["total_bytes"]
        disk = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f}" if total else "unknown"
        kept = (
            f"kept {storage['retention_days']:g} days after delivery"
            if storage["retention_days"]
            else "kept for ever"
        )
        held = storage["spool_instances"]
        parts.append(
            f"storage: {disk}; {held} received image{'' if held == 1 else 's'} on disk "
            f"({_size(storage['spool_bytes'])}), {kept}"
        )
        unrecorded = storage.get("unrecorded_images", {})
        if unrecorded is None:
            parts.append(
                "received images that no instance records: not known (spool/.unrecorded "
                "cannot be read, or there is no spool): run status as the spool's owner, "
                "with the listener's BONEAGE_DATA_DIR"
            )
        elif unrecorded.get("images"):
            goes = (
                f"the first goes after {unrecorded['first_goes_after']} unless a row names it"
                if unrecorded["first_goes_after"]
                else "kept for ever (BONEAGE_RETENTION_DAYS is 0)"
            )
            parts.append(
                f"{unrecorded['images']} received image(s) that no instance records "
                f"({_size(unrecorded['bytes'])}, a row not committed or lost to a database "
                f"restore): {goes}"
            )
    if failed_deliveries := report.get("failed_deliveries"):
        parts.append(_failed_table(failed_deliveries))
        if len(failed_deliveries) > FAILED_SHOWN:
            parts.append(_failed_rest(failed_deliveries[FAILED_SHOWN:]))
    if (abandoned := report.get("abandoned_deliveries") or {}).get("count"):
        parts.append(_abandoned_line(abandoned))
    if report.get("recent_problems"):
        recent = Table(title="recent problems", expand=True)
        for col in ("when", "what", "state", "reason"):
            recent.add_column(col)
        for p in report["recent_problems"]:
            recent.add_row(p["at"] or "", p["what"], p["state"], p["reason"] or "")
        parts.append(recent)
    for problem in report["problems"]:
        parts.append(f"[red]•[/] {problem}")
    console.print(Panel(Group(*parts), title=title, border_style="green" if healthy else "red"))
