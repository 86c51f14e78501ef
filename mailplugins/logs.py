# -*- test-case-name: tests.unit.test_logs -*-
"""Logging to stdout through twisted.logger, one line per event (journald adds the rest).

Callers log structured fields with ``Logger``; they must never pass passwords or SASL payloads.
A failure is rendered as its exception and innermost frame on the same line: a mail daemon's log
is grepped line by line.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


def format_line(event: dict[str, Any]) -> str:
    level = event.get("log_level", LogLevel.info)
    namespace = event.get("log_namespace", "-")
    text = formatEvent(event).replace("\n", " | ")
    failure = event.get("log_failure")
    if failure is not None:
        frame = ""
        tb = failure.getTracebackObject()
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            code = tb.tb_frame.f_code
            frame = f" (at {code.co_filename}:{tb.tb_lineno} in {code.co_name})"
        text = f"{text}: {failure.type.__name__}: {failure.getErrorMessage()}{frame}"
    return f"{level.name} {namespace}: {text}\n"


@implementer(ILogObserver)
class LineObserver:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._stream.write(format_line(event))
            self._stream.flush()
        except Exception:  # noqa: S110 - a broken stdout must not recurse into logging
            pass


def start_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LEVELS.get(level, LogLevel.info))
    line_observer: Any = LineObserver(stream or sys.stdout)
    observer: Any = FilteringLogObserver(line_observer, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
