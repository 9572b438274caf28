"""instances.assessment and inputs_sha256, results and deliveries.assessment

A copy of a finished instance received again that changes what its result depends on
(a corrected sex or birth date) is assessed again: the instance counts its assessments
and keeps a digest of what the last one read, and when a copy came that is not yet compared
with it; each result and delivery records the
assessment it belongs to, and one result per (instance, model, assessment).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 18:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assessment", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.add_column(sa.Column("inputs_sha256", sa.String(64), nullable=True))
        batch_op.add_column(
            sa.Column("received_again_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assessment", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.drop_constraint("uq_results_instance_model", type_="unique")
        batch_op.create_unique_constraint(
            "uq_results_instance_model_assessment", ["instance_id", "model_id", "assessment"]
        )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assessment", sa.Integer(), nullable=False, server_default="1")
        )


def downgrade() -> None:
    # Results of later assessments go, and their deliveries with them: one result per
    # (instance, model) again. A superseded delivery goes too: the older code knows no
    # state that is never sent, and one made failed was sent by its `retry-deliveries`
    # (an SR a later assessment replaced, an object the PACS rejected, another node's).
    op.execute("DELETE FROM deliveries WHERE assessment > 1")
    op.execute("DELETE FROM results WHERE assessment > 1")
    op.execute("DELETE FROM deliveries WHERE state = 'superseded'")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("assessment")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_constraint("uq_results_instance_model_assessment", type_="unique")
        batch_op.create_unique_constraint("uq_results_instance_model", ["instance_id", "model_id"])
        batch_op.drop_column("assessment")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("received_again_at")
        batch_op.drop_column("inputs_sha256")
        batch_op.drop_column("assessment")
