"""C-FIND and C-MOVE against a real pynetdicom Query/Retrieve SCP over loopback: an
interrupted move and an interrupted backfill, a PACS that goes away mid-listing or
mid-run, and the final statuses that count what was sent.

The PACS is pynetdicom's Move SCP, told per series what to do: send sub-operations to a
pynetdicom Storage SCP standing for our listener, refuse, stop partway, or hold a move
until the test lets it go on. Nothing waits on time: each step waits on an event.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_CANCEL_RQ
from pynetdicom.pdu_primitives import A_RELEASE

from dicom_io import qr
from tests.integration.test_stalled_destinations import our_association_threads
from tests.support import wait_for
from worker.backfill import (
    MAX_UNREACHED,
    BackfillInterrupted,
    BackfillPlan,
    plan_backfill,
    run_backfill,
)
from worker.settings import Destination

pytestmark = pytest.mark.integration

OUR_AE = "BONEAGE"
SOP_CLASSES = (SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage)
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: The longest any step waits for another (a bound on a failure, never a delay).
WAIT = 10.0
#: ``python -c`` running ``boneage-worker`` with the arguments after it, SIGINT raising
#: KeyboardInterrupt whatever its parent left it (ignored, in a background job).
TAKING_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'boneage-worker'; runpy.run_module('worker', run_name='__main__')"
)

MoveHandler = Callable[[evt.Event, int], Iterator[Any]]


def instance(series_instance_uid: str, sop_class: str = SecondaryCaptureImageStorage) -> Dataset:
    """A data set with identifiers only (no patient): enough for a C-STORE sub-operation."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class Listener:
    """A pynetdicom Storage SCP standing for our listener, the move destination: it
    answers 0xB000 (a warning) to the instances of ``warn_series``, 0x0000 to others."""

    def __init__(self, warn_series: frozenset[str] = frozenset()) -> None:
        self.warn_series = warn_series
        ae = AE(ae_title=OUR_AE)
        for sop_class in SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None
        self._server = server

    def _on_store(self, event: evt.Event) -> int:
        return 0xB000 if event.dataset.SeriesInstanceUID in self.warn_series else 0x0000

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()


class MovePACS:
    """A pynetdicom Query/Retrieve (Find and Move) SCP: ``handlers`` says, by
    SeriesInstanceUID, what it does with a C-MOVE (a pynetdicom EVT_C_MOVE handler, given
    the listener's port); it records the series asked for and whether a C-CANCEL came.

    Its C-FIND answers the studies of ``handlers`` at STUDY level, in their order, and a
    study's series, each one DX HAND instance, at SERIES level; but it fails with
    0xC000 the SERIES-level query of a study in ``refuse_series_of``.
    """

    def __init__(
        self,
        listener: Listener,
        handlers: dict[str, MoveHandler],
        *,
        refuse_series_of: frozenset[str] = frozenset(),
    ) -> None:
        self.asked: list[str] = []
        self.series_asked: list[str] = []  # the studies whose series were asked for
        self.cancelled = threading.Event()
        self.releasing = threading.Event()  # an A-RELEASE-RQ came
        self.hold_releases = False  # its answer waits until the test ends
        self._let_go = threading.Event()
        self._listener = listener
        self._handlers = handlers
        self._refuse_series_of = refuse_series_of
        ae = AE(ae_title="PACS")
        ae.add_supported_context(qr.StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(qr.StudyRootQueryRetrieveInformationModelFind)
        for sop_class in SOP_CLASSES:
            ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_MOVE, self._on_move),
                (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_DIMSE_RECV, self._on_message),
                (evt.EVT_ACSE_RECV, self._on_acse),
            ],
        )
        assert server is not None
        self._server = server
        self._stopped = False

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        uid = str(event.identifier.SeriesInstanceUID)
        self.asked.append(uid)
        if str(event.move_destination).strip() != OUR_AE:
            yield from refuse(event, self._listener.port)
            return
        yield from self._handlers[uid](event, self._listener.port)

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        studies: dict[str, list[str]] = {}
        for uid in self._handlers:
            studies.setdefault(uid.rsplit(".", 1)[0], []).append(uid)
        if query.QueryRetrieveLevel == "STUDY":
            for study in studies:
                match = Dataset()
                match.QueryRetrieveLevel = "STUDY"
                match.StudyInstanceUID = study
                match.StudyDate = "20260110"
                match.ModalitiesInStudy = "DX"
                yield (0xFF00, match)
            return
        study = str(query.StudyInstanceUID)
        self.series_asked.append(study)
        if study in self._refuse_series_of:
            yield (0xC000, None)
            return
        for uid in studies.get(study, []):
            match = Dataset()
            match.QueryRetrieveLevel = "SERIES"
            match.StudyInstanceUID = study
            match.SeriesInstanceUID = uid
            match.Modality = "DX"
            match.BodyPartExamined = "HAND"
            match.NumberOfSeriesRelatedInstances = "1"
            yield (0xFF00, match)

    def _on_acse(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]  # EVT_ACSE_RECV's
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            self.releasing.set()
            if self.hold_releases:
                self._let_go.wait(WAIT)

    def _on_message(self, event: evt.Event) -> None:
        if isinstance(event.message, C_CANCEL_RQ):
            self.cancelled.set()

    @property
    def destination(self) -> Destination:
        return Destination.parse(f"PACS@127.0.0.1:{self._server.server_address[1]}")

    def stop(self) -> None:
        """Stop listening: from now on nothing answers on its port."""
        self._let_go.set()
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()


