# -*- test-case-name: tests.unit.test_runner -*-
"""Prometheus metrics: one registry per daemon, served at ``/metrics`` on its own endpoint.

With several workers (:mod:`mailplugins.workers`) each worker writes its values to files in a
private directory (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` set by
the supervisor) and the supervisor serves the one endpoint: counters and histograms summed
over the workers, gauges as their ``multiprocess_mode`` says (``livesum`` unless noted).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mailplugins import __version__

#: Latency buckets in seconds, from sub-millisecond cache hits to Postfix's 100 s timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: Set in a worker's environment by the supervisor: where its metric files go.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process writes its metrics to files for a supervisor to sum."""
    return bool(os.environ.get(MULTIPROC_ENV))


class _Gauge(Gauge):
    """A gauge whose ``set_function`` also works in multiprocess mode.

    prometheus-client only calls a gauge's function when its own registry is collected, which
    never happens in a worker (the supervisor reads the files); there the function is
    remembered and :meth:`DaemonMetrics.refresh` writes its value.
    """

    function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        if multiprocess():
            self.function = f
            self.set(f())
        else:
            super().set_function(f)


class DaemonMetrics:
    """Names are ``mailplugins_<daemon>_<name>``; no label ever carries a user or address."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        build = Gauge(
            "mailplugins_build_info", "Version of the running daemon.", ["daemon", "version"],
            registry=self.registry, multiprocess_mode="livemax",
        )
        build.labels(daemon, __version__).set(1)
        self._gauges: list[_Gauge] = []
        self.reload_successful = self.gauge(
            "config_last_reload_successful", "1 if the last config (re)load succeeded.",
            mode="livemin",
        )
        self.reload_timestamp = self.gauge(
            "config_last_reload_success_timestamp_seconds", "When the config last loaded.",
            mode="livemax",
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

    def gauge(
        self, name: str, doc: str, labels: list[str] | tuple[str, ...] = (), *, mode: str = "livesum"
    ) -> Gauge:
        """``mode`` says how the supervisor combines the workers' values (prometheus-client's
        ``multiprocess_mode``): a sum of what is held now by default, ``livemin``/``livemax``
        for flags and timestamps. Ignored in a single process."""
        gauge = _Gauge(self.name(name), doc, list(labels), registry=self.registry,
                       multiprocess_mode=mode)  # type: ignore[arg-type]
        self._gauges.append(gauge)
        return gauge

    def refresh(self) -> None:
        """Write the value of every function gauge (multiprocess mode; a worker's timer)."""
        for gauge in self._gauges:
            if gauge.function is not None:
                gauge.set(gauge.function())

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

    def __init__(self, metrics: DaemonMetrics | WorkersMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


class WorkersMetrics:
    """The supervisor's ``/metrics`` for one daemon: the sum over its workers' files, plus
    ``mailplugins_workers`` and the supervisor's own verdict on the last reload (a file the
    supervisor rejected never reaches the workers, so their gauges cannot show it)."""

    def __init__(
        self, daemon: str, directory: str, workers: Callable[[], int],
        pids: Callable[[], list[int]] = list,
    ) -> None:
        self.daemon = daemon
        self._pids = pids
        self.reload_successful = 1.0
        self._reload_name = f"mailplugins_{daemon}_config_last_reload_successful"
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Summed(directory, self))
        self._workers = workers

    def own(self) -> Iterable[Metric]:
        count = GaugeMetricFamily("mailplugins_workers", "Worker processes serving the daemon now.",
                                  labels=["daemon"])
        count.add_metric([self.daemon], self._workers())
        yield count
        flag = GaugeMetricFamily(self._reload_name, "1 if the last config (re)load succeeded.")
        flag.add_metric([], self.reload_successful)
        yield flag
        yield from _process_totals(self._pids())

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: How the workers' ``process_*`` samples combine: summed, except these.
_PROCESS_COMBINE: dict[str, Callable[[Iterable[float]], float]] = {
    "process_start_time_seconds": min,
    "process_max_fds": min,
}


def _process_totals(pids: list[int]) -> Iterable[Metric]:
    """The ``process_*`` metrics of the workers as one process: CPU, memory, open files summed."""
    families: dict[str, Metric] = {}
    values: dict[str, list[float]] = {}
    for pid in pids:
        collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
        for family in collector.collect():
            families.setdefault(family.name, family)
            for sample in family.samples:
                values.setdefault(sample.name, []).append(sample.value)
    for family in families.values():
        total = Metric(family.name, family.documentation, family.type, family.unit)
        for sample_name in {sample.name for sample in family.samples}:
            combine = _PROCESS_COMBINE.get(sample_name, sum)
            total.add_sample(sample_name, {}, combine(values[sample_name]))
        yield total


class _Summed(Collector):
    def __init__(self, directory: str, owner: WorkersMetrics) -> None:
        self._files = MultiProcessCollector(None, path=directory)
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        for family in self._files.collect():
            if family.name != self._owner._reload_name:
                yield family
        yield from self._owner.own()


def metrics_site(metrics: DaemonMetrics | WorkersMetrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))  # type: ignore[arg-type]
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
