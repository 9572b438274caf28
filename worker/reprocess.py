"""Re-assessing chosen instances, typically with a new model.

A result is unique per (instance, model), so re-running the model that already
assessed an instance changes nothing; a new model adds a second result beside the
first. Its SR and SC are new objects (their UIDs derive from the model id), in series
of their own: they are sent only when asked, so a model change does not silently flood
the PACS, and sent, they join the first model's, which stand (the command says so).
The choice to send is kept on the instance (``send_outputs``), so that a message the
reconciler queues again sends what the command asked, and no more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import or_, select, update

from db.engine import session_scope
from db.queries import UID_CLASH, database_now
from db.schema import (
    FINISHED,
    REASSESSABLE,
    Delivery,
    DeliveryState,
    Heartbeat,
    Instance,
    InstanceState,
    ObjectKind,
    Result,
)
from worker.heartbeat import alive
from worker.runtime import Runtime

logger = logging.getLogger(__name__)


def select_instances(
    rt: Runtime, *, study_uids: Sequence[str] = (), instance_ids: Sequence[int] = ()
) -> list[int]:
    """Ids of the instances in the given studies, plus the given instance ids.

    An instance is in a study it was first received in, or one it was received in
    since, which its outputs went to (a PACS that moved the image to another study)."""
    if not study_uids and not instance_ids:
        raise ValueError("choose studies (--study) or instances (--instance) to reprocess")
    moved_there = (
        select(Delivery.id)
        .where(Delivery.instance_id == Instance.id, Delivery.study_instance_uid.in_(study_uids))
        .exists()
    )
    with session_scope(rt.database_url) as session:
        query = select(Instance.id).where(
            or_(
                Instance.study_instance_uid.in_(study_uids),
                moved_there,
                Instance.id.in_(instance_ids),
            )
        )
        return list(session.scalars(query.order_by(Instance.id)))


#: An instance whose last copy was another image under its SOP Instance UID, refused
#: (worker.pipeline): the spool holds that image now, not the one its results are of.
_UID_CLASH = Instance.reason.contains(UID_CLASH, autoescape=True)
_NOT_A_UID_CLASH = or_(Instance.reason.is_(None), ~_UID_CLASH)


def prepare_reprocess(rt: Runtime, instance_ids: Sequence[int], *, send: bool = True) -> list[int]:
    """Put back in the queue state the instances the current model has not assessed,
    their outputs to be sent to the destinations or not (``send``, kept on the row:
    the reconciler queues an instance again with no word of it).

    Returns the ids to enqueue. Instances that already have a result from this model
    are left alone, and so are those whose received file retention removed
    (:func:`files_removed`): there is nothing left to assess. So are those not finished
    yet (received, queued, or being assessed now): their message is on its way, and an
    attempt under way keeps its claim.
    """
    model_id = rt.predictor.model_id
    with session_scope(rt.database_url) as session:
        # the database's clock, not this host's: the reconciler and the claims compare
        # queued_at with times the database dated (worker.messaging.mark_queued)
        stamp = database_now(session)
        done = set(
            session.scalars(
                select(Result.instance_id).where(
                    Result.model_id == model_id, Result.instance_id.in_(instance_ids)
                )
            )
        )
        todo = [i for i in instance_ids if i not in done]
        if todo:
            # Conditional on the file still being there: retention marks an instance
            # before it removes anything, so the two never both win.
            session.execute(
                update(Instance)
                .where(
                    Instance.id.in_(todo),
                    Instance.files_removed_at.is_(None),
                    # not one the PACS rejected (rejected_by_the_pacs)
                    Instance.state.in_(REASSESSABLE),
                    # nor one whose copy received again is still to be compared: its
                    # message opens the next assessment for it (worker.pipeline), where
                    # a reprocess would assess that copy as the last one and forget it
                    Instance.received_again_at.is_(None),
                    # nor one whose spool file another image replaced (uid_clashes)
                    _NOT_A_UID_CLASH,
                )
                .values(
                    state=InstanceState.QUEUED,
                    attempts=0,
                    reason=None,
                    claimed_by=None,
                    queued_at=stamp,
                    finished_at=None,
                    send_outputs=send,
                    # its latency counts from now, not from when the image came
                    assessment_received_at=stamp,
                )
                .execution_options(synchronize_session=False)
            )
            queued = set(
                session.scalars(
                    select(Instance.id).where(
                        Instance.id.in_(todo),
                        Instance.files_removed_at.is_(None),
                        Instance.queued_at == stamp,
                    )
                )
            )
            todo = [i for i in todo if i in queued]
    logger.info(
        "reprocess with model %s: %d to assess, %d already assessed by it",
        model_id[:12],
        len(todo),
        len(done),
    )
    return todo


def sent_by_other_models(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` whose bone age from another model than the current
    one was delivered: a result of this model sent joins it, in series of its own, and
    does not replace it."""
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Result.instance_id)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(
                    Result.instance_id.in_(instance_ids),
                    Result.model_id != rt.predictor.model_id,
                    Delivery.kind == ObjectKind.SR,
                    Delivery.state == DeliveryState.DELIVERED,
                )
                .distinct()
                .order_by(Result.instance_id)
            )
        )


