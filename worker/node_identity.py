"""The node's identity, and a new one for a database copied from another node.

The node's identity is its Device Observer UID (table `node`, revision 0010): made at
random once, in its database, and shared so by every process of the node. It goes into
the UIDs of every object the node makes (dicom_io.uids, worker.pipeline.node_uids), so
that another node assessing the same image makes other objects under other UIDs.

A database copied from another node (a validation node set up from production's) has
that node's identity: the copy would make the other node's UIDs for every image, the
objects of both taken for one by a PACS that gets both. `boneage-worker db
new-identity` gives the copy one of its own (:func:`give_new_identity`), once every
process of the node has stopped (each keeps the identity it read at its start).

The copy holds that node's deliveries too: pending and failed ones it would send, or
send again (`retry-deliveries`), and delivered ones that a note of its own would
withdraw (the image rejected by its PACS, received again corrected, or moved). Those
are not the copy's: the command records where they end (``Node.copied_deliveries_up_to``,
revision 0020) and supersedes the unsent ones
(:data:`~worker.delivery.MADE_BEFORE_THE_COPY`) as it gives the identity, and the
pipeline withdraws only the objects of deliveries made since
(:func:`~db.queries.made_here`).
"""

from __future__ import annotations

import dataclasses

from pydicom.uid import generate_uid
from sqlalchemy import distinct, func, select, update

from db.engine import session_scope
from db.queries import made_here
from db.schema import Delivery, DeliveryState, Heartbeat, Node
from worker.delivery import MADE_BEFORE_THE_COPY
from worker.heartbeat import alive


@dataclasses.dataclass(frozen=True)
class IdentityInUse:
    """What goes with the node's identity in its database."""

    #: the Device Observer UID that is the node's identity
    identity: str
    #: the images with objects of ours recorded (:func:`~db.queries.made_here`): given a
    #: new identity, the node derives the UIDs of their later objects anew, in new
    #: series, those made under pydicom's root, before the identity went into UIDs,
    #: included (worker.pipeline.image_uids)
    images: int
    #: the processes of the node alive now (their heartbeats), by name
    processes: tuple[str, ...]
    #: the destinations objects of ours are recorded as sent (or on their way) to
    destinations: tuple[str, ...]
    #: the deliveries made under it (:func:`~db.queries.made_here`) that are pending,
    #: failed, and delivered: given a new identity, the node sends none of them, nor a
    #: note withdrawing one (:func:`give_new_identity`)
    pending: int = 0
    failed: int = 0
    delivered: int = 0


def identity_in_use(database_url: str) -> IdentityInUse:
    """The node's identity, and what goes with it, in the database at ``database_url``.

    Raises
    ------
    RuntimeError
        The database has no node row (it is older than revision 0010).
    """
    with session_scope(database_url) as session:
        identity = session.scalar(select(Node.device_observer_uid).where(Node.id == 1))
        if identity is None:
            raise RuntimeError("the database has no node row: run 'boneage-worker db upgrade'")
        images = session.scalar(
            select(func.count(distinct(Delivery.instance_id))).where(made_here())
        )
        processes = session.scalars(
            select(Heartbeat.name).where(alive(session)).order_by(Heartbeat.name)
        ).all()
        destinations = session.scalars(
            select(Delivery.destination).distinct().order_by(Delivery.destination)
        ).all()
        states: dict[DeliveryState, int] = {
            state: count
            for state, count in session.execute(
                select(Delivery.state, func.count()).where(made_here()).group_by(Delivery.state)
            )
        }
    return IdentityInUse(
        identity,
        images or 0,
        tuple(processes),
        tuple(destinations),
        pending=states.get(DeliveryState.PENDING, 0),
        failed=states.get(DeliveryState.FAILED, 0),
        delivered=states.get(DeliveryState.DELIVERED, 0),
    )


@dataclasses.dataclass(frozen=True)
class NewIdentity:
    """What :func:`give_new_identity` did."""

    #: the node's new Device Observer UID
    identity: str
    #: the highest delivery id the database held (``Node.copied_deliveries_up_to``): the
    #: deliveries up to it are the other node's
    copied_up_to: int
    #: of those, the pending and failed ones, superseded
    #: (:data:`~worker.delivery.MADE_BEFORE_THE_COPY`)
    superseded: int


def give_new_identity(database_url: str, *, replacing: str) -> NewIdentity | None:
    """Give the node a new identity, made at random as revision 0010 made the first,
    where its identity is still ``replacing`` (what the administrator was shown), and
    make the deliveries recorded so far the other node's: their highest id recorded
    (:func:`~db.queries.made_here`), their pending and failed ones superseded, never to
    be sent from here. One transaction: a node never has the new identity with the other node's
    deliveries still its own. Returns what it did, or None where the identity is
    another now (given a new one meanwhile: nothing changed).

    Every process of the node has stopped (the caller checked their heartbeats): no
    delivery is being made, so none made before this commits has a higher id, and none
    is being sent (a row being sent when the database was copied is superseded with
    the others; the other node records its outcome in its own database).
    """
    with session_scope(database_url) as session:
        node = session.scalar(select(Node).where(Node.id == 1).with_for_update())
        if node is None or node.device_observer_uid != replacing:
            return None
        node.device_observer_uid = str(generate_uid())
        copied_up_to = session.scalar(select(func.max(Delivery.id))) or 0
        node.copied_deliveries_up_to = copied_up_to
        superseded = session.scalars(
            update(Delivery)
            .where(
                Delivery.id <= copied_up_to,
                Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
            )
            .values(state=DeliveryState.SUPERSEDED, last_error=MADE_BEFORE_THE_COPY)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ).all()
        return NewIdentity(node.device_observer_uid, copied_up_to, len(superseded))
