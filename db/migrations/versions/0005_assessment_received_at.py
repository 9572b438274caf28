"""instances.assessment_received_at

When the copy that an instance's current assessment answers was received: a copy received
again that changed what the result depends on is assessed again, and its latency counts
from that copy, not from the instance's first reception (days before, perhaps).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assessment_received_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("assessment_received_at")