def files_removed(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` the current model has not assessed and never can:
    retention removed their received images."""
    assessed = (
        select(Result.id)
        .where(Result.instance_id == Instance.id, Result.model_id == rt.predictor.model_id)
        .exists()
    )
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Instance.id)
                .where(
                    Instance.id.in_(instance_ids),
                    Instance.files_removed_at.is_not(None),
                    Instance.state != InstanceState.REJECTED,
                    ~assessed,
                )
                .order_by(Instance.id)
            )
        )


def uid_clashes(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` whose spool file another image sent under the same SOP
    Instance UID replaced, which :func:`prepare_reprocess` leaves alone: assessed, that
    image would be taken for theirs, filed in its study, and their results withdrawn."""
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Instance.id)
                .where(Instance.id.in_(instance_ids), _UID_CLASH)
                .order_by(Instance.id)
            )
        )


def rejected_by_the_pacs(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` that a rejection note of the PACS named, which are
    never assessed again: the PACS no longer shows them, and what we sent of them was
    withdrawn."""
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Instance.id)
                .where(Instance.id.in_(instance_ids), Instance.state == InstanceState.REJECTED)
                .order_by(Instance.id)
            )
        )


def not_finished(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` still on their way (received, queued, being assessed,
    or with a copy received again still to be compared), which
    :func:`prepare_reprocess` leaves alone."""
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Instance.id)
                .where(
                    Instance.id.in_(instance_ids),
                    Instance.state.not_in(FINISHED)
                    | (
                        (Instance.state != InstanceState.REJECTED)
                        & Instance.received_again_at.is_not(None)
                    ),
                )
                .order_by(Instance.id)
            )
        )


def models_of_live_workers(rt: Runtime) -> set[str]:
    """The model ids the inference workers alive now run (from their heartbeats, judged
    by the database's clock, which wrote them)."""
    with session_scope(rt.database_url) as session:
        beats = session.scalars(
            select(Heartbeat).where(Heartbeat.role == "worker", alive(session))
        ).all()
        return {str(b.detail["model_id"]) for b in beats if (b.detail or {}).get("model_id")}


def workers_problem(rt: Runtime) -> str | None:
    """Why the inference workers alive now would not assess with this model, if they
    would not: a worker assesses with the model it runs, whatever queued the message
    (one that already assessed an instance leaves it as it was)."""
    wanted = rt.predictor.model_id
    running = models_of_live_workers(rt)
    others = sorted(running - {wanted})
    if others:
        return (
            f"inference workers run model(s) {', '.join(m[:12] for m in others)}, not "
            f"{wanted[:12]}: restart them with BONEAGE_MODEL set to this checkpoint, then "
            "run reprocess again"
        )
    return None
