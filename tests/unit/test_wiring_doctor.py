"""Doctor logic on canned ``postconf``/``doveconf`` output (mailplugins.wiring.doctor)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mailplugins.wiring.doctor import check_domains, check_dovecot, check_postfix, split_restrictions
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_config
from mailplugins.wiring.live import (
    DovecotLive,
    PostfixLive,
    parse_doveconf,
    parse_postconf,
    parse_postconf_master,
    parse_postconf_params,
)
from mailplugins.wiring.postfix import PostfixOptions, PostfixSnippet, postfix_config
from tests.unit.test_wiring_postfix import make_config

POSTCONF_D = """\
virtual_mailbox_domains = $virtual_mailbox_maps
virtual_mailbox_maps =
virtual_alias_maps = $virtual_maps
virtual_transport = virtual
recipient_delimiter =
smtpd_tls_cert_file =
smtpd_tls_key_file =
smtpd_tls_security_level =
smtpd_tls_auth_only = no
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = ${{$compatibility_level} < {1} ? {} : {permit_mynetworks, \
permit_sasl_authenticated, defer_unauth_destination}}
smtpd_recipient_restrictions =
message_size_limit = 10240000
"""

GOOD_N = """\
compatibility_level = 3.6
virtual_mailbox_domains = example.org, example.net
virtual_transport = lmtp:unix:private/mailplugins-deliver
lmtp_send_xforward_command = yes
recipient_delimiter = +-
smtpd_tls_cert_file = /etc/ssl/certs/mx.pem
smtpd_tls_key_file = /etc/ssl/private/mx.key
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/mailplugins-auth
smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated
    reject_unauth_destination
smtpd_recipient_restrictions = reject_non_fqdn_recipient,
    check_policy_service {unix:private/mailplugins-policy, timeout=5s,
    default_action=DEFER_IF_PERMIT, policy_context=smtp}
mailplugins_submission_recipient_restrictions = check_policy_service { \
unix:private/mailplugins-policy, timeout=10s, default_action=DEFER_IF_PERMIT, policy_context=submission }
"""

GOOD_M = """\
smtp       inet  n       -       y       -       -       smtpd
submission inet  n       -       y       -       -       smtpd
    -o syslog_name=postfix/submission
    -o smtpd_tls_security_level=encrypt
pickup     unix  n       -       y       60      1       pickup
"""

GOOD_P = """\
submission/inet/syslog_name = postfix/submission
submission/inet/smtpd_tls_security_level = encrypt
submission/inet/smtpd_sasl_auth_enable = yes
submission/inet/smtpd_tls_auth_only = yes
submission/inet/smtpd_client_restrictions = permit_sasl_authenticated,reject
submission/inet/smtpd_relay_restrictions = permit_sasl_authenticated,reject
submission/inet/smtpd_recipient_restrictions = $mailplugins_submission_recipient_restrictions
"""


def expected() -> PostfixSnippet:
    return postfix_config(make_config(), PostfixOptions(domain_names=("example.org", "example.net")))


def live(n: str = GOOD_N, m: str = GOOD_M, p: str = GOOD_P) -> PostfixLive:
    return PostfixLive.from_text(n=n, d=POSTCONF_D, m=m, p=p)


# -- parsing -----------------------------------------------------------------------------------------


def test_parse_postconf_keeps_empty_values() -> None:
    values = parse_postconf("a = 1\nb =\n# c = 3\nd = x = y\n")
    assert values == {"a": "1", "b": "", "d": "x = y"}


def test_parse_master_joins_continuations() -> None:
    services = parse_postconf_master(GOOD_M)
    assert services[("submission", "inet")][:8] == ["submission", "inet", "n", "-", "y", "-", "-", "smtpd"]
    assert services[("submission", "inet")][8:] == [
        "-o", "syslog_name=postfix/submission", "-o", "smtpd_tls_security_level=encrypt"]
    assert ("pickup", "unix") in services


def test_parse_params() -> None:
    params = parse_postconf_params(GOOD_P + "127.0.0.1:2587/inet/smtpd_sasl_auth_enable = yes\n")
    assert params[("submission", "inet")]["smtpd_sasl_auth_enable"] == "yes"
    assert params[("127.0.0.1:2587", "inet")] == {"smtpd_sasl_auth_enable": "yes"}


def test_split_restrictions_keeps_braces_whole() -> None:
    assert split_restrictions("permit_mynetworks,reject_unauth_destination check_policy_service "
                              "{ inet:127.0.0.1:1, timeout=1s }, permit") == [
        "permit_mynetworks", "reject_unauth_destination",
        "check_policy_service { inet:127.0.0.1:1, timeout=1s }", "permit"]


def test_parse_doveconf_blocks() -> None:
    text = """# 2.3.19.1 (9b53102964): /etc/dovecot/dovecot.conf
