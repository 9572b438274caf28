"""indexes on deliveries.result_id, deliveries.delivered_at, instances.finished_at,
instances.received_again_at

- deliveries.result_id: a `reprocess` deletes the instance's results, and each deletion
  cascades to the deliveries naming it (ON DELETE CASCADE): without an index each one
  read the whole table (200 deletions took 23 s at 1.35 million deliveries on
  PostgreSQL), and on SQLite it held the write lock meanwhile, which the listener's
  C-STOREs wait on.
- instances.received_again_at: the reconciler looks for copies received again and
  never compared (``received_again_at < ...``) every round; nearly every row's is
  empty.
- instances.finished_at, deliveries.delivered_at: the metrics and `status` read the
  last hour's (``>= since``) and the latest (``max``) of each at every scrape.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07 13:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deliveries_result_id"), ["result_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_deliveries_delivered_at"), ["delivered_at"], unique=False
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instances_received_again_at"), ["received_again_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_instances_finished_at"), ["finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_finished_at"))
        batch_op.drop_index(batch_op.f("ix_instances_received_again_at"))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_delivered_at"))
        batch_op.drop_index(batch_op.f("ix_deliveries_result_id"))
