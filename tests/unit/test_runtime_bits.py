"""sd_notify, log lines, connection limits and worker pools: the runtime pieces every daemon uses."""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path
from typing import Any

from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailplugins import sdnotify
from mailplugins.logs import format_line
from mailplugins.threads import WorkerPool


def test_notify_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
    assert server.recv(100) == b"READY=1"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mp-test-{os.getpid()}"
    abstract.bind("\0" + name)
    assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
    assert abstract.recv(100) == b"STOPPING=1"
    server.close()
    abstract.close()


def test_notify_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:1:2"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_log_lines_are_one_line_even_with_failures() -> None:
    event = {"log_format": "hello {who}\nworld", "who": "there", "log_level": LogLevel.warn,
             "log_namespace": "policyd.protocol"}
    assert format_line(event) == "warn policyd.protocol: hello there | world\n"
    try:
        {}["missing"]
    except KeyError:
        failure = Failure()
    event = {"log_format": "lookup failed", "log_level": LogLevel.error, "log_namespace": "x",
             "log_failure": failure}
    line = format_line(event)
    assert line.count("\n") == 1
    assert line.startswith("error x: lookup failed: KeyError: 'missing' (at ")
    assert "test_runtime_bits.py" in line


class DirectReactor:
    """Delivers results straight from the worker thread: enough to test the pool alone."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str]] = []

    def callFromThread(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)

    def addSystemEventTrigger(self, phase: str, event: str, fn: Any) -> None:
        self.triggers.append((phase, event))


def wait_for(d: Any) -> Any:
    done = threading.Event()
    box: list[Any] = []
    d.addBoth(lambda r: (box.append(r), done.set()))
    assert done.wait(10)
    return box[0]


def test_worker_pool_runs_off_the_calling_thread() -> None:
    reactor = DirectReactor()
    pool = WorkerPool(reactor, "test", 2)
    try:
        value, thread = wait_for(pool.run(lambda x: (x * 2, threading.get_ident()), 21))
        assert value == 42
        assert thread != threading.get_ident()
        assert reactor.triggers == [("during", "shutdown")]
    finally:
        pool.stop()


def test_worker_pool_reports_its_backlog() -> None:
    pool = WorkerPool(DirectReactor(), "test", 1)
    gate = threading.Event()
    try:
        first = pool.run(gate.wait, 10)
        second = pool.run(lambda: "done")
        assert pool.queued >= 1
        gate.set()
        assert wait_for(second) == "done"
        assert wait_for(first) is True
        assert pool.queued == 0
    finally:
        gate.set()
        pool.stop()


def test_worker_pool_errors_arrive_as_failures() -> None:
    pool = WorkerPool(DirectReactor(), "test", 1)
    try:
        result = wait_for(pool.run(lambda: 1 / 0))
        assert isinstance(result, Failure)
        assert result.check(ZeroDivisionError)
    finally:
        pool.stop()


def test_stdout_is_default_stream() -> None:
    stream = io.StringIO()
    from mailplugins.logs import LineObserver

    LineObserver(stream)({"log_format": "x", "log_namespace": "n", "log_level": LogLevel.info})
    assert stream.getvalue() == "info n: x\n"


def test_deadline_counts_from_its_first_start_unless_restarted() -> None:
    from twisted.internet.task import Clock

    from mailplugins.deadline import Deadline

    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(lambda: fired.append(clock.seconds()))
    deadline.start(clock, 5)
    clock.advance(3)
    deadline.start(clock, 5)  # more of the same line: still counted from the first byte
    clock.advance(2)
    assert fired == [5] and not deadline.running
    deadline.start(clock, 5)
    clock.advance(4)
    deadline.start(clock, 5, restart=True)  # a new line began
    clock.advance(4)
    assert fired == [5]
    deadline.stop()
    clock.advance(10)
    assert fired == [5] and clock.getDelayedCalls() == []


def test_free_port_never_hands_out_a_port_twice() -> None:
    from devrig.instances import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_deadline_follow_line_restarts_only_for_a_new_line() -> None:
    from twisted.internet.task import Clock

    from mailplugins.deadline import Deadline

    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(lambda: fired.append(clock.seconds()))
    deadline.follow_line(clock, 5, pending=True, data=b"AUTH\t1")
    clock.advance(3)
    deadline.follow_line(clock, 5, pending=True, data=b"\tPLAIN")  # the same line trickles on
    clock.advance(2)
    assert fired == [5]
    deadline.follow_line(clock, 5, pending=True, data=b"x")
    clock.advance(4)
    deadline.follow_line(clock, 5, pending=True, data=b"end\nnext")  # a new line began
    clock.advance(4)
    deadline.follow_line(clock, 5, pending=False, data=b"\n")  # complete: nothing pending
    clock.advance(10)
    assert fired == [5]
