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
"""

from __future__ import annotations

import dataclasses

from pydicom.uid import generate_uid
from sqlalchemy import distinct, func, select

from db.engine import session_scope
from db.schema import Delivery, Heartbeat, Node
from dicom_io.uids import LEGACY_ROOT
from worker.heartbeat import alive


@dataclasses.dataclass(frozen=True)
class IdentityInUse:
    """What goes with the node's identity in its database."""

    #: the Device Observer UID that is the node's identity
    identity: str
    #: the images with objects of ours recorded whose UIDs were derived with it: all but
    #: those made under pydicom's root, before the identity went into UIDs
    images: int
    #: the processes of the node alive now (their heartbeats), by name
    processes: tuple[str, ...]
    #: the destinations objects of ours are recorded as sent (or on their way) to
    destinations: tuple[str, ...]


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
            select(func.count(distinct(Delivery.instance_id))).where(
                Delivery.sop_instance_uid.not_like(f"{LEGACY_ROOT}.%")
            )
        )
        processes = session.scalars(
            select(Heartbeat.name).where(alive(session)).order_by(Heartbeat.name)
        ).all()
        destinations = session.scalars(
            select(Delivery.destination).distinct().order_by(Delivery.destination)
        ).all()
    return IdentityInUse(identity, images or 0, tuple(processes), tuple(destinations))


def give_new_identity(database_url: str, *, replacing: str) -> str | None:
    """Give the node a new identity, made at random as revision 0010 made the first,
    where its identity is still ``replacing`` (what the administrator was shown); returns
    it, or None where the identity is another now (given a new one meanwhile: nothing
    changed)."""
    with session_scope(database_url) as session:
        node = session.scalar(select(Node).where(Node.id == 1).with_for_update())
        if node is None or node.device_observer_uid != replacing:
            return None
        node.device_observer_uid = str(generate_uid())
        return node.device_observer_uid
