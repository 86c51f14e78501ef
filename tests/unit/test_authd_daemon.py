"""authd's daemon wiring and its config section."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from authd.daemon import DAEMON, RunningAuthd
from mailplugins.config import Config, ConfigError, parse_config
from mailplugins.daemon import Runtime, load_daemon
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool


def config(**authd: Any) -> Config:
    section: dict[str, Any] = {
        "sasl_listen": ["tcp:0:interface=127.0.0.1", "unix:/tmp/mp-a.sock"],
        "dict_listen": "unix:/tmp/mp-d.sock",
        "http_listen": "tcp:0:interface=127.0.0.1",
    }
    section.update(authd)
    return parse_config({"database": {"url": "sqlite://"}, "authd": section})


def build(cfg: Config) -> tuple[RunningAuthd, Database]:
    reactor = MemoryReactorClock()
    db = Database(reactor, cfg.database)
    runtime = Runtime(reactor, cfg, db, DaemonMetrics("authd"), WorkerPool(reactor, "cpu", 1))
    return DAEMON.build(runtime), db


def test_entry_point() -> None:
    assert load_daemon("authd") is DAEMON
    assert DAEMON.name == "authd"


def test_listeners() -> None:
    running, db = build(config())
    try:
        assert [(each.key, each.endpoint) for each in running.listeners] == [
            ("authd.sasl_listen[0]", "tcp:0:interface=127.0.0.1"),
            ("authd.sasl_listen[1]", "unix:/tmp/mp-a.sock"),
            ("authd.dict_listen", "unix:/tmp/mp-d.sock"),
            ("authd.http_listen", "tcp:0:interface=127.0.0.1"),
        ]
        assert running.stop() is None
    finally:
        db.close()


def test_reload() -> None:
    running, db = build(config(cache_ttl="60s", max_connections=10))
    try:
        new = config(cache_ttl="5s", max_connections=20, failure_delay="1s", http_failure_delay="1s")
        running.reload(new)
        assert running.verifier.config is new.authd
        assert running.verifier.cache.ttl == 5
        assert running.sasl.config is new.authd
        assert running.dict_backend.config is new
        assert [each.maximum for each in running.limited] == [20, 20, 20]  # sasl, dict, http
    finally:
        db.close()


def test_defaults() -> None:
    section = config().authd
    assert section is not None
    assert section.failure_delay == 2.0
    assert section.failure_delay + section.penalty_max < 10
    assert section.request_timeout < 10
    assert section.max_line_length == 16384
    assert section.trusted_networks == ()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"failure_delay": "12s"}, "authd.failure_delay"),
        ({"penalty_max": "7s"}, "authd.penalty_max"),  # 2 s + 7 s is over the 8 s budget
        ({"penalty_initial": "6s", "penalty_max": "5s"}, "authd.penalty_initial"),
        ({"request_timeout": "10s"}, "authd.request_timeout"),
        ({"trusted_networks": ["nonsense"]}, "authd.trusted_networks[0]"),
        ({"bogus": 1}, "authd.bogus"),
        ({"sasl_listen": [], "dict_listen": [], "http_listen": []}, "authd.sasl_listen"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(**settings)
    assert info.value.path.startswith(key)
