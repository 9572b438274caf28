"""Typed SQLAlchemy 2.0 schema: what was received, what was found, what was sent.

Exactly-once is enforced here, by unique constraints, not by locks: one instance
row per SOP Instance UID, one result per (instance, model), one delivery per
(output SOP Instance UID, destination). A redelivered task that loses the race meets
an ``IntegrityError`` and stops.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class InstanceState(enum.StrEnum):
    RECEIVED = "received"  # durable on disk and in the db; not yet handed to the broker
    QUEUED = "queued"  # an assess message was published
    PROCESSING = "processing"  # a worker picked it up
    ASSESSED = "assessed"  # a result exists
    NOT_ASSESSED = "not_assessed"  # accepted from the PACS but outside what we can assess
    ERROR = "error"  # processing failed in a way a retry will not fix; reason says why
    # the PACS rejected it (an IOCM rejection note): not assessed, or its bone age withdrawn
    REJECTED = "rejected"


#: The states an instance's processing ends in (until a copy received again reopens it,
#: which it never does for a rejected one).
FINISHED = (
    InstanceState.ASSESSED,
    InstanceState.NOT_ASSESSED,
    InstanceState.ERROR,
    InstanceState.REJECTED,
)
#: The finished states a copy received again, or `reprocess`, may assess again.
REASSESSABLE = (InstanceState.ASSESSED, InstanceState.NOT_ASSESSED, InstanceState.ERROR)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # attempts exhausted; `retry-deliveries` sends again
    # not sent, and never to be: a later assessment of its image replaced it
    SUPERSEDED = "superseded"
    # failed, and given up on purpose by the administrator (`abandon-deliveries`): never
    # sent again; its last_error says who, when and why (a string column: revision 0018
    # changes nothing, and its downgrade makes it failed again, a state older code knows)
    ABANDONED = "abandoned"


class ObjectKind(enum.StrEnum):
    SR = "sr"
    SC = "sc"
    # a rejection note (Key Object Selection) that withdraws our SR and SC of an image
    # the PACS rejected
    KO = "ko"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Instance(Base):
    """One received DICOM instance (no patient identifiers are kept here)."""

    __tablename__ = "instances"
    __table_args__ = (
        # the last hour's of a state (the metrics, `status`)
        Index("ix_instances_state_finished_at", "state", "finished_at"),
        # the images still on disk and their bytes, read from the index alone
        Index("ix_instances_files_removed_at_size", "files_removed_at", "size_bytes"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    # indexed: retention looks files in the spool up by it, under the listener's
    # recording lock (revision 0017)
    spool_path: Mapped[str] = mapped_column(Text, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # heartbeat name of the worker
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    # indexed, as received_again_at, delivered_at and deliveries.result_id: the metrics
    # and `status` read the last hour's, the reconciler the copies not compared (0021)
    finished_at: Mapped[datetime | None] = mapped_column(index=True)
    # retention (BONEAGE_RETENTION_DAYS) removed the spool file and the outputs' files
    files_removed_at: Mapped[datetime | None]
    # 1, and one more each time a copy received again changed what the assessment reads
    # from the header (the patient's sex, a date ...): it is then assessed again
    assessment: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # when a copy was received again that has not yet been compared with what the last
    # assessment read (worker.pipeline); the reconciler queues it again if its message
    # was lost
    received_again_at: Mapped[datetime | None] = mapped_column(index=True)
    # when a copy was last received again, kept after the comparison: retention keeps
    # the files from the later of this and finished_at (empty on instances received
    # once, and where the copies came before revision 0011 and were compared then)
    last_received_again_at: Mapped[datetime | None]
    # when the copy that the current assessment answers was received: empty for the first
    # assessment (received_at); a later one's latency counts from the copy received again
    assessment_received_at: Mapped[datetime | None]
    # whether the outputs of the assessment queued or under way go to the destinations:
    # false for one a `reprocess` not asked to send queued (whoever queues its message
    # again, the reconciler included); a copy received again that opens a new
    # assessment sets it back
    send_outputs: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # hex SHA-256 of what the last assessment's result depends on, as it read them
    # (worker.pipeline.assessment_inputs), "unread" where it could not read the file;
    # empty on rows from before revision 0004
    inputs_sha256: Mapped[str | None] = mapped_column(String(64))
    # a 32 x 32 picture of the image the last assessment gave the model
    # (worker.pipeline.image_signature), to tell a copy received again with other pixels
    # under the same UIDs; empty where it read no pixels, and on rows from before
    # revision 0007
    pixels_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    # hex SHA-256 of the patient identity (name, ID, its issuer, other IDs) of the copy
    # the last assessment read, salted with the SOP Instance UID, never the values
    # (worker.pipeline.identity_digest); empty on rows from before revision 0013
    identity_sha256: Mapped[str | None] = mapped_column(String(64))
    # identity_sha256 as the assessment before the one under way read it, set where a
    # copy received again opened this one (worker.pipeline): whichever attempt finishes
    # it, a retry too, withdraws what went under that patient. Emptied when an
    # assessment that withdrew or named them finishes; kept by one in error, or one that
    # sent nothing (a reprocess without --send): a reprocess of it, or the next
    # assessment, still has that patient's outputs to withdraw (revision 0016)
    identity_before_sha256: Mapped[str | None] = mapped_column(String(64))
    # attempts at the assessment under way that failed with trouble the assess task
    # retries with its back-off (worker.pipeline.RETRIED_BY_THE_TASK): they spend none of
    # `attempts`; 0 once the instance finishes (revision 0014)
    transient_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # whether the process of the claim under way may hold other images beside it (a
    # batching worker's task threads): where it dies, the reconciler counts none of the
    # images' attempts, and has each assessed `alone` (revision 0023)
    claim_shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # a process that held it died holding others too: it is assessed with no other image
    # in its process from then on, so that a death counts against the image that died
    # (worker.tasks; revision 0023)
    alone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    results: Mapped[list[Result]] = relationship(back_populates="instance")


class Model(Base):
    """A model that produced results; id is the SHA-256 of its checkpoint."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(32))
    input_size: Mapped[int] = mapped_column(Integer)
    trained: Mapped[bool] = mapped_column(Boolean)
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    first_used_at: Mapped[datetime] = mapped_column(default=utcnow)


