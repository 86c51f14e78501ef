"""The Postfix snippet as a pure function of a Config (mailplugins.wiring.postfix); the commands."""

from __future__ import annotations

from typing import Any

import pytest

from mailplugins.config import Config, parse_config
from mailplugins.wiring.postfix import PostfixOptions, postfix_config, render_postfix

LUA = 'local url = "http://127.0.0.1:9643/verify"\nfunction auth_password_verify(req, pass) end\n'


def make_config(**overrides: Any) -> Config:
    raw: dict[str, Any] = {
        "database": {"url": "sqlite://"},
        "mail": {"location": "/var/vmail/%d/%n/Maildir", "uid": 5000, "gid": 5000,
                 "recipient_delimiter": "+-"},
        "policyd": {"listen": "unix:/var/spool/postfix/private/mailplugins-policy:mode=660"},
        "authd": {
            "sasl_listen": "unix:/var/spool/postfix/private/mailplugins-auth:mode=660",
            "dict_listen": "unix:/run/mailplugins/dict.sock:mode=660",
            "http_listen": "tcp:9643:interface=127.0.0.1",
        },
        "deliver": {"listen": "unix:/var/spool/postfix/private/mailplugins-deliver:mode=660",
                    "hostname": "mx.example.org"},
    }
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            merged = {**raw[key], **value}
            raw[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            raw[key] = value
    return parse_config(raw, "/etc/mailplugins/mailplugins.yaml")


def test_postfix_sockets_are_relative_to_the_queue_directory() -> None:
    snippet = postfix_config(make_config(), PostfixOptions(domain_names=("example.org",)))
    main = snippet.main_dict()
    assert main["virtual_transport"] == "lmtp:unix:private/mailplugins-deliver"
    assert main["smtpd_sasl_type"] == "dovecot"
    assert main["smtpd_sasl_path"] == "private/mailplugins-auth"
    assert main["smtpd_recipient_restrictions"] == (
        "check_policy_service { unix:private/mailplugins-policy, timeout=10s, "
        "default_action=DEFER_IF_PERMIT, policy_context=smtp }"
    )
    assert "policy_context=submission" in main["mailplugins_submission_recipient_restrictions"]
    assert main["recipient_delimiter"] == "+-"
    assert main["virtual_mailbox_domains"] == "example.org"
    assert main["smtpd_tls_auth_only"] == "yes"
    assert main["smtpd_sasl_auth_enable"] == "no"
    assert "reject_unauth_destination" in main["smtpd_relay_restrictions"]
    assert snippet.warnings == ()


def test_submission_requires_tls_and_enables_sasl_only_there() -> None:
    snippet = postfix_config(make_config(), PostfixOptions(domain_names=("a.example",)))
    (service,) = snippet.services
    assert (service.name, service.type, service.chroot, service.command) == (
        "submission", "inet", "y", "smtpd")
    overrides = dict(service.overrides)
    assert overrides["smtpd_tls_security_level"] == "encrypt"
    assert overrides["smtpd_sasl_auth_enable"] == "yes"
    assert overrides["smtpd_tls_auth_only"] == "yes"
    assert overrides["smtpd_recipient_restrictions"] == "$mailplugins_submission_recipient_restrictions"
    assert snippet.master_lines()[0].split() == ["submission", "inet", "n", "-", "y", "-", "-", "smtpd"]


def test_private_submission_port_and_no_chroot() -> None:
    snippet = postfix_config(make_config(), PostfixOptions(submission="127.0.0.1:2587", chroot=False,
                                                           domain_names=("a.example",)))
    assert snippet.master_lines()[0].split()[:5] == ["127.0.0.1:2587", "inet", "n", "-", "n"]


def test_tcp_listeners_become_inet_and_outside_sockets_warn() -> None:
    config = make_config(
        policyd={"listen": "tcp:9640:interface=127.0.0.1"},
        authd={"sasl_listen": "tcp:9642:interface=127.0.0.1"},
        deliver={"listen": "unix:/run/mailplugins/lmtp.sock"},
    )
    snippet = postfix_config(config, PostfixOptions(domain_names=("a.example",)))
    main = snippet.main_dict()
    assert main["smtpd_sasl_path"] == "inet:127.0.0.1:9642"
    assert "{ inet:127.0.0.1:9640," in main["smtpd_recipient_restrictions"]
    assert main["virtual_transport"] == "lmtp:unix:/run/mailplugins/lmtp.sock"
    assert any("outside Postfix's queue directory" in w for w in snippet.warnings)


def test_wildcard_listener_warns() -> None:
    snippet = postfix_config(make_config(policyd={"listen": "tcp:9640"}),
                             PostfixOptions(domain_names=("a.example",)))
    assert "inet:127.0.0.1:9640" in snippet.main_dict()["smtpd_recipient_restrictions"]
    assert any("every interface" in w for w in snippet.warnings)


def test_systemd_listeners_use_the_shipped_socket_paths() -> None:
    config = make_config(policyd={"listen": "systemd:domain=UNIX:name=policy"},
                         deliver={"listen": "systemd:domain=UNIX:name=lmtp"},
                         authd={"sasl_listen": "systemd:domain=UNIX:name=sasl"})
    main = postfix_config(config, PostfixOptions(domain_names=("a.example",))).main_dict()
    assert main["virtual_transport"] == "lmtp:unix:private/mailplugins-deliver"
    assert main["smtpd_sasl_path"] == "private/mailplugins-auth"
    assert "unix:private/mailplugins-policy" in main["smtpd_recipient_restrictions"]


def test_other_queue_directory() -> None:
    config = make_config(deliver={"listen": "unix:/srv/pf/queue/private/lmtp"})
    snippet = postfix_config(config, PostfixOptions(queue_directory="/srv/pf/queue/",
                                                    domain_names=("a.example",)))
    assert snippet.main_dict()["virtual_transport"] == "lmtp:unix:private/lmtp"


def test_domains_list_is_sorted_and_empty_warns() -> None:
    snippet = postfix_config(make_config(), PostfixOptions(domain_names=("b.example", "a.example")))
    assert snippet.main_dict()["virtual_mailbox_domains"] == "a.example, b.example"
    assert snippet.domains_mode == "list"
    empty = postfix_config(make_config(), PostfixOptions())
    assert any("no domains" in w for w in empty.warnings)


def test_domains_from_postgresql_are_a_live_proxy_map() -> None:
    config = make_config(database={"url": "postgresql+psycopg://mp:s3cret@db.internal:5433/mail"})
    snippet = postfix_config(config, PostfixOptions())
    assert snippet.domains_mode == "sql"
    assert snippet.main_dict()["virtual_mailbox_domains"] == (
        "proxy:pgsql:/etc/postfix/mailplugins-domains-pgsql.cf")
    (query,) = snippet.files
    assert query.mode == 0o640
    lines = query.text.splitlines()
    assert "hosts = db.internal:5433" in lines
    assert "user = mp" in lines
    assert "password = s3cret" in lines
    assert "dbname = mail" in lines
    assert "query = SELECT name FROM domains WHERE name = '%s'" in lines


def test_domains_from_mysql() -> None:
    config = make_config(database={"url": "mysql+pymysql://mp:pw@localhost/mail"})
    snippet = postfix_config(config, PostfixOptions())
    assert snippet.main_dict()["virtual_mailbox_domains"].startswith("proxy:mysql:")


def test_sql_domains_refused_with_sqlite() -> None:
    with pytest.raises(ValueError, match="WAL"):
        postfix_config(make_config(), PostfixOptions(domains="sql"))


def test_without_deliver_dovecot_lmtp_and_without_policyd_a_warning() -> None:
    snippet = postfix_config(make_config(deliver=None, policyd=None),
                             PostfixOptions(domain_names=("a.example",)))
    main = snippet.main_dict()
    assert main["virtual_transport"] == "lmtp:unix:private/dovecot-lmtp"
    assert "smtpd_recipient_restrictions" not in main
    assert any("policyd is not configured" in w for w in snippet.warnings)


def test_small_deliver_limit_lowers_message_size_limit() -> None:
    config = make_config(deliver={"max_message_size": "5M"})
    main = postfix_config(config, PostfixOptions(domain_names=("a.example",))).main_dict()
    assert main["message_size_limit"] == str(5 * 1024 * 1024)
    assert "message_size_limit" not in postfix_config(
        make_config(), PostfixOptions(domain_names=("a.example",))).main_dict()


def test_render_postfix_is_main_cf_then_master_cf() -> None:
    text = render_postfix(postfix_config(make_config(), PostfixOptions(domain_names=("a.example",))))
    main_part, master_part = text.split("# ---- master.cf", 1)
    assert "\nvirtual_transport = lmtp:unix:private/mailplugins-deliver\n" in main_part
    assert "\nsubmission inet" in master_part
    assert "  -o smtpd_sasl_auth_enable=yes\n" in master_part
    assert "/etc/mailplugins/mailplugins.yaml" in text.splitlines()[0]


def test_release_parsing() -> None:
    from mailplugins.releases import detect_dovecot, detect_postfix, dovecot_release, postfix_release

    assert dovecot_release("2.4.1-4 (7d8c0e5759)") == "2.4"
    assert dovecot_release("2.3.19.1 (9b53102964)") == "2.3"
    assert dovecot_release("2.4") == "2.4"
    with pytest.raises(ValueError, match="Dovecot 2.2 is not supported"):
        dovecot_release("2.2.36")
    with pytest.raises(ValueError, match="not a version"):
        dovecot_release("banana")
    assert postfix_release("3.10.13") == "3.10"
    assert postfix_release("3.7.11") == "3.7"
    with pytest.raises(ValueError, match="Postfix 3.5 is not supported"):
        postfix_release("3.5.25")
    assert detect_dovecot(lambda cmd: "2.4.1-4 (x)\n" if cmd == ["dovecot", "--version"] else "") == "2.4"
    assert detect_postfix(lambda cmd: "3.10.13\n") == "3.10"
    with pytest.raises(ValueError, match="--dovecot-version"):
        detect_dovecot(lambda cmd: "")


def test_rate_limits_add_data_and_end_of_data_checks() -> None:
    import dataclasses
    from types import SimpleNamespace

    config = make_config()
    assert config.policyd is not None
    policyd = SimpleNamespace(listen=config.policyd.listen, mynetworks=(), ratelimit=object())
    limited = dataclasses.replace(config, policyd=policyd)
    snippet = postfix_config(limited, PostfixOptions(domain_names=("a.example",)))
    main = snippet.main_dict()
    assert main["smtpd_data_restrictions"] == (
        "check_policy_service { unix:private/mailplugins-policy, timeout=10s, "
        "default_action=DUNNO, policy_context=smtp }")
    assert "policy_context=submission" in main["mailplugins_submission_end_of_data_restrictions"]
    overrides = dict(snippet.services[0].overrides)
    assert overrides["smtpd_data_restrictions"] == "$mailplugins_submission_data_restrictions"
    assert overrides["smtpd_end_of_data_restrictions"] == "$mailplugins_submission_end_of_data_restrictions"
    assert "smtpd_data_restrictions" not in postfix_config(
        config, PostfixOptions(domain_names=("a.example",))).main_dict()


@pytest.mark.parametrize("check", ["greylist", "spf"])
def test_greylisting_or_spf_alone_adds_the_data_check_for_their_headers(check: str) -> None:
    """One PREPEND per policy reply: with one recipient the second header needs the DATA call."""
    import dataclasses
    from types import SimpleNamespace

    config = make_config()
    assert config.policyd is not None
    policyd = SimpleNamespace(listen=config.policyd.listen, mynetworks=(), **{check: object()})
    checked = dataclasses.replace(config, policyd=policyd)
    main = postfix_config(checked, PostfixOptions(domain_names=("a.example",))).main_dict()
    assert "policy_context=smtp" in main["smtpd_data_restrictions"]
    assert "smtpd_end_of_data_restrictions" not in main  # PREPEND is not allowed there anyway


# -- the Grafana dashboard (docs/grafana-dashboard.json) -----------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the three daemons can export, from their real metric registries."""
    from authd.metrics import AuthdMetrics
    from deliver.metrics import DeliverMetrics
    from mailplugins.metrics import DaemonMetrics
    from milterd.session import MilterMetrics
    from policyd.service import PolicyMetrics

    names: set[str] = set()
    for daemon, extra in (("policyd", PolicyMetrics), ("authd", AuthdMetrics), ("deliver", DeliverMetrics),
                          ("milterd", MilterMetrics)):
        metrics = DaemonMetrics(daemon)
        extra(metrics)
        for family in metrics.registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names


def test_dashboard_uses_only_exported_metrics() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    exported = exported_metric_names()
    used: set[str] = set()
    for expr in exprs:
        for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
            matching = {n for n in exported if re.fullmatch(pattern, n)}
            assert matching, pattern
            used |= matching
        used.update(re.findall(r"\b((?:mailplugins|process)_[a-z_]+)\b", expr))
    missing = sorted(name for name in used if name not in exported)
    assert missing == []
    # Every daemon-specific metric has a panel.
    specific = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in exported
                if re.match(r"mailplugins_(policyd|authd|deliver|milterd)_", n)
                and not re.search(r"_(config_last_reload_.*|connections_total|open_connections)$", n)}
    shown = {n.removesuffix("_bucket") for n in used}
    assert sorted(specific - shown) == []


