"""policyd state: rate-limit subjects, buckets and overrides; greylist triplets and clients.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_rate_subjects",
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(320), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("rule", "subject", name="pk_policy_rate_subjects"),
    )
    op.create_index("ix_policy_rate_subjects_last_seen", "policy_rate_subjects", ["last_seen"])
    op.create_table(
        "policy_rate_buckets",
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(320), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("messages", sa.BigInteger(), nullable=False),
        sa.Column("recipients", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("rule", "subject", "period", "bucket",
                                name="pk_policy_rate_buckets"),
    )
    op.create_index("ix_policy_rate_buckets_expires", "policy_rate_buckets", ["expires"])
    op.create_table(
        "policy_rate_overrides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(320), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("messages", sa.BigInteger(), nullable=True),
        sa.Column("recipients", sa.BigInteger(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_policy_rate_overrides"),
        sa.UniqueConstraint("rule", "subject", "period", name="uq_policy_rate_overrides_rule"),
    )
    op.create_table(
        "policy_greylist",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_policy_greylist"),
    )
    op.create_index("ix_policy_greylist_last_seen", "policy_greylist", ["last_seen"])
    op.create_table(
        "policy_greylist_clients",
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("last_counted", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("address", name="pk_policy_greylist_clients"),
    )
    op.create_index("ix_policy_greylist_clients_last_seen", "policy_greylist_clients",
                    ["last_seen"])


def downgrade() -> None:
    for table in ("policy_greylist_clients", "policy_greylist", "policy_rate_overrides",
                  "policy_rate_buckets", "policy_rate_subjects"):
        op.drop_table(table)
