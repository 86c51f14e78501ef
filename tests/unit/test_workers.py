"""The worker supervisor: readiness, restarts with backoff, reload and stop fan-out (fakes),
then the whole thing with real processes serving the echo test daemon."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.task import Clock

from mailplugins import sdnotify
from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.workers import (
    RESTART_MAX,
    STABLE_AFTER,
    Supervisor,
    Worker,
    restart_delay,
    wants_workers,
)
from tests.rig import REPO, free_port, short_tempdir, wait_until


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class FakeReactor(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class Harness:
    def __init__(self, tmp_path: Path, workers: int = 2) -> None:
        self.path = tmp_path / "c.yaml"
        self.tmp_path = tmp_path
        self.write(workers=workers)
        self.reactor = FakeReactor()
        self.spawned: list[tuple[Worker, FakeTransport]] = []
        config = parse_config(yaml.safe_load(self.path.read_text()), str(self.path))
        self.supervisor = Supervisor(self.reactor, str(self.path), config, ["deliver"], self.spawn)

    def write(self, **deliver: object) -> None:
        data = {"database": {"url": f"sqlite:///{self.tmp_path}/m.db"},
                "deliver": {"listen": f"unix:{self.tmp_path}/d.sock", **deliver}}
        self.path.write_text(yaml.safe_dump(data))

    def spawn(self, worker: Worker) -> FakeTransport:
        transport = FakeTransport(1000 + len(self.spawned))
        self.spawned.append((worker, transport))
        return transport

    @property
    def workers(self) -> list[Worker]:
        return self.supervisor.groups["deliver"].workers

    def all_ready(self) -> None:
        for worker in self.workers:
            self.supervisor.worker_ready(worker)


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []

    def notify(state: str, environ: Any = None) -> bool:
        sent.append(state)
        return True

    monkeypatch.setattr(sdnotify, "notify", notify)
    return sent


def test_restart_delay_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == RESTART_MAX


def test_a_supervisor_only_when_some_daemon_asks_for_several_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    one = parse_config({"database": {"url": url}, "deliver": {"listen": "tcp:1", "workers": 1},
                        "authd": {"sasl_listen": "tcp:2"}})
    assert one.authd is not None and one.authd.workers == 1  # authd's default
    assert not wants_workers(one, ["deliver", "authd"])
    two = parse_config({"database": {"url": url}, "deliver": {"listen": "tcp:1", "workers": 2}})
    assert wants_workers(two, ["deliver"])
    default = parse_config({"database": {"url": url}, "policyd": {"listen": "tcp:1"}})
    assert default.policyd is not None and default.policyd.workers == (os.cpu_count() or 1)


def test_ready_only_once_every_worker_listens(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path, workers=3)
    h.supervisor.start_workers()
    assert [w.index for w, _ in h.spawned] == [0, 1, 2]
    h.supervisor.worker_ready(h.workers[0])
    h.supervisor.worker_ready(h.workers[2])
    h.supervisor.worker_ready(h.workers[2])
    assert notified == []
    h.supervisor.worker_ready(h.workers[1])
    assert notified == ["READY=1\nSTATUS=serving deliver (3 workers)"]
    # A restarted worker's readiness is not announced again.
    h.supervisor.worker_exited(h.workers[1], None, signal.SIGKILL)
    h.reactor.advance(restart_delay(1))
    h.supervisor.worker_ready(h.workers[1])
    assert len(notified) == 1


def test_a_dead_worker_is_restarted_with_backoff(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path)
    h.supervisor.start_workers()
    h.all_ready()
    worker = h.workers[0]
    for failures in (1, 2, 3):
        h.reactor.advance(1)
        h.supervisor.worker_exited(worker, 1, None)
        assert not worker.alive
        h.reactor.advance(restart_delay(failures) - 0.01)
        assert not worker.alive, "restarted before its delay"
        h.reactor.advance(0.01)
        assert worker.alive and worker.pid == h.spawned[-1][1].pid
    # After a long healthy run the next death is restarted after the shortest delay again.
    h.reactor.advance(STABLE_AFTER)
    h.supervisor.worker_exited(worker, None, signal.SIGSEGV)
    h.reactor.advance(restart_delay(1))
    assert worker.alive
    assert len(h.spawned) == 2 + 4
    assert h.workers[1].alive and h.spawned[1][0] is h.workers[1]


def test_a_refused_spawn_is_tried_again_later(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path, workers=1)
    refusals = [OSError(11, "Resource temporarily unavailable")]

    def spawn(worker: Worker) -> FakeTransport:
        if refusals:
            raise refusals.pop()
        return h.spawn(worker)

    h.supervisor.spawn = spawn
    h.supervisor.start_workers()
    assert not h.workers[0].alive
    h.reactor.advance(restart_delay(1))
    assert h.workers[0].alive and len(h.spawned) == 1


def test_a_worker_that_cannot_start_stops_the_service(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path)
    h.supervisor.start_workers()
    h.supervisor.worker_ready(h.workers[0])
    h.supervisor.worker_exited(h.workers[1], 2, None)
    assert h.reactor.stopped and h.supervisor.exit_status == 2
    h.reactor.advance(RESTART_MAX)
    assert len(h.spawned) == 2 and notified == []


def test_reload_validates_then_signals_every_worker(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path)
    h.supervisor.start_workers()
    h.all_ready()
    h.write(max_connections=0)  # invalid
    h.supervisor.reload()
    assert all(t.signals == [] for _, t in h.spawned)
    assert notified[-1] == "READY=1\nSTATUS=reload rejected"
    h.write(max_connections=5)
    h.supervisor.reload()
    assert [t.signals for _, t in h.spawned] == [[signal.SIGHUP], [signal.SIGHUP]]
    assert notified[-1] == "READY=1\nSTATUS=reloaded"
    assert h.supervisor.config.deliver is not None
    assert h.supervisor.config.deliver.max_connections == 5


def test_stop_signals_all_and_waits_for_every_worker(tmp_path: Path, notified: list[str]) -> None:
    h = Harness(tmp_path, workers=3)
    h.supervisor.start_workers()
    h.all_ready()
    h.supervisor.worker_exited(h.workers[2], 1, None)  # restart pending
    done: list[object] = []
    h.supervisor.shutdown().addCallback(done.append)
    assert notified[-1] == "STOPPING=1"
    assert [t.signals for _, t in h.spawned] == [[signal.SIGTERM], [signal.SIGTERM], []]
    h.reactor.advance(RESTART_MAX)
    assert len(h.spawned) == 3, "a worker was restarted during shutdown"
    h.supervisor.worker_exited(h.workers[0], 0, None)
    assert done == []
    h.supervisor.worker_exited(h.workers[1], 0, None)
    assert done == [None]


def test_several_daemons_each_with_its_own_count(tmp_path: Path, notified: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path}/m.db"},
        "policyd": {"listen": "tcp:1", "workers": 3},
        "deliver": {"listen": "tcp:2", "workers": 1},
    }))
    config = parse_config(yaml.safe_load(path.read_text()), str(path))
    spawned: list[Worker] = []

    def spawn(worker: Worker) -> FakeTransport:
        spawned.append(worker)
        return FakeTransport(100 + len(spawned))

    supervisor = Supervisor(FakeReactor(), str(path), config, ["policyd", "deliver"], spawn)
    supervisor.start_workers()
    assert [(w.daemon, w.index) for w in spawned] == [
        ("policyd", 0), ("policyd", 1), ("policyd", 2), ("deliver", 0)]
    for worker in spawned[:3]:
        supervisor.worker_ready(worker)
    assert notified == []
    supervisor.worker_ready(spawned[3])
    assert notified == ["READY=1\nSTATUS=serving policyd, deliver (4 workers)"]


def test_metrics_combine_the_workers_snapshots(tmp_path: Path) -> None:
    """Counters and histograms: summed over every worker that ever ran; gauges: over the live
    ones, by their mode; the reload flag is the supervisor's own."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from mailplugins.metrics import DaemonMetrics, WorkersMetrics

    def worker(pid: int, requests: int, held: int, stamp: float, cached: int) -> None:
        metrics = DaemonMetrics("policyd")
        metrics.counter("requests_total", "Requests.", ["action"]).labels("DUNNO").inc(requests)
        metrics.histogram("request_duration_seconds", "Time.").observe(0.002 * requests)
        metrics.open_connections.labels("policyd.listen").set(held)
        metrics.reload_timestamp.set(stamp)
        metrics.reload_successful.set(1)
        metrics.gauge("cache_entries", "Held.").set_function(lambda: cached)
        (tmp_path / f"{pid}.json").write_text(json.dumps(metrics.snapshot()))

    worker(101, 3, 2, 10.0, 5)
    worker(102, 4, 1, 20.0, 6)
    worker(103, 10, 7, 30.0, 9)  # dead: its counts stay, its gauges do not
    combined = WorkersMetrics("policyd", str(tmp_path), lambda: 2, lambda: [101, 102])
    combined.reload_successful = 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(combined.render().decode())
        for s in family.samples
    }
    assert samples[("mailplugins_policyd_requests_total", (("action", "DUNNO"),))] == 17
    assert samples[("mailplugins_policyd_request_duration_seconds_count", ())] == 3
    assert samples[("mailplugins_policyd_request_duration_seconds_bucket", (("le", "0.01"),))] == 2
    assert samples[("mailplugins_policyd_open_connections", (("listener", "policyd.listen"),))] == 3
    assert samples[("mailplugins_policyd_cache_entries", ())] == 11
    assert samples[("mailplugins_policyd_config_last_reload_success_timestamp_seconds", ())] == 20
    assert samples[("mailplugins_policyd_config_last_reload_successful", ())] == 0
    assert samples[("mailplugins_workers", (("daemon", "policyd"),))] == 2
    build = [k for k in samples if k[0] == "mailplugins_build_info"]
    assert len(build) == 1 and samples[build[0]] == 1


