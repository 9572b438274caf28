"""rejections.study_instance_uid, rejections.series_instance_uid

Where the rejection note names each instance it rejects: only an image of ours in that
study is rejected (db.queries.rejects). A note rejecting another image under the same
SOP Instance UID, in another study (a modality that reuses UIDs), is recorded and left:
before, it rejected our image, withdrew its SR and SC, and, titled "Data Retention
Policy Expired", had retention remove its files; an image received after such a note
was never assessed. The unique key is now the instance and the study: a note naming
the UID in a study is recorded even where one of another study was first.

Empty on every row that exists: those reject whatever image has the UID, as before.

Downgraded, the columns go, and of the rows of one SOP Instance UID the first recorded
is kept (the key is the UID again): the older release rejects by the UID alone again,
an image received later under a UID a note of another study named included.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("series_instance_uid", sa.String(length=64), nullable=True))
        batch_op.drop_constraint("uq_rejections_sop_instance_uid", type_="unique")
        batch_op.create_unique_constraint(
            "uq_rejections_instance_study", ["sop_instance_uid", "study_instance_uid"]
        )


def downgrade() -> None:
    op.execute(
        "DELETE FROM rejections WHERE id NOT IN "
        "(SELECT min(id) FROM rejections GROUP BY sop_instance_uid)"
    )
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.drop_constraint("uq_rejections_instance_study", type_="unique")
        batch_op.create_unique_constraint("uq_rejections_sop_instance_uid", ["sop_instance_uid"])
        batch_op.drop_column("series_instance_uid")
        batch_op.drop_column("study_instance_uid")