def send(count: int, *, then: int | None = None) -> MoveHandler:
    """Send ``count`` instances of the series asked for, then end with ``then`` (a
    failure status) or let pynetdicom end it (0x0000, or 0xB000 after a warning)."""

    def handler(event: evt.Event, port: int) -> Iterator[Any]:
        uid = str(event.identifier.SeriesInstanceUID)
        yield ("127.0.0.1", port)
        yield count + (then is not None)
        for _ in range(count):
            yield (0xFF00, instance(uid))
        if then is not None:
            yield (then, None)

    return handler


def one_of_three_sent(
    event: evt.Event, port: int, stalled: threading.Event
) -> Generator[Any, None, str]:
    """The start of a move handler: one of the series' three instances sent, then
    ``stalled`` set; the series' UID returned, for the handler to go on."""
    uid = str(event.identifier.SeriesInstanceUID)
    yield ("127.0.0.1", port)
    yield 3
    yield (0xFF00, instance(uid))
    stalled.set()
    return uid


def refuse(event: evt.Event, port: int) -> Iterator[Any]:
    """An unknown move destination: pynetdicom answers 0xA801."""
    yield (None, None)


def series(study: str, number: int, modality: str = "DX") -> qr.SeriesMatch:
    return qr.SeriesMatch(study, f"{study}.{number}", modality, "HAND", 1)


@contextlib.contextmanager
def ctrl_c_once(ready: Callable[[], bool]) -> Iterator[list[float]]:
    """Ctrl-C, a KeyboardInterrupt in the main thread, once ``ready()`` holds (at most
    :data:`WAIT` seconds on); yields a list the time of the press is put in."""
    pressed: list[float] = []

    def ctrl_c(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def press() -> None:
        with contextlib.suppress(AssertionError):
            wait_for(ready, timeout=WAIT, what="the moment to press Ctrl-C", interval=0.01)
            pressed.append(time.monotonic())
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, ctrl_c)
    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        yield pressed
    finally:
        presser.join(WAIT)
        signal.signal(signal.SIGUSR1, previous)


def stopping_after(pacs: MovePACS, steps: int) -> tuple[list[str], Callable[[str], None]]:
    """A progress step that stops ``pacs`` once it has been called ``steps`` times, and
    the tags it was called with."""
    called: list[str] = []

    def step(tag: str) -> None:
        called.append(tag)
        if len(called) == steps:
            pacs.stop()

    return called, step


@pytest.fixture
def listener() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.stop()


