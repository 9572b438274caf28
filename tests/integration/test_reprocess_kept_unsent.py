"""`reprocess` as the administrator runs it: results a reprocess without --send kept
unsent are sent by one with --send (the image assessed again, sent this time, as a
reprocess with --send would have assessed it), once; and ids or study UIDs that match
nothing are named, not taken for nothing left to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import Result as BoneAge
from db.schema import utcnow as now
from dicom_io.sc import WITHDRAWN
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import another_model, spool_instance
from tests.integration.test_received_again import deliver, heat_map_of, report_of
from worker.cli import main as cli
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def reprocess(rt: Runtime, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Result, str]:
    """`boneage-worker reprocess --model … ARGS` on ``rt``'s node (its database, data
    directory, destinations and model); the result, and what it said on one line."""
    monkeypatch.setenv("BONEAGE_DESTINATIONS", ",".join(map(str, rt.settings.destinations)))
    done = CliRunner().invoke(
        cli,
        [
            "--data-dir",
            str(rt.settings.data_dir),
            "--database-url",
            rt.database_url,
            "reprocess",
            "--model",
            str(rt.settings.model),
            *args,
        ],
    )
    return done, " ".join(done.output.split())


def _of_model(rt: Runtime, instance_id: int) -> list[tuple[int, ObjectKind, str]]:
    """(result id, kind, SOP Instance UID) of each delivery of ``rt``'s model's results
    of the instance."""
    with session_scope(rt.database_url) as session:
        rows = session.execute(
            select(BoneAge.id, Delivery.kind, Delivery.sop_instance_uid)
            .join(Delivery, Delivery.result_id == BoneAge.id)
            .where(BoneAge.instance_id == instance_id, BoneAge.model_id == rt.predictor.model_id)
            .order_by(Delivery.id)
        ).all()
        return [(r, k, u) for r, k, u in rows]


def _results(rt: Runtime, instance_id: int) -> list[tuple[int, str]]:
    with session_scope(rt.database_url) as session:
        rows = session.scalars(
            select(BoneAge).where(BoneAge.instance_id == instance_id).order_by(BoneAge.id)
        )
        return [(r.assessment, r.model_id) for r in rows]


def test_results_kept_unsent_are_sent_once_by_a_reprocess_asked_to_send(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new model reprocessed without --send (to look at its results first), then with
    --send: its SR and SC reach the PACS, once, beside the first model's, as a reprocess
    with --send would have sent them. The second run used to find the image assessed by
    the model and queue nothing, and nothing could send those results afterwards. A
    third run does nothing."""
    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    new = another_model(runtime, tmp_path, 31)
    short = new.predictor.model_id[:12]

    quiet, said = reprocess(new, monkeypatch, "--instance", str(instance_id))
    assert quiet.exit_code == 0, quiet.output
    assert f"1 queued for model {short} (results kept, not sent: reprocess again" in said
    kept = assess_instance(new, instance_id, send=False)  # as the worker runs its message
    assert (kept.state, kept.delivery_ids) == ("assessed", ())
    [(assessment, _), (_, model)] = _results(runtime, instance_id)
    assert model == new.predictor.model_id

    again, said = reprocess(new, monkeypatch, "--instance", str(instance_id))
    assert again.exit_code == 0, again.output
    assert "0 queued" in said and "1 already assessed by it" in said
    assert (
        f"1 of those already assessed by it have their results kept, not sent (a reprocess "
        f"without --send, or no destination configured then): run reprocess again with "
        f"--send to assess them again and send them. Instance ids: {instance_id}"
    ) in said

    loud, said = reprocess(new, monkeypatch, "--instance", str(instance_id), "--send")
    assert loud.exit_code == 0, loud.output
    assert f"1 queued for model {short} (results will be sent)" in said
    assert "0 already assessed by it" in said
    assert (
        "1 of those queued were assessed by this model before with their results kept, not "
        f"sent (reprocess without --send): they are assessed again, and sent this time. "
        f"Instance ids: {instance_id}"
    ) in said
    sent = assess_instance(new, instance_id)
    assert sent.state == "assessed" and len(sent.delivery_ids) == 2
    objects = deliver(new, storescp, sent.delivery_ids)
    sr, sc = report_of(objects), heat_map_of(objects)
    # beside the first model's, in series of their own; nothing replaced or withdrawn
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)
    assert sr.SeriesInstanceUID != first_sr.SeriesInstanceUID
    assert sc.SeriesInstanceUID != first_sc.SeriesInstanceUID
    assert "PredecessorDocumentsSequence" not in sr
    assert WITHDRAWN not in str(sc.get("ImageComments", ""))
    # one result of the model for the assessment, whose objects went, each once
    assert _results(runtime, instance_id) == [
        (assessment, runtime.predictor.model_id),
        (assessment, new.predictor.model_id),
    ]
    [(result_sr, kind_sr, sr_uid), (result_sc, kind_sc, sc_uid)] = _of_model(new, instance_id)
    assert (kind_sr, kind_sc) == (ObjectKind.SR, ObjectKind.SC)
    assert result_sr == result_sc
    assert (sr_uid, sc_uid) == (sr.SOPInstanceUID, sc.SOPInstanceUID)
    received = [dcmread(p).SOPInstanceUID for p in storescp.received()]
    assert sorted(received) == sorted(
        [first_sr.SOPInstanceUID, first_sc.SOPInstanceUID, sr_uid, sc_uid]
    )

    third, said = reprocess(new, monkeypatch, "--instance", str(instance_id), "--send")
    assert third.exit_code == 0, third.output
    assert f"0 queued for model {short}" in said and "1 already assessed by it" in said
    assert "kept, not sent (a reprocess" not in said and "assessed again" not in said
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.ASSESSED
        deliveries = session.scalars(select(Delivery)).all()
    assert len(deliveries) == 4
    assert {d.state for d in deliveries} == {DeliveryState.DELIVERED}


