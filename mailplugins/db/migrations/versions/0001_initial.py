"""Initial schema: domains, mailboxes, aliases, sender grants, app passwords, settings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_domains"),
        sa.UniqueConstraint("name", name="uq_domains_name"),
    )
    op.create_table(
        "mailboxes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("local_part", sa.String(128), nullable=False),
        sa.Column("local_key", sa.String(128), nullable=False),
        sa.Column("password", sa.String(255), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("allow_smtp", sa.Boolean(), nullable=False),
        sa.Column("allow_imap", sa.Boolean(), nullable=False),
        sa.Column("allow_pop3", sa.Boolean(), nullable=False),
        sa.Column("allow_lmtp", sa.Boolean(), nullable=False),
        sa.Column("password_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_login_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_mailboxes_domain_id_domains", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_mailboxes"),
        sa.UniqueConstraint("domain_id", "local_key", name="uq_mailboxes_domain_id"),
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("local_part", sa.String(128), nullable=False),
        sa.Column("local_key", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_aliases_domain_id_domains", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_aliases"),
        sa.UniqueConstraint("domain_id", "local_key", name="uq_aliases_domain_id"),
    )
    op.create_table(
        "alias_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alias_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(320), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["alias_id"], ["aliases.id"], name="fk_alias_targets_alias_id_aliases", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_alias_targets"),
        sa.UniqueConstraint("alias_id", "target", name="uq_alias_targets_alias_id"),
    )
    op.create_table(
        "sender_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"], name="fk_sender_grants_mailbox_id_mailboxes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_sender_grants"),
        sa.UniqueConstraint("mailbox_id", "address_key", name="uq_sender_grants_mailbox_id"),
    )
    op.create_index("ix_sender_grants_address_key", "sender_grants", ["address_key"])
    op.create_table(
        "app_passwords",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password", sa.String(255), nullable=False),
        sa.Column("services", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"], name="fk_app_passwords_mailbox_id_mailboxes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_app_passwords"),
        sa.UniqueConstraint("mailbox_id", "name", name="uq_app_passwords_mailbox_id"),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_settings"),
    )


def downgrade() -> None:
    for table in ("settings", "app_passwords", "sender_grants", "alias_targets", "aliases",
                  "mailboxes", "domains"):
        op.drop_table(table)
