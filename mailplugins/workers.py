# -*- test-case-name: tests.unit.test_workers -*-
"""Several worker processes per daemon (``workers: N``): the supervising process.

The supervisor binds every listener once (:mod:`mailplugins.listening`), then starts each
daemon's workers as copies of its own command line; a worker is told which daemon it serves,
which inherited descriptor is which listener, and where to write its metrics, through its
environment (:func:`worker_environment`). It never serves a request itself. It:

- tells systemd ``READY=1`` once every worker has reported that it listens (one line on a
  status pipe); workers never talk to ``$NOTIFY_SOCKET`` (it is not in their environment);
- restarts a worker that dies, after a delay that doubles while restarts keep failing quickly
  (:func:`restart_delay`), logging one line each time;
- on SIGHUP validates the new file whole and only then signals every worker, which reloads as
  a single process does; a bad file is rejected and no worker sees a signal;
- on SIGTERM signals every worker, waits until all have finished their in-flight work and
  exited, then closes the sockets (and unlinks the unix socket files it made);
- serves each daemon's ``metrics`` endpoint, summed over its workers (:mod:`mailplugins.metrics`).

With ``workers: 1`` for every daemon served, :mod:`mailplugins.runner` runs them in one
process as before and none of this is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins import sdnotify
from mailplugins.config import Config, ConfigError, load_config
from mailplugins.connections import WorkerSlots
from mailplugins.daemon import LISTEN_KEYS, configured_listeners
from mailplugins.listening import FDS_ENV, bind, encode_fds, listen_request
from mailplugins.metrics import WorkersMetrics, metrics_site

log = Logger(namespace="mailplugins.workers")

#: A worker's environment: ``<daemon> <index> <status fd> <supervisor pid>``.
WORKER_ENV = "MAILPLUGINS_WORKER"
#: The daemon's private directory: metric snapshots and the connection-count slots.
WORKER_DIR_ENV = "MAILPLUGINS_WORKER_DIR"
#: In the daemon's private directory (beside the metric files): its workers' connection counts.
SLOTS_FILE = "connections.slots"
#: The worker writes ``ready`` there once it listens.
STATUS_FD = 3
#: Restart delays: the first after a quick death, doubling up to the last.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: A worker that ran this long before dying counts as a fresh failure (restarted quickly).
STABLE_AFTER = 60.0
#: How long a scrape of /metrics waits for the workers' fresh snapshots.
SNAPSHOT_WAIT = 0.5
#: How long SIGTERM waits for the workers before SIGKILL (systemd's TimeoutStopSec is shorter).
STOP_GRACE = 60.0
#: Environment a worker must not inherit: readiness and sockets come from the supervisor.
_NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that has died ``failures`` times in quick succession."""
    return float(min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, failures - 1)))


def worker_count(config: Config, name: str) -> int:
    return int(getattr(getattr(config, name), "workers", 1))


def wants_workers(config: Config, names: Sequence[str]) -> bool:
    """Whether ``serve`` needs a supervisor: some daemon asks for more than one process."""
    return any(worker_count(config, name) > 1 for name in names)


@dataclass
class Worker:
    daemon: str
    index: int
    transport: Any = None
    pid: int | None = None
    ready: bool = False
    started_at: float = 0.0
    #: Deaths in quick succession (reset by a run longer than STABLE_AFTER).
    failures: int = 0
    restart: Any = None  # IDelayedCall

    @property
    def alive(self) -> bool:
        return self.transport is not None

    def __str__(self) -> str:
        return f"{self.daemon} worker {self.index}"


@dataclass
class SharedSocket:
    key: str
    endpoint: str
    sock: socket.socket
    #: A unix socket file we created (and remove at exit); None for TCP and systemd's.
    path: str | None = None


@dataclass
class DaemonGroup:
    name: str
    workers: list[Worker]
    sockets: list[SharedSocket] = field(default_factory=list)
    metrics_dir: str = ""
    metrics: WorkersMetrics | None = None

    def live(self) -> int:
        return sum(1 for worker in self.workers if worker.alive)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive and w.pid is not None]


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self._status = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803
        if childFD != STATUS_FD:
            return
        self._status += data
        while b"\n" in self._status:
            line, self._status = self._status.split(b"\n", 1)
            if line == b"ready":
                self.supervisor.worker_ready(self.worker)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        status = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.supervisor.worker_exited(self.worker, status, sig)


