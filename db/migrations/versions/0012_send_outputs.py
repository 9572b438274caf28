"""instances.send_outputs

Whether the outputs of the assessment queued or under way go to the destinations. A
`reprocess` not asked to send (its default) clears it; a copy received again that opens
a new assessment sets it back. Before this revision the choice travelled only in the
queued message, and a message the reconciler queued again (an attempt that failed, a
worker killed, a message waiting past the requeue time) sent the results all the same.

True on every row that exists: their assessments sent, or were sent, as asked then.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 11:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("send_outputs", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("send_outputs")
