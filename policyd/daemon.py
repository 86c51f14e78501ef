# -*- test-case-name: tests.unit.test_policyd_daemon -*-
"""policyd as a mailplugins daemon: wiring of config, lookups, service, timers and listeners.

The running daemon holds its :class:`~mailplugins.timers.DaemonServices` (a ``MultiService``)
whose ``timers`` run the periodic jobs the settings need (the greylisting and rate-limit purge). A
reload builds the next :class:`~policyd.service.Snapshot` whole (settings, a fresh lookup
cache, the stateful checks) and swaps it in; requests in flight finish on theirs.
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
from mailplugins.timers import DaemonServices, Timers
from policyd.lookups import Lookups
from policyd.message_checks import build_stateful, reload_stateful
from policyd.protocol import PolicyFactory
from policyd.service import PolicyMetrics, PolicyService, Snapshot

#: Distinct database lookups pending beyond which new misses get the fallback at once.
MAX_PENDING_LOOKUPS = 1000


def make_lookups(runtime: Runtime, config: Config) -> Lookups:
    section = config.policyd
    assert section is not None
    return Lookups(
        runtime.db.store, runtime.db.run, runtime.reactor.seconds,
        ttl=section.cache_ttl, size=section.cache_size,
        delimiters=config.mail.recipient_delimiter,
        max_pending=MAX_PENDING_LOOKUPS,
    )


@dataclass
class RunningPolicyd:
    runtime: Runtime
    service: PolicyService
    factory: PolicyFactory
    #: max_connections, across all of policyd's listeners.
    limit: ConnectionLimit
    limited: list[LimitedFactory]
    listeners: list[Listener] = field(default_factory=list)
    #: Started at build, stopped by :meth:`stop`; its ``timers`` hold the periodic jobs.
    services: DaemonServices = field(init=False)

    def __post_init__(self) -> None:
        self.services = DaemonServices(self.runtime.reactor)

    @property
    def timers(self) -> Timers:
        return self.services.timers

    @property
    def lookups(self) -> Lookups:
        """The current snapshot's lookups (a reload makes new ones)."""
        return self.service.lookups

    def start(self) -> None:
        self.services.startService()
        self._set_timers()

    def _set_timers(self) -> None:
        stateful = self.service.stateful
        self.timers.want(stateful.periodic() if stateful is not None else [])

    def reload(self, config: Config) -> None:
        section = config.policyd
        assert section is not None
        stateful = self.service.stateful
        checks = reload_stateful(stateful, config) if stateful is not None else None
        self.service.swap(Snapshot(section, make_lookups(self.runtime, config), checks))
        self._set_timers()
        # New connections get the new limits; open ones keep theirs until they close.
        self.factory.config = section
        self.limit.maximum = section.max_connections

    def stop(self) -> Deferred[None] | None:
        self.services.stop()  # the timers stop at once; a purge in flight just ends
        if self.service.stateful is not None:
            self.service.stateful.close()
        return None


class PolicydPlugin:
    name = "policyd"

    def build(self, runtime: Runtime) -> RunningPolicyd:
        config = runtime.config.policyd
        assert config is not None
        reactor = runtime.reactor
        lookups = make_lookups(runtime, runtime.config)
        service = PolicyService(config, lookups, reactor, PolicyMetrics(runtime.metrics))
        service.stateful = build_stateful(runtime)
        # Read at scrape time only: nothing on the request path.
        runtime.metrics.gauge("cache_entries", "Lookups held in the cache.").set_function(
            lambda: len(service.lookups.cache)
        )
        runtime.metrics.gauge(
            "pending_lookups", "Distinct database lookups queued or running."
        ).set_function(lambda: service.lookups.pending)
        factory = PolicyFactory(service, config, reactor)
        limit = ConnectionLimit(config.max_connections)
        listeners, limited = capped_listeners(
            "policyd.listen", config.listen, cast(IProtocolFactory, factory),
            limit=limit, metrics=runtime.metrics,
        )
        running = RunningPolicyd(runtime, service, factory, limit, limited, listeners)
        running.start()
        # Move everything alive after startup (modules, SQLAlchemy, Twisted: a few hundred
        # thousand objects) out of the collector's reach: a full collection then scans only
        # what was made since, instead of pausing every connection for ~50-70 ms.
        reactor.callLater(0, gc.freeze)
        return running


DAEMON = PolicydPlugin()