def test_results_kept_unsent_whose_image_retention_removed_are_said_so(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention removed the received image since: nothing can assess it again to send
    its results, which the command says, with what to do; the results stay."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    new = another_model(runtime, tmp_path, 32)
    reprocess(new, monkeypatch, "--instance", str(instance_id))
    assert assess_instance(new, instance_id, send=False).delivery_ids == ()
    with session_scope(runtime.database_url) as session:
        session.get_one(Instance, instance_id).files_removed_at = now()

    loud, said = reprocess(new, monkeypatch, "--instance", str(instance_id), "--send")
    assert loud.exit_code == 0, loud.output
    assert "0 queued" in said and "0 already assessed by it" in said
    assert (
        f"1 instance(s) not queued: retention removed their received images "
        f"(BONEAGE_RETENTION_DAYS); send them again from the PACS, or backfill them. "
        f"Instance ids: {instance_id}"
    ) in said
    assert len(_results(runtime, instance_id)) == 2  # the unsent one stays


def test_ids_and_study_uids_that_match_nothing_are_named(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study UID mistyped, an instance id of another node: named, and where nothing
    at all matched the status is 1. It used to say "0 instances chosen" and succeed."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        study = session.get_one(Instance, instance_id).study_instance_uid
    mistyped, unknown = f"{study}9", instance_id + 1000

    nothing, said = reprocess(
        runtime, monkeypatch, "--study", mistyped, "--instance", str(unknown), "--send"
    )
    assert nothing.exit_code == 1, nothing.output
    assert (
        f"Error: nothing to reprocess: no image received here is in study {mistyped}; "
        f"no instance has id {unknown}"
    ) in said

    some, said = reprocess(
        runtime, monkeypatch, "--study", study, "--study", mistyped, "--instance", str(unknown)
    )
    assert some.exit_code == 0, some.output
    assert (
        f"Matched nothing: no image received here is in study {mistyped}; no instance has "
        f"id {unknown}."
    ) in said
    assert "1 instances chosen; 0 queued" in said and "1 already assessed by it" in said

    found, said = reprocess(runtime, monkeypatch, "--study", study)
    assert found.exit_code == 0, found.output
    assert "Matched nothing" not in said
