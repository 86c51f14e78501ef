# -*- test-case-name: tests.unit.test_cli -*-
"""The state one ``mailplugins`` invocation shares with its commands, and their output helpers.

:class:`AppBase` loads the config and opens the store on first use; the command groups
(:mod:`~mailplugins.cli.accounts`, :mod:`~mailplugins.cli.wiring`) extend it and
:class:`~mailplugins.cli.main.App` joins them. Daemons' command modules take an ``App``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from mailplugins.config import Config, config_path, load_config
from mailplugins.hashing import hash_password
from mailplugins.store import Store

if TYPE_CHECKING:
    pass

COMMANDS_GROUP = "mailplugins.commands"
EXIT_FAILED = 1
EXIT_USAGE = 2
#: App passwords: 4 groups of 4 lowercase letters, easy to type on a phone, ~75 bits.


class CommandError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


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


class AppBase:
    """State for one invocation: arguments, streams, the config and the store (opened lazily)."""

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


def command_group(
    commands: Any, name: str, help_text: str, wrap: Callable[[Any], Any] = lambda fn: fn
) -> Callable[[str, Any, str], argparse.ArgumentParser]:
    """Add ``mailplugins NAME ACTION ...`` to ``commands``; returns ``action(name, handler,
    help)``, which adds one action (its parser, for the arguments) with ``wrap(handler)``."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    parser_class=type(parser))

    def action(action_name: str, handler: Any, text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(action_name, help=text, description=text)
        sub.set_defaults(handler=wrap(handler))
        return sub

    return action
