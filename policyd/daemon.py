# -*- test-case-name: tests.unit.test_policyd_daemon -*-
"""policyd as a mailplugins daemon: wiring of config, lookups, service and listeners."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory

from mailplugins.config import Config
from mailplugins.connections import ConnectionLimit, LimitedFactory
from mailplugins.daemon import Listener, Runtime, capped_listeners
from policyd.lookups import Lookups
from policyd.message_checks import build_stateful, reload_stateful
from policyd.protocol import PolicyFactory
from policyd.service import PolicyMetrics, PolicyService

#: Distinct database lookups pending beyond which new misses get the fallback at once.
MAX_PENDING_LOOKUPS = 1000


@dataclass
class RunningPolicyd:
    service: PolicyService
    lookups: Lookups
    factory: PolicyFactory
    #: max_connections, across all of policyd's listeners.
    limit: ConnectionLimit
    limited: list[LimitedFactory]
    listeners: list[Listener] = field(default_factory=list)

    def reload(self, config: Config) -> None:
        section = config.policyd
        assert section is not None
        self.lookups.reconfigure(
            ttl=section.cache_ttl, size=section.cache_size,
            delimiters=config.mail.recipient_delimiter,
        )
        self.service.reconfigure(section)
        if self.service.stateful is not None:
            reload_stateful(self.service.stateful, config)
        # New connections get the new limits; open ones keep theirs until they close.
        self.factory.config = section
        self.limit.maximum = section.max_connections

    def stop(self) -> Deferred[None] | None:
        if self.service.stateful is not None:
            self.service.stateful.close()
        return None


class PolicydPlugin:
    name = "policyd"

    def build(self, runtime: Runtime) -> RunningPolicyd:
        config = runtime.config.policyd
        assert config is not None
        reactor = runtime.reactor
        lookups = Lookups(
            runtime.db.store, runtime.db.run, reactor.seconds,
            ttl=config.cache_ttl, size=config.cache_size,
            delimiters=runtime.config.mail.recipient_delimiter,
            max_pending=MAX_PENDING_LOOKUPS,
        )
        service = PolicyService(config, lookups, reactor, PolicyMetrics(runtime.metrics))
        service.stateful = build_stateful(runtime)
        # Read at scrape time only: nothing on the request path.
        runtime.metrics.gauge("cache_entries", "Lookups held in the cache.").set_function(
            lambda: len(lookups.cache)
        )
        runtime.metrics.gauge(
            "pending_lookups", "Distinct database lookups queued or running."
        ).set_function(lambda: lookups.pending)
        factory = PolicyFactory(service, config, reactor)
        limit = ConnectionLimit(config.max_connections)
        listeners, limited = capped_listeners(
            "policyd.listen", config.listen, cast(IProtocolFactory, factory),
            limit=limit, metrics=runtime.metrics,
        )
        running = RunningPolicyd(service, lookups, factory, limit, limited, listeners)
        # Move everything alive after startup (modules, SQLAlchemy, Twisted: a few hundred
        # thousand objects) out of the collector's reach: a full collection then scans only
        # what was made since, instead of pausing every connection for ~50-70 ms.
        reactor.callLater(0, gc.freeze)
        return running


DAEMON = PolicydPlugin()
