# -*- test-case-name: tests.unit.test_runner -*-
"""``mailplugins serve``: run daemons in one reactor, with reload, readiness and clean exit.

Startup either brings every listener up and then tells systemd ``READY=1``, or exits non-zero
naming the listener that failed: a daemon that silently runs without its socket is worse than
one that does not start.

When a daemon asks for several ``workers``, ``serve`` becomes their supervisor
(:mod:`mailplugins.workers`) and each worker runs this module's :class:`Runner` on the
listening sockets it inherited, reporting readiness to the supervisor instead of systemd.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins import sdnotify
from mailplugins.balance import Balance
from mailplugins.config import Config, ConfigError, load_config
from mailplugins.daemon import Listener, RunningDaemon, Runtime, daemon_names, load_daemon
from mailplugins.database import Database
from mailplugins.db import revision
from mailplugins.listening import FDS_ENV, ListenRequest, adopt, decode_fds, listen_request
from mailplugins.metrics import DaemonMetrics, metrics_site, write_snapshot
from mailplugins.threads import WorkerPool
from mailplugins.wiring.endpoints import parse_endpoint

log = Logger(namespace="mailplugins.runner")


#: Seconds between a worker's metric snapshots: how stale the supervisor's /metrics may be.
SNAPSHOT_INTERVAL = 1.0


class StartupError(Exception):
    """Startup cannot go on; the message is one line for the operator."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Running:
    name: str
    daemon: RunningDaemon
    runtime: Runtime


def select_daemons(config: Config, requested: Sequence[str], known: Sequence[str]) -> list[str]:
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise StartupError(f"unknown daemon {unknown[0]!r} (known: {', '.join(known)})", 2)
    names = list(dict.fromkeys(requested)) or list(config.configured_daemons())
    missing = [name for name in names if getattr(config, name, None) is None]
    if missing:
        raise StartupError(f"{missing[0]}: not configured in {config.source}", 2)
    if not names:
        raise StartupError(
            f"no daemon is configured in {config.source}: add a policyd, authd, deliver or milterd section", 2
        )
    return names


def remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed process makes bind() fail; remove it if nobody listens."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
    else:
        raise StartupError(f"{path}: another process is already listening there")
    finally:
        probe.close()


def endpoint_string(description: str) -> str:
    """The endpoint as we listen on it: unix sockets without Twisted's ``<path>.lock`` file.

    Twisted's default ``lockfile=1`` leaves a lock file beside the socket, which in Postfix's
    ``private/`` makes ``postfix start`` warn about files not owned by postfix. Stale sockets
    are handled here instead (:func:`_remove_stale_socket`). An explicit ``lockfile=`` wins.
    """
    if description.startswith("unix:") and "lockfile=" not in description:
        return description + ":lockfile=0"
    return description


@dataclass
class _Activated:
    """A socket systemd passed, served as the workers serve theirs (:func:`adopt`).

    Twisted's own ``systemd:`` endpoint would, for a unix socket, ``chmod`` the socket file
    to ``0666`` when it starts listening (overriding the ``.socket`` unit's ``SocketMode``)
    and unlink it when it stops, leaving systemd listening on a socket nobody can reach.
    """

    request: ListenRequest

    def listen(self, reactor: Any, listener: Listener) -> Any:
        try:
            return adopt(reactor, self.request.fd, listener.endpoint, listener.factory)
        finally:
            os.close(self.request.fd)  # adopt() serves on a copy of it


def _endpoint(reactor: Any, listener: Listener) -> Any:
    try:
        if listener.endpoint.split(":", 1)[0].lower() == "systemd":
            return _Activated(listen_request(listener.endpoint))
        endpoint = serverFromString(reactor, endpoint_string(listener.endpoint))
    except (KeyError, IndexError):
        raise StartupError(systemd_missing(listener.key, listener.endpoint), 2) from None
    if isinstance(endpoint, UNIXServerEndpoint):
        # The path as our own endpoint parser reads it (the endpoint keeps it private).
        remove_stale_socket(parse_endpoint(listener.endpoint).path)
    return endpoint


def systemd_missing(key: str, endpoint: str) -> str:
    return (f"{key}: systemd passed no socket for {endpoint!r} "
            "(check the .socket unit's FileDescriptorName)")


