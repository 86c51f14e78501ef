# -*- test-case-name: tests.unit.test_milterd_live -*-
"""milterd as a mailplugins daemon: config, checks, pools, listeners and metrics.

Like the other daemons, the running daemon holds its
:class:`~mailplugins.timers.DaemonServices` with ``timers``; milterd's settings want no periodic
job (its caches expire entry by entry). A reload
builds new :class:`~milterd.live.LiveChecks` from the new config and gives it, with the new
settings, to the factory: each connection takes the pair once, when it opens, so a message in
flight never mixes old and new settings.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory

from mailplugins.config import Config
from mailplugins.connections import ConnectionLimit, LimitedFactory
from mailplugins.daemon import Listener, Runtime, capped_listeners
from mailplugins.threads import WorkerPool
from mailplugins.timers import DaemonServices, Timers
from milterd.live import LiveChecks
from milterd.protocol import MilterFactory
from milterd.session import MilterMetrics


@dataclass
class RunningMilterd:
    checks: LiveChecks
    factory: MilterFactory
    dns_pool: WorkerPool
    #: max_connections, across all of milterd's listeners.
    limit: ConnectionLimit
    limited: list[LimitedFactory]
    listeners: list[Listener] = field(default_factory=list)
    #: Started at build, stopped by :meth:`stop`; its ``timers`` want no job today.
    services: DaemonServices = field(init=False)

    def __post_init__(self) -> None:
        self.services = DaemonServices(self.factory.clock)

    @property
    def timers(self) -> Timers:
        return self.services.timers

    def start(self) -> None:
        self.services.startService()

    def reload(self, config: Config) -> None:
        section = config.milterd
        assert section is not None
        checks = self.checks.renewed(section, config.mail.recipient_delimiter)
        # New connections get the new checks and limits together; open ones keep theirs.
        self.checks = self.factory.checks = checks
        self.factory.config = section
        self.limit.maximum = section.max_connections

    def stop(self) -> Deferred[None] | None:
        self.services.stop()
        self.dns_pool.stop()
        return None


class MilterdPlugin:
    name = "milterd"

    def build(self, runtime: Runtime, checks: LiveChecks | None = None) -> RunningMilterd:
        config = runtime.config.milterd
        assert config is not None
        reactor = runtime.reactor
        dns_pool = WorkerPool(reactor, "dns", config.dns_threads)
        live = checks or LiveChecks(
            config, store=runtime.db.store, db_run=runtime.db.run, cpu_run=runtime.cpu.run,
            dns_run=dns_pool.run, clock=reactor, delimiters=runtime.config.mail.recipient_delimiter,
        )
        metrics = MilterMetrics(runtime.metrics)
        factory = MilterFactory(live, config, reactor, metrics)
        limit = ConnectionLimit(config.max_connections)
        listeners, limited = capped_listeners(
            "milterd.listen", config.listen, cast(IProtocolFactory, factory),
            limit=limit, metrics=runtime.metrics,
        )
        running = RunningMilterd(live, factory, dns_pool, limit, limited, listeners)
        running.start()
        runtime.metrics.gauge("dns_cache_entries", "DNS answers held in the cache.").set_function(
            lambda: len(running.checks.resolver)
        )
        runtime.metrics.gauge("dns_queued", "DNS lookups waiting for a thread.").set_function(
            lambda: dns_pool.queued
        )
        runtime.metrics.gauge(
            "dns_queries", "DNS lookups made since the last start or reload (cache misses)."
        ).set_function(lambda: running.checks.resolver.queries)
        reactor.callLater(0, gc.freeze)  # as policyd: keep full collections short
        return running


DAEMON = MilterdPlugin()
