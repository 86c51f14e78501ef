"""The daemons' metrics helpers: :class:`LabelCache` (label children looked up once).

The registry's snapshots and the supervisor's combined ``/metrics`` are tested with the workers
(tests/unit/test_workers.py); the endpoint itself with the runner (tests/unit/test_runner.py).
"""

from __future__ import annotations

import pytest
from prometheus_client import Counter

from mailplugins.metrics import DaemonMetrics, LabelCache


def counted(metric: Counter, monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Record every ``metric.labels(...)`` call (the cache should make one per key)."""
    calls: list[tuple[object, ...]] = []
    labels = metric.labels

    def spy(*values: object) -> Counter:
        calls.append(values)
        return labels(*values)

    monkeypatch.setattr(metric, "labels", spy)
    return calls


def test_a_child_is_asked_of_labels_once_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = DaemonMetrics("testd")
    counter = metrics.counter("results_total", "Results.", ["result"])
    calls = counted(counter, monkeypatch)
    cache = LabelCache(counter)
    first = cache["pass"]
    assert cache["pass"] is first
    assert cache["fail"] is not first
    assert calls == [("pass",), ("fail",)]
    assert cache.metric is counter
    assert first is counter.labels("pass")  # the metric's own child, not a copy


def test_counts_land_on_the_labelled_series() -> None:
    metrics = DaemonMetrics("testd")
    cache = LabelCache(metrics.counter("results_total", "Results.", ["result"]))
    cache["pass"].inc()
    cache["pass"].inc()
    cache["fail"].inc(3)
    sample = metrics.registry.get_sample_value
    assert sample("mailplugins_testd_results_total", {"result": "pass"}) == 2
    assert sample("mailplugins_testd_results_total", {"result": "fail"}) == 3
    assert sample("mailplugins_testd_results_total", {"result": "none"}) is None


def test_several_labels_are_keyed_by_the_tuple_of_values_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = DaemonMetrics("testd")
    counter = metrics.counter("messages_total", "Messages.", ["direction", "outcome"])
    calls = counted(counter, monkeypatch)
    cache = LabelCache(counter)
    cache["incoming", "accepted"].inc()
    cache["incoming", "accepted"].inc()
    cache["outgoing", "signed"].inc()
    assert calls == [("incoming", "accepted"), ("outgoing", "signed")]
    sample = metrics.registry.get_sample_value
    assert sample("mailplugins_testd_messages_total",
                  {"direction": "incoming", "outcome": "accepted"}) == 2
    assert sample("mailplugins_testd_messages_total",
                  {"direction": "outgoing", "outcome": "signed"}) == 1
    assert sample("mailplugins_testd_messages_total",
                  {"direction": "signed", "outcome": "outgoing"}) is None


def test_a_histogram_child_observes_into_its_series() -> None:
    metrics = DaemonMetrics("testd")
    cache = LabelCache(metrics.histogram("stage_seconds", "Stages.", ["stage"]))
    cache["write"].observe(0.002)
    sample = metrics.registry.get_sample_value
    assert sample("mailplugins_testd_stage_seconds_count", {"stage": "write"}) == 1
    assert sample("mailplugins_testd_stage_seconds_sum", {"stage": "write"}) == 0.002
    assert sample("mailplugins_testd_stage_seconds_count", {"stage": "data"}) is None


def test_wrong_label_values_fail_as_labels_does_and_are_not_kept() -> None:
    metrics = DaemonMetrics("testd")
    cache = LabelCache(metrics.counter("messages_total", "Messages.", ["direction", "outcome"]))
    with pytest.raises(ValueError):
        cache["incoming"]
    assert dict(cache) == {}
