"""instances.identity_sha256

A SHA-256 of the patient identity the last assessment's copy carried (Patient's Name,
Patient ID, its issuer and the issuer's qualifiers, Other Patient IDs), salted with the
SOP Instance UID, never the values (worker.pipeline.identity_digest). A copy received
again under another identity (the PACS corrected the patient) is then assessed again:
its SR and SC carry the corrected identity, the earlier ones not yet sent never go, and
those a destination has are withdrawn. Before this revision only what the result depends
on was compared (instances.inputs_sha256), and the SR and SC made for the first identity
went out under it.

Empty on rows from before this revision: their identity is not compared, as before,
until their next assessment records it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("identity_sha256")
