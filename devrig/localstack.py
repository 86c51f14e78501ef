# -*- test-case-name: tests.e2e.test_seed_flow -*-
"""The whole mail system on one machine: the daemons wired to private stock Postfix and Dovecot.

``scripts/run`` (``python -m devrig.localstack DIR``) builds it from nothing in ``DIR``:
a SQLite database with a demo domain and two users, a self-signed certificate, the daemons, and
Postfix (SMTP and submission with STARTTLS) and Dovecot (IMAP and POP3 with STARTTLS) configured
by the same generators operators use (``mailplugins postfix-config`` / ``dovecot-config``).
Everything listens on 127.0.0.1 only. Running it again reuses the database and certificate;
instances left over from a killed run are stopped first. The end-to-end seed-flow test runs
this same stack on free ports.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import authd
from devrig.instances import Dovecot, Postfix, ServeProcess, free_port
from devrig.release import NAMES, Release, host, release
from mailplugins.config import Config, load_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.hashing import hash_password
from mailplugins.store import Store
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_conf_text, dovecot_config
from mailplugins.wiring.postfix import PostfixOptions, postfix_config

DEMO_DOMAIN = "example.test"
#: authd's Lua script in the checkout (the root sees the checkout at the same path).
LUA_SCRIPT = Path(authd.__file__).resolve().parent / "lua" / "mailplugins-auth.lua"
DEMO_USERS = ("bob", "alice")
#: The demo's mail files belong to this user, as with Dovecot's mail_uid (never root).
MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"


@dataclass(frozen=True)
class Ports:
    smtp: int = 2525
    submission: int = 2587
    imap: int = 2143
    pop3: int = 2110
    verify: int = 2643
    policyd_metrics: int = 9641
    authd_metrics: int = 9642
    deliver_metrics: int = 9644

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(8)))


class DaemonsApart(ServeProcess):
    """policyd, authd and deliver as three ``mailplugins serve`` processes on one config (as
    the systemd units run them), so a test can kill and restart one daemon alone and
    ``bench/soak`` can sample each one's memory and descriptors.

    Stands in for LocalStack's single ``mailplugins serve`` (same start/stop/output); each
    daemon logs to ``<name>.log`` in ``log_dir``.
    """

    NAMES = ("policyd", "authd", "deliver")

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        super().__init__(config_path, log_path=log_dir / "daemons.log")
        self.each = {name: ServeProcess(config_path, [name], log_dir / f"{name}.log")
                     for name in self.NAMES}

    def start(self, timeout: float = 30.0) -> DaemonsApart:
        for serve in self.each.values():
            serve.start(timeout)
        return self

    def output(self) -> str:
        return "".join(f"--- {name}\n{serve.output()}" for name, serve in self.each.items())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for serve in self.each.values():
            serve.kill(sig)

    def stop(self) -> int | None:
        statuses = [serve.stop() for serve in reversed(self.each.values())]
        return next((status for status in statuses if status), statuses[-1])


def demo_password() -> str:
    """16 letters and digits: token_urlsafe can start with '-', which the printed swaks and
    IMAP LOGIN lines would take for an option (seen: swaks "Unknown option")."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(16))


