"""A burst of connections split about evenly between a daemon's workers (mailplugins.balance):
the pause logic with a fake clock, then policyd with two real workers."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from mailplugins.balance import PAUSE, TICK, Balance
from mailplugins.connections import WorkerSlots
from mailplugins.listening import adopt, bind, listen_request
from tests.rig import Daemons, free_port, short_tempdir, wait_until


class FakePort:
    """A listening port as Balance sees it: reading or not, listening or stopped."""

    def __init__(self) -> None:
        self.connected = 1
        self.disconnecting = 0
        self.reading = True

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False


def worker_slots(tmp_path: Path, workers: int) -> list[WorkerSlots]:
    path = str(tmp_path / "connections.slots")
    WorkerSlots.create(path, workers)
    return [WorkerSlots(path, index) for index in range(workers)]


def test_a_worker_over_its_share_pauses_then_reads_again(tmp_path: Path) -> None:
    clock = Clock()
    mine, other = worker_slots(tmp_path, 2)
    balance = Balance(clock, mine)
    port = FakePort()
    # Up to ceil(total / 2) + 1: no pause (an even split cannot hold at every instant).
    for own, others in [(1, 0), (2, 0), (3, 0), (3, 1), (11, 9), (12, 10)]:
        mine.set(own)
        other.set(others)
        balance.after_read(port)
        assert port.reading, (own, others)
        assert not clock.getDelayedCalls()
    mine.set(4)
    other.set(0)
    balance.after_read(port)
    assert not port.reading
    balance.after_read(port)  # a read already queued: still one pause
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(PAUSE - 0.001)
    assert not port.reading
    clock.advance(0.001)
    assert port.reading and not clock.getDelayedCalls()


def test_a_worker_back_within_its_share_reads_again_before_the_pause_ends(
        tmp_path: Path) -> None:
    """Short connections swing the counts past the share all the time: a paused worker
    listens again a tick after its own connections closed or the others took new ones, not
    a whole pause later (with the full pause each, the workers took turns not accepting and
    the churn of connections fell to a third)."""
    clock = Clock()
    mine, other = worker_slots(tmp_path, 2)
    balance = Balance(clock, mine)
    port = FakePort()
    mine.set(12)
    other.set(8)
    balance.after_read(port)
    assert not port.reading
    clock.advance(TICK)
    assert not port.reading  # still over its share: looks again a tick later
    mine.set(10)  # two of its connections closed
    clock.advance(TICK)
    assert port.reading and not clock.getDelayedCalls()
    assert clock.seconds() < PAUSE
    balance.after_read(port)  # 10 of 18: within its share
    mine.set(12)
    other.set(0)  # over its share once more; then the other worker takes new ones
    balance.after_read(port)
    assert not port.reading
    other.set(12)
    clock.advance(TICK)
    assert port.reading


def test_the_pause_ends_even_if_no_other_worker_takes_anything(tmp_path: Path) -> None:
    """A dead or stuck worker slows the others' accepting to one per pause, never stops it."""
    clock = Clock()
    mine, _ = worker_slots(tmp_path, 2)
    balance = Balance(clock, mine)
    port = FakePort()
    for own in range(4, 10):
        mine.set(own)  # accepted one more after each pause
        balance.after_read(port)
        assert not port.reading
        clock.advance(PAUSE)
        assert port.reading


def test_a_port_stopped_during_its_pause_stays_stopped(tmp_path: Path) -> None:
    clock = Clock()
    mine, _ = worker_slots(tmp_path, 2)
    mine.set(5)
    balance = Balance(clock, mine)
    port = FakePort()
    balance.after_read(port)
    port.disconnecting = 1  # stopListening(): the socket is closing
    clock.advance(PAUSE)
    assert not port.reading
    port.connected, port.disconnecting = 0, 0  # closed
    balance.after_read(port)
    clock.advance(PAUSE)
    assert not port.reading


def test_the_share_counts_every_worker(tmp_path: Path) -> None:
    clock = Clock()
    slots = worker_slots(tmp_path, 4)
    balance = Balance(clock, slots[0])
    for index, count in enumerate([7, 5, 5, 5]):  # 22 open: a share of 6, +1
        slots[index].set(count)
    assert not balance.over_share()
    slots[0].set(8)
    assert balance.over_share()


