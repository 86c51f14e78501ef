"""DKIM signing keys (milterd), pending -> active -> retired.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dkim_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("selector", sa.String(63), nullable=False),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("activated_at", sa.DateTime(), nullable=True),
        sa.Column("retired_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dkim_keys"),
        sa.UniqueConstraint("domain", "selector", name="uq_dkim_keys_domain"),
    )
    op.create_index("ix_dkim_keys_domain", "dkim_keys", ["domain"])


def downgrade() -> None:
    op.drop_index("ix_dkim_keys_domain", table_name="dkim_keys")
    op.drop_table("dkim_keys")