class Supervisor:
    """Starts, watches, reloads and stops the workers of the daemons ``names``.

    ``spawn(worker)`` starts one worker and returns its process transport (``pid``,
    ``signalProcess``); the default runs this program again (:meth:`spawn_process`). Tests
    pass a fake and drive :meth:`worker_ready` / :meth:`worker_exited` themselves.
    """

    def __init__(
        self,
        reactor: Any,
        config_path: str,
        config: Config,
        names: Sequence[str],
        spawn: Callable[[Worker], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.config_path = config_path
        self.config = config
        self.names = list(names)
        self.spawn = spawn or self.spawn_process
        self.groups = {
            name: DaemonGroup(name, [Worker(name, i) for i in range(worker_count(config, name))])
            for name in self.names
        }
        self.ports: list[Any] = []
        self.announced = False
        self.stopping = False
        self.exit_status = 0
        self._stopped: defer.Deferred[None] | None = None
        self._kill: Any = None  # IDelayedCall

    # -- start --------------------------------------------------------------------------

    def bind_all(self) -> None:
        """Make every daemon's listening sockets; StartupError names the one that failed."""
        from mailplugins.runner import StartupError, remove_stale_socket, systemd_missing

        for group in self.groups.values():
            section = getattr(self.config, group.name)
            for key, endpoint in configured_listeners(group.name, section):
                try:
                    request = listen_request(endpoint)
                except (KeyError, IndexError):
                    raise StartupError(systemd_missing(key, endpoint), 2) from None
                path = str(request.address) if request.kind == "unix" else None
                if path is not None and not path.startswith("\0"):
                    remove_stale_socket(path)
                try:
                    sock = bind(request)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise StartupError(f"{key}: cannot listen on {endpoint}: {reason}") from None
                owned = path if path is not None and not path.startswith("\0") else None
                group.sockets.append(SharedSocket(key, endpoint, sock, owned))
                log.info("{key}: listening on {endpoint} ({n} workers)", key=key,
                         endpoint=endpoint, n=len(group.workers))

    @defer.inlineCallbacks
    def start(self) -> Any:
        from mailplugins.runner import StartupError, endpoint_string

        self.bind_all()
        for group in self.groups.values():
            group.metrics_dir = tempfile.mkdtemp(prefix=f"mailplugins-{group.name}-")
            WorkerSlots.create(os.path.join(group.metrics_dir, SLOTS_FILE), len(group.workers))
            section = getattr(self.config, group.name)
            if section.metrics:
                group.metrics = WorkersMetrics(group.name, group.metrics_dir, group.live, group.pids,
                                               partial(self.fresh_snapshots, group))
                site = cast(IProtocolFactory, metrics_site(group.metrics))
                key = f"{group.name}.metrics"
                try:
                    port = yield serverFromString(self.reactor, endpoint_string(section.metrics)).listen(site)
                except Exception as exc:
                    reason = getattr(exc, "socketError", None) or exc
                    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
                    raise StartupError(f"{key}: cannot listen on {section.metrics}: {text}") from None
                self.ports.append(port)
                log.info("{key}: listening on {endpoint}", key=key, endpoint=section.metrics)
        self.start_workers()

    def start_workers(self) -> None:
        for group in self.groups.values():
            for worker in group.workers:
                self._start_worker(worker)

    def _start_worker(self, worker: Worker) -> None:
        worker.restart = None
        worker.ready = False
        worker.started_at = self.reactor.seconds()
        try:
            worker.transport = self.spawn(worker)
        except Exception as exc:  # fork or exec refused (EAGAIN, ENOMEM): try again later
            worker.failures += 1
            delay = restart_delay(worker.failures)
            log.error("{worker} cannot be started ({error}); trying again in {delay}s",
                      worker=str(worker), error=exc, delay=f"{delay:g}")
            worker.restart = self.reactor.callLater(delay, self._start_worker, worker)
            return
        worker.pid = getattr(worker.transport, "pid", None)

    def worker_environment(self, worker: Worker, fds: dict[str, int]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_WORKERS}
        env[WORKER_ENV] = f"{worker.daemon} {worker.index} {STATUS_FD} {os.getpid()}"
        env[FDS_ENV] = encode_fds(fds)
        env[WORKER_DIR_ENV] = self.groups[worker.daemon].metrics_dir
        return env

    def spawn_process(self, worker: Worker) -> Any:
        """Run this program again as one worker, with the daemon's sockets from fd 4 on."""
        group = self.groups[worker.daemon]
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, STATUS_FD: "r"}
        fds: dict[str, int] = {}
        for number, shared in enumerate(group.sockets, start=STATUS_FD + 1):
            child_fds[number] = shared.sock.fileno()
            fds[shared.key] = number
        argv = [sys.executable, *sys.orig_argv[1:]]
        return self.reactor.spawnProcess(
            _WorkerProtocol(self, worker), sys.executable, argv,
            env=self.worker_environment(worker, fds), childFDs=child_fds,
        )

    # -- events from the workers --------------------------------------------------------

    def worker_ready(self, worker: Worker) -> None:
        if worker.ready:
            return
        worker.ready = True
        log.info("{worker} serving (pid {pid})", worker=str(worker), pid=worker.pid)
        if not self.announced and all(w.ready for g in self.groups.values() for w in g.workers):
            self.announced = True
            total = sum(len(g.workers) for g in self.groups.values())
            sdnotify.ready(f"serving {', '.join(self.names)} ({total} workers)")
            log.info("mailplugins {names} ready", names=" ".join(self.names))

    def worker_exited(self, worker: Worker, status: int | None, sig: int | None) -> None:
        pid = worker.pid
        worker.transport = None
        how = f"killed by signal {sig}" if sig else f"exited with status {status}"
        if self.stopping:
            log.info("{worker} (pid {pid}) {how}", worker=str(worker), pid=pid, how=how)
            self._maybe_stopped()
            return
        if not self.announced and not worker.ready:
            # A worker that cannot start (it printed its one-line reason) stops the service,
            # as a single process would: restarting it would fail the same way.
            log.error("{worker} (pid {pid}) {how} before it was ready; stopping",
                      worker=str(worker), pid=pid, how=how)
            self.exit_status = status or 1
            if self.reactor.running:
                self.reactor.stop()
            return
        ran = self.reactor.seconds() - worker.started_at
        worker.failures = 1 if ran >= STABLE_AFTER else worker.failures + 1
        delay = restart_delay(worker.failures)
        log.warn("{worker} (pid {pid}) {how}; restarting it in {delay}s",
                 worker=str(worker), pid=pid, how=how, delay=f"{delay:g}")
        worker.restart = self.reactor.callLater(delay, self._start_worker, worker)

    # -- reload -------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: validate the new file whole; only a good one reaches the workers."""
        sdnotify.reloading()
        try:
            new = load_config(self.config_path)
            missing = [n for n in self.names if getattr(new, n) is None]
            if missing:
                raise ConfigError(missing[0], "section removed; a running daemon needs a restart")
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: {error}", error=str(exc))
            for group in self.groups.values():
                if group.metrics is not None:
                    group.metrics.reload_successful = 0
            sdnotify.ready("reload rejected")
            return
        if new.database != self.config.database:
            log.warn("database settings changed: they take effect at the next restart")
        for name in self.names:
            old_section, new_section = getattr(self.config, name), getattr(new, name)
            for key in (*LISTEN_KEYS, "metrics", "workers"):
                if getattr(old_section, key, None) != getattr(new_section, key, None):
                    log.warn("{daemon}.{key} changed: it takes effect at the next restart",
                             daemon=name, key=key)
        self.config = new
        signalled = self.signal_all(signal.SIGHUP)
        for group in self.groups.values():
            if group.metrics is not None:
                group.metrics.reload_successful = 1
        log.info("configuration reloaded from {path} ({n} workers signalled)",
                 path=self.config_path, n=signalled)
        sdnotify.ready("reloaded")

    def fresh_snapshots(self, group: DaemonGroup) -> defer.Deferred[None]:
        """SIGUSR1 asks each live worker for a metric snapshot; fires once every one has
        written a newer file, or after SNAPSHOT_WAIT (a worker too busy to answer in time is
        shown as of its last periodic snapshot)."""
        since = time.time_ns()
        pending: dict[int, str] = {}
        for worker in group.workers:
            if worker.alive and worker.pid is not None:
                with contextlib.suppress(Exception):
                    worker.transport.signalProcess(signal.SIGUSR1)
                    pending[worker.pid] = os.path.join(group.metrics_dir, f"{worker.pid}.json")
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + SNAPSHOT_WAIT

        def check() -> None:
            for pid, path in list(pending.items()):
                with contextlib.suppress(OSError):
                    if os.stat(path).st_mtime_ns >= since:
                        del pending[pid]
            if not pending or self.reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self.reactor.callLater(0.005, check)

        check()
        return done

    def signal_all(self, signum: int) -> int:
        count = 0
        for group in self.groups.values():
            for worker in group.workers:
                if worker.alive:
                    try:
                        worker.transport.signalProcess(signum)
                        count += 1
                    except Exception:  # noqa: S112 - it just exited; processEnded follows
                        continue
        return count

    # -- stop ---------------------------------------------------------------------------

    def shutdown(self) -> defer.Deferred[None]:
        """SIGTERM: every worker finishes its in-flight work and exits, then the sockets close."""
        sdnotify.stopping()
        self.stopping = True
        for group in self.groups.values():
            for worker in group.workers:
                if worker.restart is not None and worker.restart.active():
                    worker.restart.cancel()
                worker.restart = None
        self._stopped = defer.Deferred()
        self.signal_all(signal.SIGTERM)
        self._kill = self.reactor.callLater(STOP_GRACE, self.signal_all, signal.SIGKILL)
        stopped = self._stopped
        self._maybe_stopped()
        return stopped.addCallback(lambda _: self._close())

    def _maybe_stopped(self) -> None:
        if self._stopped is None or any(g.live() for g in self.groups.values()):
            return
        stopped, self._stopped = self._stopped, None
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        stopped.callback(None)

    @defer.inlineCallbacks
    def _close(self) -> Any:
        for port in self.ports:
            yield port.stopListening()
        self.close_sockets()

    def close_sockets(self) -> None:
        for group in self.groups.values():
            for shared in group.sockets:
                shared.sock.close()
                if shared.path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(shared.path)
            group.sockets = []
            if group.metrics_dir:
                shutil.rmtree(group.metrics_dir, ignore_errors=True)


def supervise(config_path: str, config: Config, names: list[str], reactor: Any) -> int:
    """Run the workers until SIGTERM/SIGINT; returns the process exit status."""
    from mailplugins.runner import run_reactor

    supervisor = Supervisor(reactor, config_path, config, names)
    try:
        return run_reactor(reactor, supervisor)
    finally:
        supervisor.close_sockets()
