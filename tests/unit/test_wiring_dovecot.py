"""The Dovecot snippet as a pure function of a Config (mailplugins.wiring.dovecot)."""

from __future__ import annotations

from typing import Any

import pytest

from mailplugins.config import Config
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_conf_text, dovecot_config, render_dovecot
from mailplugins.wiring.postfix import PostfixOptions, postfix_config
from tests.unit.test_wiring_postfix import LUA, make_config


def test_dovecot_dict_passdb_and_userdb() -> None:
    snippet = dovecot_config(make_config(), DovecotOptions())
    settings = {s.name: s.value for s in snippet.settings}
    assert settings["mail_location"] == "maildir:/var/vmail/%d/%n/Maildir"
    assert settings["mail_uid"] == "5000"
    assert settings["ssl"] == "required"
    assert settings["auth_mechanisms"] == "plain login"
    args = "/etc/dovecot/mailplugins-dict-auth.conf.ext"
    master_args = "/etc/dovecot/mailplugins-dict-master.conf.ext"
    assert snippet.passdbs == ({"driver": "dict", "args": master_args, "master": "yes", "pass": "yes"},
                               {"driver": "dict", "args": args})
    assert snippet.userdbs == ({"driver": "dict", "args": args},)
    ext, master = snippet.files
    assert ext.path == args and master.path == master_args
    assert (master.mode, master.group) == (0o640, "dovecot")
    assert "uri = proxy:/run/mailplugins/dict.sock:auth" in master.text.splitlines()
    assert "  key = master/%s/%u" in master.text.splitlines()
    assert "idle_msecs" not in master.text.replace("No idle_msecs", "")
    text = dovecot_conf_text(snippet)
    assert (f"passdb {{\n  driver = dict\n  args = {master_args}\n  master = yes\n  pass = yes\n}}\n"
            f"passdb {{\n  driver = dict\n  args = {args}\n}}") in text
    assert "auth_master_user_separator" not in text  # authd.master_user_separator is empty
    assert "uri = proxy:/run/mailplugins/dict.sock:auth" in ext.text.splitlines()
    assert "idle_msecs" not in ext.text.replace("No idle_msecs", "")
    assert "  key = passdb/%s/%u" in ext.text.splitlines()
    assert "  key = userdb/%u" in ext.text.splitlines()


def test_dovecot_lua_points_at_the_installed_script_when_the_url_matches() -> None:
    options = DovecotOptions(lua=True, lua_script="/usr/lib/x/authd/lua/mailplugins-auth.lua",
                             lua_script_text=LUA)
    snippet = dovecot_config(make_config(), options)
    lua = {"driver": "lua", "args": "file=/usr/lib/x/authd/lua/mailplugins-auth.lua blocking=yes"}
    assert snippet.passdbs == ({**lua, "master": "yes"}, lua)
    assert snippet.userdbs[0]["driver"] == "dict"
    assert [f.path for f in snippet.files] == ["/etc/dovecot/mailplugins-dict-auth.conf.ext"]


def test_master_user_separator_is_written_for_both_releases() -> None:
    config = make_config(authd={"master_user_separator": "*"})
    for snippet in (dovecot_config(config), _d24(config)):
        settings = {s.name: s.value for s in snippet.settings}
        assert settings["auth_master_user_separator"] == "*"


def test_dovecot_lua_copy_with_the_configured_url() -> None:
    config = make_config(authd={"http_listen": "tcp:9700:interface=127.0.0.1"})
    options = DovecotOptions(lua=True, lua_script="/pkg/mailplugins-auth.lua", lua_script_text=LUA)
    snippet = dovecot_config(config, options)
    assert snippet.passdbs[0]["args"] == "file=/etc/dovecot/mailplugins-auth.lua blocking=yes"
    lua = next(f for f in snippet.files if f.path.endswith(".lua"))
    assert 'local url = "http://127.0.0.1:9700/verify"' in lua.text


def test_dovecot_lua_without_dict_uses_a_static_userdb_and_warns() -> None:
    config = make_config(authd={"dict_listen": None})
    snippet = dovecot_config(config, DovecotOptions(lua=True, lua_script="/s.lua", lua_script_text=LUA))
    (userdb,) = snippet.userdbs
    assert userdb["driver"] == "static"
    assert "home=/var/vmail/%d/%n " in userdb["args"]
    assert "mail=maildir:/var/vmail/%d/%n/Maildir" in userdb["args"]
    assert snippet.warnings