class Result(Base):
    """A bone-age estimate for one assessment of one instance by one model.

    An instance assessed again, because a copy received again changed its patient's
    sex or dates, keeps the results of its earlier assessments.
    """

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint(
            "instance_id", "model_id", "assessment", name="uq_results_instance_model_assessment"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    assessment: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    bone_age_months: Mapped[float] = mapped_column(Float)
    chronological_age_months: Mapped[float | None] = mapped_column(Float)
    sds: Mapped[float | None] = mapped_column(Float)
    intervals: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    male: Mapped[bool] = mapped_column(Boolean)
    laterality: Mapped[str | None] = mapped_column(String(1))
    inference_seconds: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    """One DICOM object to send to one destination, with its retry state.

    ``result_id`` is empty for the SR that reports an image as not assessed.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_deliveries_object_dest"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    # indexed: deleting a result (a reprocess) cascades to its deliveries (0021)
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("results.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[ObjectKind] = mapped_column(_enum(ObjectKind))
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # the study and series the object was written into (empty on rows from before
    # revision 0006: the instance's first study, the series derived from it)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # the instance's assessment whose object this is (Instance.assessment)
    assessment: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    path: Mapped[str] = mapped_column(Text)
    # hex SHA-256 of the file at `path` as written; checked before each send (empty on
    # rows from before revision 0003: those files are read back in full instead)
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    # since when a delivery worker has been sending it; empty once the send's outcome is
    # recorded (a worker that died sending leaves it until the next claim), except where
    # that outcome is unknown (sent, its answer never came): the object may be there
    sending_since: Mapped[datetime | None]
    # a rejection note of ours: the SOP Instance UID of our object it withdraws, whose
    # own delivery to the same destination decides whether and when it goes (empty on
    # other rows, and on notes from before revision 0009)
    withdraws: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(index=True)

    result: Mapped[Result | None] = relationship(back_populates="deliveries")


class Rejection(Base):
    """An instance a PACS rejected with an IOCM rejection note (dicom_io.ko): one of
    ours, an image (which is then never assessed, or has its bone age withdrawn), or an
    instance not received yet, which is then not assessed when it comes. One row per
    instance and study the note names it in: only an image of ours in that study is
    rejected (db.queries.rejects), not another image under the same SOP Instance UID."""

    __tablename__ = "rejections"
    __table_args__ = (
        UniqueConstraint(
            "sop_instance_uid", "study_instance_uid", name="uq_rejections_instance_study"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # the study and series the note names it in (revision 0022); empty on rows recorded
    # before, which reject whatever image has the SOP Instance UID, as they did then
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # the note's title, a code of dicom_io.ko.REJECTION_TITLES (113001 ...)
    code: Mapped[str] = mapped_column(String(16))
    note_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Node(Base):
    """This node, one row (id 1): what every process of it shares, whatever host or
    container runs it."""

    __tablename__ = "node"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # the Device Observer UID our SRs name the node by (TID 1004), made at random once
    device_observer_uid: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the highest delivery id when `db new-identity` gave the node the identity it has
    # (revision 0020): the deliveries up to it are the node's the database was copied
    # from, never this one's to send or withdraw; empty on a node never given one
    copied_deliveries_up_to: Mapped[int | None] = mapped_column(Integer)


class Heartbeat(Base):
    """Liveness of the listener and workers, written periodically by each process."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # since when its writes have gone on without a break (worker.heartbeat.claim_holders):
    # its first, or the first after one failed or came more than STALE_AFTER after the
    # one before; None where an older release wrote the row
    writing_since: Mapped[datetime | None] = mapped_column()
