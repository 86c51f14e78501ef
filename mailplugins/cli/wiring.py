# -*- test-case-name: tests.unit.test_cli_wiring -*-
"""``mailplugins postfix-config|dovecot-config|doctor``: wiring stock Postfix and Dovecot."""

from __future__ import annotations

import argparse
import contextlib
import grp
import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mailplugins.releases import detect_dovecot, detect_postfix, dovecot_release, postfix_release
from mailplugins.wiring.dict_socket import check_dict_socket
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_conf_text, dovecot_config, render_dovecot
from mailplugins.wiring.postfix import PostfixOptions, PostfixSnippet, postfix_config, render_postfix
from mailplugins.wiring.snippets import DEBIAN_CERT, DEBIAN_KEY, GeneratedFile

if TYPE_CHECKING:
    from mailplugins.wiring.doctor import Finding
from mailplugins.cli.app import EXIT_FAILED, EXIT_USAGE, AppBase, CommandError


class WiringCommands(AppBase):
    """Generate the Postfix and Dovecot settings, and check the live ones against them."""

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
        from mailplugins.wiring import doctor, probe
        from mailplugins.wiring.live import run_doveconf, run_postconf

        findings: list[doctor.Finding] = []
        checked: list[str] = []
        try:
            if not self.args.no_postfix:
                snippet = postfix_config(self.config, self._postfix_options())
                live = run_postconf(self.args.postfix_config_dir)
                findings += doctor.check_postfix(snippet, live)
                if snippet.domains_mode == "list":
                    findings += doctor.check_domains(snippet, live, snippet_domains(snippet))
                checked.append("postfix")
            if not self.args.no_dovecot:
                dsnippet = dovecot_config(self.config, self._dovecot_options())
                dlive = run_doveconf(self.args.dovecot_config)
                findings += doctor.check_dovecot(dsnippet, dlive)
                findings += check_dict_socket(self.config, dlive)
                findings += doctor.check_dovecot_files(dsnippet)
                findings += doctor.check_mailbox_paths(self.config.mail.location,
                                                       self.store.iter_mailboxes())
                checked.append("dovecot")
            if self.args.probe:
                findings += probe.probe_daemons(self.config)
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
        from mailplugins.wiring.doctor import Finding

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


def wiring_options(sub: argparse.ArgumentParser, postfix: bool, dovecot: bool) -> None:
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
