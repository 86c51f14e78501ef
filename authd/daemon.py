# -*- test-case-name: tests.unit.test_authd_daemon -*-
"""authd as a mailplugins daemon: one verifier shared by the SASL, dict and HTTP listeners."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from authd import failures
from authd.dict import DictBackend, DictFactory
from authd.http import VerifyResource, VerifySite
from authd.metrics import AuthdMetrics
from authd.sasl import AuthClientFactory
from authd.shared_writes import shared_writes_for
from authd.verify import Verifier
from mailplugins.config import AuthdConfig, Config
from mailplugins.connections import ConnectionLimit, LimitedFactory
from mailplugins.daemon import Listener, Runtime, capped_listeners
from mailplugins.timers import DaemonServices, Periodic, Timers

log = Logger(namespace="authd.daemon")
#: Seconds between sweeps of stale shared failure counters.
SWEEP_INTERVAL = 600.0


@dataclass
class RunningAuthd:
    runtime: Runtime
    verifier: Verifier
    sasl: AuthClientFactory
    dict_backend: DictBackend
    dict_factory: DictFactory
    http: VerifySite
    #: max_connections, across the sasl, dict and http listeners together.
    limit: ConnectionLimit
    listeners: list[Listener] = field(default_factory=list)
    limited: list[LimitedFactory] = field(default_factory=list)
    #: Started at build, stopped by :meth:`stop`; its ``timers`` hold the periodic jobs (the
    #: shared-failure sweep while ``penalty_shared``).
    services: DaemonServices = field(init=False)

    def __post_init__(self) -> None:
        self.services = DaemonServices(self.runtime.reactor)

    @property
    def timers(self) -> Timers:
        return self.services.timers

    @property
    def sweeping(self) -> bool:
        return bool(self.services.running) and "sweep" in self.timers.names()

    def start(self) -> None:
        self.services.startService()
        self._set_timers()

    def _set_timers(self) -> None:
        """Start or stop exactly the timers the current settings need (at build and reload)."""
        section = self.runtime.config.authd
        assert section is not None
        jobs: list[Periodic] = []
        if section.penalty_shared:
            jobs.append(Periodic("sweep", SWEEP_INTERVAL, partial(self.sweep, section)))
        self.timers.want(jobs)

    def reload(self, config: Config) -> None:
        """The verifier swaps its whole state (settings, caches, throttle) in one step, and a
        verification finishes on the state it started with; each front end (SASL, dict, HTTP)
        takes its new settings in one assignment."""
        section = config.authd
        assert section is not None
        self.verifier.reload(section, config.passwords)
        self.sasl.config = section
        self.dict_factory.config = section
        self.dict_backend.config = config
        self.http.max_body = section.http_max_body
        self.http.line_timeout = section.line_timeout
        resource = self.http.resource.children[b"verify"]
        assert isinstance(resource, VerifyResource)
        resource.failure_delay = section.http_failure_delay
        self.limit.maximum = section.max_connections
        self.runtime.config = config  # the runner does this too; the timers read it
        self._set_timers()

    def stop(self) -> Deferred[None] | None:
        self.services.stop()  # the timers stop at once; a sweep in flight just ends
        return None

    def sweep(self, section: AuthdConfig | None = None) -> Deferred[Any]:
        """Drop shared failure counters that no longer count (in the database pool)."""
        section = section or self.runtime.config.authd
        assert section is not None
        engine = self.runtime.db.engine
        now = int(self.runtime.reactor.seconds())
        work = self.runtime.db.run(failures.purge, engine, now, int(section.penalty_window))

        def failed(failure: Failure) -> None:
            log.warn("sweeping shared failure counters failed: {error}",
                     error=failure.type.__name__ if failure.type else "error")

        return work.addErrback(failed)


class AuthdPlugin:
    name = "authd"

    def build(self, runtime: Runtime) -> RunningAuthd:
        config = runtime.config
        section = config.authd
        assert section is not None
        metrics = AuthdMetrics(runtime.metrics)
        db = runtime.db
        verifier = Verifier(
            clock=runtime.reactor,
            store=db.store,
            db_run=db.run,
            cpu_run=runtime.cpu.run,
            config=section,
            passwords=config.passwords,
            metrics=metrics,
            db_timeout=db.timeout,
            shared_writes=shared_writes_for(runtime.reactor, db, metrics.shared_writes),
        )
        sasl = AuthClientFactory(
            verifier=verifier, config=section, metrics=metrics, clock=runtime.reactor
        )
        backend = DictBackend(db.store, config)
        dict_factory = DictFactory(
            backend=backend, db_run=db.run, timeout=db.timeout, clock=runtime.reactor,
            config=section, metrics=metrics,
        )
        http = VerifySite(
            verifier, section.http_failure_delay, section.http_max_body,
            line_timeout=section.line_timeout, reactor=runtime.reactor,
            backend=backend, db_run=db.run, db_timeout=db.timeout,
        )

        limit = ConnectionLimit(section.max_connections)
        listeners: list[Listener] = []
        limited: list[LimitedFactory] = []
        for key, endpoints, factory in (
            ("sasl", section.sasl_listen, sasl),
            ("dict", section.dict_listen, dict_factory),
            ("http", section.http_listen, http),
        ):
            if endpoints:
                more, capped = capped_listeners(
                    f"authd.{key}_listen", endpoints, cast(IProtocolFactory, factory),
                    limit=limit, metrics=runtime.metrics,
                )
                listeners += more
                limited += capped
        running = RunningAuthd(
            runtime, verifier, sasl, backend, dict_factory, http, limit, listeners, limited
        )
        running.start()
        return running


DAEMON = AuthdPlugin()
