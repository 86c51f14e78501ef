"""The units in systemd/: ``systemd-analyze verify`` clean, the promised settings, and real
socket activation plus ``Type=notify`` readiness through ``systemd-socket-activate``.

``systemd-analyze verify`` checks that ExecStart binaries exist, so it runs on copies whose
``/opt/mailplugins/bin/mailplugins`` points at this venv's ``mailplugins``; everything else is
verified as shipped. It does not require the ``User=`` accounts (mailplugins, vmail) to exist,
so no system user is created. verify exits 0 even for unknown keys or bad values (it only
warns), so any output at all fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailplugins.wiring.endpoints import SHIPPED_SOCKETS, parse_endpoint
from tests.rig import REPO, short_tempdir, wait_until, write_config

pytestmark = pytest.mark.e2e

UNITS = REPO / "systemd"
SHIPPED_BINARY = "/opt/mailplugins/bin/mailplugins"
DAEMONS = ("policyd", "authd", "deliver", "milterd")
VENV_BINARY = Path(sys.executable).parent / "mailplugins"


def unit_lines(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    section = ""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_lines(path) if s == section and k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key} appears {len(found)} times"
    return found[0]


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    assert VENV_BINARY.exists()
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".socket"):
            text = unit.read_text().replace(SHIPPED_BINARY, str(VENV_BINARY))
            (tmp_path / unit.name).write_text(text)
    return tmp_path


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_every_unit_passes_systemd_analyze_verify(unit_copies: Path) -> None:
    units = sorted(unit_copies.iterdir())
    assert {u.name for u in units} >= {f"mailplugins-{d}.{kind}" for d in DAEMONS
                                       for kind in ("service", "socket")}
    result = verify(units)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_is_not_a_rubber_stamp(unit_copies: Path) -> None:
    unit = unit_copies / "mailplugins-policyd.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    assert "Unknown key 'ProtectSystm'" in verify([unit]).stderr
    shipped = verify([UNITS / "mailplugins-deliver.service"])
    assert f"Command {SHIPPED_BINARY} is not executable" in shipped.stderr


@pytest.mark.parametrize("daemon", DAEMONS)
def test_service_settings(daemon: str) -> None:
    unit = UNITS / f"mailplugins-{daemon}.service"
    assert one(unit, "Service", "Type") == "notify"
    # Only the worker supervisor notifies, and it stops its workers itself (docs/workers.md).
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "ExecStart").endswith(f"serve {daemon}")
    assert one(unit, "Service", "ExecStartPre").endswith("check-config")
    reload_lines = values(unit, "Service", "ExecReload")
    assert len(reload_lines) == 2
    assert reload_lines[0].endswith("check-config")
    assert reload_lines[1] == "/bin/kill -HUP $MAINPID"
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                       ("CapabilityBoundingSet", ""), ("ProtectHome", "yes")):
        assert one(unit, "Service", key) == value, key
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    writable = one(unit, "Service", "ReadWritePaths").split()
    if daemon == "deliver":
        assert (one(unit, "Service", "User"), one(unit, "Service", "Group")) == ("vmail", "vmail")
        assert writable == ["/var/vmail", "-/var/lib/mailplugins"]
    else:
        assert one(unit, "Service", "User") == "mailplugins"
        assert writable == ["-/var/lib/mailplugins"]
    sockets = one(unit, "Service", "Sockets").split()
    assert f"mailplugins-{daemon}.socket" in sockets
    for name in sockets:
        assert (UNITS / name).exists()
        assert one(UNITS / name, "Socket", "Service") == unit.name


def test_sockets_match_the_generators_shipped_table() -> None:
    """postfix-config/dovecot-config resolve systemd:name=X through SHIPPED_SOCKETS: keep in step."""
    seen = {}
    for unit in sorted(UNITS.glob("*.socket")):
        name = one(unit, "Socket", "FileDescriptorName")
        listen = one(unit, "Socket", "ListenStream")
        assert one(unit, "Socket", "Accept") == "no"
        seen[name] = listen
    assert set(seen) == set(SHIPPED_SOCKETS)
    for name, listen in seen.items():
        endpoint = parse_endpoint(SHIPPED_SOCKETS[name])
        expected = endpoint.path if endpoint.kind == "unix" else endpoint.inet()
        assert listen == expected, name
        if listen.startswith("/var/spool/postfix/private/"):
            daemon = {"policy": "policyd", "sasl": "authd", "lmtp": "deliver", "milter": "milterd"}[name]
            unit = UNITS / f"mailplugins-{daemon}.socket"
            assert one(unit, "Socket", "SocketUser") == "postfix"
            assert one(unit, "Socket", "SocketMode") == "0660"


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = short_tempdir("mp-sd-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_socket_activation_and_readiness(scratch: Path) -> None:
    """What the .socket/.service pair does, done by systemd-socket-activate: the daemon adopts the
    named socket, answers on it, and says READY=1 on $NOTIFY_SOCKET."""
    from mailplugins.config import parse_config
    from mailplugins.db import schema
    from mailplugins.db.engine import make_engine

    config = {
        "database": {"url": f"sqlite:///{scratch}/mail.db"},
        "mail": {"location": str(scratch / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
        "policyd": {"listen": "systemd:domain=UNIX:name=policy"},
    }
    path = write_config(scratch / "mailplugins.yaml", config)
    engine = make_engine(parse_config(config).database)
    schema.upgrade(engine)
    engine.dispose()
    notify_path = scratch / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    policy_path = scratch / "policy.sock"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    log = open(scratch / "log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(policy_path), "--fdname=policy",
         "-E", "NOTIFY_SOCKET", str(VENV_BINARY), "--config", str(path), "serve", "policyd"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        wait_until(policy_path.exists, timeout=10, what="systemd-socket-activate to listen")
        # The first connection makes systemd-socket-activate exec mailplugins with the socket.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(60)
        client.connect(str(policy_path))
        client.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
                       b"sender=a@remote.example\nrecipient=b@elsewhere.example\n\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = client.recv(4096)
            if not chunk:
                break
            reply += chunk
        client.close()
        assert reply.startswith(b"action="), (reply, (scratch / "log").read_text())
        states: list[str] = []
        deadline = time.monotonic() + 30
        while not any(s.startswith("READY=1") for s in states) and time.monotonic() < deadline:
            states.append(notify.recv(4096).decode())
        assert any(s.startswith("READY=1") for s in states), states
    finally:
        process.terminate()
        process.wait(timeout=30)
        notify.close()
        log.close()