def test_an_interrupted_move_is_cancelled_and_left_at_once(listener: Listener) -> None:
    """Ctrl-C while the PACS is still sending: the PACS gets a C-CANCEL and move_series
    returns (raising KeyboardInterrupt) while the PACS still holds the move; a release
    would have waited for the PACS to finish or for the ACSE timeout."""
    stalled = threading.Event()  # the PACS sent one instance and holds the rest
    returned = threading.Event()  # move_series has returned
    held: list[bool] = []  # whether the PACS still held the move when it returned
    resumed = threading.Event()

    def slow(event: evt.Event, port: int) -> Iterator[Any]:
        uid = yield from one_of_three_sent(event, port, stalled)
        held.append(returned.wait(WAIT))
        resumed.set()
        if event.is_cancelled:
            yield (0xFE00, None)
            return
        yield (0xFF00, instance(uid))
        yield (0xFF00, instance(uid))

    pacs = MovePACS(listener, {"1.2.3.1": slow})
    try:
        peer = pacs.destination
        with ctrl_c_once(stalled.is_set), pytest.raises(KeyboardInterrupt):
            qr.move_series(
                "1.2.3",
                "1.2.3.1",
                ae_title=peer.ae_title,
                host=peer.host,
                port=peer.port,
                calling_ae_title=OUR_AE,
                move_destination=OUR_AE,
                timeout=3 * WAIT,
            )
        returned.set()
    finally:
        returned.set()
        pacs.stop()
    assert resumed.wait(WAIT)
    assert held == [True], "move_series waited for the PACS to finish the move"
    assert pacs.cancelled.wait(WAIT), "the PACS got no C-CANCEL"


def test_a_run_stops_once_the_pacs_is_gone(listener: Listener) -> None:
    """The PACS refuses three series (it answered: the run goes on), moves the fourth,
    then goes away: after MAX_UNREACHED series with no association the run stops,
    the two series left counted not tried."""
    plan = BackfillPlan(studies=[], series=[series(f"1.2.{n}", 1) for n in range(1, 10)])
    handlers: dict[str, MoveHandler] = {s.series_instance_uid: refuse for s in plan.series[:3]}
    handlers[plan.series[3].series_instance_uid] = send(1)
    pacs = MovePACS(listener, handlers)
    steps, step = stopping_after(pacs, 4)
    try:
        report = run_backfill(
            pacs.destination,
            plan,
            calling_ae_title=OUR_AE,
            move_destination=OUR_AE,
            on_series=step,
        )
    finally:
        pacs.stop()
    assert MAX_UNREACHED == 3
    assert len(steps) == 4 + MAX_UNREACHED, "series tried after the PACS had gone"
    assert pacs.asked == [s.series_instance_uid for s in plan.series[:4]]
    assert (report.series_moved, report.instances_moved, report.series_not_tried) == (1, 1, 2)
    assert len(report.failures) == 3 + MAX_UNREACHED + 1
    assert all("0xA801" in f for f in report.failures[:3])
    assert "stopped" in report.failures[-1] and "2 series not tried" in report.failures[-1]


def test_warnings_only_is_a_move_and_a_move_failed_partway_counts_what_came() -> None:
    """A final 0xB000 with no failed sub-operation (warnings only) moved the series: the
    study's notes came, so its hand series is moved too; a final 0xA702 after two
    instances were sent counts those two."""
    notes, hand, other = series("1.2.3", 1, "KO"), series("1.2.3", 2), series("1.2.4", 1)
    listener = Listener(warn_series=frozenset({notes.series_instance_uid}))
    pacs = MovePACS(
        listener,
        {
            notes.series_instance_uid: send(1),
            hand.series_instance_uid: send(1),
            other.series_instance_uid: send(2, then=0xA702),
        },
    )
    try:
        report = run_backfill(
            pacs.destination,
            BackfillPlan(studies=[], series=[notes, hand, other]),
            calling_ae_title=OUR_AE,
            move_destination=OUR_AE,
        )
    finally:
        pacs.stop()
        listener.stop()
    assert pacs.asked == [
        notes.series_instance_uid,
        hand.series_instance_uid,
        other.series_instance_uid,
    ]
    assert report.series_moved == 2
    assert report.instances_moved == 1 + 1 + 2
    assert report.instances_with_warnings == 1
    assert len(report.failures) == 1 and "0xA702 (2 sent, 1 failed)" in report.failures[0]


