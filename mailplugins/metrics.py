# -*- test-case-name: tests.unit.test_runner -*-
"""Prometheus metrics: one registry per daemon, served at ``/metrics`` on its own endpoint."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mailplugins import __version__

#: Latency buckets in seconds, from sub-millisecond cache hits to Postfix's 100 s timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DaemonMetrics:
    """Names are ``mailplugins_<daemon>_<name>``; no label ever carries a user or address."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        build = Gauge(
            "mailplugins_build_info", "Version of the running daemon.", ["daemon", "version"],
            registry=self.registry,
        )
        build.labels(daemon, __version__).set(1)
        self.reload_successful = self.gauge(
            "config_last_reload_successful", "1 if the last config (re)load succeeded."
        )
        self.reload_timestamp = self.gauge(
            "config_last_reload_success_timestamp_seconds", "When the config last loaded."
        )
        self.connections = self.counter(
            "connections_total", "Connections accepted.", ["listener"]
        )
        self.open_connections = self.gauge(
            "open_connections", "Connections open now.", ["listener"]
        )
        self.refused_connections = self.counter(
            "refused_connections_total", "Connections refused over max_connections.", ["listener"]
        )

    def name(self, name: str) -> str:
        return f"mailplugins_{self.daemon}_{name}"

    def counter(self, name: str, doc: str, labels: list[str] | tuple[str, ...] = ()) -> Counter:
        return Counter(self.name(name), doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str] | tuple[str, ...] = ()) -> Gauge:
        return Gauge(self.name(name), doc, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: list[str] | tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(self.name(name), doc, list(labels), buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: DaemonMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


def metrics_site(metrics: DaemonMetrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))  # type: ignore[arg-type]
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
