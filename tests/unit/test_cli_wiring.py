"""The wiring commands (mailplugins.cli.wiring): postfix-config, dovecot-config, as an operator runs them."""

from __future__ import annotations

from typing import Any


def _cli(tmp_path: Any, *args: str, authd: bool = True) -> tuple[int, str, str]:
    import io

    import yaml

    from mailplugins.cli import main

    config = tmp_path / "mailplugins.yaml"
    data: dict[str, Any] = {
        "database": {"url": f"sqlite:///{tmp_path}/mail.db"},
        "mail": {"location": "/var/vmail/%d/%n/Maildir", "uid": 5000, "gid": 5000},
        "deliver": {"listen": "systemd:domain=UNIX:name=lmtp"},
    }
    if authd:
        data["authd"] = {"sasl_listen": "systemd:domain=UNIX:name=sasl",
                         "dict_listen": "systemd:domain=UNIX:name=dict"}
    config.write_text(yaml.safe_dump(data))
    out, err = io.StringIO(), io.StringIO()
    status = main(["--config", str(config), *args], io.StringIO(""), out, err)
    return status, out.getvalue(), err.getvalue()


def test_dovecot_config_command_for_another_release(tmp_path: Any) -> None:
    status, out, err = _cli(tmp_path, "dovecot-config", "--dovecot-version", "2.4")
    # The test config has no http_listen: 2.4 needs it, said in one line, exit 2.
    assert (status, out) == (2, "")
    assert err == ("mailplugins: authd.http_listen is not set: Dovecot 2.4 has no dict passdb, "
                   "it asks authd over HTTP (Lua)\n")
    status, out, err = _cli(tmp_path, "dovecot-config", "--dovecot-version", "2.2")
    assert status == 2 and err.startswith("mailplugins: Dovecot 2.2 is not supported")
    status, out, err = _cli(tmp_path, "dovecot-config", "--dovecot-version", "2.3")
    assert status == 0 and "# For Dovecot 2.3" in out and "mail_location = " in out


def test_without_dovecot_installed_the_release_must_be_named(tmp_path: Any, monkeypatch: Any) -> None:
    assert _cli(tmp_path, "db", "upgrade")[0] == 0
    monkeypatch.setenv("PATH", str(tmp_path))  # no dovecot, no postconf
    status, out, err = _cli(tmp_path, "dovecot-config")
    assert (status, out) == (2, "")
    assert err == ("mailplugins: cannot run 'dovecot --version': give --dovecot-version 2.3 or 2.4\n")
    status, out, err = _cli(tmp_path, "postfix-config", "--domains", "list")
    assert (status, err) == (2, "mailplugins: cannot run 'postconf -d -h mail_version': give "
                                "--postfix-version\n")
    status, out, err = _cli(tmp_path, "postfix-config", "--domains", "list", "--postfix-version", "3.10")
    assert status == 0 and out.count("# For Postfix 3.10 ") == 1


def test_postfix_config_command_lists_the_database_domains(tmp_path: Any) -> None:
    assert _cli(tmp_path, "db", "upgrade")[0] == 0
    assert _cli(tmp_path, "domain", "add", "b.example")[0] == 0
    assert _cli(tmp_path, "domain", "add", "a.example")[0] == 0
    status, out, err = _cli(tmp_path, "postfix-config", "--submission", "127.0.0.1:2587", "--no-chroot")
    assert status == 0, err
    assert "\nvirtual_mailbox_domains = a.example, b.example\n" in out
    assert "\nvirtual_transport = lmtp:unix:private/mailplugins-deliver\n" in out
    assert "\n127.0.0.1:2587 inet  n       -       n" in out
    assert "# WARNING: policyd is not configured" in out


def test_dovecot_config_command_writes_its_files(tmp_path: Any) -> None:
    target = tmp_path / "dovecot"
    status, out, err = _cli(tmp_path, "dovecot-config", "--write", "--dovecot-directory", str(target))
    assert status == 0, err
    conf = target / "conf.d" / "99-mailplugins.conf"
    ext = target / "mailplugins-dict-auth.conf.ext"
    master = target / "mailplugins-dict-master.conf.ext"
    assert out.splitlines() == [f"wrote {conf}", f"wrote {ext}", f"wrote {master}"]
    assert f"args = {master}" in conf.read_text()
    assert f"args = {ext}" in conf.read_text()
    assert "uri = proxy:/run/mailplugins/dict.sock:auth" in ext.read_text()
    assert ext.stat().st_mode & 0o777 == 0o640
    import grp
    import os

    if os.geteuid() == 0:  # the dovecot group may read it (Debian's dovecot-core makes the group)
        assert ext.stat().st_gid == grp.getgrnam("dovecot").gr_gid


def test_dovecot_config_without_authd_is_a_usage_error(tmp_path: Any) -> None:
    status, out, err = _cli(tmp_path, "dovecot-config", authd=False)
    assert (status, out) == (2, "")
    assert err == "mailplugins: authd is not configured: Dovecot needs authd's dict or HTTP listener\n"
