# -*- test-case-name: tests.unit.test_deliver_lmtp -*-
"""deliver as a mailplugins daemon: the LMTP listener(s), the disk pool, reload and stop."""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from deliver.files import clean_stale
from deliver.lmtp import LMTPFactory
from deliver.metrics import DeliverMetrics
from deliver.service import DeliveryService, mail_root
from mailplugins.config import Config
from mailplugins.connections import ConnectionLimit
from mailplugins.daemon import Listener, Runtime, capped_listeners
from mailplugins.threads import WorkerPool

log = Logger(namespace="deliver")

#: How long stop() waits for deliveries in progress (Postfix retries anything unanswered).
STOP_GRACE = 30.0


class RunningDeliver:
    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config
        assert config.deliver is not None
        self.runtime = runtime
        self.disk = WorkerPool(runtime.reactor, "disk", config.deliver.disk_threads)
        self.service = DeliveryService(
            runtime.reactor, config, runtime.db, self.disk, DeliverMetrics(runtime.metrics)
        )
        lmtp: Any = LMTPFactory(self.service, runtime.reactor)
        #: max_connections, across all of deliver's listeners.
        self.limit = ConnectionLimit(config.deliver.max_connections)
        self.listeners: list[Listener]
        self.listeners, self.limited = capped_listeners(
            "deliver.listen", config.deliver.listen, lmtp, limit=self.limit,
            metrics=runtime.metrics, refusal=b"421 4.3.2 Too many connections, try again later\r\n",
        )
        root = mail_root(config.mail.location)
        if not os.path.isdir(root):
            log.warn("mail root {root} does not exist: create it, owned by the mail user", root=root)
        if os.geteuid() not in (0, config.mail.uid):
            log.warn("deliver runs as uid {uid}, neither root nor mail.uid {mail_uid}: "
                     "Dovecot may not be able to read what it writes",
                     uid=os.geteuid(), mail_uid=config.mail.uid)
        # Named spool files only exist where O_TMPFILE is unsupported; old ones are garbage.
        self.disk.run(clean_stale, self.service.spool_directory, time.time() - 3600).addErrback(
            lambda f: log.warn("cannot clean spool directory: {error}", error=f.getErrorMessage())
        )

    def reload(self, config: Config) -> None:
        assert config.deliver is not None
        self.service.reload(config)
        self.limit.maximum = config.deliver.max_connections

    def stop(self) -> Deferred[Any] | None:
        pending = list(self.service.in_flight)
        if not pending:
            self.disk.stop()
            return None
        log.info("waiting for {count} deliveries in progress", count=len(pending))
        waiting: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        waiting.addTimeout(STOP_GRACE, self.runtime.reactor)
        waiting.addErrback(lambda _: None)
        waiting.addBoth(lambda _: self.disk.stop())
        return waiting


class DeliverPlugin:
    name = "deliver"

    def build(self, runtime: Runtime) -> RunningDeliver:
        return RunningDeliver(runtime)


DAEMON = DeliverPlugin()