class LocalStack:
    def __init__(
        self,
        root: str | Path,
        ports: Ports | None = None,
        database_url: str | None = None,
        policyd: dict[str, Any] | None = None,
        release: Release | None = None,
        milterd: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        #: Whose stock Postfix and Dovecot run: the host's by default (see devrig.release).
        self.release = release or host()
        #: SQLite in ``root`` by default; several stacks ("MX hosts") may share a server database.
        self.database_url = database_url or f"sqlite:///{self.root}/mail.db"
        #: Extra policyd settings (rate limits, greylisting, ...) for a new config.
        self.policyd_extra = dict(policyd or {})
        #: Run milterd too: the demo domain's outgoing mail is DKIM-signed (scripts/run).
        self.milterd = milterd
        self.ports = ports or Ports()
        self.config_path = self.root / "mailplugins.yaml"
        self.tls_dir = self.root / "tls"
        self.passwords_path = self.root / "demo-passwords"
        self.postfix = Postfix(self.root, smtp_port=self.ports.smtp, hostname=f"mail.{DEMO_DOMAIN}",
                               release=self.release)
        self.daemons = ServeProcess(self.config_path, log_path=self.root / "daemons.log")
        self.dovecot: Dovecot | None = None
        self.passwords: dict[str, str] = {}
        self.domains: tuple[str, ...] = ()

    # -- preparation -----------------------------------------------------------------------

    def config_data(self) -> dict[str, Any]:
        private = self.postfix.private_dir
        local = "interface=127.0.0.1"
        return {
            "database": {"url": self.database_url},
            "mail": {
                "location": f"{self.root}/mail/%d/%n/Maildir",
                "uid": MAIL_USER,
                "gid": MAIL_GROUP,
                "recipient_delimiter": "+",
            },
            "policyd": {
                "listen": f"unix:{private}/mailplugins-policy:mode=666",
                "metrics": f"tcp:{self.ports.policyd_metrics}:{local}",
                # Every demo client is on loopback: an empty mynetworks shows relay control at
                # work (only authenticated clients relay), as on a real server's port 25.
                "mynetworks": [],
                **self.policyd_extra,
            },
            "authd": {
                "sasl_listen": f"unix:{private}/mailplugins-auth:mode=666",
                "dict_listen": f"unix:{self.root}/dict.sock:mode=660",
                "http_listen": f"tcp:{self.ports.verify}:{local}",
                "metrics": f"tcp:{self.ports.authd_metrics}:{local}",
            },
            "deliver": {
                "listen": f"unix:{private}/mailplugins-deliver:mode=666",
                "metrics": f"tcp:{self.ports.deliver_metrics}:{local}",
            },
        }

    def milterd_section(self) -> dict[str, Any]:
        return {
            "listen": f"unix:{self.postfix.private_dir}/mailplugins-milter:mode=666",
            "authserv_id": f"mail.{DEMO_DOMAIN}",
            # Every demo client is on loopback: only authenticated mail is signed.
            "mynetworks": [],
        }

    def prepare(self) -> Config:
        """Config, schema, demo users and certificate; idempotent."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.postfix.queue_dir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            data = self.config_data()
            if self.milterd:
                data["milterd"] = self.milterd_section()
            self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        elif self.milterd:
            data = yaml.safe_load(self.config_path.read_text())
            if "milterd" not in data:  # a run/ made before milterd existed: add it
                data["milterd"] = self.milterd_section()
                self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_config(str(self.config_path))
        # The mail root belongs to the mail user, as on a real server: Dovecot may then create
        # a Maildir for a user who has not received mail yet.
        mail_root = self.root / "mail"
        mail_root.mkdir(exist_ok=True)
        os.chown(mail_root, config.mail.uid, config.mail.gid)
        mail_root.chmod(0o750)
        engine = make_engine(config.database)
        try:
            schema.upgrade(engine)
            store = Store(engine)
            self._demo_users(store, config)
            self.domains = tuple(d.name for d in store.list_domains())
        finally:
            engine.dispose()
        self._certificate()
        return config

    def _demo_users(self, store: Store, config: Config) -> None:
        if self.passwords_path.exists():
            for line in self.passwords_path.read_text().splitlines():
                address, _, password = line.partition(" ")
                self.passwords[address] = password
        if not store.is_local_domain(DEMO_DOMAIN):
            store.add_domain(DEMO_DOMAIN)
        for user in DEMO_USERS:
            address = f"{user}@{DEMO_DOMAIN}"
            if store.get_mailbox(address) is None:
                password = demo_password()
                store.add_mailbox(address, hash_password(password, config.passwords))
                self.passwords[address] = password
        self.passwords_path.write_text("".join(f"{a} {p}\n" for a, p in self.passwords.items()))
        self.passwords_path.chmod(0o600)

    @property
    def tls_cert(self) -> Path:
        return self.tls_dir / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return self.tls_dir / "key.pem"

    def _certificate(self) -> None:
        if self.tls_cert.exists() and self.tls_key.exists():
            return
        self.tls_dir.mkdir(exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-subj", f"/CN=mail.{DEMO_DOMAIN}",
             "-addext", f"subjectAltName=DNS:mail.{DEMO_DOMAIN}",
             "-keyout", str(self.tls_key), "-out", str(self.tls_cert)],
            check=True, capture_output=True,
        )
        self.tls_key.chmod(0o600)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        config = self.prepare()
        self.stop_leftovers()
        postfix = postfix_config(config, PostfixOptions(
            queue_directory=str(self.postfix.queue_dir),
            config_directory=str(self.postfix.etc),
            submission=f"127.0.0.1:{self.ports.submission}",
            chroot=False,
            tls_cert=str(self.tls_cert),
            tls_key=str(self.tls_key),
            domain_names=self.domains,
            version=".".join(map(str, self.release.postfix_version)),
        ))
        for generated in postfix.files:
            # Postfix's proxymap reads these as the postfix user (they may hold a DB password).
            _write_generated(generated.path, generated.text, generated.mode, group="postfix")
        self.postfix.main.update(postfix.main_dict())
        self.postfix.main["mynetworks"] = ""
        self.postfix.main["mydomain"] = DEMO_DOMAIN
        self.postfix.services = postfix.master_lines()
        dovecot_dir = self.root / "dovecot"
        # The generators write for this release's versions, as dovecot-config/postfix-config
        # would on that host; Dovecot 2.4 has no dict passdb, so it asks authd through Lua.
        dovecot_version = ".".join(map(str, self.release.dovecot_version))
        lua = dovecot_version != "2.3"
        dovecot = dovecot_config(config, DovecotOptions(
            config_directory=str(dovecot_dir),
            version=dovecot_version,
            lua=lua,
            lua_script=str(LUA_SCRIPT) if lua else "",
            lua_script_text=LUA_SCRIPT.read_text() if lua else None,
            tls_cert=str(self.tls_cert),
            tls_key=str(self.tls_key),
            postfix_queue_directory=str(self.postfix.queue_dir),
        ))
        for generated in dovecot.files:
            _write_generated(generated.path, generated.text, generated.mode)
        self.dovecot = Dovecot(self.root, conf=dovecot_conf_text(dovecot),
                               imap_port=self.ports.imap, pop3_port=self.ports.pop3,
                               release=self.release)
        if self.milterd:
            self.signing_key()
        # Postfix first: it creates the private/ directory the daemons' sockets live in.
        self.postfix.start()
        self.daemons.start()
        # What mailplugins-authd-dict.socket does (root:dovecot 0660): authd made the socket with
        # its own group, which Dovecot's mail processes (last_login) may not open.
        shutil.chown(self.root / "dict.sock", group="dovecot")
        self.dovecot.start()

    def signing_key(self) -> None:
        """An active DKIM key for the demo domain, made with the documented commands (the
        demo's DNS is not real: ``--no-dns-check``); kept across runs."""
        database = self.root / "mail.db"
        if self.database_url == f"sqlite:///{database}" and database.exists():
            database.chmod(0o600)  # it will hold a private key (dkim keygen refuses otherwise)
        listed = self.daemons.cli("dkim", "list", "--json")
        if listed.returncode != 0:
            raise RuntimeError(f"mailplugins dkim list: {listed.stderr.strip()}")
        if '"active"' in listed.stdout:
            return
        made = self.daemons.cli("dkim", "keygen", DEMO_DOMAIN, "--selector", "demo")
        if made.returncode != 0 and "already exists" not in made.stderr:
            raise RuntimeError(f"mailplugins dkim keygen: {made.stderr.strip()}")
        active = self.daemons.cli("dkim", "activate", DEMO_DOMAIN, "demo", "--no-dns-check")
        if active.returncode != 0:
            raise RuntimeError(f"mailplugins dkim activate: {active.stderr.strip()}")

    def stop_leftovers(self) -> None:
        """Stop instances a killed earlier run left behind (found by their pid files)."""
        postfix_pid = self.postfix.queue_dir / "pid" / "master.pid"
        if postfix_pid.exists() and (self.postfix.etc / "main.cf").exists():
            self.postfix.stop()
        leftover = Dovecot(self.root, conf="", release=self.release)
        if (leftover.base_dir / "master.pid").exists() and leftover.config_path.exists():
            leftover.stop()

    def stop(self) -> None:
        """Stop every part, each even when one before it would not stop; raises
        RuntimeError naming what would not."""
        failed: list[str] = []
        for part in (self.dovecot, self.postfix, self.daemons):
            if part is None:
                continue
            try:
                part.stop()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failed.append(str(exc))
        if failed:
            raise RuntimeError("; ".join(failed))

    def banner(self) -> str:
        bob, alice = (f"{user}@{DEMO_DOMAIN}" for user in DEMO_USERS)
        p = self.ports
        return f"""
mailplugins mail system running in {self.root}
  SMTP (port 25 stand-in)  127.0.0.1:{p.smtp}
  submission (STARTTLS)    127.0.0.1:{p.submission}   users: {bob}, {alice}
  IMAP / POP3 (STARTTLS)   127.0.0.1:{p.imap} / 127.0.0.1:{p.pop3}
  passwords                {self.passwords_path}
  logs                     {self.root}/daemons.log, {self.postfix.maillog}, {self.root}/dovecot/dovecot.log
  DKIM                     {"outgoing mail of " + DEMO_DOMAIN + " is signed (mailplugins dkim list)"
                             if self.milterd else "off (--no-milterd)"}

Send as bob to alice (self-signed certificate):
  swaks --server 127.0.0.1:{p.submission} --tls --auth PLAIN \\
        --auth-user {bob} --auth-password '{self.passwords.get(bob, "see passwords")}' \\
        --from {bob} --to {alice}
Read it as alice over IMAP:
  openssl s_client -quiet -starttls imap -connect 127.0.0.1:{p.imap}
  a LOGIN {alice} {self.passwords.get(alice, "PASSWORD")}
  b SELECT INBOX
  c FETCH 1 BODY[]
Admin: MAILPLUGINS_CONFIG={self.config_path} mailplugins user list
Ctrl-C stops everything.
"""


def _write_generated(path: str, text: str, mode: int, group: str | None = None) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)
    if group is not None:
        shutil.chown(target, group=group)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devrig.localstack", description=__doc__)
    parser.add_argument("root", type=Path, help="directory for all state (created if absent)")
    parser.add_argument("--database-url", help="a shared database instead of SQLite in ROOT "
                        "(used when ROOT has no config yet)")
    parser.add_argument("--release", choices=NAMES, help="run this Debian release's Postfix and "
                        "Dovecot (default: the host's; the other one needs the root scripts/test "
                        "builds)")
    parser.add_argument("--no-milterd", action="store_true",
                        help="do not run milterd (no DKIM signing of the demo domain's mail)")
    args = parser.parse_args(argv)
    stack = LocalStack(args.root, database_url=args.database_url,
                       release=release(args.release) if args.release else None,
                       milterd=not args.no_milterd)
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        while not stopping.wait(1):
            process = stack.daemons.process
            if process is not None and process.poll() is not None:
                print(f"mailplugins serve exited {process.returncode}; stopping", file=sys.stderr)
                return 1
        return 0
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"mailplugins: the local stack did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        try:
            stack.stop()
        except RuntimeError as exc:
            print(f"mailplugins: the local stack did not stop cleanly: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
