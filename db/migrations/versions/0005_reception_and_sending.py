"""instances.assessment_received_at, deliveries.sending_since

When the copy that an instance's current assessment answers was received: a copy received
again that changed what the result depends on is assessed again, and its latency counts
from that copy, not from the instance's first reception (days before, perhaps).

Since when a delivery is being sent, while it is: an object of an earlier assessment that
was on its way to the PACS when a later assessment superseded it may arrive there, and the
later SR names it among the reports it replaces.

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
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sending_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("sending_since")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("assessment_received_at")