def test_mynetworks_follow_policyd() -> None:
    config = make_config(policyd={"mynetworks": ["127.0.0.0/8", "::1/128", "2001:db8::/32"]})
    main = postfix_config(config, PostfixOptions(domain_names=("a.example",))).main_dict()
    assert main["mynetworks"] == "127.0.0.0/8 [::1]/128 [2001:db8::]/32"
    assert postfix_config(make_config(), PostfixOptions(domain_names=("a.example",))).main_dict()[
        "mynetworks"] == ""


def test_extra_listeners_postfix_cannot_use_are_ignored() -> None:
    config = make_config(policyd={"listen": ["unix:/var/spool/postfix/private/mailplugins-policy",
                                             "systemd:domain=UNIX:name=other"]})
    snippet = postfix_config(config, PostfixOptions(domain_names=("a.example",)))
    assert "unix:private/mailplugins-policy" in snippet.main_dict()["smtpd_recipient_restrictions"]
    with pytest.raises(ValueError, match="cannot tell where it listens"):
        postfix_config(make_config(policyd={"listen": "systemd:domain=UNIX:name=other"}),
                       PostfixOptions(domain_names=("a.example",)))


def test_render_never_prints_the_database_password() -> None:
    config = make_config(database={"url": "postgresql+psycopg://mp:s3cret@db.internal/mail"})
    snippet = postfix_config(config, PostfixOptions())
    text = render_postfix(snippet)
    assert "s3cret" not in text
    assert "password = ********" in text
    assert "password = s3cret" in snippet.files[0].text