# -- real processes: the echo test daemon with workers: 2 ---------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def ask(path: Path, line: bytes = b"pid") -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(line + b"\n")
        return sock.recv(100).decode().strip()


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def answering(path: Path, want: int) -> dict[int, str]:
    """pid -> tag of the workers that answered, asking until ``want`` distinct ones did."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 30
    while len(seen) < want and time.monotonic() < deadline:
        pid, tag = ask(path).split()
        seen[int(pid)] = tag
    return seen


def test_two_echo_workers_share_one_socket(workdir: Path) -> None:
    sock_path = workdir / "echo.sock"
    metrics_port = free_port()
    data = {"database": {"url": f"sqlite:///{workdir}/m.db"},
            "deliver": {"listen": f"unix:{sock_path}:mode=600", "workers": 2,
                        "metrics": f"tcp:{metrics_port}:interface=127.0.0.1"}}
    config = workdir / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    engine = make_engine(parse_config(data).database)
    schema.upgrade(engine)
    engine.dispose()
    notify_path = workdir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    log = workdir / "log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
        env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
    )
    try:
        assert notify.recv(1000) == b"READY=1\nSTATUS=serving deliver (2 workers)"
        assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
        first = children(process.pid)
        assert len(first) == 2
        assert answering(sock_path, 2) == dict.fromkeys(first, "v1")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b'mailplugins_workers{daemon="deliver"} 2.0' in body
        assert b"process_open_fds" in body

        # A killed worker is replaced; the socket stays (the dead worker does not unlink it).
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children(process.pid) - {victim}) == 2, timeout=30,
                   what="the killed worker to be replaced")
        second = children(process.pid)
        assert answering(sock_path, 2) == dict.fromkeys(second, "v1")
        text = log.read_text()
        assert re.search(rf"deliver worker \d \(pid {victim}\) killed by signal 9; restarting it in 0.5s",
                         text), text

        # SIGHUP: a bad file reaches no worker; a good one reaches both.
        config.write_text("deliver: [\n")
        process.send_signal(signal.SIGHUP)
        assert notify.recv(1000).startswith(b"RELOADING=1")
        assert notify.recv(1000) == b"READY=1\nSTATUS=reload rejected"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b"mailplugins_deliver_config_last_reload_successful 0.0" in body
        assert answering(sock_path, 2) == dict.fromkeys(second, "v1")
        config.write_text(yaml.safe_dump(data))
        process.send_signal(signal.SIGHUP)
        assert notify.recv(1000).startswith(b"RELOADING=1")
        assert notify.recv(1000) == b"READY=1\nSTATUS=reloaded"
        wait_until(lambda: set(answering(sock_path, 2).values()) == {"v2"}, timeout=30,
                   what="both workers to reload")
        assert set(answering(sock_path, 2)) == second

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert notify.recv(1000) == b"STOPPING=1"
        assert not any(os.path.exists(f"/proc/{pid}") for pid in second)
        assert not sock_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()


def test_a_bind_failure_is_one_line(workdir: Path) -> None:
    data = {"database": {"url": f"sqlite:///{workdir}/m.db"},
            "deliver": {"listen": "unix:/nonexistent-mp-dir/d.sock", "workers": 2}}
    config = workdir / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr == ("mailplugins: deliver.listen: cannot listen on "
                             "unix:/nonexistent-mp-dir/d.sock: No such file or directory\n")


def test_a_worker_startup_error_stops_the_supervisor(workdir: Path) -> None:
    """The schema check runs in each worker: its one-line error ends the whole service."""
    data = {"database": {"url": f"sqlite:///{workdir}/m.db"},
            "deliver": {"listen": f"unix:{workdir}/d.sock", "workers": 2}}
    config = workdir / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    make_engine(parse_config(data).database).dispose()  # an empty database: no schema
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "mailplugins: database schema is not up to date: run 'mailplugins db upgrade'\n" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (workdir / "d.sock").exists()


def test_workers_do_not_outlive_a_killed_supervisor(workdir: Path) -> None:
    """SIGKILL to the supervisor (a crash, or systemd's final kill of the main process): its
    workers go too, so a restart never finds them still holding the socket."""
    sock_path = workdir / "echo.sock"
    data = {"database": {"url": f"sqlite:///{workdir}/m.db"},
            "deliver": {"listen": f"unix:{sock_path}", "workers": 2}}
    config = workdir / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    engine = make_engine(parse_config(data).database)
    schema.upgrade(engine)
    engine.dispose()
    log = workdir / "log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: "mailplugins deliver ready" in log.read_text(), timeout=60,
                   what="two echo workers")
        workers = children(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait(timeout=10)

        def gone(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/status") as f:
                    return any(line.startswith("State:\tZ") for line in f)  # dead, not reaped
            except FileNotFoundError:
                return True

        wait_until(lambda: all(gone(pid) for pid in workers), timeout=10,
                   what="the orphaned workers to die")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
