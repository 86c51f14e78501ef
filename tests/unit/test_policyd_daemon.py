"""The daemon wiring: listeners per endpoint, reload swaps config and drops the cache."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from mailplugins.config import Config, parse_config
from mailplugins.daemon import Runtime, load_daemon
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool
from policyd.daemon import DAEMON, RunningPolicyd


def config(**policyd: Any) -> Config:
    section: dict[str, Any] = {"listen": ["tcp:0:interface=127.0.0.1", "unix:/tmp/mp-p.sock"]}
    section.update(policyd)
    return parse_config({"database": {"url": "sqlite://"}, "policyd": section})


METRICS: dict[int, DaemonMetrics] = {}


def build(cfg: Config) -> tuple[RunningPolicyd, Database]:
    reactor = MemoryReactorClock()
    db = Database(reactor, cfg.database)
    metrics = DaemonMetrics("policyd")
    runtime = Runtime(reactor, cfg, db, metrics, WorkerPool(reactor, "cpu", 1))
    running = DAEMON.build(runtime)
    METRICS[id(running)] = metrics
    return running, db


def running_metrics(running: RunningPolicyd) -> str:
    return METRICS[id(running)].render().decode()


def test_entry_point() -> None:
    assert load_daemon("policyd") is DAEMON
    assert DAEMON.name == "policyd"


def test_one_listener_per_endpoint() -> None:
    running, db = build(config())
    try:
        assert [(each.key, each.endpoint) for each in running.listeners] == [
            ("policyd.listen[0]", "tcp:0:interface=127.0.0.1"),
            ("policyd.listen[1]", "unix:/tmp/mp-p.sock"),
        ]
        assert running.stop() is None
    finally:
        db.close()


def test_cache_gauges() -> None:
    running, db = build(config())
    try:
        running.lookups.cache.put(("domain", "example.org"), True)
        text = running_metrics(running)
        assert "mailplugins_policyd_cache_entries 1.0" in text
        assert "mailplugins_policyd_pending_lookups 0.0" in text
    finally:
        db.close()


def test_reload() -> None:
    running, db = build(config(cache_ttl="30s", max_connections=10))
    try:
        running.lookups.cache.put(("domain", "example.org"), True)
        new = config(cache_ttl="5s", max_connections=20, spoof_protection=False)
        running.reload(new)
        assert len(running.lookups.cache) == 0
        assert running.lookups.cache.ttl == 5
        assert running.service.config is new.policyd
        assert running.factory.config is new.policyd
        assert running.limit.maximum == 20
        assert [limited.limit for limited in running.limited] == [running.limit] * 2
    finally:
        db.close()


def test_max_connections_is_one_cap_across_listeners() -> None:
    from twisted.internet.testing import StringTransport

    running, db = build(config(max_connections=2))
    try:
        factories: list[Any] = [listener.factory for listener in running.listeners]
        first, second = factories
        for factory in (first, second):
            factory.buildProtocol(None).makeConnection(StringTransport())
        refused = StringTransport()
        first.buildProtocol(None).makeConnection(refused)
        assert refused.disconnecting  # two open in the daemon, one on each listener: full
        assert running.limit.open == 2
    finally:
        db.close()


GREYLIST = {"hostname": "mx.example.org", "purge_interval": "10m"}
RATELIMIT = {"rules": {"r": {"windows": [{"period": "1h", "messages": 5}]}}, "purge_interval": "5m"}


def purge_interval(running: RunningPolicyd) -> float | None:
    from mailplugins.timers import PeriodicService

    if "purge" not in running.timers.names():
        return None
    timer = running.timers.getServiceNamed("purge")
    assert isinstance(timer, PeriodicService) and timer.running
    return timer.interval


@pytest.mark.parametrize(("section", "interval"), [
    ({"greylist": GREYLIST}, 600.0),
    ({"ratelimit": RATELIMIT}, 300.0),
    ({"greylist": GREYLIST, "ratelimit": RATELIMIT}, 300.0),
])
def test_reload_starts_and_stops_the_purge_with_its_settings(section: dict[str, Any],
                                                             interval: float) -> None:
    running, db = build(config())
    try:
        assert running.timers.names() == []
        running.reload(config(**section))
        assert purge_interval(running) == interval
        running.reload(config())
        assert running.timers.names() == []
        running.reload(config(**section))
        assert purge_interval(running) == interval
        running.stop()
        assert not running.timers.running
    finally:
        db.close()


def test_a_purge_built_at_start_runs_and_follows_reloads() -> None:
    running, db = build(config(greylist=GREYLIST))
    try:
        assert purge_interval(running) == 600.0
        running.reload(config(greylist={**GREYLIST, "purge_interval": "2m"}))
        assert purge_interval(running) == 120.0
        stateful = running.service.stateful
        assert stateful is not None
        seen: list[Any] = []

        def purge_now(checks: Any = None) -> Deferred[Any]:
            seen.append(checks)
            return succeed(None)

        stateful.purge_now = purge_now  # type: ignore[method-assign]
        running.reload(config(greylist={**GREYLIST, "purge_interval": "2m"}, cache_ttl="5s"))
        reactor = running.runtime.reactor
        reactor.advance(120)
        assert seen == [running.service.snapshot.checks]  # the latest settings' purge
    finally:
        running.stop()
        db.close()
