"""instances.last_received_again_at

When a copy of the instance was last received again. Unlike ``received_again_at``,
which the worker empties once it has compared the copy with what it assessed, it stays:
retention keeps the files ``BONEAGE_RETENTION_DAYS`` from the later of this and
``finished_at``, so a copy sent again unchanged (a backfill, a PACS forwarding the study
again), even after retention removed the first, is kept as long as a new image is.

Empty on instances received once. On rows from before this revision it is the time of
a copy still waiting to be compared; a copy compared before it left no time behind,
and is kept from when the instance finished, as before.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_received_again_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(
        "UPDATE instances SET last_received_again_at = received_again_at "
        "WHERE received_again_at IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("last_received_again_at")
