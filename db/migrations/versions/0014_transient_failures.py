"""instances.transient_failures

How many attempts at the assessment under way failed with trouble the assess task
retries itself, with its back-off (worker.pipeline.RETRIED_BY_THE_TASK: the file system,
the database away). Such an attempt spends none of worker.pipeline.MAX_ATTEMPTS: before
this revision every retry's claim counted, and three failures within a quarter of a
minute (the task's first retries come after 0-5 s and 0-10 s) ended an image in error for
good, so that half a minute of a full disk or a stalled NFS mount put every image in hand
in error. The instance now ends in error once the task's retries are spent
(worker.pipeline.TRANSIENT_RETRIES). Set back to 0 when the instance finishes.

0 on every row that exists.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("transient_failures", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("transient_failures")
