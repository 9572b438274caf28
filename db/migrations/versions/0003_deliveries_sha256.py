"""deliveries.sha256: the SHA-256 of the outbox file as it was written

A delivery checks it before sending, and sends the file as stored. Rows from before
this revision have none and are read back in full instead.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 20:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("sha256")