mail_location = maildir:/var/vmail/%d/%n/Maildir
namespace inbox {
  inbox = yes
  mailbox Drafts {
    special_use = \\Drafts
  }
}
passdb {
  args = /etc/dovecot/x.ext
  driver = dict
}
userdb {
  args = uid=1
  driver = static
}
protocol lmtp {
  mail_plugins = quota
}
"""
    parsed = parse_doveconf(text)
    assert parsed.settings == {"mail_location": "maildir:/var/vmail/%d/%n/Maildir"}
    assert parsed.passdbs == ({"args": "/etc/dovecot/x.ext", "driver": "dict"},)
    assert parsed.userdbs == ({"args": "uid=1", "driver": "static"},)


# -- Postfix checks ----------------------------------------------------------------------------------


def test_good_postfix_has_no_findings() -> None:
    # Spacing, line continuations, another timeout and extra restrictions are all fine.
    assert check_postfix(expected(), live()) == []


def test_wrong_transport_is_reported_with_the_postconf_line() -> None:
    findings = check_postfix(expected(), live(n=GOOD_N.replace(
        "lmtp:unix:private/mailplugins-deliver", "lmtp:unix:private/dovecot-lmtp")))
    (finding,) = findings
    assert finding.where == "main.cf"
    assert finding.problem == "virtual_transport is 'lmtp:unix:private/dovecot-lmtp'"
    assert finding.fix == "postconf -e 'virtual_transport = lmtp:unix:private/mailplugins-deliver'"
    assert "fix: postconf -e" in finding.render()


def test_mynetworks_compared_as_networks() -> None:
    config = make_config(policyd={"mynetworks": ["127.0.0.0/8", "::1/128"]})
    snippet = postfix_config(config, PostfixOptions(domain_names=("example.org", "example.net")))
    assert check_postfix(snippet, live(n=GOOD_N + "mynetworks = [::1]/128, 127.0.0.0/8\n")) == []
    (finding,) = check_postfix(snippet, live(n=GOOD_N + "mynetworks = 127.0.0.0/8 192.0.2.0/24\n"))
    assert finding.problem == "mynetworks is '127.0.0.0/8 192.0.2.0/24'"
    assert finding.fix == "postconf -e 'mynetworks = 127.0.0.0/8 [::1]/128'"


def test_unset_setting_falls_back_to_the_default() -> None:
    findings = check_postfix(expected(), live(n=GOOD_N.replace("smtpd_sasl_type = dovecot\n", "")))
    assert [f.problem for f in findings] == ["smtpd_sasl_type is 'cyrus'"]


def test_missing_policy_service_and_wrong_context() -> None:
    n = GOOD_N.replace("policy_context=smtp}", "policy_context=submission}")
    (finding,) = check_postfix(expected(), live(n=n))
    assert finding.problem.startswith("smtpd_recipient_restrictions lacks check_policy_service {")
    n = GOOD_N.replace("    reject_unauth_destination\n", "")
    (finding,) = check_postfix(expected(), live(n=n))
    assert finding.problem.startswith("smtpd_relay_restrictions lacks reject_unauth_destination")


def test_missing_certificate_is_reported() -> None:
    n = GOOD_N.replace("smtpd_tls_cert_file = /etc/ssl/certs/mx.pem\n", "")
    (finding,) = check_postfix(expected(), live(n=n))
    assert finding.problem == "smtpd_tls_cert_file is ''"


def test_missing_submission_service() -> None:
    m = "smtp       inet  n       -       y       -       -       smtpd\n"
    (finding,) = check_postfix(expected(), live(m=m, p=""))
    assert finding.where == "master.cf"
    assert finding.problem == "no submission/inet service"
    assert "submission inet" in finding.fix
    assert "-o smtpd_sasl_auth_enable=yes" in finding.fix


def test_submission_without_sasl_or_tls() -> None:
    p = GOOD_P.replace("smtpd_sasl_auth_enable = yes", "smtpd_sasl_auth_enable = no").replace(
        "submission/inet/smtpd_tls_security_level = encrypt\n", "")
    findings = check_postfix(expected(), live(p=p))
    assert sorted(f.problem for f in findings) == [
        "submission/inet: smtpd_sasl_auth_enable is 'no'",
        "submission/inet: smtpd_tls_security_level is 'may'",
    ]
    assert "postconf -P -e 'submission/inet/smtpd_sasl_auth_enable=yes'" in [f.fix for f in findings]


def test_submission_restrictions_inline_are_accepted() -> None:
    p = GOOD_P.replace(
        "$mailplugins_submission_recipient_restrictions",
        "check_policy_service { unix:private/mailplugins-policy, policy_context=submission }")
    assert check_postfix(expected(), live(p=p)) == []
    p = GOOD_P.replace("$mailplugins_submission_recipient_restrictions", "permit_sasl_authenticated")
    (finding,) = check_postfix(expected(), live(p=p))
    assert finding.problem.startswith("submission/inet: smtpd_recipient_restrictions lacks")


def test_domains_missing_from_the_static_list() -> None:
    snippet = expected()
    assert check_domains(snippet, live(), ["example.org", "example.net"]) == []
    (finding,) = check_domains(snippet, live(), ["example.org", "example.net", "new.example"])
    assert "lacks new.example" in finding.problem
    assert finding.fix.startswith(
        "postconf -e 'virtual_mailbox_domains = example.net, example.org, new.example'")


def test_domains_via_sql_are_compared_as_settings() -> None:
    config = make_config(database={"url": "postgresql+psycopg://u:p@localhost/mail"})
    snippet = postfix_config(config, PostfixOptions())
    findings = check_postfix(snippet, live())
    assert [f.problem for f in findings] == [
        "virtual_mailbox_domains is 'example.org, example.net'"]
    assert check_domains(snippet, live(), ["x.example"]) == []


# -- Dovecot checks ----------------------------------------------------------------------------------


def dovecot_live(**changes: str | None) -> DovecotLive:
    settings = {
        "auth_mechanisms": "login plain",
        "disable_plaintext_auth": "yes",
        "ssl": "required",
        "ssl_cert": "-----BEGIN CERTIFICATE-----",
        "ssl_key": "# hidden, use -P to show it",
        "mail_location": "maildir:/var/vmail/%d/%n/Maildir",
        "mail_uid": "5000",
        "mail_gid": "5000",
    }
    for key, value in changes.items():
        if value is None:
            settings.pop(key)
        else:
            settings[key] = value
    db = {"driver": "dict", "args": "/etc/dovecot/mailplugins-dict-auth.conf.ext"}
    master = {"driver": "dict", "args": "/etc/dovecot/mailplugins-dict-master.conf.ext",
              "master": "yes", "pass": "yes"}
    return DovecotLive(settings, (master, db), (db,))


def test_good_dovecot_has_no_findings() -> None:
    assert check_dovecot(dovecot_config(make_config()), dovecot_live()) == []


def test_dovecot_uid_by_name() -> None:
    config = make_config(mail={"uid": 0, "gid": 0})
    assert check_dovecot(dovecot_config(config), dovecot_live(mail_uid="root", mail_gid="root")) == []
    findings = check_dovecot(dovecot_config(config), dovecot_live(mail_uid="nobody", mail_gid="root"))
    assert [f.problem for f in findings] == ["mail_uid is 'nobody'"]


@pytest.mark.parametrize(
    ("change", "problem", "fix"),
    [
        ({"ssl": "yes"}, "ssl is 'yes'", "ssl = required"),
        ({"mail_location": "mbox:~/mail"}, "mail_location is 'mbox:~/mail'",
         "mail_location = maildir:/var/vmail/%d/%n/Maildir"),
        ({"auth_mechanisms": "plain"}, "auth_mechanisms is 'plain'", "auth_mechanisms = plain login"),
        ({"ssl_cert": ""}, "ssl_cert is ''", "ssl_cert = </etc/ssl/certs/ssl-cert-snakeoil.pem"),
        ({"disable_plaintext_auth": None}, "disable_plaintext_auth is unset", "disable_plaintext_auth = yes"),
    ],
)
def test_dovecot_setting_mismatch(change: dict[str, str | None], problem: str, fix: str) -> None:
    (finding,) = check_dovecot(dovecot_config(make_config()), dovecot_live(**change))
    assert (finding.where, finding.problem, finding.fix) == ("dovecot", problem, fix)


def test_dovecot_extra_and_missing_passdb() -> None:
    good = dovecot_live()
    pam = {"driver": "pam"}
    with_pam = DovecotLive(good.settings, (pam, *good.passdbs), good.userdbs)
    (finding,) = check_dovecot(dovecot_config(make_config()), with_pam)
    assert finding.problem == "extra passdb { driver = pam } is consulted too"
    assert "auth-system.conf.ext" in finding.fix
    lua = dovecot_config(make_config(), DovecotOptions(lua=True, lua_script="/s.lua"))
    problems = sorted(f.problem for f in check_dovecot(lua, good))
    assert problems == [
        "extra passdb { driver = dict  args = /etc/dovecot/mailplugins-dict-auth.conf.ext } is consulted too",
        "extra passdb { driver = dict  args = /etc/dovecot/mailplugins-dict-master.conf.ext  master = yes  "
        "pass = yes } is consulted too",
        "no passdb { driver = lua  args = file=/s.lua blocking=yes  master = yes }",
        "no passdb { driver = lua  args = file=/s.lua blocking=yes }",
    ]
    # Without the master passdb (an older generated config) doctor asks for it.
    without = DovecotLive(good.settings, good.passdbs[1:], good.userdbs)
    (finding,) = check_dovecot(dovecot_config(make_config()), without)
    assert finding.problem == ("no passdb { driver = dict  args = "
                               "/etc/dovecot/mailplugins-dict-master.conf.ext  master = yes  pass = yes }")


# -- companion files and probing -------------------------------------------------------------------


def test_dovecot_files_compared_without_comments_and_spacing() -> None:
    from mailplugins.wiring.doctor import check_dovecot_files

    snippet = dovecot_config(make_config())
    generated, master = snippet.files
    assert master.path.endswith("mailplugins-dict-master.conf.ext")
    snippet = dataclasses.replace(snippet, files=(generated,))
    same = "# mine\n" + generated.text.replace("  key = userdb/%u", "    key   =   userdb/%u")
    assert check_dovecot_files(snippet, lambda path: same) == []
    (missing,) = check_dovecot_files(snippet, lambda path: None)
    assert missing.problem == f"{generated.path} does not exist"
    assert missing.fix == "mailplugins dovecot-config --write"
    wrong = generated.text.replace("/run/mailplugins/dict.sock", "/run/old.sock")
    (differs,) = check_dovecot_files(snippet, lambda path: wrong)
    assert differs.problem.endswith("differs from the generated file")
    assert "uri = proxy:/run/mailplugins/dict.sock:auth" in differs.fix

    def unreadable(path: str) -> str:
        raise PermissionError(path)

    assert check_dovecot_files(snippet, unreadable) == []


def test_probe_daemons(tmp_path: Any) -> None:
    import socket

    from mailplugins.wiring.probe import probe_daemons

    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "policy.sock"))
    listening.listen(1)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    port = tcp.getsockname()[1]
    try:
        config = make_config(
            policyd={"listen": f"unix:{tmp_path}/policy.sock"},
            authd={"sasl_listen": f"tcp:{port}:interface=127.0.0.1", "dict_listen": None,
                   "http_listen": None},
            deliver={"listen": f"unix:{tmp_path}/absent.sock"},
        )
        findings = probe_daemons(config, timeout=1)
    finally:
        listening.close()
        tcp.close()
    (finding,) = findings
    assert finding.where == "daemons"
    assert finding.problem.startswith(f"deliver.listen: nothing answers at {tmp_path}/absent.sock (")
    assert finding.fix == "systemctl start mailplugins-deliver (then: journalctl -u mailplugins-deliver)"


# -- Dovecot 2.4 ---------------------------------------------------------------------------------

#: ``doveconf -n`` of the generated 2.4 snippet, as Dovecot 2.4.1 prints it (named blocks,
#: ``ssl_server { }`` grouping, defaults such as auth_allow_cleartext = no left out).
DOVECONF_24 = """# 2.4.1-4 (7d8c0e5759): /etc/dovecot/dovecot.conf
# 4 default setting changes since version 2.4.0
dovecot_config_version = 2.4.0
auth_mechanisms = plain login
dovecot_storage_version = 2.4.0
mail_driver = maildir
mail_gid = 5000
mail_home = /var/vmail/%{user | domain | lower}/%{user | username | lower}
mail_inbox_path = /var/vmail/%{user | domain | lower}/%{user | username | lower}/Maildir
mail_path = /var/vmail/%{user | domain | lower}/%{user | username | lower}/Maildir
mail_plugins {
  last_login = yes
}
mail_uid = 5000
ssl = required
ssl_server {
  cert_file = /etc/ssl/certs/ssl-cert-snakeoil.pem
  key_file = /etc/ssl/private/ssl-cert-snakeoil.key
}
passdb master {
  driver = lua
  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua
  master = yes
}
passdb lua {
  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua
}
userdb lua {
  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua
}
last_login {
  dict proxy {
    name = lastlogin
    socket_path = /run/mailplugins/dict.sock
  }
}
"""


def snippet24() -> Any:
    return dovecot_config(make_config(), DovecotOptions(
        version="2.4", lua_script="/usr/lib/x/authd/lua/mailplugins-auth.lua"))


def live24(text: str = DOVECONF_24) -> DovecotLive:
    # doctor reads settings from -a, where defaults are shown: add the two it checks.
    parsed = parse_doveconf(text)
    settings = {"auth_allow_cleartext": "no", **parsed.settings}
    return DovecotLive(settings, parsed.passdbs, parsed.userdbs, parsed.everywhere)


def test_parse_doveconf_24_named_blocks_and_ssl_server() -> None:
    parsed = parse_doveconf(DOVECONF_24)
    assert parsed.release == "2.4"
    assert parsed.settings["ssl_server_cert_file"] == "/etc/ssl/certs/ssl-cert-snakeoil.pem"
    script = "/usr/lib/x/authd/lua/mailplugins-auth.lua"
    assert parsed.passdbs == (
        {"name": "master", "driver": "lua", "lua_file": script, "master": "yes"},
        {"name": "lua", "driver": "lua", "lua_file": script},
    )
    assert "socket_path" not in parsed.settings and "name" not in parsed.settings


def test_correct_24_config_has_no_findings() -> None:
    assert check_dovecot(snippet24(), live24()) == []


def test_24_missing_cert_and_wrong_lua_file() -> None:
    text = DOVECONF_24.replace("  cert_file = /etc/ssl/certs/ssl-cert-snakeoil.pem\n", "").replace(
        "passdb lua {\n  lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua",
        "passdb lua {\n  lua_file = /etc/dovecot/other.lua")
    problems = sorted(f.problem for f in check_dovecot(snippet24(), live24(text)))
    assert problems == [
        "extra passdb lua { lua_file = /etc/dovecot/other.lua } is consulted too",
        "no passdb lua { lua_file = /usr/lib/x/authd/lua/mailplugins-auth.lua }",
        "ssl_server_cert_file is unset",
    ]


def test_24_literal_variables_flagged_with_the_fix() -> None:
    text = DOVECONF_24.replace(
        "mail_home = /var/vmail/%{user | domain | lower}/%{user | username | lower}",
        "mail_home = /var/vmail/%d/%n") + "userdb static {\n  fields {\n    home = /srv/%Ln\n  }\n}\n"
    findings = check_dovecot(snippet24(), live24(text))
    literal = [f for f in findings if "literally" in f.problem]
    assert [(f.problem, f.fix) for f in literal] == [
        ("mail_home = /var/vmail/%d/%n: Dovecot 2.4 takes %d, %n literally (every user would "
         "share one directory)",
         "mail_home = /var/vmail/%{user | domain | lower}/%{user | username | lower}"),
        ("home = /srv/%Ln: Dovecot 2.4 takes %Ln literally (every user would share one directory)",
         "home = /srv/%{user | username | lower}"),
    ]
    assert any(f.problem.startswith("mail_home is ") for f in findings)
    assert any(f.problem.startswith("extra userdb static") for f in findings)


def test_23_variables_in_a_23_config_are_fine_and_a_release_mismatch_is_named() -> None:
    assert not [f for f in check_dovecot(dovecot_config(make_config()), dovecot_live())
                if "literally" in f.problem]
    (finding,) = check_dovecot(snippet24(), dovecot_live())
    assert finding.problem == "the configuration is Dovecot 2.3's, the expected one 2.4's"
    assert finding.fix.startswith("mailplugins dovecot-config --dovecot-version 2.3")


def test_mail_left_under_a_mixed_case_directory_is_reported(tmp_path: Any) -> None:
    from types import SimpleNamespace

    from mailplugins.wiring.doctor import check_mailbox_paths

    location = f"{tmp_path}/%d/%n/Maildir"
    alice = SimpleNamespace(address="Alice@example.org", local_part="Alice", domain="example.org")
    bob = SimpleNamespace(address="Bob@example.org", local_part="Bob", domain="example.org")
    carol = SimpleNamespace(address="carol@example.org", local_part="carol", domain="example.org")
    (tmp_path / "example.org" / "Alice" / "Maildir").mkdir(parents=True)
    (tmp_path / "example.org" / "Bob").mkdir(parents=True)
    (tmp_path / "example.org" / "bob").mkdir(parents=True)
    (tmp_path / "example.org" / "carol").mkdir(parents=True)
    findings = check_mailbox_paths(location, [alice, bob, carol])  # type: ignore[list-item]
    assert [(f.problem, f.fix) for f in findings] == [
        (f"Alice@example.org: mail in {tmp_path}/example.org/Alice is no longer read (paths are "
         f"lower-case: {tmp_path}/example.org/alice)",
         f"mv {tmp_path}/example.org/Alice {tmp_path}/example.org/alice"),
        (f"Bob@example.org: mail in {tmp_path}/example.org/Bob is no longer read (paths are "
         f"lower-case: {tmp_path}/example.org/bob)",
         f"merge {tmp_path}/example.org/Bob into {tmp_path}/example.org/bob (both exist), then "
         f"remove {tmp_path}/example.org/Bob"),
    ]
