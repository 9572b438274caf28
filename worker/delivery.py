"""Delivery of our SR and SC objects, with retries whose state lives in the db.

A delivery is `pending` until the destination answers Success (or a warning,
which means it stored the object), `failed` once its attempts are spent. Nothing
is dropped silently: a failed delivery stays visible in `status` until
`boneage-worker retry-deliveries` sends it again.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState
from db.schema import utcnow as now
from dicom_io.scu import SendError, send_files
from worker.runtime import Runtime
from worker.settings import Destination
from worker.tls import client_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryOutcome:
    state: str  # "delivered", "retry", "failed", "skipped"
    retry_in: float | None = None
    error: str | None = None


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential back-off: base, 2·base, 4·base … capped."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


def deliver_one(rt: Runtime, delivery_id: int, *, force: bool = False) -> DeliveryOutcome:
    """Try to send one delivery now.

    Parameters
    ----------
    force
        Send even when the next attempt is not yet due (used by `retry-deliveries`).
    """
    settings = rt.settings
    with session_scope(rt.database_url) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return DeliveryOutcome("skipped", error="no such delivery")
        if delivery.state is not DeliveryState.PENDING:
            return DeliveryOutcome("skipped", error=f"already {delivery.state.value}")
        due = delivery.next_attempt_at
        if not force and due is not None and due > now() + timedelta(seconds=1):
            # A duplicate message (reconciler and retry both queued it): the other one sends.
            return DeliveryOutcome("skipped", error="not due yet")
        destination_text, path = delivery.destination, Path(delivery.path)
    try:
        destination = Destination.parse(destination_text)
    except ValueError as exc:
        return _record_failure(rt, delivery_id, str(exc), permanent=True)
    try:
        # Built per attempt: a renewed certificate is used without a restart.
        tls = client_context(settings)
    except (OSError, ssl.SSLError) as exc:
        # A configuration fault the administrator can fix: retried, never permanent.
        return _record_failure(rt, delivery_id, f"TLS settings unusable: {exc}")

    try:
        [outcome] = send_files(
            [path],
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=settings.ae_title,
            ssl_context=tls,
        )
    except FileNotFoundError:
        return _record_failure(rt, delivery_id, "the outbox file is missing", permanent=True)
    except (SendError, OSError, RuntimeError) as exc:
        return _record_failure(rt, delivery_id, str(exc))
    if not outcome.ok:
        return _record_failure(
            rt, delivery_id, f"{destination} answered status 0x{outcome.status:04X}"
        )

    with session_scope(rt.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(
                state=DeliveryState.DELIVERED,
                delivered_at=now(),
                attempts=Delivery.attempts + 1,
                last_error=None,
                next_attempt_at=None,
            )
        )
    logger.info("delivery %d sent to %s", delivery_id, destination.ae_title)
    return DeliveryOutcome("delivered")


def _record_failure(
    rt: Runtime, delivery_id: int, error: str, *, permanent: bool = False
) -> DeliveryOutcome:
    settings = rt.settings
    with session_scope(rt.database_url) as session:
        delivery = session.get_one(Delivery, delivery_id)
        delivery.attempts += 1
        delivery.last_error = error[:500]
        if permanent or delivery.attempts >= settings.delivery_max_attempts:
            delivery.state = DeliveryState.FAILED
            delivery.next_attempt_at = None
            logger.error(
                "delivery %d failed after %d attempts: %s", delivery_id, delivery.attempts, error
            )
            return DeliveryOutcome("failed", error=error)
        wait = backoff_seconds(
            delivery.attempts,
            settings.delivery_backoff_seconds,
            settings.delivery_backoff_max_seconds,
        )
        delivery.next_attempt_at = now() + timedelta(seconds=wait)
        attempts = delivery.attempts
    logger.warning(
        "delivery %d attempt %d failed (%s); next in %.0fs", delivery_id, attempts, error, wait
    )
    return DeliveryOutcome("retry", retry_in=wait, error=error)


def reset_failed(rt: Runtime, delivery_ids: list[int] | None = None) -> list[int]:
    """Put failed deliveries back to pending, due now; returns their ids."""
    from sqlalchemy import select

    with session_scope(rt.database_url) as session:
        query = select(Delivery).where(Delivery.state == DeliveryState.FAILED)
        if delivery_ids:
            query = query.where(Delivery.id.in_(delivery_ids))
        rows = list(session.scalars(query))
        for row in rows:
            row.state = DeliveryState.PENDING
            row.attempts = 0
            row.next_attempt_at = now()
        return [row.id for row in rows]
