"""Log lines: one line per event, failures included, on stdout by default."""

from __future__ import annotations

import io

from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailplugins.logs import format_line


def test_log_lines_are_one_line_even_with_failures() -> None:
    event = {"log_format": "hello {who}\nworld", "who": "there", "log_level": LogLevel.warn,
             "log_namespace": "policyd.protocol"}
    assert format_line(event) == "warn policyd.protocol: hello there | world\n"
    try:
        dict[str, int]()["missing"]
    except KeyError:
        failure = Failure()
    event = {"log_format": "lookup failed", "log_level": LogLevel.error, "log_namespace": "x",
             "log_failure": failure}
    line = format_line(event)
    assert line.count("\n") == 1
    assert line.startswith("error x: lookup failed: KeyError: 'missing' (at ")
    assert "test_logs.py" in line


def test_stdout_is_default_stream() -> None:
    stream = io.StringIO()
    from mailplugins.logs import LineObserver

    LineObserver(stream)({"log_format": "x", "log_namespace": "n", "log_level": LogLevel.info})
    assert stream.getvalue() == "info n: x\n"
