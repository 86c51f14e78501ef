"""`mailplugins serve`: listeners, readiness, reload, failure messages, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.runner import StartupError, select_daemons
from tests.rig import REPO, free_port, short_tempdir, wait_until


def test_select_daemons(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    empty = parse_config({"database": {"url": url}}, "/etc/x.yaml")
    with pytest.raises(StartupError, match="no daemon is configured in /etc/x.yaml") as info:
        select_daemons(empty, [], ["policyd", "authd", "deliver"])
    assert info.value.status == 2
    with pytest.raises(StartupError, match="policyd: not configured"):
        select_daemons(empty, ["policyd"], ["policyd"])
    with pytest.raises(StartupError, match="unknown daemon 'smtpd'"):
        select_daemons(empty, ["smtpd"], ["policyd"])
    one = parse_config({"database": {"url": url}, "deliver": {"listen": "tcp:1"}})
    assert select_daemons(one, [], ["policyd", "deliver"]) == ["deliver"]
    assert select_daemons(one, ["deliver", "deliver"], ["deliver"]) == ["deliver"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write(workdir: Path, listen: object, *, upgrade: bool = True, **extra: object) -> Path:
    data = {"database": {"url": f"sqlite:///{workdir}/m.db"}, "deliver": {"listen": listen, **extra}}
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    if upgrade:
        engine = make_engine(parse_config(data).database)
        schema.upgrade(engine)
        engine.dispose()
    return path


def echo_serve(config: Path, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
    process: subprocess.Popen[str] = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or dict(os.environ), **kwargs,  # type: ignore[call-overload]
    )
    return process


def test_serve_with_no_daemon_configured_exits_2(workdir: Path) -> None:
    config = workdir / "c.yaml"
    config.write_text(f"database:\n  url: sqlite:///{workdir}/m.db\n")
    result = subprocess.run([sys.executable, "-m", "mailplugins.cli", "--config", str(config), "serve"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == (
        f"mailplugins: no daemon is configured in {config}: "
        "add a policyd, authd, deliver or milterd section\n")


@pytest.mark.parametrize("path", ["/nonexistent-mp-dir/deliver.sock", "/proc/mp-deliver.sock"])
def test_unlistenable_socket_exits_nonzero_naming_path(workdir: Path, path: str) -> None:
    config = write(workdir, f"unix:{path}:mode=660")
    process = echo_serve(config)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.startswith(f"mailplugins: deliver.listen: cannot listen on unix:{path}:mode=660: ")
    assert "Traceback" not in err


def test_unix_listeners_leave_no_lock_file_unless_asked() -> None:
    from mailplugins.runner import endpoint_string

    assert endpoint_string("unix:/run/x.sock:mode=660") == "unix:/run/x.sock:mode=660:lockfile=0"
    assert endpoint_string("unix:/run/x.sock:lockfile=1") == "unix:/run/x.sock:lockfile=1"
    assert endpoint_string("tcp:25:interface=127.0.0.1") == "tcp:25:interface=127.0.0.1"


def test_outdated_schema_refuses_to_start(workdir: Path) -> None:
    config = write(workdir, "tcp:0:interface=127.0.0.1", upgrade=False)
    engine = make_engine(parse_config(yaml.safe_load(config.read_text())).database)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE unrelated (x INTEGER)")
    engine.dispose()
    process = echo_serve(config)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "run 'mailplugins db upgrade'" in err


def talk(path: Path, line: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line + b"\n")
        return sock.recv(100)


def test_ready_reload_metrics_and_stop(workdir: Path) -> None:
    sock_path = workdir / "echo.sock"
    # A stale socket file from a crashed run must not block start-up.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    metrics_port = free_port()
    config = write(workdir, [f"unix:{sock_path}:mode=600", "tcp:0:interface=127.0.0.1"],
                   metrics=f"tcp:{metrics_port}:interface=127.0.0.1")
    notify_path = workdir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    process = echo_serve(config, env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)))
    try:
        assert notify.recv(1000).startswith(b"READY=1\nSTATUS=serving deliver")
        assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
        assert not Path(f"{sock_path}.lock").exists()
        assert talk(sock_path, b"hello") == b"echo hello v1\n"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b'mailplugins_build_info{daemon="deliver",version=' in body
        assert b"mailplugins_deliver_config_last_reload_successful 1.0" in body
        assert b"process_open_fds" in body

        good = config.read_text()
        config.write_text(good.replace("metrics:", "metrcis:"))
        process.send_signal(signal.SIGHUP)
        assert notify.recv(1000).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert notify.recv(1000) == b"READY=1\nSTATUS=reload rejected"
        assert talk(sock_path, b"still") == b"echo still v1\n"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b"mailplugins_deliver_config_last_reload_successful 0.0" in body

        config.write_text(good)
        process.send_signal(signal.SIGHUP)
        assert notify.recv(1000).startswith(b"RELOADING=1")
        assert notify.recv(1000) == b"READY=1\nSTATUS=reloaded"
        assert talk(sock_path, b"again") == b"echo again v2\n"

        process.send_signal(signal.SIGTERM)
        assert notify.recv(1000) == b"STOPPING=1"
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        lines = out.splitlines()
        rejected = "reload rejected, keeping the running config: deliver.metrcis: unknown key"
        assert any(rejected in line for line in lines)
        assert any("configuration reloaded" in line for line in lines)
        assert all(line.split(" ", 1)[0] in ("debug", "info", "warn", "error", "critical") for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        notify.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation(workdir: Path, workers: int) -> None:
    """A socket passed by systemd (LISTEN_FDS/LISTEN_FDNAMES) is adopted by name, and the
    socket file stays systemd's: its mode (the unit's ``SocketMode``) is kept, not widened to
    Twisted's 0666, and it is still there when the daemon stops, for the next activation.
    One process adopts it itself; with workers the supervisor passes it on."""
    sock_path = workdir / "activated.sock"
    config = write(workdir, "systemd:domain=UNIX:name=deliver", workers=workers)
    activate = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock_path), "--fdname=deliver",
         sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(sock_path.exists, timeout=10, what="systemd-socket-activate to listen")
        os.chmod(sock_path, 0o660)
        # The first connection starts the daemon, which takes over the listening socket.
        assert talk(sock_path, b"activated", timeout=30) == b"echo activated v1\n"
        assert talk(sock_path, b"twice") == b"echo twice v1\n"
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
    finally:
        activate.send_signal(signal.SIGTERM)
        activate.communicate(timeout=30)
    assert activate.returncode == 0
    assert stat.S_ISSOCK(sock_path.stat().st_mode)


def test_systemd_socket_with_wrong_name_is_a_clear_error(workdir: Path) -> None:
    sock_path = workdir / "misnamed.sock"
    config = write(workdir, "systemd:domain=UNIX:name=deliver")
    activate = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock_path), "--fdname=policy",
         sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config), "serve"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(sock_path.exists, timeout=10, what="systemd-socket-activate to listen")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock_path))
        _out, err = activate.communicate(timeout=60)
        client.close()
        assert activate.returncode == 2
        assert "deliver.listen: systemd passed no socket for 'systemd:domain=UNIX:name=deliver'" in err
    finally:
        if activate.poll() is None:
            activate.kill()
            activate.communicate()
