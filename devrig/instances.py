# -*- test-case-name: tests.unit.test_devrig -*-
"""Private stock Postfix and Dovecot instances on loopback ports, in one scratch directory.

Used by the end-to-end tests and by the local demo stack (``scripts/run``): each instance has
its own config, queue, state and log files under its root, listens only on 127.0.0.1, and is
stopped with its own stop command, so it never touches the system's mail setup and can run
beside other instances. Runs as root, without Postfix's chroot; README's Development section
describes the rig.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


_given_ports: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free right now, never one this process was given before: the port
    is released at once, so two calls in a row could otherwise return the same one (seen: a
    daemon's two listeners on one port)."""
    for _attempt in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise RuntimeError("no free loopback port this process has not handed out already")


def short_tempdir(prefix: str = "mp-") -> Path:
    """A short path (unix socket paths are limited to 107 bytes) that other users can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unix_socket_open(path: str | Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def run(cmd: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


class Postfix:
    """A private Postfix 3.7 instance.

    ``main`` adds or overrides main.cf settings; ``services`` are extra master.cf lines (e.g. a
    submission smtpd with ``-o`` overrides); ``smtp_port`` is the port 25 stand-in.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        smtp_port: int | None = None,
        main: Mapping[str, str] | None = None,
        services: Iterable[str] = (),
        hostname: str = "mx.test.example",
    ) -> None:
        self.root = Path(root) / "postfix"
        self.etc = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.smtp_port = smtp_port or free_port()
        self.hostname = hostname
        self.main: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": hostname,
            "mydomain": "test.example",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "notify_classes": "",
            "smtpd_tls_security_level": "none",
            "recipient_delimiter": "+",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            # Retry deferred mail quickly in tests.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
        }
        self.main.update(main or {})
        self.services = list(services)

    @property
    def private_dir(self) -> Path:
        return self.queue_dir / "private"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["postfix", "-c", str(self.etc), *args], check=check)

    def write(self) -> None:
        for directory in (self.etc, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        lines = [f"{key} = {value}" for key, value in self.main.items()]
        (self.etc / "main.cf").write_text("\n".join(lines) + "\n")
        shutil.copy("/etc/postfix/master.cf", self.etc / "master.cf")
        run(["postconf", "-c", str(self.etc), "-F", "-e", "*/*/chroot = n"])
        run(["postconf", "-c", str(self.etc), "-M", "-e",
             f"smtp/inet=127.0.0.1:{self.smtp_port} inet n - n - - smtpd"])
        master = (self.etc / "master.cf").read_text()
        (self.etc / "master.cf").write_text(master + "".join(s.rstrip() + "\n" for s in self.services))

    def start(self) -> Postfix:
        self.write()
        result = self._postfix("check", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix check failed: {result.stderr}{self.log_text()}")
        self._postfix("start")
        wait_until(lambda: port_open(self.smtp_port), what=f"postfix on port {self.smtp_port}")
        return self

    def set_main(self, **settings: str) -> None:
        for key, value in settings.items():
            self.main[key] = value
            run(["postconf", "-c", str(self.etc), "-e", f"{key}={value}"])

    def reload(self) -> None:
        self._postfix("reload")
        time.sleep(0.5)

    def flush(self) -> None:
        self._postfix("flush", check=False)

    def stop(self) -> None:
        if (self.etc / "main.cf").exists():
            self._postfix("stop", check=False)
            pid_file = self.queue_dir / "pid" / "master.pid"
            wait_until(lambda: not pid_file.exists() or not _pid_alive(pid_file), timeout=15,
                       what="postfix master to exit")

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        return wait_until(
            lambda: regex.search(self.log_text()), timeout=timeout, what=f"maillog /{pattern}/"
        )


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


class Dovecot:
    """A private Dovecot 2.3 instance; ``conf`` holds passdb/userdb/mail_location and friends."""

    def __init__(
        self,
        root: str | Path,
        *,
        conf: str,
        imap_port: int | None = None,
        pop3_port: int | None = None,
        lmtp_port: int | None = None,
        protocols: Sequence[str] = ("imap", "pop3"),
    ) -> None:
        self.root = Path(root) / "dovecot"
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.base_dir = self.root / "run"
        self.imap_port = imap_port or free_port()
        self.pop3_port = pop3_port or free_port()
        self.lmtp_port = lmtp_port
        self.protocols = list(protocols) + (["lmtp"] if lmtp_port and "lmtp" not in protocols else [])
        self.conf = conf

    def write(self) -> None:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lmtp = ""
        if self.lmtp_port:
            lmtp = (f"service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n"
                    f"    port = {self.lmtp_port}\n  }}\n}}\n")
        text = f"""instance_name = mp-{uuid.uuid4().hex[:8]}
base_dir = {self.base_dir}
state_dir = {self.root}/state
log_path = {self.log_path}
protocols = {' '.join(self.protocols)}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{lmtp}{self.conf}
"""
        self.config_path.write_text(text)

    def start(self) -> Dovecot:
        self.write()
        run(["doveconf", "-c", str(self.config_path), "-n"])
        # Dovecot daemonises with our stdout/stderr: give it a file, never a pipe we would wait on.
        with open(self.root / "dovecot.stderr", "ab") as out:
            result = subprocess.run(
                ["dovecot", "-c", str(self.config_path)], stdout=out, stderr=out, check=False
            )
        if result.returncode != 0:
            raise RuntimeError(f"dovecot exited {result.returncode}: "
                               f"{(self.root / 'dovecot.stderr').read_text()}{self.log_text()}")
        if "imap" in self.protocols:
            wait_until(lambda: port_open(self.imap_port), what=f"dovecot imap on {self.imap_port}")
        if self.lmtp_port:
            wait_until(lambda: port_open(self.lmtp_port or 0), what="dovecot lmtp")
        return self

    def doveadm(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["doveadm", "-c", str(self.config_path), *args], check=check)

    def stop(self) -> None:
        if self.config_path.exists():
            self.doveadm("stop")
            pid_file = self.base_dir / "master.pid"
            wait_until(lambda: not pid_file.exists() or not _pid_alive(pid_file), timeout=15,
                       what="dovecot to exit")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""




class ServeProcess:
    """``mailplugins serve`` as a child process, its output appended to ``log_path``."""

    def __init__(
        self,
        config_path: str | Path,
        daemons: Sequence[str] = (),
        log_path: str | Path | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.daemons = list(daemons)
        self.log_path = Path(log_path or self.config_path.with_name("daemons.log"))
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mailplugins.cli", "--config", str(self.config_path), *args]

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, input=input, cwd=self.cwd,
            check=False,
        )

    def start(self, timeout: float = 30.0) -> ServeProcess:
        """Start and wait until every listener is up (the runner's "ready" line)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command("serve", *self.daemons), stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"mailplugins serve exited {self.process.returncode}:\n{self.output()[offset:]}"
                )
            return " ready" in self.output()[offset:]

        wait_until(ready, timeout=timeout, what="mailplugins serve to be ready")
        return self

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode
