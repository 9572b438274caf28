"""node.copied_deliveries_up_to

The highest delivery id the database held when `boneage-worker db new-identity` gave the
node the identity it has (worker.node_identity). A database copied from another node (a
validation node set up from production's) holds that node's deliveries: its pending and
failed ones the copy would send, or send again (`retry-deliveries`), and its delivered
ones, which a note of the copy's would withdraw (the image rejected by the PACS,
received again corrected, moved to another study). The deliveries up to this id are the
other node's: the command supersedes the unsent ones in the same transaction, and no
note of the copy's withdraws one (deliveries are numbered as they are made and never
removed, and the command runs while no process of the node runs).

Empty on every row that exists, as on a node never given a new identity: every delivery
is its own. A copy given its new identity before this revision keeps the other node's
deliveries as its own, as before.

A release from before this revision refuses the database at start-up (its schema check
finds a revision it has no migration for). Downgraded, the column is dropped: the
other node's deliveries superseded stay so, but a note of the older release's may
withdraw that node's delivered objects again.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.add_column(sa.Column("copied_deliveries_up_to", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_column("copied_deliveries_up_to")
