# -*- test-case-name: tests.unit.test_cli -*-
"""The ``mailplugins`` command: parses arguments, calls the core, prints.

Exit status: 0 success, 1 the operation failed (e.g. the user exists), 2 usage or configuration
error. Every error is one line on stderr; passwords are read from stdin or a prompt, never argv.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import grp
import importlib.util
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from mailplugins import __version__
from mailplugins.config import Config, ConfigError, config_path, load_config
from mailplugins.config.fields import parse_size
from mailplugins.generators import (
    DEBIAN_CERT,
    DEBIAN_KEY,
    DovecotOptions,
    GeneratedFile,
    PostfixOptions,
    PostfixSnippet,
    dovecot_conf_text,
    dovecot_config,
    postfix_config,
    render_dovecot,
    render_postfix,
)
from mailplugins.hashing import hash_password
from mailplugins.passwd_import import never_logs_in, parse_passwd_line
from mailplugins.releases import detect_dovecot, detect_postfix, dovecot_release, postfix_release
from mailplugins.store import SERVICES, AlreadyExists, Store, StoreError

if TYPE_CHECKING:
    from mailplugins.doctor import Finding

COMMANDS_GROUP = "mailplugins.commands"
EXIT_FAILED = 1
EXIT_USAGE = 2
#: App passwords: 4 groups of 4 lowercase letters, easy to type on a phone, ~75 bits.
APP_PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyz"  # noqa: S105 - an alphabet, not a secret


class CommandError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _quota(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad quota {text!r}: {exc}") from None


def _services(text: str) -> list[str]:
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in SERVICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown service {bad[0]!r} (use {','.join(SERVICES)})")
    return items


def read_password(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.password_stdin:
        line = stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    elif stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("passwords do not match")
    else:
        raise CommandError("no password given: use --password-stdin or run on a terminal", EXIT_USAGE)
    if not password:
        raise CommandError("empty password refused")
    if "\0" in password or "\n" in password:
        raise CommandError("password contains a NUL or newline")
    return password


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds") + "Z"
    if isinstance(value, frozenset):
        return sorted(value)
    raise TypeError(type(value).__name__)


def print_json(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    out.write(json.dumps(list(rows), default=_json_default, indent=2, ensure_ascii=False) + "\n")


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


class App:
    """State for one invocation; each ``cmd_*`` method implements one command."""

    def __init__(
        self, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None
    ) -> None:
        self.args = args
        self.stdin = stdin
        self.out = stdout
        self.err = stderr or sys.stderr
        self._config: Config | None = None
        self._store: Store | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(config_path(self.args.config))
        return self._config

    @property
    def store(self) -> Store:
        if self._store is None:
            from mailplugins.db.engine import make_engine

            self._store = Store(make_engine(self.config.database))
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.engine.dispose()

    def hash(self, password: str) -> str:
        return hash_password(password, self.config.passwords)

    def dns_servers(self) -> tuple[tuple[str, ...] | tuple[tuple[str, int], ...], float]:
        """(nameservers, timeout) for the CLI's lookups: ``--nameserver`` if given, else milterd's
        ``nameservers``, else the system resolver; milterd's ``dns_timeout``, else 5 seconds."""
        given: tuple[str, ...] = tuple(getattr(self.args, "nameserver", None) or ())
        milterd = self.config.milterd
        timeout = milterd.dns_timeout if milterd is not None else 5.0
        if given:
            return given, timeout
        return (milterd.nameservers if milterd is not None else ()), timeout

    # -- commands ----------------------------------------------------------------------------

    def cmd_check_config(self) -> None:
        config = self.config
        daemons = ", ".join(config.configured_daemons()) or "no daemons"
        self.out.write(f"{config.source}: OK ({daemons})\n")

    def cmd_db_upgrade(self) -> None:
        from mailplugins.db import schema

        before = schema.current_revision(self.store.engine)
        schema.upgrade(self.store.engine)
        after = schema.current_revision(self.store.engine)
        if before == after:
            self.out.write(f"database schema is up to date (revision {after})\n")
        else:
            self.out.write(f"database schema upgraded from {before or 'empty'} to {after}\n")

    def cmd_domain_add(self) -> None:
        self.out.write(f"added domain {self.store.add_domain(self.args.domain)}\n")

    def cmd_domain_remove(self) -> None:
        self.store.remove_domain(self.args.domain, force=self.args.force)
        self.out.write(f"removed domain {self.args.domain}\n")

    def cmd_domain_list(self) -> None:
        domains = self.store.list_domains()
        if self.args.json:
            print_json([asdict(d) for d in domains], self.out)
        else:
            rows = [(d.name, f"{d.mailboxes} mailboxes", f"{d.aliases} aliases") for d in domains]
            print_table(rows, self.out)

    def cmd_user_add(self) -> None:
        password = read_password(self.args, self.stdin)
        record = self.store.add_mailbox(
            self.args.address,
            self.hash(password),
            quota_bytes=self.args.quota or 0,
            services=self.args.services or SERVICES,
        )
        self.out.write(f"added user {record.address}\n")

    def cmd_user_passwd(self) -> None:
        if self.store.get_mailbox(self.args.address) is None:
            raise StoreError(f"mailbox {self.args.address} does not exist")
        password = read_password(self.args, self.stdin)
        self.store.set_password(self.args.address, self.hash(password))
        self.out.write(f"password changed for {self.args.address}\n")

    def cmd_user_disable(self) -> None:
        self.store.set_enabled(self.args.address, False)
        self.out.write(f"disabled {self.args.address}\n")

    def cmd_user_enable(self) -> None:
        self.store.set_enabled(self.args.address, True)
        self.out.write(f"enabled {self.args.address}\n")

    def cmd_user_remove(self) -> None:
        self.store.remove_mailbox(self.args.address)
        self.out.write(f"removed user {self.args.address} (its Maildir is left on disk)\n")

    def cmd_user_quota(self) -> None:
        self.store.set_quota(self.args.address, self.args.bytes)
        self.out.write(f"quota of {self.args.address} set to {self.args.bytes} bytes\n")

    def cmd_user_services(self) -> None:
        self.store.set_services(self.args.address, self.args.services)
        self.out.write(f"{self.args.address} may use: {','.join(self.args.services) or 'nothing'}\n")

    def cmd_user_master(self) -> None:
        on = self.args.state == "on"
        self.store.set_master(self.args.address, on)
        if on:
            self.out.write(f"{self.args.address} is a master user: its password opens every "
                           "mailbox (IMAP, POP3; SMTP only with authd.master_user_smtp)\n")
        else:
            self.out.write(f"{self.args.address} is no longer a master user\n")

    def cmd_user_import(self) -> int:
        """Users with their existing hashes from a Dovecot passwd-file; bad lines are listed."""
        args = self.args
        if args.file == "-":
            lines = self.stdin.readlines()
        else:
            try:
                with open(args.file, encoding="utf-8") as handle:
                    lines = handle.readlines()
            except OSError as exc:
                raise CommandError(f"cannot read {args.file}: {exc.strerror}", EXIT_USAGE) from None
        known = {d.name for d in self.store.list_domains()}
        imported = skipped = failed = locked = 0
        for number, line in enumerate(lines, 1):
            try:
                entry = parse_passwd_line(line, args.domain)
            except ValueError as exc:
                self.err.write(f"{args.file}:{number}: {exc}\n")
                failed += 1
                continue
            if entry is None:
                continue
            try:
                domain = entry.address.rpartition("@")[2].lower()
                if domain not in known and args.create_domains:
                    known.add(self.store.add_domain(domain))
                self.store.add_mailbox(entry.address, entry.password, quota_bytes=entry.quota_bytes)
                imported += 1
            except AlreadyExists:
                if args.update:
                    self.store.set_password(entry.address, entry.password)
                    imported += 1
                else:
                    skipped += 1
                    continue
            except StoreError as exc:
                self.err.write(f"{args.file}:{number}: {exc}\n")
                failed += 1
                continue
            why = never_logs_in(entry.password)
            if why:
                locked += 1
                self.err.write(f"{args.file}:{number}: {entry.address} can never log in: {why} "
                               "(set one with: mailplugins user passwd)\n")
        summary = f"imported {imported}, skipped {skipped} existing, {failed} failed"
        if locked:
            summary += f"; {locked} imported can never log in"
        self.out.write(summary + "\n")
        return EXIT_FAILED if failed else 0

    def cmd_user_list(self) -> None:
        users = self.store.list_mailboxes(self.args.domain)
        if self.args.json:
            print_json(
                [
                    {
                        "address": u.address,
                        "enabled": u.enabled,
                        "quota_bytes": u.quota_bytes,
                        "services": sorted(u.services),
                        "master": u.master,
                        "scheme": u.password.split("}", 1)[0].lstrip("{"),
                        "created_at": u.created_at,
                        "last_login_at": u.last_login_at,
                    }
                    for u in users
                ],
                self.out,
            )
            return
        print_table(
            [
                (
                    u.address,
                    "enabled" if u.enabled else "disabled",
                    f"quota={u.quota_bytes or 'none'}",
                    ",".join(s for s in SERVICES if s in u.services) or "-",
                    "master" if u.master else "",
                )
                for u in users
            ],
            self.out,
        )

    def cmd_alias_add(self) -> None:
        record = self.store.add_alias(self.args.address, self.args.targets)
        self.out.write(f"{record.address} -> {', '.join(record.targets)}\n")

    def cmd_alias_remove(self) -> None:
        self.store.remove_alias(self.args.address, self.args.targets)
        self.out.write(f"removed alias {self.args.address}\n")

    def cmd_alias_list(self) -> None:
        aliases = self.store.list_aliases()
        if self.args.json:
            print_json([{"address": a.address, "targets": list(a.targets)} for a in aliases], self.out)
        else:
            print_table([(a.address, "->", ", ".join(a.targets)) for a in aliases], self.out)

    def cmd_sender_grant(self) -> None:
        grant = self.store.grant_sender(self.args.login, self.args.address)
        self.out.write(f"{grant.login} may send as {grant.address}\n")

    def cmd_sender_revoke(self) -> None:
        self.store.revoke_sender(self.args.login, self.args.address)
        self.out.write(f"{self.args.login} may no longer send as {self.args.address}\n")

    def cmd_sender_list(self) -> None:
        grants = self.store.list_grants(self.args.login)
        if self.args.json:
            print_json([asdict(g) for g in grants], self.out)
        else:
            print_table([(g.login, "may send as", g.address) for g in grants], self.out)

    def cmd_app_password_add(self) -> None:
        password = "-".join(
            "".join(secrets.choice(APP_PASSWORD_ALPHABET) for _ in range(4)) for _ in range(4)
        )
        self.store.add_app_password(
            self.args.login, self.args.name, self.hash(password), self.args.services or ()
        )
        self.out.write(f"app password {self.args.name!r} for {self.args.login} (shown once):\n")
        self.out.write(password + "\n")

    def cmd_app_password_list(self) -> None:
        rows = self.store.list_app_passwords(self.args.login)
        if self.args.json:
            print_json(
                [
                    {
                        "name": r.name,
                        "services": sorted(r.services),
                        "created_at": r.created_at,
                        "last_used_at": r.last_used_at,
                    }
                    for r in rows
                ],
                self.out,
            )
        else:
            print_table(
                [
                    (r.name, ",".join(sorted(r.services)) or "all services",
                     f"last used {r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "never used")
                    for r in rows
                ],
                self.out,
            )

    def cmd_app_password_revoke(self) -> None:
        self.store.revoke_app_password(self.args.login, self.args.name)
        self.out.write(f"revoked app password {self.args.name!r} of {self.args.login}\n")

    # -- wiring stock Postfix and Dovecot ----------------------------------------------------

    def _postfix_options(self) -> PostfixOptions:
        a = self.args
        mode = a.domains
        if mode == "auto":
            mode = "list" if self.config.database.is_sqlite else "sql"
        names: tuple[str, ...] = ()
        if mode == "list":
            names = tuple(d.name for d in self.store.list_domains())
        return PostfixOptions(
            queue_directory=a.queue_directory, config_directory=a.postfix_directory,
            submission=a.submission, chroot=not a.no_chroot, tls_cert=a.tls_cert,
            tls_key=a.tls_key, domains=mode, domain_names=names,
            version=_release(a.postfix_version, postfix_release, detect_postfix),
        )

    def _dovecot_options(self) -> DovecotOptions:
        a = self.args
        script = a.lua_script or _packaged_lua_script()
        text = None
        if script:
            try:
                with open(script, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError:
                text = None
        return DovecotOptions(
            config_directory=a.dovecot_directory, lua=a.lua, lua_script=script, lua_script_text=text,
            tls_cert=a.tls_cert, tls_key=a.tls_key, postfix_queue_directory=a.queue_directory,
            version=_release(a.dovecot_version, dovecot_release, detect_dovecot),
        )

    def _write_files(self, files: Sequence[GeneratedFile]) -> None:
        for generated in files:
            _write_atomically(generated.path, generated.text, generated.mode, generated.group)
            self.out.write(f"wrote {generated.path}\n")

    def cmd_postfix_config(self) -> None:
        try:
            snippet = postfix_config(self.config, self._postfix_options())
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        if self.args.write:
            self._write_files(snippet.files)
            return
        self.out.write(render_postfix(snippet))

    def cmd_dovecot_config(self) -> None:
        try:
            snippet = dovecot_config(self.config, self._dovecot_options())
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        if self.args.write:
            conf = os.path.join(self.args.dovecot_directory, "conf.d", "99-mailplugins.conf")
            self._write_files([GeneratedFile(conf, dovecot_conf_text(snippet), 0o644), *snippet.files])
            return
        self.out.write(render_dovecot(snippet))

    def cmd_doctor(self) -> int:
        from mailplugins import doctor

        findings: list[doctor.Finding] = []
        checked: list[str] = []
        try:
            if not self.args.no_postfix:
                snippet = postfix_config(self.config, self._postfix_options())
                live = doctor.run_postconf(self.args.postfix_config_dir)
                findings += doctor.check_postfix(snippet, live)
                if snippet.domains_mode == "list":
                    findings += doctor.check_domains(snippet, live, snippet_domains(snippet))
                checked.append("postfix")
            if not self.args.no_dovecot:
                dsnippet = dovecot_config(self.config, self._dovecot_options())
                from mailplugins.dict_socket import check_dict_socket

                dlive = doctor.run_doveconf(self.args.dovecot_config)
                findings += doctor.check_dovecot(dsnippet, dlive)
                findings += check_dict_socket(self.config, dlive)
                findings += doctor.check_dovecot_files(dsnippet)
                findings += doctor.check_mailbox_paths(self.config.mail.location,
                                                       self.store.iter_mailboxes())
                checked.append("dovecot")
            if self.args.probe:
                findings += doctor.probe_daemons(self.config)
                checked.append("the daemons' sockets")
            if self.args.dns:
                findings += self._dns_findings()
                checked.append("DNS")
        except (ValueError, RuntimeError) as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        for finding in findings:
            self.out.write(finding.render() + "\n")
        if findings:
            self.out.write(f"{len(findings)} problem(s) found\n")
            return EXIT_FAILED
        what = " and ".join([", ".join(checked[:-1]), checked[-1]] if len(checked) > 1 else checked)
        self.out.write(f"OK: {what or 'nothing'} wired as {self.config.source} says\n")
        return 0

    def _dns_findings(self) -> list[Finding]:
        """Every domain's records (those of the database's domains and of its DKIM keys)."""
        from mailplugins import dns
        from mailplugins.dkim_keys import DkimKeys, signing_ids
        from mailplugins.dns_records import check_domain, expected_records
        from mailplugins.doctor import Finding

        servers, timeout = self.dns_servers()
        keys = DkimKeys(self.store.engine)
        all_keys = keys.list_keys()
        signing = signing_ids(all_keys)
        domains = sorted({d.name for d in self.store.list_domains()} | {k.domain for k in all_keys})
        findings: list[Finding] = []
        for domain in domains:
            expected = expected_records(domain, self.config.dns, all_keys, sorted(signing))
            retired = [k for k in all_keys if k.domain == domain and k.state == "retired"]
            findings += [Finding("dns", problem, "") for problem in check_domain(
                domain, expected, retired,
                lambda name: dns.txt_records(name, nameservers=servers, timeout=timeout),
                lambda name: dns.mx_records(name, nameservers=servers, timeout=timeout),
            )]
        return findings

    def cmd_serve(self) -> int:
        from mailplugins.logs import start_logging
        from mailplugins.runner import StartupError, serve

        config = self.config
        start_logging(self.args.log_level)
        try:
            return serve(config_path(self.args.config), config, self.args.daemons)
        except StartupError as exc:
            raise CommandError(str(exc), exc.status) from None


def _release(given: str | None, parse: Callable[[str], str], detect: Callable[[], str]) -> str:
    """The release named on the command line, else the installed one; CommandError (2) if neither."""
    try:
        return parse(given) if given else detect()
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _packaged_lua_script() -> str:
    """authd's Lua script as installed, found without importing authd (the core imports no daemon)."""
    spec = importlib.util.find_spec("authd")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "lua", "mailplugins-auth.lua")
        if os.path.exists(path):
            return path
    return ""


def _write_atomically(path: str, text: str, mode: int, group: str = "") -> None:
    """Replace ``path`` whole; ``group`` (when it exists and we may) gets read access."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mailplugins-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if group:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def snippet_domains(snippet: PostfixSnippet) -> list[str]:
    """The domains the generator listed (it lists the database's when domains_mode is list)."""
    value = snippet.main_dict().get("virtual_mailbox_domains", "")
    return [d.strip() for d in value.split(",") if d.strip()]


def _nameserver(text: str) -> str:
    from mailplugins.dns import parse_nameserver

    try:
        parse_nameserver(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def nameserver_option(sub: argparse.ArgumentParser) -> None:
    """``--nameserver ADDR[:PORT]`` (repeatable): ask this server instead of milterd.nameservers."""
    sub.add_argument("--nameserver", action="append", type=_nameserver, metavar="ADDR[:PORT]",
                     help="DNS server to ask (repeatable; default: milterd.nameservers, else the "
                     "system resolver); e.g. the zone's own server, to skip caches")


def _wiring_options(sub: argparse.ArgumentParser, postfix: bool, dovecot: bool) -> None:
    sub.add_argument("--tls-cert", default=DEBIAN_CERT, metavar="FILE", help=f"default {DEBIAN_CERT}")
    sub.add_argument("--tls-key", default=DEBIAN_KEY, metavar="FILE", help=f"default {DEBIAN_KEY}")
    sub.add_argument("--queue-directory", default="/var/spool/postfix", metavar="DIR",
                     help="Postfix's queue_directory (default /var/spool/postfix)")
    if postfix:
        sub.add_argument("--postfix-version", metavar="X.Y",
                         help="Postfix release to write for (default: the installed one, "
                         "postconf -d mail_version)")
        sub.add_argument("--postfix-directory", default="/etc/postfix", metavar="DIR",
                         help="where companion map files go (default /etc/postfix)")
        sub.add_argument("--submission", default="submission", metavar="SERVICE",
                         help="master.cf name of the submission listener (default submission = 587)")
        sub.add_argument("--no-chroot", action="store_true", help="submission smtpd not chrooted")
        sub.add_argument("--domains", default="auto", choices=("auto", "list", "sql"),
                         help="virtual_mailbox_domains as a list from the database or a live SQL "
                         "map (default: list with SQLite, sql with PostgreSQL/MySQL)")
    if dovecot:
        sub.add_argument("--dovecot-version", metavar="2.3|2.4",
                         help="Dovecot release to write for (default: the installed one, dovecot --version)")
        sub.add_argument("--dovecot-directory", default="/etc/dovecot", metavar="DIR",
                         help="where the companion files go (default /etc/dovecot)")
        sub.add_argument("--lua", action="store_true",
                         help="Lua passdb over authd's HTTP verify endpoint instead of the dict passdb")
        sub.add_argument("--lua-script", metavar="FILE",
                         help="authd's Lua script (default: the one installed with authd)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailplugins",
        description="Policy, authentication and LMTP delivery for stock Postfix and Dovecot.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: $MAILPLUGINS_CONFIG, then "
                        "/etc/mailplugins/mailplugins.yaml)")
    parser.add_argument("--version", action="version", version=f"mailplugins {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(
        group: Any, name: str, handler: Callable[[App], Any], help_text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def nested(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)

    command(commands, "check-config", App.cmd_check_config, "validate the configuration only")

    db = nested("db", "database schema")
    command(db, "upgrade", App.cmd_db_upgrade, "create or migrate the schema (idempotent)")

    domain = nested("domain", "mail domains served here")
    command(domain, "add", App.cmd_domain_add, "add a domain").add_argument("domain")
    sub = command(domain, "remove", App.cmd_domain_remove, "remove a domain")
    sub.add_argument("domain")
    sub.add_argument("--force", action="store_true", help="also remove its mailboxes and aliases")
    command(domain, "list", App.cmd_domain_list, "list domains").add_argument("--json", action="store_true")

    user = nested("user", "mailboxes")
    sub = command(user, "add", App.cmd_user_add, "add a mailbox")
    sub.add_argument("address")
    sub.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_argument("--quota", type=_quota, metavar="BYTES", help="quota (e.g. 1073741824 or 1G)")
    sub.add_argument("--services", type=_services, metavar="LIST",
                     help="comma-separated services allowed (default: smtp,imap,pop3,lmtp)")
    sub = command(user, "passwd", App.cmd_user_passwd, "change a mailbox password")
    sub.add_argument("address")
    sub.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    for name, handler, text in (
        ("disable", App.cmd_user_disable, "refuse logins and mail for a mailbox"),
        ("enable", App.cmd_user_enable, "re-enable a mailbox"),
        ("remove", App.cmd_user_remove, "remove a mailbox (its Maildir stays on disk)"),
    ):
        command(user, name, handler, text).add_argument("address")
    sub = command(user, "quota", App.cmd_user_quota, "set a mailbox quota (0 = none)")
    sub.add_argument("address")
    sub.add_argument("bytes", type=_quota)
    sub = command(user, "services", App.cmd_user_services, "set the services a mailbox may use")
    sub.add_argument("address")
    sub.add_argument("services", type=_services, help="comma-separated: smtp,imap,pop3,lmtp")
    sub = command(user, "master", App.cmd_user_master,
                  "make a mailbox a master user (logs in as any mailbox, every use logged) or not")
    sub.add_argument("address")
    sub.add_argument("state", choices=("on", "off"))
    sub = command(user, "import", App.cmd_user_import,
                  "add users with their existing hashes from a Dovecot passwd-file")
    sub.add_argument("file", help="user:{SCHEME}hash:uid:gid::home::extra lines ('-' = stdin)")
    sub.add_argument("--domain", help="domain for entries without @")
    sub.add_argument("--create-domains", action="store_true", help="add missing domains")
    sub.add_argument("--update", action="store_true", help="replace the hash of existing users")
    sub = command(user, "list", App.cmd_user_list, "list mailboxes")
    sub.add_argument("--domain")
    sub.add_argument("--json", action="store_true")

    alias = nested("alias", "aliases and catch-alls (@domain)")
    sub = command(alias, "add", App.cmd_alias_add, "add an alias, or targets to one")
    sub.add_argument("address")
    sub.add_argument("targets", nargs="+", metavar="TARGET")
    sub = command(alias, "remove", App.cmd_alias_remove, "remove an alias, or some of its targets")
    sub.add_argument("address")
    sub.add_argument("targets", nargs="*", metavar="TARGET")
    command(alias, "list", App.cmd_alias_list, "list aliases").add_argument("--json", action="store_true")

    sender = nested("sender", "which login may send as which address")
    for name, handler, text in (
        ("grant", App.cmd_sender_grant, "let LOGIN send as ADDRESS (or @domain)"),
        ("revoke", App.cmd_sender_revoke, "take a grant back"),
    ):
        sub = command(sender, name, handler, text)
        sub.add_argument("login")
        sub.add_argument("address")
    sub = command(sender, "list", App.cmd_sender_list, "list grants")
    sub.add_argument("login", nargs="?")
    sub.add_argument("--json", action="store_true")

    app = nested("app-password", "per-device passwords")
    sub = command(app, "add", App.cmd_app_password_add, "generate an app password (printed once)")
    sub.add_argument("login")
    sub.add_argument("name")
    sub.add_argument("--services", type=_services, metavar="LIST", help="limit to these services")
    sub = command(app, "list", App.cmd_app_password_list, "list a login's app passwords")
    sub.add_argument("login")
    sub.add_argument("--json", action="store_true")
    sub = command(app, "revoke", App.cmd_app_password_revoke, "revoke an app password")
    sub.add_argument("login")
    sub.add_argument("name")

    # Commands contributed by daemon packages (e.g. policyd's ``ratelimit``): the core never
    # imports a daemon, it only asks the installed entry points.
    for entry in entry_points(group=COMMANDS_GROUP):
        entry.load()(commands)

    sub = command(commands, "serve", App.cmd_serve, "run daemons (default: every configured one)")
    sub.add_argument("daemons", nargs="*", metavar="DAEMON", help="policyd, authd, deliver")
    sub.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    sub = command(commands, "postfix-config", App.cmd_postfix_config,
                  "print the main.cf and master.cf settings wiring Postfix to the daemons")
    _wiring_options(sub, postfix=True, dovecot=False)
    sub.add_argument("--write", action="store_true", help="write the companion map files only")
    sub = command(commands, "dovecot-config", App.cmd_dovecot_config,
                  "print the dovecot.conf snippet wiring Dovecot to authd")
    _wiring_options(sub, postfix=False, dovecot=True)
    sub.add_argument("--write", action="store_true",
                     help="write conf.d/99-mailplugins.conf and its companion files")
    sub = command(commands, "doctor", App.cmd_doctor,
                  "compare the live Postfix and Dovecot configuration with the generated one")
    _wiring_options(sub, postfix=True, dovecot=True)
    sub.add_argument("--postfix-config-dir", metavar="DIR", help="postconf -c DIR (private instance)")
    sub.add_argument("--dovecot-config", metavar="FILE", help="doveconf -c FILE (private instance)")
    sub.add_argument("--no-postfix", action="store_true", help="skip the Postfix checks")
    sub.add_argument("--no-dovecot", action="store_true", help="skip the Dovecot checks")
    sub.add_argument("--probe", action="store_true",
                     help="also connect to each daemon where Postfix and Dovecot will")
    sub.add_argument("--dns", action="store_true",
                     help="also look up every domain's MX, SPF, DKIM and DMARC records")
    nameserver_option(sub)
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    err = stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    app = App(args, stdin or sys.stdin, stdout or sys.stdout, err)
    try:
        result = args.handler(app)
        return result if isinstance(result, int) else 0
    except ConfigError as exc:
        err.write(f"mailplugins: {exc}\n")
        return EXIT_USAGE
    except (StoreError, CommandError) as exc:
        err.write(f"mailplugins: {exc}\n")
        return getattr(exc, "status", EXIT_FAILED)
    except DBAPIError as exc:
        text = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        if "no such table" in text or "does not exist" in text or "doesn't exist" in text:
            text = "the schema is missing: run 'mailplugins db upgrade'"
        err.write(f"mailplugins: database error: {text}\n")
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        err.write(f"mailplugins: database error: {str(exc).splitlines()[0]}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("mailplugins: interrupted\n")
        return 130
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
