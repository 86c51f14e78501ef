# -*- test-case-name: tests.unit.test_db_tables -*-
"""The declarative base every table module shares, its constraint naming and column sizes.

Each table module (``models``, ``policy_models``, ``auth_models``, ``dkim_models``) imports
this one and nothing of the others; :mod:`mailplugins.db.tables` gathers them into the one
schema Alembic and the schema test compare.
"""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Length limits chosen to fit MariaDB's index key limit with utf8mb4.
DOMAIN_LEN = 255
LOCAL_LEN = 128
ADDRESS_LEN = 320
HASH_LEN = 255


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
