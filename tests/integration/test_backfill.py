"""`boneage-worker backfill` against a real Orthanc: C-FIND, then C-MOVE to our listener.

Orthanc runs the shipped configuration on free ports, with two changes a site makes
for a backfill: BONEAGE may query and retrieve (AllowFind, AllowMove), and the Lua
auto-forwarding is off, so that only the backfill sends images to the node. It holds
two hand studies on different dates and a chest study; `serve` (tiny model) sends its
results back to Orthanc. Another Orthanc holds rejection notes (IHE IOCM Key Object
Selection Documents) beside the images they reject, as a PACS that does not apply
IOCM keeps them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from db.engine import session_scope
from db.schema import FINISHED, Delivery, DeliveryState, Instance, InstanceState, Result
from dicom_io import qr
from dicom_io.qr import MoveOutcome, QueryError, SeriesMatch
from dicom_io.synthetic import make_radiograph_dataset
from models.phantoms import make_phantom
from tests.integration.test_end_to_end import Node, cli
from tests.integration.test_security import Certificates
from tests.orthanc import OrthancServer, require_orthanc
from tests.support import free_port, pacs_rejection_note, wait_for, wait_for_port
from worker.backfill import (
    BackfillPlan,
    is_candidate,
    plan_backfill,
    run_backfill,
    study_series_to_move,
)
from worker.settings import Destination

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BONEAGE_AE = "BONEAGE"
ORTHANC_AE = "ORTHANC"
IN_RANGE = dt.date(2026, 1, 10)
OUT_OF_RANGE = dt.date(2026, 3, 15)


class QueryableOrthanc(OrthancServer):
    """Orthanc that lets BONEAGE query and retrieve, and forwards nothing by itself."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["LuaScripts"] = []
        config["DicomModalities"]["BONEAGE"].update(AllowFind=True, AllowMove=True)
        return config


@dataclass
class Stack:
    orthanc: OrthancServer
    node: Node
    database_url: str
    studies: dict[str, str]  # "hand", "late hand", "chest" -> StudyInstanceUID
    orthanc_ids: dict[str, str]  # the same -> Orthanc's study id


