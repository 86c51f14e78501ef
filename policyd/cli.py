# -*- test-case-name: tests.unit.test_policyd_cli -*-
"""``mailplugins ratelimit``: per-mailbox and per-domain rate-limit overrides, usage, resets.

Registered through the ``mailplugins.commands`` entry point, so the core CLI never imports
policyd. Overrides live in the database: every host sharing it applies them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from mailplugins.cli import App, CommandError, command_group, print_json, print_table
from mailplugins.clients import client_network
from mailplugins.config.fields import parse_duration, parse_size
from policyd.ratelimit import address_subject
from policyd.sql.overrides import (
    OverrideError,
    list_rate_overrides,
    rate_usage,
    remove_rate_override,
    reset_rate_counters,
    set_rate_override,
)
from policyd.sql.ratelimit import RateKey


def _period(text: str) -> int:
    try:
        seconds = int(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad period {text!r}: {exc}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the period must be positive")
    return seconds


def _limit(text: str) -> int:
    """A limit: a number, a size (for bytes), or -1 for unlimited."""
    if text.strip() == "-1":
        return -1
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad limit {text!r}: {exc}") from None


def _rule(app: App, name: str) -> Any:
    policyd = app.config.policyd
    ratelimit = getattr(policyd, "ratelimit", None) if policyd is not None else None
    rules = {rule.name: rule for rule in (ratelimit.rules if ratelimit else ())}
    if name not in rules:
        known = ", ".join(sorted(rules)) or "none configured"
        raise CommandError(f"no rate-limit rule {name!r} in policyd.ratelimit.rules ({known})")
    return rules[name]


def _subject(app: App, text: str) -> tuple[str, tuple[str, ...]]:
    """The counter subject as policyd computes it (login/sender address, or client network)."""
    rule = _rule(app, app.args.rule)
    if "@" not in text:
        network = client_network(text, rule.ipv4_prefix, rule.ipv6_prefix)
        if network is not None:
            return network, ()
        return text.casefold(), ()
    found = address_subject(text, app.config.mail.recipient_delimiter)
    if found is None:
        raise CommandError(f"not an address: {text!r}")
    return found


def cmd_set(app: App) -> None:
    _rule(app, app.args.rule)
    a = app.args
    if a.messages is None and a.recipients is None and a.bytes is None:
        raise CommandError("give at least one of --messages, --recipients, --bytes", 2)
    record = set_rate_override(app.store.engine, a.rule, a.subject, a.period,
                               messages=a.messages, recipients=a.recipients, size=a.bytes)
    app.out.write(f"{record.rule}: {record.subject} per {record.period}s: "
                  f"{_limits(record.messages, record.recipients, record.bytes)}\n")


def _limits(messages: int | None, recipients: int | None, size: int | None) -> str:
    def one(name: str, value: int | None) -> str:
        return f"{name}={'inherit' if value is None else 'unlimited' if value < 0 else value}"

    return " ".join((one("messages", messages), one("recipients", recipients), one("bytes", size)))


def cmd_remove(app: App) -> None:
    removed = remove_rate_override(app.store.engine, app.args.rule, app.args.subject, app.args.period)
    if not removed:
        raise CommandError(f"no override of {app.args.subject} in rule {app.args.rule}")
    app.out.write(f"removed {removed} override(s) of {app.args.subject}\n")


def cmd_list(app: App) -> None:
    rows = list_rate_overrides(app.store.engine, app.args.rule)
    if app.args.json:
        print_json([asdict(r) for r in rows], app.out)
    else:
        print_table([(r.rule, r.subject, f"per {r.period}s", _limits(r.messages, r.recipients, r.bytes))
                     for r in rows], app.out)


def cmd_show(app: App) -> None:
    rule = _rule(app, app.args.rule)
    subject, overrides = _subject(app, app.args.subject)
    usage = rate_usage(app.store.engine, RateKey(rule.name, subject, rule.windows, overrides), time.time())
    if app.args.json:
        print_json([{"subject": subject, **asdict(u)} for u in usage], app.out)
        return
    print_table([(subject, f"last {u.period}s", f"messages={u.messages}", f"recipients={u.recipients}",
                  f"bytes={u.bytes}") for u in usage], app.out)


def cmd_reset(app: App) -> None:
    _rule(app, app.args.rule)
    subject, _ = _subject(app, app.args.subject)
    removed = reset_rate_counters(app.store.engine, app.args.rule, subject)
    app.out.write(f"reset {subject} in rule {app.args.rule} ({removed} counter rows)\n")


def _wrap(fn: Any) -> Any:
    def run(app: App) -> None:
        try:
            fn(app)
        except OverrideError as exc:
            raise CommandError(str(exc)) from None

    return run


def register(commands: Any) -> None:
    """Add ``ratelimit`` to the ``mailplugins`` command (entry point ``mailplugins.commands``)."""
    action = command_group(commands, "ratelimit",
                           "per-mailbox and per-domain rate-limit overrides (policyd)", _wrap)
    sub = action("set", cmd_set, "set the limits of SUBJECT (user@domain or @domain) in one window")
    sub.add_argument("rule")
    sub.add_argument("subject")
    sub.add_argument("period", type=_period, help="the window, e.g. 3600 or 1h")
    for name in ("messages", "recipients", "bytes"):
        sub.add_argument(f"--{name}", type=_limit, metavar="N",
                         help="the limit (-1 unlimited; omitted: the rule's own)")
    sub = action("remove", cmd_remove, "remove the overrides of SUBJECT (one window, or all)")
    sub.add_argument("rule")
    sub.add_argument("subject")
    sub.add_argument("period", type=_period, nargs="?")
    sub = action("list", cmd_list, "list overrides")
    sub.add_argument("rule", nargs="?")
    sub.add_argument("--json", action="store_true")
    sub = action("show", cmd_show, "what SUBJECT (address or client IP) has used in each window")
    sub.add_argument("rule")
    sub.add_argument("subject")
    sub.add_argument("--json", action="store_true")
    sub = action("reset", cmd_reset, "forget what SUBJECT has sent (lift a block at once)")
    sub.add_argument("rule")
    sub.add_argument("subject")

