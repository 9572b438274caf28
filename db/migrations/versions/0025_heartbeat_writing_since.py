"""heartbeats.writing_since

A worker is taken for dead, and its claims taken back, when its heartbeat is stale. A
database away for longer than that (a failover of a minute) left every heartbeat stale,
the living's too: the first reconciler round after it, before the workers wrote again,
took back every image in hand, said each worker had died, and marked a batching
worker's images to be assessed alone for good. Each process now records since when its
writes have gone on without a break (its first write, or the first after one failed or
came late); while no live process has written so for as long as a heartbeat takes to go
stale, no heartbeat says a worker died (worker.heartbeat.claim_holders).

Empty on every row that exists, and on those an older release writes: they vouch for
nothing until a process of this release has written for that long.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("writing_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.drop_column("writing_since")
