"""authd: master users (a mailbox whose credentials may log in as any other mailbox).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A separate flag, off for every existing mailbox: nobody becomes a master user by upgrading.
    op.add_column(
        "mailboxes",
        sa.Column("master", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("mailboxes", "master")
