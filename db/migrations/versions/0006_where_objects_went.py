"""deliveries.study_instance_uid, deliveries.series_instance_uid

The study and series an object was written into. An image received again in another
study (a PACS that merged or split studies, and sent it again) is assessed again, and
its new SR and SC go into that study, in series of their own: a series belongs to one
study. The SR that replaces an earlier one names it where it is, which the UIDs derived
from the image and the model no longer tell once the study changed.

Empty on rows from before this revision: their objects went into the study the image
was first received in, in the series derived from it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("series_instance_uid", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("series_instance_uid")
        batch_op.drop_column("study_instance_uid")
