"""attempts record when the backend accepted them

A job becomes SUBMITTED (and counts against its team's quota) before the backend is asked to run it; the attempt's
`handed_over_at` is set once the backend has accepted it. A replica that dies in between leaves a SUBMITTED job not
yet handed over, which the next pass hands over (submit is idempotent by job id).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 23:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("handed_over_at", sa.DateTime(timezone=True), nullable=True))
    # Attempts recorded before this version were recorded after the backend accepted them.
    op.execute("UPDATE attempts SET handed_over_at = started_at")


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("handed_over_at")
