# -*- test-case-name: tests.unit.test_devrig -*-
"""The dev rig's own helpers (``devrig/``), the parts that need no Postfix or Dovecot."""

from __future__ import annotations

import stat

from devrig.instances import short_tempdir


def test_short_tempdir_is_short_and_traversable_by_the_mail_users() -> None:
    path = short_tempdir()
    try:
        # Room for a socket name under it (sun_path is 108 bytes with its NUL).
        assert len(str(path)) < 40
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    finally:
        path.rmdir()
