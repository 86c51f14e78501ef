"""The database stops mid-load: every daemon answers its temporary failure in time, then recovers.

policyd, authd and deliver run as three ``mailplugins serve`` processes on one fresh
PostgreSQL database, with every lookup cache off so each request reaches the database. Load
runs against all of them the whole time: policy requests, auth-client AUTH PLAIN, dict
passdb lookups and LMTP deliveries. Then the local PostgreSQL cluster itself is stopped
(``pg_ctlcluster ... stop -m fast``: connections are cut and new ones refused), and started
again. What Postfix and Dovecot must see:

- during the outage only temporary failures, each well inside the daemon's own limit: policyd
  its fallback action (Postfix: 4xx to the client), authd a reset auth-client connection
  (Postfix answers ``454 4.7.0``), a dict ``F`` reply (Dovecot: temporary failure), deliver
  ``451 4.3.0`` at RCPT (Postfix defers); never a permanent answer (a wrong "no such user",
  "wrong password" or "rejected" would lose mail or lock users out);
- afterwards real answers again from the same processes, without a restart;
- every LMTP delivery answered 250 is in the Maildir.

The cluster is started again in a fixture's teardown whatever happens, and the test waits
until it accepts connections: the rest of the suite needs it.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from devrig.instances import short_tempdir, wait_until
from mailplugins.hashing import hash_password
from tests.conftest import PG_ADMIN_URL
from tests.rig import Daemons

pytestmark = pytest.mark.e2e

NOBODY = 65534
PASSWORD = "outage-secret"
USER = "bob@example.org"
#: Database settings shared by the three daemons: a lookup slower than this is given up.
DB_TIMEOUT = 1.0
POLICYD_BUDGET = 2.0
AUTHD_REQUEST_TIMEOUT = 3.0
FALLBACK = "DEFER_IF_PERMIT Service temporarily unavailable"
#: Slack on top of each daemon's own limit for process scheduling on a busy 2-core machine.
SLACK = 1.0
#: Outage answers each client must have collected before the database comes back.
OUTAGE_SAMPLES = 4
OUTAGE_SECONDS = DB_TIMEOUT + 1.0


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        pytest.fail("no local PostgreSQL cluster (/etc/postgresql is empty): cannot stop it")
    return versions[-1]


def pg_ctl(action: str) -> None:
    """Stop or start the local cluster directly, not through systemd (there is none here)."""
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", action]
    if action == "stop":
        command += ["-m", "fast"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: "
                           f"{result.stdout}{result.stderr}")


def pg_accepts_connections() -> bool:
    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def _admin_execute(*statements: str) -> None:
    """A fresh admin connection per use: pooled ones do not survive the cluster's restart."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                           connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database, as tests.conftest makes them, but dropped through a new connection."""
    name = f"mp_{uuid.uuid4().hex[:12]}"
    try:
        _admin_execute(f"CREATE DATABASE {name}")
    except Exception as exc:
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}: {exc}")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin_execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            f"DROP DATABASE IF EXISTS {name}",
        )


@pytest.fixture
def postgres_comes_back(pg_url: str) -> Iterator[None]:
    """Whatever the test does, the cluster runs again (and accepts connections) afterwards.

    Depends on ``pg_url`` so this teardown runs before the database is dropped.
    """
    try:
        yield
    finally:
        if not pg_accepts_connections():
            try:
                pg_ctl("start")
            except RuntimeError:
                if not pg_accepts_connections():  # started meanwhile by someone else: fine
                    raise
        wait_until(pg_accepts_connections, timeout=60, interval=0.2, what="PostgreSQL to accept connections")


@dataclass
class Stack:
    root: Path
    mail_root: Path
    policyd: Daemons
    authd: Daemons
    deliver: Daemons

    @property
    def policy_socket(self) -> Path:
        return self.root / "policy.sock"

    @property
    def sasl_socket(self) -> Path:
        return self.root / "auth.sock"

    @property
    def dict_socket(self) -> Path:
        return self.root / "dict.sock"

    @property
    def lmtp_socket(self) -> Path:
        return self.root / "lmtp.sock"

    def new_files(self) -> list[Path]:
        directory = self.mail_root / "example.org" / "bob" / "Maildir" / "new"
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def logs(self) -> str:
        return "\n".join(f"--- {d.root.name}\n{d.output()[-3000:]}"
                         for d in (self.policyd, self.authd, self.deliver))


