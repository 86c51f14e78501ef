# -*- test-case-name: tests.unit.test_metrics, tests.unit.test_runner -*-
"""Prometheus metrics: one registry per daemon, served at ``/metrics`` on its own endpoint.

With several workers (:mod:`mailplugins.workers`) each worker keeps its own registry, as a
single process does (nothing is added to the hot path), and writes a snapshot of it to a file
in the daemon's private directory every second and when it stops (:func:`write_snapshot`). The
supervisor serves the one endpoint, combining the files (:class:`WorkersMetrics`): counters and
histograms summed over every worker that ever ran (a dead worker's last counts stay), gauges
over the live workers as their ``mode`` says (a sum unless noted).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

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
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailplugins import __version__

#: Latency buckets in seconds, from sub-millisecond cache hits to Postfix's 100 s timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: How the supervisor combines the live workers' values of a gauge.
GAUGE_MODES: dict[str, Callable[[Iterable[float]], float]] = {"sum": sum, "min": min, "max": max}

#: Families a worker does not export: the supervisor reports the workers' process totals itself.
_LOCAL_ONLY = ("process_", "python_")

#: A labelled metric's class (Counter, Gauge, Histogram, ...): its children are of the same class.
_M = TypeVar("_M", bound=MetricWrapperBase)


class LabelCache(dict[str | tuple[str, ...], _M]):
    """A labelled metric's children, each asked of ``labels()`` once: ``cache[value].inc()``.

    prometheus-client's ``labels()`` validates the values and takes a lock on every call (about
    1 µs), and the daemons update labelled metrics several times per request or message. Here a
    hit is one dictionary lookup done in C, with no Python frame; a miss (``__missing__``) calls
    ``labels()`` and keeps the child, which lives as long as its metric. The key is the value
    for a metric with one label (``cache["accepted"]``), the tuple of values for several
    (``cache["incoming", "pass"]``). Every key is kept, so only for label values from small
    fixed sets (results, stages, directions), never addresses or domains. ``metric`` is the
    metric itself.
    """

    __slots__ = ("metric",)

    def __init__(self, metric: _M) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, key: str | tuple[str, ...]) -> _M:
        child = self.metric.labels(key) if isinstance(key, str) else self.metric.labels(*key)
        self[key] = child
        return child


class DaemonMetrics:
    """Names are ``mailplugins_<daemon>_<name>``; no label ever carries a user or address."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        #: Gauge name -> how the workers' values combine (see :meth:`gauge`).
        self.modes: dict[str, str] = {"mailplugins_build_info": "max"}
        build = Gauge(
            "mailplugins_build_info", "Version of the running daemon.", ["daemon", "version"],
            registry=self.registry,
        )
        build.labels(daemon, __version__).set(1)
        self.reload_successful = self.gauge(
            "config_last_reload_successful", "1 if the last config (re)load succeeded.", mode="min"
        )
        self.reload_timestamp = self.gauge(
            "config_last_reload_success_timestamp_seconds", "When the config last loaded.",
            mode="max",
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
        self, name: str, doc: str, labels: list[str] | tuple[str, ...] = (), *, mode: str = "sum"
    ) -> Gauge:
        """``mode`` (``sum``, ``min``, ``max``) says how the live workers' values combine when
        the daemon runs several: what they hold now is summed by default; flags and timestamps
        take the smallest or largest. Nothing changes in a single process."""
        if mode not in GAUGE_MODES:
            raise ValueError(f"unknown gauge mode {mode!r}")
        self.modes[self.name(name)] = mode
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

    def snapshot(self) -> list[dict[str, Any]]:
        """The registry as plain data, for the supervisor to combine (see :class:`WorkersMetrics`)."""
        families = []
        for family in self.registry.collect():
            if family.name.startswith(_LOCAL_ONLY) or (
                family.type == "gauge" and family.name.endswith("_created")
            ):
                continue
            families.append({
                "name": family.name, "doc": family.documentation, "type": family.type,
                "mode": self.modes.get(family.name, "sum"),
                "samples": [[sample.name, sample.labels, sample.value] for sample in family.samples],
            })
        return families


def write_snapshot(metrics: DaemonMetrics, directory: str) -> None:
    """A worker's registry into ``directory/<pid>.json``, replaced whole (never read half)."""
    path = os.path.join(directory, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics.snapshot(), f)
    os.replace(path + ".tmp", path)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: DaemonMetrics | WorkersMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if not isinstance(self._metrics, WorkersMetrics) or self._metrics.refresh is None:
            return self._metrics.render()
        metrics, refresh = self._metrics, self._metrics.refresh

        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)  # the scraper hung up meanwhile

        def done(_: object) -> None:
            if not gone:
                request.write(metrics.render())
                request.finish()

        refresh().addBoth(done)
        return NOT_DONE_YET


class WorkersMetrics:
    """The supervisor's ``/metrics`` for one daemon: its workers' snapshots combined, plus
    ``mailplugins_workers`` and the supervisor's own verdict on the last reload (a file the
    supervisor rejected never reaches the workers, so their gauges cannot show it)."""

    def __init__(
        self, daemon: str, directory: str, workers: Callable[[], int],
        pids: Callable[[], list[int]] = list,
        refresh: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        #: Asks the workers for fresh snapshots before a scrape is answered, so that
        #: everything answered before the scrape is counted, as in a single process.
        self.refresh = refresh
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
        self._directory = directory
        self._owner = owner

    def _snapshots(self) -> Iterable[tuple[bool, list[dict[str, Any]]]]:
        live = set(self._owner._pids())
        try:
            names = sorted(os.listdir(self._directory))
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith(".json"):
                continue
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self._directory, name)) as f:
                    families = json.load(f)
                yield int(name[:-5]) in live, families

    def collect(self) -> Iterable[Metric]:
        info: dict[str, dict[str, Any]] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
        for live, families in self._snapshots():
            for family in families:
                name = family["name"]
                if name == self._owner._reload_name or (family["type"] == "gauge" and not live):
                    continue
                info.setdefault(name, family)
                samples = values.setdefault(name, {})
                for sample, labels, value in family["samples"]:
                    samples.setdefault((sample, tuple(sorted(labels.items()))), []).append(value)
        for name, family in info.items():
            metric = Metric(name, family["doc"], family["type"])
            combine = GAUGE_MODES[family["mode"]] if family["type"] == "gauge" else sum
            for (sample, labels), found in values[name].items():
                metric.add_sample(sample, dict(labels), float(combine(found)))
            yield metric
        yield from self._owner.own()


def metrics_site(metrics: DaemonMetrics | WorkersMetrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))  # type: ignore[arg-type]
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
