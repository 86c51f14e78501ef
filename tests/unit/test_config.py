"""Config loading: typed values, and one-line errors that name the key path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mailplugins.config import ConfigError, load_config, parse_config
from mailplugins.config.fields import Fields, parse_duration, parse_size


def base(tmp_path: Path, **sections: object) -> dict[str, object]:
    return {"database": {"url": f"sqlite:///{tmp_path}/mail.db"}, **sections}


def error_of(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_minimal_config_has_defaults(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path))
    assert config.configured_daemons() == ()
    assert config.mail.location == "/var/vmail/%d/%n/Maildir"
    assert config.mail.recipient_delimiter == "+"
    assert config.passwords.scheme == "ARGON2ID"
    assert config.passwords.argon2_memory_kib == 19456
    assert config.database.pool_size == 5


def test_interface_example_config_loads(tmp_path: Path) -> None:
    raw = base(
        tmp_path,
        mail={"location": "maildir:/var/vmail/%d/%n/Maildir", "uid": 5000, "gid": 5000},
        policyd={
            "listen": "unix:/var/spool/postfix/private/mailplugins-policy:mode=660",
            "metrics": "tcp:9641:interface=127.0.0.1",
            "mynetworks": ["127.0.0.0/8", "::1/128"],
        },
        authd={
            "sasl_listen": "unix:/var/spool/postfix/private/mailplugins-auth:mode=660",
            "dict_listen": "unix:/run/mailplugins/dict.sock:mode=660",
            "http_listen": "tcp:9643:interface=127.0.0.1",
            "metrics": "tcp:9642:interface=127.0.0.1",
        },
        deliver={
            "listen": ["unix:/var/spool/postfix/private/mailplugins-deliver:mode=660",
                       "systemd:domain=UNIX:name=deliver"],
            "metrics": "tcp:9644:interface=127.0.0.1",
        },
    )
    config = parse_config(raw)
    assert config.configured_daemons() == ("policyd", "authd", "deliver")
    assert config.mail.location == "/var/vmail/%d/%n/Maildir"
    assert config.policyd is not None
    assert config.policyd.mynetworks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.policyd.listen == ("unix:/var/spool/postfix/private/mailplugins-policy:mode=660",)
    assert config.deliver is not None and len(config.deliver.listen) == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"policyd": {"listen": "tcp:1", "mynetworks": ["127.0.0.0/8", "10.0.0.300/8"]}},
         'policyd.mynetworks[1]: not an IP network: "10.0.0.300/8"'),
        ({"policyd": {"listen": "tcp:abc"}}, "policyd.listen: not a valid endpoint"),
        ({"policyd": {"listen": ["tcp:1", "bogus:1"]}}, "policyd.listen[1]: not a valid endpoint"),
        ({"policyd": {"listen": "systemd:domain=UNIX"}}, "policyd.listen: systemd endpoint needs name="),
        ({"policyd": {}}, "policyd.listen: required key is missing"),
        ({"policyd": {"listen": "tcp:1", "budget": "fast"}}, "policyd.budget: not a duration"),
        ({"mail": {"uid": "no-such-user-here"}}, 'mail.uid: no such user: "no-such-user-here"'),
        ({"mail": {"location": "relative/%u"}}, "mail.location: must be an absolute path"),
        ({"mail": {"location": "/var/vmail/all"}}, "mail.location: must contain %u, %n or %d"),
        ({"mail": {"location": "/var/vmail/%x"}}, "mail.location: unknown variable '%x'"),
        ({"mail": {"colour": "blue"}}, "mail.colour: unknown key"),
        ({"passwords": {"scheme": "MD5"}}, "passwords.scheme: must be one of"),
        ({"passwords": {"bcrypt_cost": 2}}, "passwords.bcrypt_cost: must be at least 4"),
        ({"passwords": {"bcrypt_cost": "high"}}, 'passwords.bcrypt_cost: expected an integer, got "high"'),
        ({"database": {"url": "oracle://x"}}, "database.url: unsupported database"),
        ({"database": {"url": "sqlite:////no/such/dir/x.db"}}, "database.url: directory does not exist"),
        ({"database": {"url": "not a url"}}, "database.url: not a database URL"),
        ({"polciyd": {}}, "polciyd: unknown key"),
        ({"mail": ["a"]}, "mail: expected a mapping, got a list"),
        (["a"], "<top level>: expected a mapping"),
        ({"authd": {"metrics": "tcp:1"}}, "authd.sasl_listen: authd needs at least one"),
    ],
)
def test_errors_name_the_key_path(raw: dict[str, object], expected: str, tmp_path: Path) -> None:
    if isinstance(raw, dict) and "database" not in raw:
        raw = {"database": {"url": f"sqlite:///{tmp_path}/m.db"}, **raw}
    assert expected in error_of(raw)


def test_unknown_key_error_names_nested_path(tmp_path: Path) -> None:
    text = error_of(base(tmp_path, deliver={"listen": "tcp:1", "lisen": "x"}))
    assert text == "deliver.lisen: unknown key"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("300s", 300.0), ("5m", 300.0), ("2h", 7200.0), ("2d", 172800.0),
     ("250ms", 0.25), ("1w", 604800.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "-5s", True, [1], "5 parsecs"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [(1024, 1024), ("10M", 10 * 1024**2), ("1GiB", 1024**3), ("512k", 524288), ("7", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_fields_section_absent_vs_empty() -> None:
    fields = Fields({"a": {}, "b": None})
    assert fields.section("a") is not None
    assert fields.section("missing") is None


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*: No such file"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("policyd:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line"):
        load_config(str(bad))
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("policyd: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(str(tagged))


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(f"database:\n  url: sqlite:///{tmp_path}/m.db\nmail:\n  uid: 0\n  gid: root\n")
    config = load_config(str(path))
    assert config.source == str(path)
    assert (config.mail.uid, config.mail.gid) == (0, 0)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path))
    with pytest.raises(AttributeError):
        config.mail = None  # type: ignore[misc, assignment]


def test_ssl_listener_without_pyopenssl_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "OpenSSL" else real(name, *a))
    message = error_of(base(tmp_path, policyd={"listen": "ssl:9640:privateKey=k.pem"}))
    assert message == (
        "policyd.listen: ssl: endpoints need pyOpenSSL (pip install 'mailplugins[tls]'): "
        '"ssl:9640:privateKey=k.pem"'
    )