def write_study(path: Path, *, study_date: dt.date, body_part: str, seed: int) -> str:
    """A phantom DX (not a patient) of a 110-month-old girl; returns its StudyInstanceUID."""
    phantom = make_phantom(110.0, male=False, size=256, rng=np.random.default_rng(seed))
    ds = make_radiograph_dataset(
        np.round(phantom.image * 4095).astype(np.uint16),
        modality="DX",
        sex="F",
        birth_date=study_date - dt.timedelta(days=round(110 * 30.4375)),
        study_date=study_date,
        body_part=body_part,
    )
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def node_env(folder: Path, port: int, orthanc: OrthancServer, checkpoint: Path) -> dict[str, str]:
    """The node's environment: listening on ``port``, accepting and answering Orthanc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(folder / "data"),
        BONEAGE_AE_TITLE=BONEAGE_AE,
        BONEAGE_PORT=str(port),
        BONEAGE_DESTINATIONS=orthanc.destination,
        BONEAGE_ALLOWED_AETS=f"{ORTHANC_AE}@127.0.0.1",
        BONEAGE_MODEL=str(checkpoint),
    )
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Stack]:
    require_orthanc()
    folder = tmp_path_factory.mktemp("backfill-stack")
    port = free_port()
    orthanc = QueryableOrthanc(
        folder / "orthanc", boneage=(BONEAGE_AE, "127.0.0.1", port), ae_title=ORTHANC_AE
    )
    env = node_env(folder, port, orthanc, tiny_checkpoint)
    node = Node(folder, env)
    try:
        orthanc.start()
        studies, ids = {}, {}
        for seed, (name, date, body_part) in enumerate(
            [
                ("hand", IN_RANGE, "HAND"),
                ("late hand", OUT_OF_RANGE, "HAND"),
                ("chest", IN_RANGE + dt.timedelta(days=2), "CHEST"),
            ]
        ):
            path = folder / f"{name.replace(' ', '-')}.dcm"
            studies[name] = write_study(path, study_date=date, body_part=body_part, seed=seed)
            ids[name] = orthanc.upload(path)["ParentStudy"]
        serve = node.start("serve", "serve")
        try:
            wait_for_port(port, timeout=120, process=serve)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_text()[-6000:]}") from None
        yield Stack(orthanc, node, f"sqlite:///{folder / 'data' / 'boneage.db'}", studies, ids)
    finally:
        node.stop()
        orthanc.stop()


def backfill(stack: Stack, *args: str) -> tuple[int, str]:
    result = cli(
        "backfill",
        "--from",
        stack.orthanc.destination,
        "--since",
        "2026-01-01",
        "--until",
        "2026-01-31",
        *args,
        env=stack.node.env,
    )
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def instances(database_url: str) -> list[Instance]:
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(Instance)))
        session.expunge_all()
        return rows


def test_dry_run_lists_without_moving(stack: Stack) -> None:
    before = len(instances(stack.database_url))
    code, output = backfill(stack, "--dry-run")
    assert code == 0, output
    assert "2 studies found, 1 series would be moved, 0 failures" in output
    assert "20260110" in output and "HAND" in output
    assert "CHEST" not in output and "20260315" not in output
    # C-MOVE is synchronous and the listener commits before it answers: nothing came.
    assert len(instances(stack.database_url)) == before


def test_backfill_moves_only_the_matching_study(stack: Stack) -> None:
    code, output = backfill(stack)
    assert code == 0, f"{output}\n{stack.node.log_text()[-4000:]}"
    assert re.search(
        r"studies found: 2, series matched: 1, series moved: 1 \(1 instances\)", output
    )
    assert "failures: 0" in output

    [row] = instances(stack.database_url)
    assert row.study_instance_uid == stack.studies["hand"]
    assert row.calling_ae_title == ORTHANC_AE

    def delivered() -> bool:
        with session_scope(stack.database_url) as session:
            states = [d.state for d in session.scalars(select(Delivery))]
        return len(states) == 2 and all(s is DeliveryState.DELIVERED for s in states)

    try:
        wait_for(delivered, timeout=240, what="the SR and SC delivered to Orthanc", interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.node.log_text()[-6000:]}") from None
    [row] = instances(stack.database_url)
    assert row.state is InstanceState.ASSESSED

    in_study = {
        stack.orthanc.tags(item["ID"])["SOPClassUID"]
        for item in stack.orthanc.study_instances(stack.orthanc_ids["hand"])
    }
    assert {ComprehensiveSRStorage, SecondaryCaptureImageStorage} <= in_study
    for other in ("late hand", "chest"):
        assert len(stack.orthanc.study_instances(stack.orthanc_ids[other])) == 1


class TLSQueryableOrthanc(QueryableOrthanc):
    """The same, serving and calling DICOM over TLS only, with certificates of a test CA."""

    def __init__(self, folder: Path, certificates: Certificates, **kwargs: Any) -> None:
        super().__init__(folder, **kwargs)
        self.certificates = certificates

    def config(self) -> dict[str, Any]:
        config = super().config()
        certificate, key = self.certificates.node  # names 127.0.0.1, as the node checks
        config.update(
            DicomTlsEnabled=True,
            DicomTlsCertificate=str(certificate),
            DicomTlsPrivateKey=str(key),
            DicomTlsTrustedCertificates=str(self.certificates.ca),
            DicomTlsRemoteCertificateRequired=True,
        )
        # its C-STOREs of a C-MOVE to BONEAGE go over TLS too
        config["DicomModalities"]["BONEAGE"]["UseDicomTls"] = True
        return config


def test_backfill_over_tls(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A PACS that speaks only TLS: query, move to our TLS listener, results back over TLS."""
    require_orthanc()
    certificates = Certificates(tmp_path / "pki")
    port = free_port()
    orthanc = TLSQueryableOrthanc(
        tmp_path / "orthanc",
        certificates,
        boneage=(BONEAGE_AE, "127.0.0.1", port),
        ae_title=ORTHANC_AE,
    )
    certificate, key = certificates.node
    env = node_env(tmp_path, port, orthanc, tiny_checkpoint)
    env.update(
        BONEAGE_TLS_CERTIFICATE=str(certificate),
        BONEAGE_TLS_PRIVATE_KEY=str(key),
        BONEAGE_TLS_CA_CERTIFICATES=str(certificates.ca),
        BONEAGE_TLS_REQUIRE_CLIENT_CERTIFICATE="true",
        BONEAGE_DESTINATIONS_TLS="true",
    )
    node = Node(tmp_path, env)
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    try:
        orthanc.start()
        hand = tmp_path / "hand.dcm"
        study = write_study(hand, study_date=IN_RANGE, body_part="HAND", seed=7)
        orthanc_study = orthanc.upload(hand)["ParentStudy"]
        serve = node.start("serve", "serve")
        wait_for_port(port, timeout=120, process=serve)
        arguments = ("--from", orthanc.destination, "--since", "2026-01-01")

        plain = cli("backfill", *arguments, "--no-tls", env=env)
        assert plain.returncode != 0  # the PACS refuses plain TCP
        assert "association with ORTHANC" in plain.stdout + plain.stderr

        moved = cli("backfill", *arguments, env=env)  # TLS, as BONEAGE_DESTINATIONS_TLS says
        output = " ".join((moved.stdout + moved.stderr).split())
        assert moved.returncode == 0, f"{output}\n{orthanc.log_tail()}"
        assert "series moved: 1 (1 instances)" in output

        def delivered() -> bool:
            with session_scope(database_url) as session:
                states = [d.state for d in session.scalars(select(Delivery))]
            return len(states) == 2 and all(s is DeliveryState.DELIVERED for s in states)

        try:
            wait_for(delivered, timeout=240, what="the SR and SC delivered over TLS")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_text()[-6000:]}") from None
        [row] = instances(database_url)
        assert row.study_instance_uid == study and row.state is InstanceState.ASSESSED
        in_study = {
            orthanc.tags(item["ID"])["SOPClassUID"]
            for item in orthanc.study_instances(orthanc_study)
        }
        assert {ComprehensiveSRStorage, SecondaryCaptureImageStorage} <= in_study
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.parametrize(
    ("modality", "body_part", "expected"),
    [
        ("DX", "HAND", True),
        ("CR", "", True),
        ("DX", "CHEST", False),
        ("CT", "HAND", False),
        # as the gate reads them: a side written in, a region the hand is part of
        ("DX", "L HAND", True),
        ("CR", "EXTREMITY", True),
        ("DX", "HAND\\WRIST", True),
        ("DX", "FINGER", False),
    ],
)
def test_series_selection(modality: str, body_part: str, expected: bool) -> None:
    series = SeriesMatch("1.2.3", "1.2.3.4", modality, body_part, 1)
    assert is_candidate(series, ["CR", "DX"]) is expected


