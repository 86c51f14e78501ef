"""``mailplugins ratelimit``: overrides round-trip through the CLI, usage and resets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from mailplugins.config import load_config
from mailplugins.db.engine import make_engine
from policyd.sql.ratelimit import RateKey, rate_check
from tests.unit.test_cli_accounts import Cli


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url},
        "policyd": {
            "listen": "tcp:0:interface=127.0.0.1",
            "ratelimit": {"rules": {"outbound": {
                "key": ["sasl_username", "sender", "client_address"],
                "windows": [{"period": "1h", "messages": 100}, {"period": "1d", "messages": 1000}],
            }}},
        },
    }))
    tool = Cli(config)
    tool.ok("db", "upgrade")
    return tool


def test_overrides_round_trip(cli: Cli) -> None:
    assert "bob@example.org per 3600s: messages=5 recipients=inherit bytes=unlimited" in cli.ok(
        "ratelimit", "set", "outbound", "Bob@Example.org", "1h", "--messages", "5", "--bytes", "-1")
    cli.ok("ratelimit", "set", "outbound", "@example.org", "1d", "--recipients", "10K")
    rows = json.loads(cli.ok("ratelimit", "list", "--json"))
    assert [(r["subject"], r["period"], r["messages"], r["recipients"], r["bytes"]) for r in rows] == [
        ("@example.org", 86400, None, 10240, None),
        ("bob@example.org", 3600, 5, None, -1),
    ]
    assert cli("ratelimit", "set", "outbound", "bob@example.org", "1h")[0] == 2
    assert "no rate-limit rule 'inbound'" in cli.fails(1, "ratelimit", "set", "inbound", "x@example.org",
                                                       "1h", "--messages", "1")
    assert "not an address or @domain" in cli.fails(1, "ratelimit", "set", "outbound", "not an address",
                                                    "1h", "--messages", "1")
    cli.ok("ratelimit", "remove", "outbound", "@example.org")
    cli.fails(1, "ratelimit", "remove", "outbound", "@example.org")
    assert len(json.loads(cli.ok("ratelimit", "list", "outbound", "--json"))) == 1


def test_show_and_reset_what_policyd_counted(cli: Cli) -> None:
    config = load_config(str(cli.config))
    engine = make_engine(config.database)
    assert config.policyd is not None and config.policyd.ratelimit is not None
    rule = config.policyd.ratelimit.rules[0]
    key = RateKey(rule.name, "bob@example.org", rule.windows, ("@example.org", "bob@example.org"))
    for _ in range(3):
        assert rate_check(engine, [key], time.time(), messages=1, recipients=2).admitted
    engine.dispose()
    shown = json.loads(cli.ok("ratelimit", "show", "outbound", "BOB+lists@example.org", "--json"))
    assert [(u["subject"], u["period"], u["messages"], u["recipients"]) for u in shown] == [
        ("bob@example.org", 3600, 3, 6), ("bob@example.org", 86400, 3, 6)]
    assert "reset bob@example.org" in cli.ok("ratelimit", "reset", "outbound", "bob@example.org")
    shown = json.loads(cli.ok("ratelimit", "show", "outbound", "bob@example.org", "--json"))
    assert [u["messages"] for u in shown] == [0, 0]
