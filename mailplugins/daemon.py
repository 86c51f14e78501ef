# -*- test-case-name: tests.unit.test_runner -*-
"""What a daemon package provides to the runner, and what the runner gives it.

Daemons are found through the ``mailplugins.daemons`` entry point group, so the core never
imports a daemon. Each entry point names an object with a ``name`` and a ``build(runtime)``
method returning a :class:`RunningDaemon`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory

from mailplugins.config import Config
from mailplugins.connections import ConnectionLimit, LimitedFactory
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool

ENTRY_POINT_GROUP = "mailplugins.daemons"

#: The keys of a daemon section that name listeners; each daemon names its listeners
#: ``<daemon>.<key>`` (``[i]`` when the key lists several), see :func:`listeners_for`.
LISTEN_KEYS = ("listen", "sasl_listen", "dict_listen", "http_listen")


@dataclass
class Listener:
    #: Config key path of the endpoint, named in errors (``policyd.listen[0]``).
    key: str
    endpoint: str
    factory: IProtocolFactory


@dataclass
class Runtime:
    """Shared services for one daemon; ``config`` is replaced whole on every reload."""

    reactor: Any
    config: Config
    db: Database
    metrics: DaemonMetrics
    #: CPU-bound work (password hashing) off the reactor.
    cpu: WorkerPool
    extra: dict[str, Any] = field(default_factory=dict)


class RunningDaemon(Protocol):
    listeners: list[Listener]

    def reload(self, config: Config) -> None:
        """Take a new, already validated config; listeners stay as they are."""

    def stop(self) -> Deferred[None] | None:
        """Finish or abandon in-flight work before the reactor stops."""


class DaemonPlugin(Protocol):
    name: str

    def build(self, runtime: Runtime) -> RunningDaemon: ...


def daemon_names() -> list[str]:
    """Installed daemons, in the order the runner starts them."""
    order = {"policyd": 0, "authd": 1, "deliver": 2, "milterd": 3}
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names, key=lambda n: (order.get(n, 9), n))


def load_daemon(name: str) -> DaemonPlugin:
    (entry,) = entry_points(group=ENTRY_POINT_GROUP, name=name)
    plugin: DaemonPlugin = entry.load()
    return plugin


def capped_listeners(
    key_prefix: str,
    endpoints: tuple[str, ...],
    factory: IProtocolFactory,
    *,
    limit: ConnectionLimit,
    metrics: DaemonMetrics,
    refusal: bytes = b"",
) -> tuple[list[Listener], list[LimitedFactory]]:
    """One Listener per endpoint, each counted under its key and capped by the daemon's ``limit``."""
    listeners: list[Listener] = []
    factories: list[LimitedFactory] = []
    for listener in listeners_for(key_prefix, endpoints, factory):
        limited = LimitedFactory(
            factory, listener=listener.key, limit=limit, metrics=metrics, refusal=refusal
        )
        factories.append(limited)
        listeners.append(Listener(listener.key, listener.endpoint, cast(IProtocolFactory, limited)))
    return listeners, factories


def listeners_for(key_prefix: str, endpoints: tuple[str, ...], factory: IProtocolFactory) -> list[Listener]:
    """One Listener per endpoint string of a ``listen`` key (a string or a list)."""
    return [Listener(key, e, factory) for key, e in listener_keys(key_prefix, endpoints)]


def listener_keys(key_prefix: str, endpoints: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(key, endpoint)`` for each endpoint of one key: ``policyd.listen`` or ``...listen[i]``."""
    if len(endpoints) == 1:
        return [(key_prefix, endpoints[0])]
    return [(f"{key_prefix}[{i}]", e) for i, e in enumerate(endpoints)]


def configured_listeners(name: str, section: Any) -> list[tuple[str, str]]:
    """Every ``(key, endpoint)`` the daemon ``name`` will listen on, read from its section
    without building it (the worker supervisor binds them before any worker runs; the metrics
    endpoint is not among them)."""
    found: list[tuple[str, str]] = []
    for key in LISTEN_KEYS:
        endpoints = getattr(section, key, None) or ()
        found.extend(listener_keys(f"{name}.{key}", tuple(endpoints)))
    return found
