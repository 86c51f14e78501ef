# -*- test-case-name: tests.unit.test_wiring_dovecot -*-
"""Dovecot's master passdb for mailplugins' master users (migration 0004), 2.3 and 2.4.

A master user (``mailplugins user master ADDRESS on``) logs in as another mailbox with its own
password: PLAIN with an authorization id (``imapsync --authuser1``) or ``user*master`` with
``auth_master_user_separator``. Dovecot asks a passdb flagged ``master = yes`` only for such a
login, so the block is always written, before the ordinary passdb, and costs ordinary logins
nothing:

- dict (2.3): a second dict-auth file whose key is ``master/%s/%u``, which authd answers only
  for an enabled mailbox flagged master (and never for ``smtp`` unless ``master_user_smtp``),
  with ``pass = yes`` so that Dovecot then looks the mailbox logged into up in the ordinary
  passdb: without it a master login to a mailbox that does not exist (or is disabled, or denies
  the service) passes authentication and ends in "Internal login failure" at the userdb;
- Lua (2.3 and 2.4): the same script again with ``master = yes``; it sends Dovecot's login user
  as the authorization id and authd checks the master flag, the master's password and that the
  mailbox logged into exists, is enabled and allows the service.

No ``result_success = continue``: the script's ``auth_passdb_lookup`` knows no user.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

FILE_NAME = "mailplugins-dict-master.conf.ext"


def dict_master_text(socket_path: str) -> str:
    return "\n".join([
        "# Dovecot's master passdb (master = yes) answered by mailplugins authd: master users only.",
        "# No idle_msecs in the uri: Dovecot 2.3.19 auth workers panic with it.",
        f"uri = proxy:{socket_path}:auth",
        "key passdb {",
        "  key = master/%s/%u",
        "  format = json",
        "}",
        "passdb_objects = passdb",
    ]) + "\n"


def dict_master_path(config_directory: str) -> str:
    return os.path.join(config_directory, FILE_NAME)


def master_of(ordinary: Mapping[str, str], release: str) -> dict[str, str]:
    """The Lua master passdb: the ordinary one again, flagged master (2.4: named ``master``)."""
    block = {key: value for key, value in ordinary.items() if key != "name"}
    if release == "2.4":
        return {"name": "master", **block, "master": "yes"}
    return {**block, "master": "yes"}