@pytest.fixture
def stack(pg_url: str, postgres_comes_back: None) -> Iterator[Stack]:
    root = short_tempdir("mp-dbo-")
    mail_root = root / "vmail"
    mail_root.mkdir()
    os.chown(mail_root, NOBODY, NOBODY)
    database = {"url": pg_url, "pool_size": 4, "timeout": f"{DB_TIMEOUT}s"}
    mail = {"location": f"{mail_root}/%d/%n/Maildir", "uid": NOBODY, "gid": NOBODY}
    policyd = Daemons(root / "policyd", {
        "database": database, "mail": mail,
        "policyd": {
            "listen": f"unix:{root}/policy.sock:mode=666",
            "budget": f"{POLICYD_BUDGET}s",
            "fallback_action": FALLBACK,
            "cache_ttl": 0,
        },
    }, ["policyd"])
    authd = Daemons(root / "authd", {
        "database": database, "mail": mail,
        "authd": {
            "sasl_listen": f"unix:{root}/auth.sock:mode=666",
            "dict_listen": f"unix:{root}/dict.sock:mode=666",
            "lookup_cache_ttl": 0,
            "request_timeout": f"{AUTHD_REQUEST_TIMEOUT}s",
            "failure_delay": "0s",
        },
    }, ["authd"])
    deliver = Daemons(root / "deliver", {
        "database": database, "mail": mail,
        "deliver": {
            "listen": f"unix:{root}/lmtp.sock:mode=666",
            "hostname": "deliver.test",
            "lookup_cache_ttl": 0,
        },
    }, ["deliver"])
    store = policyd.store
    store.add_domain("example.org")
    store.add_mailbox(USER, hash_password(PASSWORD, policyd.config.passwords))
    started: list[Daemons] = []
    try:
        for daemons in (policyd, authd, deliver):
            daemons.start()
            started.append(daemons)
        yield Stack(root, mail_root, policyd, authd, deliver)
    finally:
        for daemons in started:
            daemons.stop()
        for daemons in (policyd, authd, deliver):
            daemons.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


# -- clients: each call returns (outcome, detail); outcome "ok", "temp" or anything else ----


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(path))
    return sock


def _read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(f"closed after {data!r}")
        data += chunk
    return data


class PolicyClient:
    """Postfix's smtpd keeps its policy connection open between requests: so do we."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.sequence = 0

    def __call__(self) -> tuple[str, str]:
        if self.sock is None:
            self.sock = _connect(self.path)
        self.sequence += 1
        attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                 "client_address": "192.0.2.1", "client_name": "unknown",
                 "sender": "someone@remote.example", "recipient": USER,
                 "instance": f"outage.{self.sequence}"}
        self.sock.sendall(b"".join(f"{k}={v}\n".encode() for k, v in attrs.items()) + b"\n")
        reply = _read_until(self.sock, lambda d: d.endswith(b"\n\n"))
        action = reply.decode().split("\n", 1)[0].removeprefix("action=")
        if action == "DUNNO":
            return "ok", action
        return ("temp" if action == FALLBACK else "wrong"), action

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class SaslClient:
    """The auth-client protocol as Postfix's smtpd speaks it, one connection kept open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.request = 0

    def _line(self) -> bytes:
        assert self.sock is not None
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def __call__(self) -> tuple[str, str]:
        if self.sock is None:
            self.sock = _connect(self.path)
            self.buffer = b""
            self.sock.sendall(b"VERSION\t1\t2\nCPID\t4242\n")
            while self._line() != b"DONE":
                pass
        self.request += 1
        resp = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        try:
            self.sock.sendall(f"AUTH\t{self.request}\tPLAIN\tservice=smtp\tnologin"
                              f"\tlip=127.0.0.1\trip=192.0.2.7\tresp={resp}\n".encode())
            line = self._line().decode()
        except (ConnectionResetError, BrokenPipeError):
            # authd's temporary failure: the connection is reset, Postfix answers 454 4.7.0.
            self.close()
            return "temp", "connection reset"
        verb = line.split("\t", 1)[0]
        return ("ok" if verb == "OK" else "wrong"), line

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


class DictClient:
    """Dovecot's dict-proxy passdb lookup, one connection kept open (as Dovecot does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def __call__(self) -> tuple[str, str]:
        if self.sock is None:
            self.sock = _connect(self.path)
            self.sock.sendall(b"H3\t2\t0\t\tauth\n")
        self.sock.sendall(f"Lshared/passdb/{USER}\t{USER}\n".encode())
        line = _read_until(self.sock, lambda d: d.endswith(b"\n")).decode()
        if line.startswith("O") and USER in line:
            return "ok", line[:40]
        return ("temp" if line.startswith("F") else "wrong"), line.strip()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _last_line_complete(data: bytes) -> bool:
    """A whole (possibly multi-line) reply: its last line is ``NNN text`` (no ``-``)."""
    if not data.endswith(b"\r\n"):
        return False
    return data[:-2].rsplit(b"\r\n", 1)[-1][3:4] in (b" ", b"")


def _lmtp_reply(sock: socket.socket) -> str:
    """The last line of one reply."""
    return _read_until(sock, _last_line_complete).decode()[:-2].rsplit("\r\n", 1)[-1]


class LmtpClient:
    """One LMTP transaction per call, as Postfix's lmtp client; the RCPT reply is what counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent = 0
        self.saved = 0

    def __call__(self) -> tuple[str, str]:
        with _connect(self.path) as sock:
            def command(line: bytes) -> str:
                sock.sendall(line + b"\r\n")
                return _lmtp_reply(sock)

            _lmtp_reply(sock)
            command(b"LHLO client.test")
            command(b"MAIL FROM:<sender@remote.example>")
            rcpt = command(f"RCPT TO:<{USER}>".encode())
            if not rcpt.startswith("250"):
                command(b"QUIT")
                outcome = "temp" if rcpt.startswith("451 4.3.0") else "wrong"
                return outcome, rcpt
            command(b"DATA")
            self.sent += 1
            final = command(f"Subject: outage {self.sent}\r\n\r\nbody {self.sent}\r\n.".encode())
            command(b"QUIT")
        if final.startswith("250 2.0.0"):
            self.saved += 1
            return "ok", rcpt
        return "wrong", final

    def close(self) -> None:
        pass


