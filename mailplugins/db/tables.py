# -*- test-case-name: tests.unit.test_db_tables -*-
"""The whole schema: every table module imported, so ``metadata`` holds every table.

Alembic's ``env.py`` and the schema test compare against this; the daemons import only the
table modules they use.
"""

from __future__ import annotations

from mailplugins.db import auth_models, dkim_models, models, policy_models
from mailplugins.db.base import Base

#: Every table of mailplugins, for Alembic autogenerate and the schema test.
metadata = Base.metadata
MODULES = (models, policy_models, auth_models, dkim_models)