def test_a_warning_status_that_gives_no_failed_count_is_not_taken_for_all_sent() -> None:
    """0xB000 is "sub-operations complete, one or more failures or warnings": with no
    Number of Failed Sub-operations it may have failed them all (a rejection note's
    series then held back its study's images, as any failure does; found in the second
    review), where a count of 0 says warnings only."""
    assert qr.MoveOutcome(0xB000, completed=2, failed=0, warning=1).ok
    assert not qr.MoveOutcome(0xB000, completed=0, failed=0, warning=0, failed_given=False).ok
    assert not qr.MoveOutcome(0xB000, completed=1, failed=1, warning=0).ok
    assert qr.MoveOutcome(0x0000, completed=3, failed=0, warning=0, failed_given=False).ok


def test_a_listing_stops_once_the_pacs_is_gone(listener: Listener) -> None:
    """The PACS fails the series queries of three studies (it answered: the listing goes
    on), lists the fourth's, then goes away: after MAX_UNREACHED studies with no
    association the listing stops, the three studies left counted not listed, and the
    plan keeps the series listed before."""
    studies = [f"1.2.{n}" for n in range(11, 21)]
    pacs = MovePACS(
        listener, {f"{s}.1": send(1) for s in studies}, refuse_series_of=frozenset(studies[:3])
    )
    steps, step = stopping_after(pacs, 4)
    try:
        plan = plan_backfill(
            pacs.destination,
            calling_ae_title=OUR_AE,
            since=dt.date(2026, 1, 1),
            modalities=("DX",),
            on_study=step,
        )
    finally:
        pacs.stop()
    assert len(plan.studies) == 10
    assert len(steps) == 4 + MAX_UNREACHED, "studies listed after the PACS had gone"
    assert pacs.series_asked == studies[:4]
    assert [s.series_instance_uid for s in plan.series] == ["1.2.14.1"]
    assert plan.studies_not_tried == 3
    assert len(plan.failures) == 3 + MAX_UNREACHED + 1
    assert all("0xC000" in f for f in plan.failures[:3])
    assert "stopped" in plan.failures[-1] and "3 studies not tried" in plan.failures[-1]


