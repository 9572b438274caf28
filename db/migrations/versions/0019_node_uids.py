"""the node's identity in the UIDs of our objects

No schema changes. From this revision on, the UIDs of the SRs, SCs and notes we make are
derived with the node's identity (its Device Observer UID, `node`, revision 0010), under
`2.25` or BONEAGE_UID_ROOT (dicom_io.uids); before, they were derived under pydicom's
root from the image, the model and the assessment alone. An image keeps deriving its
UIDs the way its first object of ours recorded was made (worker.pipeline.image_uids), so
that a later assessment joins its series and a note withdraws its objects under the UIDs
the PACS has.

A release from before it does not know that: run beside this one against the same
database (a rolling upgrade, an image rolled back), it would assess again an image
whose objects are the node's and put what it makes under pydicom's root, in new series
beside the ones the PACS shows, and withdraw nothing under the UIDs the PACS has. This
revision is there so that it refuses to: that release's schema check
(db.engine.check_schema, at the start of `listen`, `work`, `reconcile` and the
administrator's commands, and in `status`) finds the database at a revision it has no
migration for and stops: "database schema is at 0019, newer than this version of
boneage-worker (which knows up to 0018)"; its `serve` and `db upgrade`, which migrate
first, stop on Alembic's "Can't locate revision identified by '0019'". A process of that
release started before the upgrade and still running is not stopped by it (the check is
made at start-up): stop them all before `db upgrade`, or at least before the new
release's workers start (the listener's unit and the Kubernetes init container run it as
the new release starts; see deploy/README.md).

Downgraded, nothing changes: the release before makes its new objects under pydicom's
root again, and an image whose objects are the node's gets its later ones under
pydicom's root, in new series (as above); roll back only where that is accepted.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nothing: the revision marks the change of how UIDs are derived (see above)
    pass


def downgrade() -> None:
    pass
