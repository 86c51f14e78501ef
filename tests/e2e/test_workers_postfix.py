"""policyd with ``workers: 2`` behind a private stock Postfix (3.7 and 3.10).

One listening socket, two worker processes: each worker answers (connections pinned to a
worker are found through ``/proc``), a killed worker is replaced while Postfix keeps getting
answers, SIGHUP reaches both, ``/metrics`` sums both, rate limits stay exact across them, and
SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devrig.release import Release
from tests.rig import Daemons, Postfix, RigFactory, free_port, wait_until

pytestmark = pytest.mark.e2e

LIMIT = 3


@dataclass
class Rig:
    root: Path
    postfix: Postfix
    daemons: Daemons
    policy_port: int
    metrics_port: int

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-3000:]}\n"
                f"--- daemons\n{self.daemons.output()[-5000:]}")

    @property
    def supervisor(self) -> int:
        assert self.daemons.process is not None
        return self.daemons.process.pid

    def workers(self) -> set[int]:
        with open(f"/proc/{self.supervisor}/task/{self.supervisor}/children") as f:
            return {int(pid) for pid in f.read().split()}

    def metric(self, name: str) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        total = 0.0
        for line in body.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def policy_config(policy_port: int, metrics_port: int, action: str = "Greylisted") -> dict[str, object]:
    return {
        "listen": f"tcp:{policy_port}:interface=127.0.0.1",
        "metrics": f"tcp:{metrics_port}:interface=127.0.0.1",
        "workers": 2,
        "mynetworks": ["127.0.0.2/32"],
        "greylist": {"delay": "1h", "hostname": "mx.test.example",
                     "action": f"DEFER_IF_PERMIT 4.7.1 {action}"},
        "ratelimit": {"rules": {"senders": {"key": ["sender"],
                                            "windows": [{"period": "1h", "messages": LIMIT}]}}},
    }


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-wrk-")
    root = factory.root
    policy_port, metrics_port = free_port(), free_port()
    daemons = factory.daemons(
        {"mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
         "policyd": policy_config(policy_port, metrics_port)},
        ["policyd"],
    )
    daemons.store.add_domain("example.org")
    daemons.store.add_mailbox("bob@example.org", "{PLAIN}unused")
    policy = (f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, "
              f"default_action=DUNNO }}")
    postfix = factory.postfix(
        main={
            "virtual_mailbox_domains": "example.org",
            "virtual_transport": "error:no delivery in this test",
            "smtpd_reject_unlisted_recipient": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": policy,
            "smtpd_data_restrictions": policy,
        },
    )
    try:
        factory.start(daemons)
        factory.start(postfix)
        rig = Rig(root, postfix, daemons, policy_port, metrics_port)
        wait_until(lambda: len(rig.workers()) == 2, timeout=30, what="two policyd workers")
        yield rig
    finally:
        factory.close()


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def owner(rig: Rig, client: socket.socket) -> int | None:
    """The worker holding the server side of ``client``'s connection."""
    local = client.getsockname()[1]
    wanted = f"0100007F:{rig.policy_port:04X} 0100007F:{local:04X}"
    with open("/proc/net/tcp") as f:
        inode = next((line.split()[9] for line in f if wanted in line), None)
    if inode is None:
        return None
    return next((pid for pid in rig.workers() if inode in _socket_inodes(pid)), None)


def one_connection_per_worker(rig: Rig) -> dict[int, socket.socket]:
    """Open policy connections until each worker has accepted one; the others are closed."""
    pinned: dict[int, socket.socket] = {}
    spare: list[socket.socket] = []
    for _ in range(60):
        if len(pinned) == 2:
            break
        client = socket.create_connection(("127.0.0.1", rig.policy_port), timeout=10)
        ask(client, request())  # accepted and answered: the owner is settled
        pid = owner(rig, client)
        if pid is not None and pid not in pinned:
            pinned[pid] = client
        else:
            spare.append(client)
    for client in spare:
        client.close()
    assert len(pinned) == 2, f"connections never reached both workers {rig.workers()}\n{rig.logs()}"
    return pinned


