# -*- test-case-name: tests.unit.test_devrig -*-
"""Private stock Postfix and Dovecot instances on loopback ports, in one scratch directory.

Used by the end-to-end tests and by the local demo stack (``scripts/run``): each instance has
its own config, queue, state and log files under its root, listens only on 127.0.0.1, and is
stopped with its own stop command, so it never touches the system's mail setup and can run
beside other instances. Runs as root, without Postfix's chroot; README's Development section
describes the rig.

Each instance runs one release's packages (``release=``, see :mod:`devrig.release`): the host's
or, through ``chroot``, those of a Debian root, with the config each version accepts.
"""

from __future__ import annotations

import contextlib
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

from devrig.release import Release, host, shown

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
            f"{shown(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


class Postfix:
    """A private Postfix instance (3.7 on Debian 12, 3.10 on Debian 13).

    ``main`` adds or overrides main.cf settings; ``services`` are extra master.cf lines (e.g. a
    submission smtpd with ``-o`` overrides); ``smtp_port`` is the port 25 stand-in; ``binds``
    are directories outside /tmp that a release root must see.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        smtp_port: int | None = None,
        main: Mapping[str, str] | None = None,
        services: Iterable[str] = (),
        hostname: str = "mx.test.example",
        release: Release | None = None,
        binds: Iterable[str | Path] = (),
    ) -> None:
        self.release = release or host()
        self.release.check()
        self.binds = list(binds)
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
            # No DNS for the SMTP and LMTP clients (disable_dns_lookups is deprecated in 3.9+).
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
        }
        self.main.update(main or {})
        self.services = list(services)

    @property
    def private_dir(self) -> Path:
        return self.queue_dir / "private"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.command("postfix", "-c", str(self.etc), *args, check=check)

    def command(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one of this release's Postfix commands (``postconf``, ``postqueue``, ...)."""
        return run(self.release.command(argv, self.binds), check=check)

    def postconf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``postconf -c ETC ARGS`` of this instance's release."""
        return self.command("postconf", "-c", str(self.etc), *args, check=check)

    def check(self) -> subprocess.CompletedProcess[str]:
        """``postfix check`` on this instance's config (never raises; see returncode)."""
        return self._postfix("check", check=False)

    def write(self) -> None:
        for directory in (self.etc, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        lines = [f"{key} = {value}" for key, value in self.main.items()]
        (self.etc / "main.cf").write_text("\n".join(lines) + "\n")
        shutil.copy(self.release.path("/etc/postfix/master.cf"), self.etc / "master.cf")
        self.postconf("-F", "-e", "*/*/chroot = n")
        self.postconf("-M", "-e", f"smtp/inet=127.0.0.1:{self.smtp_port} inet n - n - - smtpd")
        master = (self.etc / "master.cf").read_text()
        (self.etc / "master.cf").write_text(master + "".join(s.rstrip() + "\n" for s in self.services))

    def start(self) -> Postfix:
        self.write()
        result = self.check()
        if result.returncode != 0:
            raise RuntimeError(f"postfix check failed: {result.stderr}{self.log_text()}")
        self._postfix("start")
        wait_until(lambda: port_open(self.smtp_port), what=f"postfix on port {self.smtp_port}")
        return self

    def set_main(self, **settings: str) -> None:
        for key, value in settings.items():
            self.main[key] = value
            self.postconf("-e", f"{key}={value}")

    def reload(self) -> None:
        self._postfix("reload")
        time.sleep(0.5)

    def flush(self) -> None:
        self._postfix("flush", check=False)

    #: Seconds ``postfix stop`` gets before the master is killed.
    stop_timeout = 15.0

    def stop(self) -> None:
        if (self.etc / "main.cf").exists():
            self._postfix("stop", check=False)
            _wait_for_exit(self.queue_dir / "pid" / "master.pid", "postfix master",
                           self.stop_timeout)

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


def _wait_for_exit(pid_file: Path, what: str, timeout: float) -> None:
    """Wait for the master named in ``pid_file`` to exit after its own stop command, and kill
    it if it has not within ``timeout`` rather than leave it and its ports behind (once,
    scripts/run's Ctrl-C left Dovecot's master running after ``doveadm stop``, its log
    showing no shutdown)."""
    def gone() -> bool:
        return not pid_file.exists() or not _pid_alive(pid_file)

    try:
        wait_until(gone, timeout=timeout, what=f"{what} to exit")
    except TimeoutError:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        wait_until(gone, timeout=5, what=f"{what} to exit after SIGKILL")


class Dovecot:
    """A private Dovecot instance (2.3 on Debian 12, 2.4 on Debian 13).

    The rig writes the settings every instance needs (its directories, listeners, cleartext
    logins) in the form its release accepts; ``conf`` (passdb/userdb/mail settings and friends)
    must already be in that form: ``dovecot24`` tells a test which to write. ``binds`` are
    directories outside /tmp that a release root must see.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        conf: str,
        imap_port: int | None = None,
        pop3_port: int | None = None,
        lmtp_port: int | None = None,
        protocols: Sequence[str] = ("imap", "pop3"),
        release: Release | None = None,
        binds: Iterable[str | Path] = (),
    ) -> None:
        self.release = release or host()
        self.release.check()
        self.binds = list(binds)
        self.root = Path(root) / "dovecot"
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.base_dir = self.root / "run"
        self.imap_port = imap_port or free_port()
        self.pop3_port = pop3_port or free_port()
        self.lmtp_port = lmtp_port
        self.protocols = list(protocols) + (["lmtp"] if lmtp_port and "lmtp" not in protocols else [])
        self.conf = conf

    @property
    def dovecot24(self) -> bool:
        """Whether this instance's release has Dovecot 2.4 (its config language differs)."""
        return self.release.dovecot24

    def write(self) -> None:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lmtp = ""
        if self.lmtp_port:
            # 2.4 has no per-listener address; the global listen = 127.0.0.1 holds for both.
            address = "" if self.dovecot24 else "    address = 127.0.0.1\n"
            lmtp = (f"service lmtp {{\n  inet_listener lmtp {{\n{address}"
                    f"    port = {self.lmtp_port}\n  }}\n}}\n")
        conf = self.conf
        if self.dovecot24:
            # 2.4 refuses a config whose first setting is not its version (and a second, different
            # one): the conf's own versions (the generator's) go first, else Debian 13's.
            versions = []
            for name in ("dovecot_config_version", "dovecot_storage_version"):
                found = re.search(rf"^[ \t]*{name}[ \t]*=[ \t]*(\S+)[ \t]*\n?", conf, re.M)
                versions.append(f"{name} = {found.group(1) if found else '2.4.0'}\n")
                if found:
                    conf = conf[:found.start()] + conf[found.end():]
            head = ("".join(versions), "auth_allow_cleartext = yes\n")
        else:
            head = ("", "disable_plaintext_auth = no\n")
        text = f"""{head[0]}instance_name = mp-{uuid.uuid4().hex[:8]}
base_dir = {self.base_dir}
state_dir = {self.root}/state
log_path = {self.log_path}
protocols = {' '.join(self.protocols)}
listen = 127.0.0.1
ssl = no
{head[1]}auth_mechanisms = plain login
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
{lmtp}{conf}
"""
        self.config_path.write_text(text)

    def start(self) -> Dovecot:
        self.write()
        self.doveconf("-n", check=True)
        # Dovecot daemonises with our stdout/stderr: give it a file, never a pipe we would wait on.
        with open(self.root / "dovecot.stderr", "ab") as out:
            result = subprocess.run(
                self.command("dovecot", "-c", str(self.config_path)), stdout=out, stderr=out,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"dovecot exited {result.returncode}: "
                               f"{(self.root / 'dovecot.stderr').read_text()}{self.log_text()}")
        if "imap" in self.protocols:
            wait_until(lambda: port_open(self.imap_port), what=f"dovecot imap on {self.imap_port}")
        if self.lmtp_port:
            wait_until(lambda: port_open(self.lmtp_port or 0), what="dovecot lmtp")
        return self

    def command(self, *argv: str) -> list[str]:
        """``argv`` as it runs for this instance's release."""
        return self.release.command(argv, self.binds)

    def doveadm(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(self.command("doveadm", "-c", str(self.config_path), *args), check=check)

    def doveconf(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(self.command("doveconf", "-c", str(self.config_path), *args), check=check)

    #: Seconds ``doveadm stop`` gets before the master is killed.
    stop_timeout = 15.0

    def stop(self) -> None:
        if self.config_path.exists():
            self.doveadm("stop")
            _wait_for_exit(self.base_dir / "master.pid", "dovecot", self.stop_timeout)

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

    def pids(self) -> list[int]:
        """The serving processes: ``mailplugins serve`` and, with ``workers`` above 1, its
        workers (the processes that hold the connections)."""
        if self.process is None:
            return []
        pid = self.process.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [pid, *(int(child) for child in f.read().split())]
        except OSError:
            return [pid]

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


# -- Dovecot config fragments in the form each release accepts ---------------------------------

# Dovecot 2.3's short variables the rig's configs use, and 2.4's spelling of each.
_DOVECOT24_VARIABLES = {"%u": "%{user}", "%n": "%{user | username}", "%d": "%{user | domain}"}


def dovecot_variables(release: Release, text: str) -> str:
    """``text`` with 2.3's ``%u``/``%n``/``%d`` written as ``release``'s Dovecot wants them
    (2.4 takes the old ones literally)."""
    if not release.dovecot24:
        return text
    return re.sub("%[und]", lambda m: _DOVECOT24_VARIABLES[m.group(0)], text)


def dovecot_mail_location(release: Release, location: str) -> str:
    """``mail_location = maildir:PATH`` (2.3) or ``mail_driver``/``mail_path`` (2.4)."""
    if not release.dovecot24:
        return f"mail_location = {location}\n"
    driver, _, path = location.partition(":")
    return f"mail_driver = {driver}\nmail_path = {dovecot_variables(release, path)}\n"


def dovecot_static_auth(release: Release, password: str, **userdb: str) -> str:
    """A static passdb (one password for every user) and a static userdb with ``userdb``'s
    fields (``uid``, ``gid``, ``home`` with 2.3 variables)."""
    if not release.dovecot24:
        fields = " ".join(f"{key}={value}" for key, value in userdb.items())
        return (f"passdb {{\n  driver = static\n  args = password={password}\n}}\n"
                f"userdb {{\n  driver = static\n  args = {fields}\n}}\n")
    fields = "".join(f"    {key} = {dovecot_variables(release, value)}\n"
                     for key, value in userdb.items())
    return (f"passdb static {{\n  password = {password}\n}}\n"
            f"userdb static {{\n  fields {{\n{fields}  }}\n}}\n")


def dovecot_auth_listener(path: str | Path, mode: str = "0660", user: str = "postfix",
                          group: str = "postfix") -> str:
    """``service auth`` with an extra auth-client socket at ``path`` (Postfix's SASL socket);
    the same form in 2.3 and 2.4."""
    return (f"service auth {{\n  unix_listener {path} {{\n    mode = {mode}\n    user = {user}\n"
            f"    group = {group}\n  }}\n}}\n")


def dovecot_passwd_file(release: Release, path: str | Path) -> str:
    """A passwd-file passdb and userdb reading ``path``."""
    if not release.dovecot24:
        return "".join(f"{kind} {{\n  driver = passwd-file\n  args = {path}\n}}\n"
                       for kind in ("passdb", "userdb"))
    return "".join(f"{kind} passwd-file {{\n  passwd_file_path = {path}\n}}\n"
                   for kind in ("passdb", "userdb"))
