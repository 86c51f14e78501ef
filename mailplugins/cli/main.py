# -*- test-case-name: tests.unit.test_cli -*-
"""The ``mailplugins`` command: parses arguments, calls the core, prints.

Exit status: 0 success, 1 the operation failed (e.g. the user exists), 2 usage or configuration
error. Every error is one line on stderr; passwords are read from stdin or a prompt, never argv.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TextIO

from mailplugins import __version__
from mailplugins.config import ConfigError, config_path
from mailplugins.records import StoreError

if TYPE_CHECKING:
    pass
from mailplugins.cli.accounts import AccountCommands, _quota, _services
from mailplugins.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandError,
    _Parser,
    nameserver_option,
)
from mailplugins.cli.wiring import WiringCommands, wiring_options

COMMANDS_GROUP = "mailplugins.commands"


class App(AccountCommands, WiringCommands):
    """State for one invocation; each ``cmd_*`` method implements one command."""

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

    def cmd_serve(self) -> int:
        from mailplugins.logs import start_logging
        from mailplugins.runner import StartupError, serve

        config = self.config
        start_logging(self.args.log_level)
        try:
            return serve(config_path(self.args.config), config, self.args.daemons)
        except StartupError as exc:
            raise CommandError(str(exc), exc.status) from None


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
    wiring_options(sub, postfix=True, dovecot=False)
    sub.add_argument("--write", action="store_true", help="write the companion map files only")
    sub = command(commands, "dovecot-config", App.cmd_dovecot_config,
                  "print the dovecot.conf snippet wiring Dovecot to authd")
    wiring_options(sub, postfix=False, dovecot=True)
    sub.add_argument("--write", action="store_true",
                     help="write conf.d/99-mailplugins.conf and its companion files")
    sub = command(commands, "doctor", App.cmd_doctor,
                  "compare the live Postfix and Dovecot configuration with the generated one")
    wiring_options(sub, postfix=True, dovecot=True)
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
