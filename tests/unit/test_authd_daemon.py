"""authd's daemon wiring and its config section."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
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
        assert running.limit.maximum == 20
        assert [each.limit for each in running.limited] == [running.limit] * 4  # sasl x2, dict, http
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


def test_shared_counters_are_swept_periodically() -> None:
    from authd import failures
    from authd.daemon import SWEEP_INTERVAL
    from mailplugins.db import schema

    running, db = build(config(penalty_window="10m"))
    calls: list[tuple[Any, ...]] = []
    try:
        schema.upgrade(db.engine)
        failures.record_failure(db.engine, ["ip:192.0.2.1"], "aa", now=0, window=600)
        assert running.sweeping
        db.run = lambda fn, *args: calls.append((fn, *args)) or succeed(fn(*args))  # type: ignore[method-assign, assignment, func-returns-value]
        reactor = running.runtime.reactor
        reactor.advance(SWEEP_INTERVAL + 1)
        assert calls and calls[0][0] is failures.purge
        assert failures.failure_counts(db.engine, ["ip:192.0.2.1"], now=0, window=10**9) == {}
        running.stop()
        assert not running.sweeping
        reactor.advance(SWEEP_INTERVAL * 3)
        assert len(calls) == 1
    finally:
        db.close()


def test_no_sweeper_without_sharing() -> None:
    running, db = build(config(penalty_shared=False))
    try:
        assert not running.sweeping
    finally:
        db.close()


def sweeps(running: RunningAuthd, db: Database) -> list[Any]:
    """Stub the database pool: each sweep appends its job instead of touching a database."""
    from authd import failures

    calls: list[Any] = []

    def run(fn: Any, *args: Any) -> Any:
        assert fn is failures.purge
        calls.append(args)
        return succeed(None)

    db.run = run  # type: ignore[method-assign, assignment]
    return calls


def test_reload_switches_the_sweep_on_and_off() -> None:
    """Issue 14: penalty_shared switched on by SIGHUP starts the sweep, switched off stops it."""
    from authd.daemon import SWEEP_INTERVAL

    running, db = build(config(penalty_shared=False, penalty_window="10m"))
    calls = sweeps(running, db)
    reactor = running.runtime.reactor
    try:
        reactor.advance(SWEEP_INTERVAL * 2)
        assert calls == []
        running.reload(config(penalty_shared=True, penalty_window="20m"))
        reactor.advance(SWEEP_INTERVAL)
        assert len(calls) == 1
        assert running.sweeping
        assert calls[0][-1] == 1200  # the reloaded penalty_window
        reactor.advance(SWEEP_INTERVAL)
        assert len(calls) == 2
        running.reload(config(penalty_shared=True))  # still on: the same one timer
        reactor.advance(SWEEP_INTERVAL)
        assert len(calls) == 3
        running.reload(config(penalty_shared=False))
        reactor.advance(SWEEP_INTERVAL * 3)
        assert len(calls) == 3
        assert not running.sweeping
        running.reload(config(penalty_shared=True))
        reactor.advance(SWEEP_INTERVAL)
        assert len(calls) == 4
        assert running.stop() is None
        assert not running.sweeping
        reactor.advance(SWEEP_INTERVAL * 3)
        assert len(calls) == 4
    finally:
        db.close()


def test_a_failing_sweep_does_not_stop_the_next() -> None:
    from authd.daemon import SWEEP_INTERVAL

    running, db = build(config(penalty_shared=True))
    calls: list[str] = []

    def run(fn: Any, *args: Any) -> Any:
        calls.append("run")
        if len(calls) == 1:
            raise RuntimeError("pool is gone")  # raised, not through a Deferred
        if len(calls) == 2:
            return fail(RuntimeError("database down"))
        return succeed(None)

    db.run = run  # type: ignore[method-assign, assignment]
    reactor = running.runtime.reactor
    try:
        for expected in (1, 2, 3, 4):
            reactor.advance(SWEEP_INTERVAL)
            assert len(calls) == expected
        assert running.sweeping
    finally:
        running.stop()
        db.close()


def test_max_connections_is_one_cap_across_sasl_dict_and_http() -> None:
    from twisted.internet.testing import StringTransport

    running, db = build(config(max_connections=2))
    try:
        sasl, _unix, dict_listener, http = (listener.factory for listener in running.listeners)
        sasl.buildProtocol(None).makeConnection(StringTransport())
        dict_listener.buildProtocol(None).makeConnection(StringTransport())
        refused = StringTransport()
        http.buildProtocol(None).makeConnection(refused)
        assert refused.disconnecting and refused.value() == b""
        assert running.limit.open == 2
    finally:
        db.close()