def key_image_note(image: Dataset) -> Dataset:
    """A radiologist's key object selection titled (113004, DCM) "For Teaching": a KO in
    the study that rejects nothing."""
    note = pacs_rejection_note(image)
    [title] = note.ConceptNameCodeSequence
    title.CodeValue, title.CodeMeaning = "113004", "For Teaching"
    note.SeriesDescription = "Key images - For Teaching"
    return note


def test_a_rejected_image_is_not_assessed_after_backfill(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """After an outage of the auto-forwarding, an image and the PACS's rejection note
    naming it were both never forwarded: backfill moves the note before the image, so
    the image is recorded rejected and never assessed, nothing of ours filed in its
    study. A hand with a key image note "For Teaching" beside it is assessed as ever,
    and a note in a study with no hand to move is not moved."""
    require_orthanc()
    port = free_port()
    orthanc = QueryableOrthanc(
        tmp_path / "orthanc", boneage=(BONEAGE_AE, "127.0.0.1", port), ae_title=ORTHANC_AE
    )
    env = node_env(tmp_path, port, orthanc, tiny_checkpoint)
    node = Node(tmp_path, env)
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    try:
        orthanc.start()
        images: dict[str, Dataset] = {}
        orthanc_ids: dict[str, str] = {}
        for seed, (name, body_part, note_of) in enumerate(
            [
                ("rejected", "HAND", lambda ds: pacs_rejection_note(ds, "113001")),
                ("teaching", "HAND", key_image_note),
                ("chest", "CHEST", lambda ds: pacs_rejection_note(ds, "113001")),
            ]
        ):
            path = tmp_path / f"{name}.dcm"
            write_study(
                path, study_date=IN_RANGE + dt.timedelta(days=seed), body_part=body_part, seed=seed
            )
            images[name] = dcmread(path)
            orthanc_ids[name] = orthanc.upload(path)["ParentStudy"]
            note_of(images[name]).save_as(tmp_path / f"{name}-note.dcm", enforce_file_format=True)
            orthanc.upload(tmp_path / f"{name}-note.dcm")
        studies = {name: str(ds.StudyInstanceUID) for name, ds in images.items()}
        serve = node.start("serve", "serve")
        wait_for_port(port, timeout=120, process=serve)

        arguments = ("--from", orthanc.destination, "--since", "2026-01-01")
        moved = cli("backfill", *arguments, env=env)
        output = " ".join((moved.stdout + moved.stderr).split())
        assert moved.returncode == 0, f"{output}\n{node.log_text()[-4000:]}"

        hands = {str(images[name].SOPInstanceUID) for name in ("rejected", "teaching")}

        def settled() -> list[Instance] | None:
            """Both hands received, every instance finished, every delivery made."""
            rows = instances(database_url)
            if not hands <= {row.sop_instance_uid for row in rows}:
                return None
            if any(row.state not in FINISHED for row in rows):
                return None
            with session_scope(database_url) as session:
                states = [d.state for d in session.scalars(select(Delivery))]
            return rows if all(s is DeliveryState.DELIVERED for s in states) else None

        try:
            rows = wait_for(settled, timeout=240, what="the moved instances finished")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_text()[-6000:]}") from None
        by_study: dict[str, dict[str, Instance]] = {}
        for row in rows:
            by_study.setdefault(row.study_instance_uid, {})[row.modality or ""] = row
        rejected = by_study[studies["rejected"]]["DX"]
        assert rejected.state is InstanceState.REJECTED, rejected.reason
        assert rejected.reason == "rejected by the PACS: Rejected for Quality Reasons"
        assert set(by_study) == {studies["rejected"], studies["teaching"]}  # not the chest
        its_note = by_study[studies["rejected"]]["KO"]
        assert its_note.state is InstanceState.NOT_ASSESSED
        assert (its_note.reason or "").startswith(
            "a key object selection, rejection note 'Rejected for Quality Reasons': "
            "1 instance(s) rejected"
        ), its_note.reason

        assessed, key_images = (
            by_study[studies["teaching"]]["DX"],
            by_study[studies["teaching"]]["KO"],
        )
        assert assessed.state is InstanceState.ASSESSED
        assert key_images.state is InstanceState.NOT_ASSESSED
        assert key_images.reason == "a key object selection, not a rejection note"

        with session_scope(database_url) as session:
            results = {r.instance_id for r in session.scalars(select(Result))}
            delivered = {d.instance_id for d in session.scalars(select(Delivery))}
        assert results == delivered == {assessed.id}  # no bone age for the rejected image
        assert len(orthanc.study_instances(orthanc_ids["rejected"])) == 2  # image and note
        in_study = {
            orthanc.tags(item["ID"])["SOPClassUID"]
            for item in orthanc.study_instances(orthanc_ids["teaching"])
        }
        assert {ComprehensiveSRStorage, SecondaryCaptureImageStorage} <= in_study

        # the counts and the plan say what went: each study's notes, then its hand
        assert "studies found: 3, series matched: 4, series moved: 4 (4 instances)" in output
        assert "failures: 0" in output
        plan = plan_backfill(
            Destination.parse(orthanc.destination),
            calling_ae_title=BONEAGE_AE,
            since=IN_RANGE,
            until=IN_RANGE + dt.timedelta(days=2),
        )
        assert [(s.study_instance_uid, s.modality) for s in plan.series] == [
            (studies["rejected"], "KO"),
            (studies["rejected"], "DX"),
            (studies["teaching"], "KO"),
            (studies["teaching"], "DX"),
        ]
        dry = cli("backfill", *arguments, "--dry-run", env=env)
        output = " ".join((dry.stdout + dry.stderr).split())
        assert dry.returncode == 0, output
        assert "3 studies found, 4 series would be moved, 0 failures" in output
        assert output.count("KO") == 2, output  # the two notes listed, as the images are
    finally:
        node.stop()
        orthanc.stop()