def test_dovecot_errors() -> None:
    with pytest.raises(ValueError, match="authd is not configured"):
        dovecot_config(make_config(authd=None))
    with pytest.raises(ValueError, match="dict_listen"):
        dovecot_config(make_config(authd={"dict_listen": None}))
    with pytest.raises(ValueError, match="Lua script"):
        dovecot_config(make_config(), DovecotOptions(lua=True))
    with pytest.raises(ValueError, match="unix socket"):
        dovecot_config(make_config(authd={"dict_listen": "tcp:9000:interface=127.0.0.1"}))


def test_dovecot_auth_socket_for_postfix_when_authd_has_no_sasl() -> None:
    snippet = dovecot_config(make_config(authd={"sasl_listen": None}))
    assert any("unix_listener /var/spool/postfix/private/auth" in block for block in snippet.blocks)
    main = postfix_config(make_config(authd={"sasl_listen": None}),
                          PostfixOptions(domain_names=("a.example",))).main_dict()
    assert main["smtpd_sasl_path"] == "private/auth"


def test_render_dovecot() -> None:
    snippet = dovecot_config(make_config())
    text = render_dovecot(snippet)
    assert "passdb {\n  driver = dict\n  args = /etc/dovecot/mailplugins-dict-auth.conf.ext\n}" in text
    assert "uri = proxy:" in text
    assert "uri = proxy:" not in dovecot_conf_text(snippet)
    # last_login through authd's dict socket, on 2.3 as on 2.4.
    assert "  last_login_dict = proxy:/run/mailplugins/dict.sock:lastlogin\n" in text


def _d24(config: Config | None = None, **options: Any) -> Any:
    return dovecot_config(config or make_config(), DovecotOptions(
        version="2.4", lua_script="/usr/lib/x/authd/lua/mailplugins-auth.lua", lua_script_text=LUA,
        **options))


def test_dovecot24_names_named_lua_blocks_and_translated_paths() -> None:
    snippet = _d24()
    assert [s.name for s in snippet.settings][:2] == ["dovecot_config_version", "dovecot_storage_version"]
    settings = {s.name: s.value for s in snippet.settings}
    assert settings["dovecot_config_version"] == "2.4.0"  # Debian 13's dovecot.conf says 2.4.0
    assert settings["auth_allow_cleartext"] == "no"
    assert settings["ssl_server_cert_file"] == "/etc/ssl/certs/ssl-cert-snakeoil.pem"
    assert settings["mail_driver"] == "maildir"
    assert settings["mail_home"] == "/var/vmail/%{user | domain | lower}/%{user | username | lower}"
    assert settings["mail_path"] == (
        "/var/vmail/%{user | domain | lower}/%{user | username | lower}/Maildir")
    assert settings["mail_inbox_path"] == settings["mail_path"]
    for gone in ("mail_location", "disable_plaintext_auth", "ssl_cert", "ssl_key"):
        assert gone not in settings
    lua = {"name": "lua", "driver": "lua", "lua_file": "/usr/lib/x/authd/lua/mailplugins-auth.lua"}
    master = {**lua, "name": "master", "master": "yes"}
    assert snippet.passdbs == (master, lua) and snippet.userdbs == (lua,)
    text = dovecot_conf_text(snippet)
    assert ("passdb master {\n  driver = lua\n  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua\n"
            "  master = yes\n}\npassdb lua {") in text
    assert "passdb lua {\n  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua\n}" in text
    assert "userdb lua {\n  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua\n}" in text
    assert "dict_proxy_socket_path = /run/mailplugins/dict.sock" in text  # last_login
    assert "allow_all_users" not in text and "driver = dict" not in text
    assert "%d" not in text and "%n" not in text and "%u" not in text
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body[0] == "dovecot_config_version = 2.4.0"


def test_dovecot24_refuses_an_untranslatable_location_naming_the_key() -> None:
    config = make_config(mail={"location": "/var/vmail/x%%n/%n"})  # a literal "%n" directory
    with pytest.raises(ValueError, match=r"^mail\.location: "):
        _d24(config)


def test_dovecot24_needs_the_http_listener() -> None:
    with pytest.raises(ValueError, match="http_listen"):
        _d24(make_config(authd={"http_listen": None}))


def test_dovecot24_without_dict_has_no_last_login() -> None:
    text = dovecot_conf_text(_d24(make_config(authd={"dict_listen": None})))
    assert "last_login" not in text and "passdb lua {" in text


def test_dovecot24_lua_copy_with_the_configured_url() -> None:
    snippet = _d24(make_config(authd={"http_listen": "tcp:9700:interface=127.0.0.1"}))
    assert snippet.passdbs[0]["lua_file"] == "/etc/dovecot/mailplugins-auth.lua"
    (lua,) = snippet.files
    assert 'local url = "http://127.0.0.1:9700/verify"' in lua.text

