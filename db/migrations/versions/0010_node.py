"""node

One row: what every process of this node shares, whatever host or container runs it.
For now the Device Observer UID our SRs name the node by (TID 1004): made here, at
random, once; before this revision it was derived from the AE title and the host name,
so each container or GPU host of one node wrote a device of its own, and a new one at
every redeployment.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:00:00.000000
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from pydicom.uid import generate_uid

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    node = op.create_table(
        "node",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_observer_uid", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node")),
    )
    op.bulk_insert(
        node,
        [{"id": 1, "device_observer_uid": str(generate_uid()), "created_at": datetime.now(UTC)}],
    )


def downgrade() -> None:
    op.drop_table("node")