def series(study: str, number: int, modality: str, body_part: str = "") -> SeriesMatch:
    return SeriesMatch(study, f"{study}.{number}", modality, body_part, 1)


@pytest.mark.parametrize(
    ("found", "moved"),
    [
        # the notes before the hands, whatever order the PACS lists them in
        ([("DX", "HAND"), ("KO", ""), ("SR", "")], ["KO", "DX"]),
        ([("CR", ""), ("KO", ""), ("KO", ""), ("DX", "CHEST")], ["KO", "KO", "CR"]),
        # a study with no hand to move needs none of its notes
        ([("DX", "CHEST"), ("KO", "")], []),
        ([("KO", "")], []),
    ],
)
def test_study_series_to_move(found: list[tuple[str, str]], moved: list[str]) -> None:
    listed = [series("1.2.3", n, modality, part) for n, (modality, part) in enumerate(found)]
    chosen = study_series_to_move(listed, ["CR", "DX"])
    assert [s.modality for s in chosen] == moved


def test_a_study_whose_notes_did_not_move_keeps_its_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PACS fails the move of one study's notes: that study's hand is not moved (one
    of its images may be rejected by a note that did not come), the other study's are."""
    plan = BackfillPlan(
        studies=[],
        series=[
            series("1.2.3", 1, "KO"),
            series("1.2.3", 2, "DX"),
            series("1.2.4", 1, "KO"),
            series("1.2.4", 2, "DX"),
        ],
    )
    asked: list[str] = []

    def move_series(study: str, uid: str, **_: Any) -> MoveOutcome:
        asked.append(uid)
        if uid == "1.2.3.1":
            raise QueryError("ORTHANC@127.0.0.1:1 failed the C-MOVE to BONEAGE: 0xA702")
        return MoveOutcome(status=0x0000, completed=1, failed=0, warning=0)

    monkeypatch.setattr(qr, "move_series", move_series)
    steps: list[str] = []
    report = run_backfill(
        Destination.parse("ORTHANC@127.0.0.1:1"),
        plan,
        calling_ae_title=BONEAGE_AE,
        move_destination=BONEAGE_AE,
        on_series=steps.append,
    )
    assert asked == ["1.2.3.1", "1.2.4.1", "1.2.4.2"]
    assert (report.series_matched, report.series_moved, report.instances_moved) == (4, 2, 2)
    assert len(report.failures) == 2 and "not all moved first" in report.failures[1]
    assert len(steps) == 4  # the progress counts every series, the one left too
