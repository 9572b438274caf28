"""Re-assessing chosen instances, typically with a new model.

A result is unique per (instance, model, assessment), so re-running the model that
already assessed an instance's current assessment changes nothing; a new model adds a
second result beside the first. Its SR and SC are new objects (their UIDs derive from
the model id), in series of their own: they are sent only when asked, so a model change
does not silently flood the PACS, and sent, they join the first model's, which stand
(the command says so). The choice to send is kept on the instance (``send_outputs``),
so that a message the reconciler queues again sends what the command asked, and no
more. A result kept unsent (a reprocess not asked to send) is sent by a reprocess asked
to: the instance is assessed again, as the first would have been with ``--send``
(:func:`prepare_reprocess`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.orm import aliased

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


def matched_nothing(
    rt: Runtime, *, study_uids: Sequence[str] = (), instance_ids: Sequence[int] = ()
) -> tuple[list[str], list[int]]:
    """The given study UIDs and instance ids that :func:`select_instances` finds no
    instance by (a UID mistyped, an id of another node): ``(study_uids, instance_ids)``,
    in the order given."""
    with session_scope(rt.database_url) as session:
        studies = set(
            session.scalars(
                select(Instance.study_instance_uid).where(
                    Instance.study_instance_uid.in_(study_uids)
                )
            )
        ) | set(
            session.scalars(
                select(Delivery.study_instance_uid).where(
                    Delivery.study_instance_uid.in_(study_uids)
                )
            )
        )
        ids = set(session.scalars(select(Instance.id).where(Instance.id.in_(instance_ids))))
    return (
        [uid for uid in dict.fromkeys(study_uids) if uid not in studies],
        [i for i in dict.fromkeys(instance_ids) if i not in ids],
    )


def _of_this_assessment(model_id: str) -> ColumnElement[bool]:
    """A result of ``model_id`` of its instance's current assessment (``Instance.assessment``):
    one of an earlier assessment (a copy received again opened another since) is not the
    assessment the instance stands at, and does not make it assessed by the model."""
    stands = aliased(Instance)  # its own FROM, whatever query this goes into
    return (Result.model_id == model_id) & (
        Result.assessment
        == select(stands.assessment)
        .where(stands.id == Result.instance_id)
        .correlate_except(stands)
        .scalar_subquery()
    )


def _never_sent() -> ColumnElement[bool]:
    """A result none of whose objects a delivery was made for: kept unsent by a
    reprocess not asked to send, or made with no destination configured."""
    return ~select(Delivery.id).where(Delivery.result_id == Result.id).exists()


def _sends(rt: Runtime, send: bool) -> bool:
    """Whether a reprocess asked to ``send`` sends anything (a destination configured):
    only then is a result kept unsent worth assessing again to send it."""
    return send and bool(rt.settings.destinations)


def kept_unsent(rt: Runtime, instance_ids: Sequence[int]) -> list[int]:
    """Ids among ``instance_ids`` whose current assessment the current model assessed
    with nothing sent (:func:`_never_sent`): a reprocess asked to send assesses them
    again, sent (:func:`prepare_reprocess`)."""
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Result.instance_id)
                .where(
                    Result.instance_id.in_(instance_ids),
                    _of_this_assessment(rt.predictor.model_id),
                    _never_sent(),
                )
                .distinct()
                .order_by(Result.instance_id)
            )
        )


#: An instance whose last copy was another image under its SOP Instance UID, refused
#: (worker.pipeline): the spool holds that image now, not the one its results are of.
_UID_CLASH = Instance.reason.contains(UID_CLASH, autoescape=True)
_NOT_A_UID_CLASH = or_(Instance.reason.is_(None), ~_UID_CLASH)


def prepare_reprocess(rt: Runtime, instance_ids: Sequence[int], *, send: bool = True) -> list[int]:
    """Put back in the queue state the instances the current model has not assessed,
    their outputs to be sent to the destinations or not (``send``, kept on the row:
    the reconciler queues an instance again with no word of it).

    Returns the ids to enqueue. Instances that already have a result from this model,
    of the assessment they stand at (a corrected copy received since opens another,
    which this model has not assessed), are left alone, unless ``send`` asks to send
    what a reprocess not asked to send kept unsent (:func:`kept_unsent`): that result is
    removed, never having gone anywhere, and the instance assessed again, sent, as a
    reprocess asked to send would have assessed it (its objects' UIDs are the same; what
    they replace and withdraw at the PACS is found as of now). Left alone too are those
    whose received file retention removed (:func:`files_removed`): there is nothing left
    to assess. So are those not finished yet (received, queued, or being assessed now):
    their message is on its way, and an attempt under way keeps its claim.
    """
    model_id = rt.predictor.model_id
    with session_scope(rt.database_url) as session:
        # the database's clock, not this host's: the reconciler and the claims compare
        # queued_at with times the database dated (worker.messaging.mark_queued)
        stamp = database_now(session)
        assessed = select(Result.instance_id).where(
            Result.instance_id.in_(instance_ids), _of_this_assessment(model_id)
        )
        done = set(session.scalars(assessed))
        unsent = set(session.scalars(assessed.where(_never_sent()))) if _sends(rt, send) else set()
        done -= unsent
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
            # A result kept unsent makes way for the one its assessment again sends (one
            # per instance, model and assessment), in the transaction that queued it: a
            # worker claims it once this commits. Never one a delivery was made for since.
            if again := [i for i in todo if i in unsent]:
                session.execute(
                    delete(Result)
                    .where(
                        Result.instance_id.in_(again),
                        _of_this_assessment(model_id),
                        _never_sent(),
                    )
                    .execution_options(synchronize_session=False)
                )
    logger.info(
        "reprocess with model %s: %d to assess (%d of them assessed by it, kept unsent, "
        "to be sent), %d already assessed by it",
        model_id[:12],
        len(todo),
        len([i for i in todo if i in unsent]),
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


def files_removed(rt: Runtime, instance_ids: Sequence[int], *, send: bool = False) -> list[int]:
    """Ids among ``instance_ids`` the current model has not assessed (in the assessment
    they stand at) and never can: retention removed their received images. With
    ``send``, those too whose result of this model was kept unsent (:func:`kept_unsent`),
    which :func:`prepare_reprocess` would assess again to send it."""
    assessed = (
        select(Result.id)
        .where(
            Result.instance_id == Instance.id,
            _of_this_assessment(rt.predictor.model_id),
            *([~_never_sent()] if _sends(rt, send) else []),
        )
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
