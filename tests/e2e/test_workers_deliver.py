"""deliver with ``workers: 2`` behind a private stock Postfix (3.7 and 3.10), over LMTP.

Postfix opens several LMTP connections at once on deliver's one unix socket; the kernel hands
them to both workers. Every message arrives exactly once, ``/metrics`` counts each delivery
once over both workers, and a worker killed while mail flows is replaced without losing or
doubling a message.
"""

from __future__ import annotations

import os
import signal
import smtplib
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from tests.rig import Daemons, Postfix, RigFactory, free_port, wait_until

pytestmark = pytest.mark.e2e

NOBODY = 65534


@dataclass
class Rig:
    mail_root: Path
    postfix: Postfix
    daemons: Daemons
    metrics_port: int

    def inbox(self) -> list[Path]:
        new = self.mail_root / "example.org" / "alice" / "Maildir" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def workers(self) -> set[int]:
        assert self.daemons.process is not None
        pid = self.daemons.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(child) for child in f.read().split()}

    def delivered(self) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        for line in body.read().decode().splitlines():
            if line.startswith('mailplugins_deliver_recipients_total{result="delivered"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def send(self, count: int, tag: str) -> None:
        def one(n: int) -> None:
            message = f"Subject: {tag} {n}\r\nMessage-ID: <{tag}.{n}@test>\r\n\r\nbody {n}\r\n"
            with smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=60) as smtp:
                smtp.sendmail("sender@remote.example", ["alice@example.org"], message)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))

    def subjects(self) -> list[str]:
        found = []
        for path in self.inbox():
            for line in path.read_bytes().split(b"\n"):
                if line.startswith(b"Subject: "):
                    found.append(line[9:].decode().strip())
                    break
        return found

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-3000:]}\n"
                f"--- daemons\n{self.daemons.output()[-4000:]}")


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-wkd-")
    root = factory.root
    mail_root = root / "vmail"
    mail_root.mkdir()
    os.chown(mail_root, NOBODY, NOBODY)
    sock = root / "lmtp.sock"
    metrics_port = free_port()
    daemons = factory.daemons({
        "mail": {"location": f"{mail_root}/%d/%n/Maildir", "uid": NOBODY, "gid": NOBODY},
        "deliver": {"listen": f"unix:{sock}:mode=666", "hostname": "deliver.test", "workers": 2,
                    "metrics": f"tcp:{metrics_port}:interface=127.0.0.1"},
    }, ["deliver"])
    daemons.store.add_domain("example.org")
    daemons.store.add_mailbox("alice@example.org", "{PLAIN}unused")
    postfix = factory.postfix(main={
        "virtual_mailbox_domains": "example.org",
        "virtual_transport": f"lmtp:unix:{sock}",
        "smtpd_reject_unlisted_recipient": "no",
        # As `mailplugins postfix-config` writes it: the queue ID lets deliver recognise
        # Postfix's retry of a message whose reply a killed worker never sent.
        "lmtp_send_xforward_command": "yes",
        # Deferred mail (a worker killed mid-delivery) is retried within the test's patience.
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
    })
    try:
        factory.start(daemons)
        factory.start(postfix)
        yield Rig(mail_root, postfix, daemons, metrics_port)
    finally:
        factory.close()


def test_every_message_once_and_counted_once_over_both_workers(rig: Rig) -> None:
    assert len(rig.workers()) == 2
    before, tag = rig.delivered(), f"calm-{uuid.uuid4().hex[:6]}"
    rig.send(20, tag)
    wait_until(lambda: sum(s.startswith(tag) for s in rig.subjects()) == 20, timeout=90,
               what=f"20 messages in the Maildir\n{rig.logs()}")
    assert sorted(s for s in rig.subjects() if s.startswith(tag)) == sorted(
        f"{tag} {n}" for n in range(20))
    wait_until(lambda: rig.delivered() - before == 20, timeout=10,
               what=f"/metrics to count 20 deliveries over both workers, has {rig.delivered() - before}")


def test_a_worker_killed_while_mail_flows_loses_and_doubles_nothing(rig: Rig) -> None:
    tag = f"kill-{uuid.uuid4().hex[:6]}"
    victim = min(rig.workers())
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(rig.send, 30, tag)
        wait_until(lambda: any(s.startswith(tag) for s in rig.subjects()), timeout=60,
                   what=f"the first message\n{rig.logs()}")
        os.kill(victim, signal.SIGKILL)
        sending.result(timeout=120)
    wait_until(lambda: len(rig.workers() - {victim}) == 2, timeout=30, what="a new worker")
    wait_until(lambda: sum(s.startswith(tag) for s in rig.subjects()) >= 30, timeout=120,
               what=f"30 messages in the Maildir\n{rig.logs()}")
    mine = sorted(s for s in rig.subjects() if s.startswith(tag))
    twice = sorted({s for s in mine if mine.count(s) > 1})
    notes = [line for line in rig.postfix.log_text().splitlines() if "more than once" in line]
    assert mine == sorted(f"{tag} {n}" for n in range(30)), (twice, notes, rig.logs())
    assert f"(pid {victim}) killed by signal 9; restarting it in" in rig.daemons.output()