def request(state: str = "RCPT", sender: str | None = None, **extra: str) -> bytes:
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": "198.51.100.7", "client_name": "client.remote.example",
        "helo_name": "client.remote.example",
        "sender": sender or f"s{uuid.uuid4().hex[:10]}@remote.example",
        "recipient": "bob@example.org", "recipient_count": "1" if state == "DATA" else "0",
        "instance": uuid.uuid4().hex[:8], **extra,
    }
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


def ask(client: socket.socket, data: bytes) -> str:
    client.sendall(data)
    answer = b""
    while not answer.endswith(b"\n\n"):
        chunk = client.recv(4096)
        assert chunk, "policyd closed the connection"
        answer += chunk
    return answer.decode().strip()


def rcpt(rig: Rig, sender: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.remote.example")
        code, _ = smtp.mail(sender)
        assert code == 250, rig.logs()
        return smtp.rcpt("bob@example.org")


def test_both_workers_answer_through_one_socket(rig: Rig) -> None:
    pinned = one_connection_per_worker(rig)
    assert set(pinned) == rig.workers()
    for client in pinned.values():
        assert ask(client, request()) == "action=DEFER_IF_PERMIT 4.7.1 Greylisted"
        client.close()
    code, text = rcpt(rig, "first@remote.example")
    assert code == 450 and b"Greylisted" in text, rig.logs()


def test_metrics_sum_over_both_workers(rig: Rig) -> None:
    pinned = one_connection_per_worker(rig)
    before = rig.metric("mailplugins_policyd_requests_total")
    sent = 0
    for client in pinned.values():
        for _ in range(7):
            ask(client, request())
            sent += 1
        client.close()
    # Each worker writes its own file; the supervisor's endpoint adds them up.
    assert rig.metric("mailplugins_policyd_requests_total") - before == sent
    assert rig.metric("mailplugins_workers") == 2


def test_rate_limit_is_exact_across_workers(rig: Rig) -> None:
    pinned = list(one_connection_per_worker(rig).values())
    sender = f"limited{uuid.uuid4().hex[:6]}@remote.example"
    answers = [ask(pinned[i % 2], request("DATA", sender)) for i in range(LIMIT + 2)]
    for client in pinned:
        client.close()
    assert answers[:LIMIT] == ["action=DUNNO"] * LIMIT, answers
    assert answers[LIMIT:] == ["action=DEFER_IF_PERMIT 4.7.1 Rate limit exceeded"] * 2, answers


def test_a_killed_worker_is_replaced_and_postfix_keeps_its_answers(rig: Rig) -> None:
    before = rig.workers()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(rig.workers() - {victim}) == 2, timeout=30,
               what="the killed policyd worker to be replaced")
    (replacement,) = rig.workers() - before
    wait_until(lambda: f"serving (pid {replacement})" in rig.daemons.output(), timeout=30,
               what="the new worker to listen")
    assert f"(pid {victim}) killed by signal 9; restarting it in" in rig.daemons.output()
    for i in range(3):
        code, text = rcpt(rig, f"after-kill{i}-{uuid.uuid4().hex[:6]}@remote.example")
        assert code == 450 and b"Greylisted" in text, rig.logs()
    assert victim not in set(one_connection_per_worker(rig))


def test_sighup_reaches_every_worker(rig: Rig) -> None:
    data = yaml.safe_load(rig.daemons.config_path.read_text())
    data["policyd"] = policy_config(rig.policy_port, rig.metrics_port, action="Greylisted anew")
    rig.daemons.config_path.write_text(yaml.safe_dump(data))
    rig.daemons.reload()
    wait_until(lambda: "2 workers signalled" in rig.daemons.output(), timeout=30,
               what="the supervisor to signal the workers")

    def both_reloaded() -> bool:
        pinned = one_connection_per_worker(rig)
        answers = {ask(client, request()) for client in pinned.values()}
        for client in pinned.values():
            client.close()
        return answers == {"action=DEFER_IF_PERMIT 4.7.1 Greylisted anew"}

    wait_until(both_reloaded, timeout=30, what="both workers to answer with the new config")
    code, text = rcpt(rig, f"reloaded-{uuid.uuid4().hex[:6]}@remote.example")
    assert code == 450 and b"Greylisted anew" in text, rig.logs()


def test_sigterm_stops_every_worker(rig: Rig) -> None:
    workers = rig.workers()
    assert rig.daemons.stop() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", rig.policy_port), timeout=5)
