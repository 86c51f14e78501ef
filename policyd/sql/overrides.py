# -*- test-case-name: tests.unit.test_policyd_cli -*-
"""Rate-limit overrides and counters for the ``mailplugins ratelimit`` CLI: show, set, remove, list, reset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Engine,
    delete,
    select,
)

from mailplugins.db.policy_models import (
    RateBucket,
    RateOverride,
)
from mailplugins.db.upsert import upsert_stmt
from policyd.sql.ratelimit import RateKey, Usage, effective_windows, override_limits, window_total

#: An override limit meaning "no limit" (NULL means "inherit the configured limit").
UNLIMITED = -1


class OverrideError(ValueError):
    """A bad override (one line for the operator)."""


def rate_usage(engine: Engine, key: RateKey, now: float) -> list[Usage]:
    """Current totals per effective window of ``key``, counting nothing (for the CLI)."""
    second = int(now)
    with engine.connect() as conn:
        conn.begin()
        windows = effective_windows(key.windows, override_limits(conn, key.rule, key.override_subjects))
        result = []
        for window in windows:
            total = window_total(conn, key, window, second // window.step)
            result.append(Usage(window.period, int(total[0]), int(total[1]), int(total[2])))
        return result


@dataclass(frozen=True)
class OverrideRecord:
    rule: str
    subject: str
    period: int
    messages: int | None
    recipients: int | None
    bytes: int | None


def normalise_override_subject(subject: str) -> str:
    """``user@domain`` or ``@domain``, case-folded (domains IDNA-encoded)."""
    from mailplugins.addresses import AddressError, parse_address, parse_domain

    text = subject.strip()
    try:
        if text.startswith("@"):
            return "@" + parse_domain(text[1:])
        return parse_address(text).key
    except AddressError as exc:
        raise OverrideError(f"not an address or @domain: {subject!r} ({exc})") from None


def set_rate_override(
    engine: Engine,
    rule: str,
    subject: str,
    period: int,
    *,
    messages: int | None = None,
    recipients: int | None = None,
    size: int | None = None,
) -> OverrideRecord:
    """Create or replace the override of ``subject`` (``user@domain`` or ``@domain``) for the
    window of ``period`` seconds. Each limit: None inherits, -1 is unlimited, else the limit."""
    if period <= 0:
        raise OverrideError("the period must be a positive number of seconds")
    for value in (messages, recipients, size):
        if value is not None and value < UNLIMITED:
            raise OverrideError("a limit must be -1 (unlimited) or a count")
    key = normalise_override_subject(subject)
    values = {"messages": messages, "recipients": recipients, "bytes": size}
    updates: dict[str, Any] = {name: (lambda c, new, name=name: getattr(new, name)) for name in values}
    with engine.begin() as conn:
        conn.execute(upsert_stmt(
            conn, RateOverride.__table__, {"rule": rule, "subject": key, "period": period, **values},
            ("rule", "subject", "period"), updates,
        ))
    return OverrideRecord(rule, key, period, messages, recipients, size)


def remove_rate_override(engine: Engine, rule: str, subject: str, period: int | None = None) -> int:
    """Remove the override(s) of ``subject`` (one period, or all); returns rows removed."""
    key = normalise_override_subject(subject)
    with engine.begin() as conn:
        stmt = delete(RateOverride).where(RateOverride.rule == rule, RateOverride.subject == key)
        if period is not None:
            stmt = stmt.where(RateOverride.period == period)
        return int(conn.execute(stmt).rowcount)


def list_rate_overrides(engine: Engine, rule: str | None = None) -> list[OverrideRecord]:
    with engine.connect() as conn:
        stmt = select(RateOverride).order_by(RateOverride.rule, RateOverride.subject,
                                             RateOverride.period)
        if rule is not None:
            stmt = stmt.where(RateOverride.rule == rule)
        return [
            OverrideRecord(r.rule, r.subject, r.period, r.messages, r.recipients, r.bytes)
            for r in conn.execute(stmt).all()
        ]


def reset_rate_counters(engine: Engine, rule: str, subject: str) -> int:
    """Forget what ``subject`` has sent (an operator lifting a block at once)."""
    with engine.begin() as conn:
        return int(conn.execute(
            delete(RateBucket).where(RateBucket.rule == rule, RateBucket.subject == subject)
        ).rowcount)