@dataclass
class Answer:
    started: float
    finished: float
    outcome: str
    detail: str

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Load:
    """One client asking again and again in a thread, every answer recorded with its timing."""

    name: str
    client: PolicyClient | SaslClient | DictClient | LmtpClient
    #: The daemon's own limit on a temporary failure (seconds).
    limit: float
    answers: list[Answer] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                outcome, detail = self.client()
            except OSError as exc:  # a client-side error is a test failure, recorded as such
                outcome, detail = "error", repr(exc)
                self.client.close()
                if isinstance(self.client, (PolicyClient, DictClient)):
                    self.client.sock = None
            self.answers.append(Answer(started, time.monotonic(), outcome, detail))
            self.stopping.wait(0.02)  # pacing: a steady load, not a benchmark

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.client.close()

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if a.started >= start and a.finished <= end]

    def outage_long_enough(self, down: float) -> bool:
        return (len(self.between(down, float("inf"))) >= OUTAGE_SAMPLES
                and time.monotonic() - down > OUTAGE_SECONDS)

    def ok_after(self, moment: float) -> bool:
        return any(a.outcome == "ok" and a.started >= moment for a in self.answers)


def test_database_stops_mid_load_temporary_failures_in_time_then_recovery(stack: Stack) -> None:
    loads = [
        Load("policyd", PolicyClient(stack.policy_socket), POLICYD_BUDGET),
        Load("authd-sasl", SaslClient(stack.sasl_socket), AUTHD_REQUEST_TIMEOUT),
        Load("authd-dict", DictClient(stack.dict_socket), DB_TIMEOUT),
        Load("deliver", LmtpClient(stack.lmtp_socket), DB_TIMEOUT),
    ]
    for load in loads:
        load.start()
    try:
        begun = time.monotonic()
        for load in loads:
            wait_until(partial(load.ok_after, begun), timeout=20,
                       what=f"{load.name} to answer before the outage\n{stack.logs()}")

        pg_ctl("stop")
        down = time.monotonic()
        # Down for longer than the database timeout, and a few answers from each client.
        for load in loads:
            wait_until(partial(load.outage_long_enough, down), timeout=20, interval=0.05,
                       what=f"{OUTAGE_SAMPLES} answers from {load.name} during the outage")
        restarting = time.monotonic()
        pg_ctl("start")
        wait_until(pg_accepts_connections, timeout=60, interval=0.2, what="PostgreSQL back")
        up = time.monotonic()

        for load in loads:
            wait_until(partial(load.ok_after, up), timeout=20,
                       what=f"{load.name} to recover without a restart\n{stack.logs()}")
    finally:
        for load in loads:
            load.stop()

    for load in loads:
        during = load.between(down, restarting)
        assert len(during) >= OUTAGE_SAMPLES, load.name
        # Only the temporary failure while the database is down: never a success from nowhere,
        # never a permanent answer.
        assert {a.outcome for a in during} == {"temp"}, (load.name, during[:5], stack.logs())
        # Every answer of the whole run (before, during, around and after) within the limit.
        slowest = max(load.answers, key=lambda a: a.seconds)
        assert slowest.seconds < load.limit + SLACK, (load.name, slowest)
        # Around the transitions an answer may be either, but never anything else.
        assert {a.outcome for a in load.answers} <= {"ok", "temp"}, (
            load.name, [a for a in load.answers if a.outcome not in ("ok", "temp")][:5])
        assert load.answers[-1].outcome == "ok", (load.name, load.answers[-3:])
        print(f"{load.name}: {len(load.answers)} answers, {len(during)} during the outage, "
              f"slowest there {max(a.seconds for a in during):.3f}s, overall {slowest.seconds:.3f}s")

    # The same processes, never restarted.
    for daemons in (stack.policyd, stack.authd, stack.deliver):
        assert daemons.process is not None and daemons.process.poll() is None
    assert f"answering {FALLBACK}" in stack.policyd.output()

    # Every delivery answered 250 is in the Maildir, once.
    lmtp = loads[3].client
    assert isinstance(lmtp, LmtpClient)
    files = stack.new_files()
    assert len(files) == lmtp.saved, (len(files), lmtp.saved)
    subjects = sorted(next(line for line in path.read_bytes().split(b"\n")
                           if line.startswith(b"Subject: ")) for path in files)
    assert len(set(subjects)) == len(subjects)
