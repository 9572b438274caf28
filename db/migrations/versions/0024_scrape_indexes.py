"""indexes on instances (state, finished_at) and (files_removed_at, size_bytes)

The listener's metrics and `status` (every minute, in each container's health check)
read the last hour's assessed images and the images still on disk:

- ``state = 'assessed' AND finished_at >= since``: SQLite, which keeps no statistics
  here, took the index on state and read every assessed row from the table (59 ms at
  200 000 rows, growing with the history; 1.3 ms through an index reaching the hour).
  One index on both columns reaches the hour on either database. The one on state
  alone stays: PostgreSQL counts the rows by state from it alone (deduplicated, a
  sixth of the new one's size), where it would read the table without it.
- ``files_removed_at IS NULL``, summing ``size_bytes``: no index, so every row was read
  at every scrape. Retention leaves only its days' rows unremoved, and the index holds
  the sizes, so the sum reads the index alone.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07 19:40:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            "ix_instances_state_finished_at", ["state", "finished_at"], unique=False
        )
        batch_op.create_index(
            "ix_instances_files_removed_at_size", ["files_removed_at", "size_bytes"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_files_removed_at_size")
        batch_op.drop_index("ix_instances_state_finished_at")
