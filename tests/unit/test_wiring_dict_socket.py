"""mailplugins.wiring.dict_socket: doctor's check that Dovecot's processes may open authd's dict socket."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from mailplugins.config import Config, parse_config
from mailplugins.wiring.dict_socket import check_dict_socket
from mailplugins.wiring.live import DovecotLive

DOVECOT_GID = grp.getgrnam("dovecot").gr_gid
LIVE = DovecotLive({"default_internal_group": "dovecot"}, (), ())


def config(dict_listen: str | None = "unix:/run/mailplugins/dict.sock:mode=660") -> Config:
    authd: dict[str, object] = {"http_listen": "tcp:9643:interface=127.0.0.1"}
    if dict_listen:
        authd["dict_listen"] = dict_listen
    return parse_config({"database": {"url": "sqlite://"}, "authd": authd})


def socket_stat(mode: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFSOCK | mode, 1, 1, 1, 0, gid, 0, 0, 0, 0))


def check(mode: int, gid: int, cfg: Config | None = None) -> list[str]:
    return [f"{f.problem} | {f.fix}" for f in check_dict_socket(
        cfg or config(), LIVE, stat_path=lambda _: socket_stat(mode, gid))]


def test_the_documented_socket_passes() -> None:
    """root:dovecot 0660, what mailplugins-authd-dict.socket makes."""
    assert check(0o660, DOVECOT_GID) == []
    assert check(0o770, DOVECOT_GID) == []


def test_a_socket_of_another_group_is_flagged() -> None:
    """authd made it itself (the demo's root:root 0660): last_login gets Permission denied."""
    [finding] = check(0o660, 0)
    assert finding.startswith("authd.dict_listen: /run/mailplugins/dict.sock is root:root 0660: "
                              "Dovecot's processes (group dovecot) may not connect")
    assert "chgrp dovecot /run/mailplugins/dict.sock && chmod 0660" in finding
    [finding] = check(0o600, DOVECOT_GID)  # the group may not write
    assert "may not connect" in finding


def test_a_socket_open_to_everyone_is_flagged() -> None:
    [finding] = check(0o666, DOVECOT_GID)
    assert "every local user may connect (it serves password hashes" in finding


def test_nothing_to_say_without_a_local_unix_dict_socket(tmp_path: Path) -> None:
    assert check_dict_socket(config(None), LIVE) == []
    assert check_dict_socket(config(f"unix:{tmp_path}/absent.sock"), LIVE) == []

    def denied(_: str) -> os.stat_result:
        raise PermissionError

    assert check_dict_socket(config(), LIVE, stat_path=denied) == []


def test_systemd_endpoints_are_checked_at_the_shipped_units_path() -> None:
    seen: list[str] = []

    def stat_path(path: str) -> os.stat_result:
        seen.append(path)
        return socket_stat(0o660, 0)

    cfg = config("systemd:domain=UNIX:name=dict")
    assert len(check_dict_socket(cfg, LIVE, stat_path=stat_path)) == 1
    assert seen == ["/run/mailplugins/dict.sock"]


def test_an_unknown_dovecot_group_is_named() -> None:
    live = DovecotLive({"default_internal_group": "no-such-group-here"}, (), ())
    [finding] = check_dict_socket(config(), live, stat_path=lambda _: socket_stat(0o660, 0))
    assert finding.problem == "default_internal_group no-such-group-here does not exist on this host"
