# -*- test-case-name: tests.unit.test_wiring_dict_socket -*-
"""Whether Dovecot's processes may open authd's dict socket (a ``doctor`` check).

Two kinds of Dovecot process connect there: the auth process (2.3's dict passdb/userdb, as
``$default_internal_user``) and the IMAP/POP3 processes, whose ``last_login`` plugin records
each login. The mail processes run as the mail user (``mail_uid``, e.g. vmail), but Dovecot
gives them ``$default_internal_group`` (``dovecot``) as an extra group (2.3: ``service imap {
extra_groups = $default_internal_group }``; 2.4: ``service_extra_groups``), so one rule admits
every one of them: the socket belongs to that group and the group may read and write it
(``root:dovecot 0660``, what ``mailplugins-authd-dict.socket`` makes). A socket created by
authd itself belongs to authd's own group (``root:root`` in the demo), and every last_login
write then fails with "Permission denied"; a socket open to every local user (``0666``) hands
password hashes (2.3's dict passdb) and last-login writes to anyone.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable

from mailplugins.config import Config
from mailplugins.wiring.doctor import Finding
from mailplugins.wiring.endpoints import parse_endpoint
from mailplugins.wiring.live import DovecotLive

FIX = ("SocketGroup=dovecot and SocketMode=0660 (mailplugins-authd-dict.socket), or "
       "chgrp {group} {path} && chmod 0660 {path}")


def _owner(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def check_dict_socket(
    config: Config, live: DovecotLive, stat_path: Callable[[str], os.stat_result] = os.stat
) -> list[Finding]:
    """Findings about authd's dict socket on this host (nothing when there is none here)."""
    if config.authd is None or not config.authd.dict_listen:
        return []
    try:
        endpoint = parse_endpoint(config.authd.dict_listen[0])
    except ValueError:
        return []  # dovecot-config already refused it
    if endpoint.kind != "unix":
        return []
    path = endpoint.path
    try:
        found = stat_path(path)
    except FileNotFoundError:
        return []  # the daemons' probe says nothing answers there
    except PermissionError:
        return []  # not ours to judge without root
    group = live.settings.get("default_internal_group") or "dovecot"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return [Finding("dovecot", f"default_internal_group {group} does not exist on this host",
                        "install Dovecot's package (it creates the dovecot user and group)")]
    mode = stat.S_IMODE(found.st_mode)
    shown = f"{path} is {_owner(found.st_uid, found.st_gid)} {mode:04o}"
    fix = FIX.format(group=group, path=path)
    if mode & 0o006:
        return [Finding(
            "dovecot",
            f"authd.dict_listen: {shown}: every local user may connect (it serves password "
            "hashes to Dovecot 2.3's dict passdb and records logins)", fix)]
    if found.st_gid != gid or mode & 0o060 != 0o060:
        return [Finding(
            "dovecot",
            f"authd.dict_listen: {shown}: Dovecot's processes (group {group}) may not connect, "
            "so last_login (and Dovecot 2.3's dict passdb/userdb) fail with Permission denied",
            fix)]
    return []
