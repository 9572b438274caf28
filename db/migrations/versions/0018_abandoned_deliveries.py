"""deliveries.state 'abandoned'

A failed delivery the administrator gives up on purpose (`abandon-deliveries`) becomes
`abandoned`. The state column is a string, checked by no constraint: the schema is as
it was. The revision is there for a rollback: a release
from before it, run against a database that holds an abandoned delivery, passed its
schema check and then failed on the row (an unknown state: `status`, the health check
and /metrics broke). Downgraded, an abandoned delivery is failed again, its error, which
says who gave it up, when and why, kept: that release shows it among the failed ones.
Upgraded again, such a row is abandoned again.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 21:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 'abandoned' fits the state column (a string of 16 characters, no constraint): no
    # column changes. A delivery this revision's downgrade made failed again is
    # abandoned again: it is failed, and its error still begins with the abandoned
    # note (worker.delivery.abandoned_note: "abandoned by ..."). One the older code sent
    # again since (retry-deliveries) is pending, delivered, or failed with another
    # error, and is left as it is; a fresh database has no row.
    op.execute(
        "UPDATE deliveries SET state = 'abandoned' "
        "WHERE state = 'failed' AND substr(last_error, 1, 13) = 'abandoned by '"
    )


def downgrade() -> None:
    # failed: a state the older code knows, which `retry-deliveries` sends again or
    # `status` shows, the error kept
    op.execute("UPDATE deliveries SET state = 'failed' WHERE state = 'abandoned'")