def test_ctrl_c_during_a_backfill_cancels_the_move_and_says_what_was_moved(
    tmp_path: Path, listener: Listener
) -> None:
    """`boneage-worker backfill`, interrupted (SIGINT) while the PACS sends the second
    of three series: the PACS gets a C-CANCEL, and the command prints what was moved
    before, the series left, and exits with 130."""
    stalled = threading.Event()  # the PACS sent one instance of the second series

    def slow(event: evt.Event, port: int) -> Iterator[Any]:
        yield from one_of_three_sent(event, port, stalled)
        pacs.cancelled.wait(WAIT)
        yield (0xFE00, None)

    pacs = MovePACS(listener, {"1.2.11.1": send(1), "1.2.12.1": slow, "1.2.13.1": send(1)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(BONEAGE_DATA_DIR=str(tmp_path / "data"), BONEAGE_AE_TITLE=OUR_AE)
    peer = pacs.destination
    # Ctrl-C as at a terminal, though the tests may run in the background, where a
    # shell without job control starts its children with SIGINT ignored
    command = [sys.executable, "-c", TAKING_CTRL_C, "backfill", "--since", "2026-01-01"]
    command += ["--modality", "DX", "--from", f"{peer.ae_title}@{peer.host}:{peer.port}"]
    backfill = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert stalled.wait(3 * WAIT), "the second series was never asked for"
        backfill.send_signal(signal.SIGINT)
        output, log = backfill.communicate(timeout=3 * WAIT)
    finally:
        if backfill.poll() is None:
            backfill.kill()
            backfill.communicate()
        pacs.stop()
    said = " ".join(output.split())  # what the command printed, the log apart
    assert backfill.returncode == 130, f"{said}\n{log}"
    assert pacs.cancelled.is_set(), "the PACS got no C-CANCEL"
    assert pacs.asked == ["1.2.11.1", "1.2.12.1"]
    assert (
        "interrupted: studies found: 3, series matched: 3, series moved: 1 (1 instances), "
        "series not tried: 2, failures: 1" in said
    ), said
    assert "interrupted: 2 series not moved, the one under way among them" in said


class SilentPACS:
    """A port where no PACS answers, in one of two ways: it takes the connection and
    never answers the association (``taken``), or its queue of connections is full, so
    that a connect waits, its SYNs dropped, as with a host gone quiet (``full``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.server = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = int(self.server.getsockname()[1])
        self._clients: list[socket.socket] = []
        self._taken: list[socket.socket] = []
        self.connecting_before = 0
        if how == "full":  # connect until one waits: the queue is full
            while self._connecting() == 0:
                client = socket.socket()
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", self.port))
                self._clients.append(client)
                wait_for(lambda: self._settled(), timeout=WAIT, what="a connect settled")
            self.connecting_before = self._connecting()
        else:
            threading.Thread(target=self._take, daemon=True).start()

    def _take(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            connection, _ = self.server.accept()
            self._taken.append(connection)

    def _states(self) -> list[str]:
        """The states of the TCP sockets connecting to the port (/proc/net/tcp)."""
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return [r.split()[3] for r in rows if r.split()[2].endswith(f":{self.port:04X}")]

    def _connecting(self) -> int:
        return self._states().count("02")  # SYN_SENT

    def _settled(self) -> bool:
        return len(self._states()) >= len(self._clients)

    def reached(self) -> bool:
        """Whether our association's connection has reached the PACS, as far as it can."""
        if self.how == "full":
            return self._connecting() > self.connecting_before
        return bool(self._taken)

    def close(self) -> None:
        for connection in (*self._clients, *self._taken):
            connection.close()
        self.server.close()


@pytest.mark.parametrize("how", ["taken", "full"])
def test_an_association_interrupted_before_the_pacs_answered_is_left_at_once(how: str) -> None:
    """Ctrl-C while the PACS has not answered the association, its connection taken or
    still being made: no connection thread of ours is left behind, and the interrupt
    comes at once. The thread is no daemon: the process would have waited for it, after
    the command's summary, until the ACSE timeout (10 minutes for a move), and a
    connect under way held the abort for the connect's 30 s."""
    pacs = SilentPACS(how)
    before = set(threading.enumerate())
    try:
        with ctrl_c_once(pacs.reached) as pressed, pytest.raises(KeyboardInterrupt):
            qr.move_series(
                "1.2.3",
                "1.2.3.1",
                ae_title="PACS",
                host="127.0.0.1",
                port=pacs.port,
                calling_ae_title=OUR_AE,
                move_destination=OUR_AE,
                timeout=600,
            )
        took = time.monotonic() - pressed[0]
        left = our_association_threads(before)
    finally:
        pacs.close()
    assert left == [], "a connection thread was left to wait out its timeout"
    assert took < WAIT / 2, f"the interrupt came {took:.1f} s after Ctrl-C"


def test_a_move_answered_then_interrupted_in_its_release_counts_what_it_sent(
    listener: Listener,
) -> None:
    """Ctrl-C once the PACS had answered the move, while it held its answer to the
    release: the series is counted moved, with its instances, and the series after it
    not tried (before, it was counted not moved, its instances left out)."""
    plan = BackfillPlan(studies=[], series=[series("1.2.3", 1), series("1.2.4", 1)])
    pacs = MovePACS(listener, {s.series_instance_uid: send(2) for s in plan.series})
    pacs.hold_releases = True
    try:
        with (
            ctrl_c_once(pacs.releasing.is_set),
            pytest.raises(BackfillInterrupted) as interrupted,
        ):
            run_backfill(pacs.destination, plan, calling_ae_title=OUR_AE, move_destination=OUR_AE)
    finally:
        pacs.stop()
    report = interrupted.value.report
    assert pacs.asked == ["1.2.3.1"]
    assert (report.series_moved, report.instances_moved, report.series_not_tried) == (1, 2, 1)
    assert report.failures == [
        "interrupted: 1 series not moved: run the backfill again to move them"
    ]
