"""authd's auth-client socket against the real ``doveadm auth test`` of Dovecot 2.3 and 2.4.

Dovecot 2.4's auth clients speak ``VERSION 1 3`` and send ``protocol=`` instead of
``service=`` (plus ``final-resp-ok``); before authd understood them, ``doveadm auth test -a``
from 2.4 got "internal auth failure". The rig's ``release`` fixture runs each release's doveadm
(Debian 13's from its root, where /tmp, with authd's socket, is at the same path).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from mailplugins.hashing import hash_password
from tests.rig import Daemons, RigFactory

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    daemons: Daemons
    socket: Path


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    with RigFactory(release, "mp-doveadm-") as factory:
        socket = factory.root / "auth.sock"
        daemons = factory.daemons(
            {"authd": {"sasl_listen": f"unix:{socket}:mode=666", "failure_delay": "0.1s",
                       "penalty_threshold": 100}},
            ["authd"],
        )
        passwords = daemons.config.passwords
        daemons.store.add_domain("example.org")
        daemons.store.add_mailbox("alice@example.org", hash_password("alice-pw", passwords))
        daemons.store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
        daemons.store.set_master("admin@example.org", True)
        factory.start(daemons)
        yield Rig(daemons, socket)


def auth_test(release: Release, rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        release.command(["doveadm", "auth", "test", "-a", str(rig.socket), *args]),
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_version_is_the_one_expected(release: Release) -> None:
    expected = {"debian12": (2, 3), "debian13": (2, 4)}[release.name]
    assert release.dovecot_version == expected


@pytest.mark.parametrize("service", ["smtp", "imap", None])
def test_good_and_bad_password(release: Release, rig: Rig, service: str | None) -> None:
    extra = ["-x", f"service={service}"] if service else []  # none: doveadm's own default
    ok = auth_test(release, rig, *extra, "Alice@Example.org", "alice-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr + rig.daemons.output()[-2000:]
    assert "user=alice@example.org" in ok.stdout
    bad = auth_test(release, rig, *extra, "alice@example.org", "wrong")
    assert bad.returncode == 77, bad.stdout + bad.stderr
    assert "internal" not in (bad.stdout + bad.stderr).lower()


def test_master_user(release: Release, rig: Rig) -> None:
    ok = auth_test(release, rig, "-x", "service=imap", "-M", "admin@example.org",
                   "alice@example.org", "master-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "user=alice@example.org" in ok.stdout


def test_no_protocol_error_was_logged(release: Release, rig: Rig) -> None:
    auth_test(release, rig, "alice@example.org", "alice-pw")
    assert "dropping auth-client connection" not in rig.daemons.output()
