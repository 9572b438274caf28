"""instances.identity_before_sha256

The patient (instances.identity_sha256) that the assessment before the one under way read,
where a copy received again under another patient opened it (worker.pipeline). Only the
attempt that opened it knew that patient: a retry of it (the task retrying a full disk, or
the reconciler after a fault) found the new patient recorded, and the SR and SC delivered
under the old one whose files retention had removed were neither withdrawn nor named for
withdrawal by hand. Emptied when the assessment finishes with its outputs.

Empty on every row that exists: a retry of an assessment under way at the upgrade does
what a retry did before this revision.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity_before_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("identity_before_sha256")
