"""rejections

The instances a PACS rejected with an IOCM rejection note (a Key Object Selection
Document titled "Rejected for Quality Reasons", "Incorrect Modality Worklist Entry" ...):
an image rejected is not assessed, or has the bone age it was given withdrawn by a
rejection note of ours; one rejected before it arrives is not assessed when it comes.

Instances may now be in state "rejected", and deliveries of kind "ko" (both columns
are strings, so no other change is needed; a downgrade turns those back into what
revision 0007 knows).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 06:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("note_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejections")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_rejections_sop_instance_uid")),
    )


def downgrade() -> None:
    # What revision 0007's code cannot load: a rejected image becomes not assessed (its
    # reason still says the PACS rejected it), and our rejection notes' deliveries go
    # (that code cannot send them; their files stay in the outbox).
    op.execute("UPDATE instances SET state = 'not_assessed' WHERE state = 'rejected'")
    op.execute("DELETE FROM deliveries WHERE kind = 'ko'")
    op.drop_table("rejections")
