"""instances.claim_shared, instances.alone

An inference process that runs several task threads (a batching worker) holds several
images at once. Where it died holding them, each one's attempt counted, although at most
one of them killed it: an image that kills its process each time it is assessed (a
decoder's crash, memory) ended every image held beside it in `error` after three deaths,
those images being queued again together and taken together again. Now a claim says
whether its process may hold others (``claim_shared``); the reconciler takes back such a
claim whose worker died without counting its attempt, and marks the image to be
assessed ``alone`` from then on: a process then holds no other image while it assesses
it, and a death then is that image's own, counted (worker.reconciler, worker.tasks,
worker.isolation).

False on every row that exists.

Downgraded, the columns go: the older release counts the attempt of every image a dead
process held.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claim_shared", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("alone", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("alone")
        batch_op.drop_column("claim_shared")