@dataclass
class WorkerRole:
    """What a worker process got from its supervisor (see :mod:`mailplugins.workers`)."""

    daemon: str
    index: int
    #: Where to write ``ready`` once every listener is adopted.
    status_fd: int
    #: Listener key -> inherited listening descriptor.
    fds: dict[str, int]
    #: The daemon's private directory: metric files and the connection-count slots.
    shared_dir: str = ""
    supervisor: int = 0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | os._Environ[str]) -> WorkerRole | None:
        from mailplugins.workers import WORKER_DIR_ENV, WORKER_ENV

        text = environ.get(WORKER_ENV)
        if not text:
            return None
        daemon, index, status_fd, supervisor = text.split()
        _die_with(int(supervisor))
        # A reload signalled while this worker still starts must not kill it (SIGHUP's default
        # action); it reads the file as it starts, and the reload handler replaces this.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a scrape's snapshot request, likewise
        return cls(daemon, int(index), int(status_fd), decode_fds(environ.get(FDS_ENV, "")),
                   environ.get(WORKER_DIR_ENV, ""), int(supervisor))

    def orphaned(self) -> bool:
        return os.getppid() != self.supervisor

    def report_ready(self) -> None:
        try:
            os.write(self.status_fd, b"ready\n")
        except OSError as exc:
            log.warn("cannot report readiness to the supervisor: {error}", error=exc.strerror)