class Hold(Protocol):
    pass


class Recording(Balance):
    def __init__(self, slots: WorkerSlots) -> None:
        super().__init__(Clock(), slots)
        self.reads = 0

    def after_read(self, port: object) -> None:
        self.reads += 1


@pytest.mark.parametrize("balanced", [False, True])
def test_an_adopted_port_accepts_one_at_a_time_only_when_balanced(
    tmp_path: Path, balanced: bool
) -> None:
    """A worker's port accepts one connection per read and asks its Balance after each; in a
    single process (systemd's sockets are adopted too) Twisted accepts all that wait."""
    sock = bind(listen_request("tcp:0:interface=127.0.0.1"))
    accepted: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr: object) -> Protocol:
            protocol = Hold()
            accepted.append(protocol)
            return protocol

    balance = Recording(worker_slots(tmp_path, 2)[0]) if balanced else None
    port: Any = adopt(MemoryReactor(), sock.fileno(), "tcp:0", Counting(), balance)
    clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(3)]
    try:
        if balanced:
            assert balance is not None
            for reads in (1, 2, 3):
                port.doRead()
                assert len(accepted) == balance.reads == reads
                assert port.numberAccepts == 21  # Twisted's raise, reset before each read
        else:
            port.doRead()
            assert len(accepted) == 3  # all at the first read
    finally:
        for client in clients:
            client.close()
        for protocol in accepted:
            server_side: Any = protocol.transport
            server_side.socket.close()
        port.connectionLost(None)
        sock.close()

# -- real processes: policyd with workers: 2 -----------------------------------------------------

BURST = 40
#: Each of the two workers must hold at least this many of the burst (an even split is 20).
AT_LEAST = 15


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _accepted_tcp(port: int) -> set[int]:
    """Inodes of the established server-side ends of connections to ``port`` (IPv4)."""
    inodes: set[int] = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(int(fields[9]))
    return inodes


def _accepted_unix(path: Path) -> set[int]:
    """Inodes of the connected server-side ends of connections to the unix socket ``path``
    (an accepted socket carries the listener's path; the clients' ends carry none)."""
    inodes: set[int] = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) == 8 and fields[7] == str(path) and fields[5] == "03":  # connected
                inodes.add(int(fields[6]))
    return inodes


def _burst(family: socket.AddressFamily, address: str | tuple[str, int]) -> list[socket.socket]:
    """``BURST`` connections, every connect() before anything is read: what every smtpd of a
    restarted Postfix does at once."""
    clients = []
    for _ in range(BURST):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address)
        clients.append(sock)
    return clients


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_burst_of_connections_is_split_between_two_workers(workdir: Path, kind: str) -> None:
    port = free_port()
    sock_path = workdir / "policy.sock"
    listen = f"tcp:{port}:interface=127.0.0.1" if kind == "tcp" else f"unix:{sock_path}"
    daemons = Daemons(workdir, {"policyd": {"listen": listen, "workers": 2}})
    daemons.start(timeout=60)
    clients: list[socket.socket] = []
    try:
        workers = daemons.pids()[1:]
        assert len(workers) == 2
        if kind == "tcp":
            clients = _burst(socket.AF_INET, ("127.0.0.1", port))
        else:
            clients = _burst(socket.AF_UNIX, str(sock_path))
        held: dict[int, int] = {}

        def all_accepted() -> bool:
            accepted = _accepted_tcp(port) if kind == "tcp" else _accepted_unix(sock_path)
            held.update({pid: len(_socket_inodes(pid) & accepted) for pid in workers})
            return sum(held.values()) == BURST

        wait_until(all_accepted, timeout=30, what=f"the workers to accept {BURST} connections")
        assert min(held.values()) >= AT_LEAST, held
        # The connections work (and stay with the worker that accepted them).
        request = b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n\n"
        for sock in clients[:3]:
            sock.sendall(request)
            assert sock.recv(1000).startswith(b"action=")
    finally:
        for sock in clients:
            sock.close()
        daemons.stop()
