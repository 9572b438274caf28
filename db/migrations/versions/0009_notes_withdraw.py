"""deliveries.withdraws

The SOP Instance UID of the SR or SC of ours that a rejection note of ours (kind "ko")
withdraws. The note waits while that object's own send to the same destination is
under way, and is not sent where the object never arrived: a PACS that applies IOCM
refuses a note naming an instance it does not have.

Empty on other rows, and on notes made before this revision (those are sent as
before, without waiting).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("withdraws", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("withdraws")
