"""Group fsync: every caller returns only after an fsync that started after its call, and
concurrent callers share fsyncs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deliver.groupsync import GroupSync, fsync_directory


class Recorder:
    """A fake fsync that records each call and, when told, blocks until released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = threading.Semaphore(0)
        self.gates: list[threading.Event] = []
        self.fail_next = False
        self.lock = threading.Lock()

    def __call__(self, path: str) -> None:
        with self.lock:
            self.calls.append(path)
            gate = self.gates.pop(0) if self.gates else None
            fail, self.fail_next = self.fail_next, False
        self.started.release()
        if gate is not None:
            assert gate.wait(10)
        if fail:
            raise OSError(5, "Input/output error")


def start(target: GroupSync, path: str, errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            target.sync(path)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for_users(sync: GroupSync, path: str, count: int) -> None:
    """Until ``count`` callers are inside sync() for ``path`` (each has taken its ticket)."""
    for _ in range(10_000):
        with sync._lock:
            state = sync._directories.get(path)
            if state is not None and state.users == count:
                return
        threading.Event().wait(0.001)
    raise AssertionError(f"{count} callers never arrived")


def test_a_lone_caller_runs_one_fsync_and_leaves_no_state(tmp_path: Path) -> None:
    fsync = Recorder()
    sync = GroupSync(fsync)
    sync.sync(str(tmp_path))
    sync.sync(str(tmp_path))
    assert fsync.calls == [str(tmp_path)] * 2  # sequential callers: one fsync each
    assert sync._directories == {}


def test_callers_during_an_fsync_share_the_next_one_which_starts_after_them() -> None:
    fsync = Recorder()
    first_gate, second_gate = threading.Event(), threading.Event()
    fsync.gates = [first_gate, second_gate]
    sync = GroupSync(fsync)
    errors: list[BaseException] = []
    first = start(sync, "/d", errors)
    assert fsync.started.acquire(timeout=10)  # the first fsync is running
    late = [start(sync, "/d", errors) for _ in range(5)]
    wait_for_users(sync, "/d", 6)
    # The running fsync may have begun before their links: it must not release them.
    first_gate.set()
    first.join(10)
    assert fsync.started.acquire(timeout=10)  # one more fsync, for all five
    assert all(t.is_alive() for t in late)
    second_gate.set()
    for thread in late:
        thread.join(10)
    assert not errors
    assert fsync.calls == ["/d", "/d"]
    assert sync._directories == {}


def test_other_directories_are_not_held_up() -> None:
    fsync = Recorder()
    gate = threading.Event()
    fsync.gates = [gate]
    sync = GroupSync(fsync)
    errors: list[BaseException] = []
    blocked = start(sync, "/a", errors)
    assert fsync.started.acquire(timeout=10)
    sync.sync("/b")  # returns although /a's fsync is still running
    gate.set()
    blocked.join(10)
    assert fsync.calls == ["/a", "/b"] and not errors


def test_a_failed_fsync_fails_its_caller_and_the_waiters_run_their_own() -> None:
    fsync = Recorder()
    gate = threading.Event()
    fsync.gates = [gate]
    fsync.fail_next = True
    sync = GroupSync(fsync)
    errors: list[BaseException] = []
    first = start(sync, "/d", errors)
    assert fsync.started.acquire(timeout=10)
    waiter_errors: list[BaseException] = []
    waiter = start(sync, "/d", waiter_errors)
    wait_for_users(sync, "/d", 2)
    gate.set()
    first.join(10)
    waiter.join(10)
    assert [type(e) for e in errors] == [OSError]
    assert waiter_errors == []
    assert fsync.calls == ["/d", "/d"]
    assert sync._directories == {}


def test_the_real_fsync_of_a_missing_directory_raises(tmp_path: Path) -> None:
    fsync_directory(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        GroupSync().sync(str(tmp_path / "gone"))
