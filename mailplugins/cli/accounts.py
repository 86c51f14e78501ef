# -*- test-case-name: tests.unit.test_cli_accounts -*-
"""``mailplugins domain|user|alias|sender|app-password``: the accounts in the database."""

from __future__ import annotations

import argparse
import secrets
from dataclasses import asdict
from typing import TYPE_CHECKING

from mailplugins.config.fields import parse_size
from mailplugins.passwd_import import never_logs_in, parse_passwd_line
from mailplugins.records import SERVICES, AlreadyExists, StoreError

if TYPE_CHECKING:
    pass
from mailplugins.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    AppBase,
    CommandError,
    print_json,
    print_table,
    read_password,
)

APP_PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyz"  # noqa: S105 - an alphabet, not a secret


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


class AccountCommands(AppBase):
    """Domains, mailboxes, aliases, sender grants and app passwords."""

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