def _die_with(supervisor: int) -> None:
    """A worker must not outlive its supervisor (which holds the sockets and restarts it):
    Linux kills it when the supervisor goes (PR_SET_PDEATHSIG), as if killed together. Where
    that is not delivered (seen in sandboxed kernels) the worker's own check, every 0.1 s,
    does the same (:meth:`Runner.start`)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:
        os._exit(1)


def _describe_failure(listener: Listener, failure: Any) -> str:
    exc = failure.value
    reason = getattr(exc, "socketError", None) or exc
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return f"{listener.key}: cannot listen on {listener.endpoint}: {text}"


class Runner:
    def __init__(
        self, reactor: Any, config_path: str, config: Config, names: list[str],
        role: WorkerRole | None = None,
    ) -> None:
        self.reactor = reactor
        self.role = role
        self.refreshers: list[task.LoopingCall] = []
        self.config_path = config_path
        self.config = config
        self.names = names
        self.running: list[_Running] = []
        self.ports: list[Any] = []
        self.db: Database | None = None
        self.cpu: WorkerPool | None = None
        #: A worker of a daemon with several: its share of a burst of connections.
        self.balance: Balance | None = None
        self.exit_status = 0

    def check_schema(self, db: Database) -> None:
        try:
            current = revision.current_revision(db.engine)
        except Exception as exc:
            log.warn("database not reachable at startup ({error}); answering fallbacks until it is",
                     error=type(exc).__name__)
            return
        if current != revision.HEAD:
            raise StartupError(
                "database schema is not up to date: run 'mailplugins db upgrade'", 2
            )

    def build(self) -> list[Listener]:
        if self.role is not None and self.role.shared_dir:
            from mailplugins.connections import share_between_workers
            from mailplugins.workers import SLOTS_FILE

            slots = share_between_workers(os.path.join(self.role.shared_dir, SLOTS_FILE), self.role.index)
            if slots.workers > 1:
                self.balance = Balance(self.reactor, slots)
        self.db = Database(self.reactor, self.config.database)
        self.check_schema(self.db)
        self.cpu = WorkerPool(self.reactor, "cpu", max(2, os.cpu_count() or 2))
        listeners: list[Listener] = []
        for name in self.names:
            metrics = DaemonMetrics(name)
            runtime = Runtime(self.reactor, self.config, self.db, metrics, self.cpu)
            daemon = load_daemon(name).build(runtime)
            self.running.append(_Running(name, daemon, runtime))
            listeners.extend(daemon.listeners)
            section = getattr(self.config, name)
            if self.role is not None and self.role.shared_dir:
                # The supervisor serves /metrics from these snapshots (mailplugins.metrics).
                snapshot = task.LoopingCall(self.write_snapshots)
                snapshot.clock = self.reactor
                snapshot.start(SNAPSHOT_INTERVAL, now=False)
                self.refreshers.append(snapshot)
            if section.metrics and self.role is None:
                site = cast(IProtocolFactory, metrics_site(metrics))
                listeners.append(Listener(f"{name}.metrics", section.metrics, site))
            metrics.reload_successful.set(1)
            metrics.reload_timestamp.set(time.time())
        return listeners

    @defer.inlineCallbacks
    def start(self) -> Any:
        listeners = self.build()
        if self.role is not None:
            role = self.role

            def orphan_check() -> None:
                if role.orphaned():
                    os.kill(os.getpid(), signal.SIGKILL)

            watch = task.LoopingCall(orphan_check)
            watch.clock = self.reactor
            watch.start(0.1, now=False)
            self.refreshers.append(watch)
            self.adopt_all(self.role, listeners)
            self.write_snapshots()
            self.role.report_ready()
            log.info("{daemon} worker {index} listening (pid {pid})", daemon=self.role.daemon,
                     index=self.role.index, pid=os.getpid())
            return
        endpoints = [(listener, _endpoint(self.reactor, listener)) for listener in listeners]
        for listener, endpoint in endpoints:
            try:
                if isinstance(endpoint, _Activated):
                    port = endpoint.listen(self.reactor, listener)
                else:
                    port = yield endpoint.listen(listener.factory)
            except Exception:
                raise StartupError(_describe_failure(listener, Failure())) from None
            self.ports.append(port)
            log.info("{key}: listening on {endpoint}", key=listener.key, endpoint=listener.endpoint)
        sdnotify.ready(f"serving {', '.join(self.names)}")
        log.info("mailplugins {names} ready", names=" ".join(self.names))

    def write_snapshots(self) -> None:
        if self.role is None or not self.role.shared_dir:
            return
        for item in self.running:
            try:
                write_snapshot(item.runtime.metrics, self.role.shared_dir)
            except OSError as exc:
                log.warn("cannot write the metrics snapshot: {error}", error=exc.strerror)

    def adopt_all(self, role: WorkerRole, listeners: list[Listener]) -> None:
        """A worker serves on the sockets its supervisor made (one per listener key), taking
        its share of each burst of connections when the daemon has other workers."""
        for listener in listeners:
            fd = role.fds.get(listener.key)
            if fd is None:
                raise StartupError(f"{listener.key}: the supervisor passed no socket for it")
            try:
                self.ports.append(
                    adopt(self.reactor, fd, listener.endpoint, listener.factory, self.balance)
                )
            except Exception:
                raise StartupError(_describe_failure(listener, Failure())) from None

    def reload(self) -> None:
        """SIGHUP: validate the new file whole, then swap it in; a bad file changes nothing."""
        sdnotify.reloading()
        try:
            new = load_config(self.config_path)
            missing = [n for n in self.names if getattr(new, n) is None]
            if missing:
                raise ConfigError(missing[0], "section removed; a running daemon needs a restart")
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: {error}", error=str(exc))
            for item in self.running:
                item.runtime.metrics.reload_successful.set(0)
            sdnotify.ready("reload rejected")
            return
        if new.database != self.config.database:
            log.warn("database settings changed: they take effect at the next restart")
        for item in self.running:
            old_section = getattr(self.config, item.name)
            new_section = getattr(new, item.name)
            for key in ("listen", "sasl_listen", "dict_listen", "http_listen", "metrics"):
                if getattr(old_section, key, None) != getattr(new_section, key, None):
                    log.warn("{daemon}.{key} changed: listeners change at the next restart",
                             daemon=item.name, key=key)
            item.runtime.config = new
            item.daemon.reload(new)
            item.runtime.metrics.reload_successful.set(1)
            item.runtime.metrics.reload_timestamp.set(time.time())
        self.config = new
        log.info("configuration reloaded from {path}", path=self.config_path)
        sdnotify.ready("reloaded")

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        sdnotify.stopping()
        for refresher in self.refreshers:
            if refresher.running:
                refresher.stop()
        for port in self.ports:
            yield port.stopListening()
        for item in self.running:
            result = item.daemon.stop()
            if result is not None:
                yield result
        self.write_snapshots()  # a worker's last counts
        if self.db is not None:
            self.db.close()
        if self.cpu is not None:
            self.cpu.stop()


def serve(config_path: str, config: Config, requested: Sequence[str], reactor: Any = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    role = WorkerRole.from_environment(os.environ)
    names = select_daemons(config, [role.daemon] if role else requested, daemon_names())
    if role is None:
        from mailplugins.workers import supervise, wants_workers

        if wants_workers(config, names):
            return supervise(config_path, config, names, reactor)
    runner = Runner(reactor, config_path, config, names, role)
    if role is not None:

        def on_usr1(_signum: int, _frame: Any) -> None:
            reactor.callFromThread(runner.write_snapshots)

        # The supervisor's /metrics asks for fresh snapshots (mailplugins.workers).
        reactor.callWhenRunning(signal.signal, signal.SIGUSR1, on_usr1)
        # Ctrl-C reaches the whole process group: the supervisor decides, and its SIGTERM
        # stops the workers (a second stop request would only log an error).
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    return run_reactor(reactor, runner)


class Served(Protocol):
    """What :func:`run_reactor` runs: a :class:`Runner`, or a worker supervisor."""

    exit_status: int

    def start(self) -> Any: ...

    def reload(self) -> None: ...

    def shutdown(self) -> Any: ...


def run_reactor(reactor: Any, served: Served) -> int:
    """Start ``served`` once the reactor runs, reload it on SIGHUP, shut it down before the
    reactor stops; returns its exit status. A :class:`StartupError` ends the run with its
    one-line message and status, anything else with a logged failure and status 1."""

    def started_failed(failure: Any) -> None:
        if failure.check(StartupError):
            sys.stderr.write(f"mailplugins: {failure.value}\n")
            served.exit_status = failure.value.status
        else:
            log.failure("startup failed", failure)
            served.exit_status = 1
        if reactor.running:
            reactor.stop()

    def on_hup(_signum: int, _frame: Any) -> None:
        reactor.callFromThread(served.reload)

    reactor.addSystemEventTrigger("before", "shutdown", served.shutdown)
    reactor.callWhenRunning(lambda: served.start().addErrback(started_failed))
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, on_hup)
    reactor.run()
    return served.exit_status
