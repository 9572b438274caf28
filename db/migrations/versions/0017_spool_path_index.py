"""index on instances.spool_path

Retention removes received images in the spool that no instance row names (a row the
listener could not commit), looking each up by its path while it holds the spool's
recording lock, which every C-STORE takes for its rename and commit: without an index each
lookup read the whole table, and every image arriving meanwhile waited for it.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 17:20:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_spool_path"), ["spool_path"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_spool_path"))
