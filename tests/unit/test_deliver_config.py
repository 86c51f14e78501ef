"""The ``deliver:`` config section and building the daemon from it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from deliver.daemon import DAEMON
from mailplugins.config import ConfigError, parse_config
from mailplugins.daemon import Runtime
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool


def section(tmp_path: Path, **deliver: Any) -> Any:
    return parse_config({
        "database": {"url": f"sqlite:///{tmp_path}/mail.db"},
        "mail": {"location": f"{tmp_path}/vmail/%d/%n/Maildir", "uid": 0, "gid": 0},
        "deliver": {"listen": "tcp:0", **deliver},
    })


def test_defaults(tmp_path: Path) -> None:
    config = section(tmp_path).deliver
    assert config.max_message_size == 50 * 1024 * 1024
    assert config.hostname == socket.gethostname()
    assert config.spool_directory is None
    assert config.default_folders == ("Drafts", "Sent", "Trash", "Templates")
    assert (config.detail_folders, config.autocreate_detail_folders, config.quota_tempfail) == (
        True, False, False)
    assert (config.idle_timeout, config.stale_tmp_age) == (600.0, 36 * 3600.0)
    assert (config.disabled, config.delivered_to, config.advertise_dsn) == ("reject", "always", False)
    assert (config.postmaster, config.received_header) == (None, True)


def test_values_are_converted(tmp_path: Path) -> None:
    config = section(tmp_path, max_message_size="10M", idle_timeout="5m", stale_tmp_age="2d",
                     default_folders=["Junk", "Archive.2026"], spool_directory=str(tmp_path),
                     quota_tempfail=True, disabled="defer").deliver
    assert config.max_message_size == 10 * 1024 * 1024
    assert (config.idle_timeout, config.stale_tmp_age) == (300.0, 172800.0)
    assert config.default_folders == ("Junk", "Archive.2026")
    assert (config.quota_tempfail, config.disabled) == (True, "defer")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_message_size", "10", "deliver.max_message_size: must be at least 1024"),
        ("default_folders", ["INBOX"], "deliver.default_folders[0]: not a valid folder name"),
        ("default_folders", ["../x"], "deliver.default_folders[0]: not a valid folder name"),
        ("hostname", "a b", "deliver.hostname: host name must not contain"),
        ("disabled", "drop", "deliver.disabled: must be one of reject, defer"),
        ("delivered_to", "x", "deliver.delivered_to: must be one of always, single, never"),
        ("spool_directory", "relative", "deliver.spool_directory: must be an absolute path"),
        ("idle_timeout", "0s", "deliver.idle_timeout: must be at least 1"),
        ("max_line_length", 10, "deliver.max_line_length: must be at least 512"),
        ("quota_tempfail", "yes", "deliver.quota_tempfail: expected true or false"),
        ("postmaster", "postmaster", "deliver.postmaster: not a mail address"),
        ("postmaster", "a%b@example.org", "deliver.postmaster: not a plain mail address"),
        ("received_header", "off", "deliver.received_header: expected true or false"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        section(tmp_path, **{key: value})
    assert str(info.value).startswith(message)


def test_build_listen_reload_and_stop(tmp_path: Path) -> None:
    config = section(tmp_path, hostname="mx.test", max_connections=1)
    clock = MemoryReactorClock()
    db = Database(clock, config.database)
    runtime = Runtime(clock, config, db, DaemonMetrics("deliver"), WorkerPool(clock, "cpu", 1))
    running = DAEMON.build(runtime)
    try:
        assert [listener.key for listener in running.listeners] == ["deliver.listen"]
        factory = running.listeners[0].factory
        first = factory.buildProtocol(None)
        transport = StringTransport()
        first.makeConnection(transport)
        assert transport.value() == b"220 mx.test LMTP mailplugins deliver ready\r\n"
        second = factory.buildProtocol(None)
        refused = StringTransport()
        second.makeConnection(refused)
        assert refused.value().startswith(b"421 4.3.2")
        running.reload(section(tmp_path, hostname="mx2.test", max_connections=5))
        assert running.service.settings.hostname == "mx2.test"
        assert running.stop() is None
        assert b"mailplugins_deliver_recipients_total" in runtime.metrics.render()
        assert b"mailplugins_deliver_delivery_duration_seconds" in runtime.metrics.render()
    finally:
        db.close()
