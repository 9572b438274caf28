"""instances.identity_sha256 of the Patient ID alone

Revision 0013 hashed five attributes (Patient's Name, Patient ID, Issuer of Patient ID,
its qualifiers, Other Patient IDs); the patient is now told by the Patient ID alone
(worker.pipeline.PATIENT_IDENTITY), since a PACS adds or reconciles the rest under the
same ID. A hash of the five never equals one of the ID, so every copy received again
would have been taken for another patient's, assessed again and its results withdrawn:
they are emptied, and each instance has its Patient ID compared from its next
assessment on, as one assessed before revision 0013.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.text("UPDATE instances SET identity_sha256 = NULL"))


def downgrade() -> None:
    pass  # the hashes of the five attributes cannot be made again; 0013's code compares
    # an instance without one from its next assessment on
