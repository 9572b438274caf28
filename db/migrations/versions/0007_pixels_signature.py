"""instances.pixels_signature

A 32 x 32 picture of the image an instance's last assessment gave the model. A copy
received again whose header changes nothing the result depends on is compared with it:
other pixels under the same SOP Instance UID (an image processed again, or another image
sent under that UID) are assessed again, where a copy transcoded is not.

Empty on rows from before this revision: a copy received again of those is compared by
its header alone, as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pixels_signature", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("pixels_signature")
