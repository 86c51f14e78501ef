"""authd: authentication failure counters shared by every host.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_failures",
        sa.Column("key", sa.String(340), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_auth_failures"),
    )
    op.create_index("ix_auth_failures_last_seen", "auth_failures", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_auth_failures_last_seen", table_name="auth_failures")
    op.drop_table("auth_failures")
