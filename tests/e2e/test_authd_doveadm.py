"""authd's auth-client socket against the real ``doveadm auth test`` of Dovecot 2.3 and 2.4.

Dovecot 2.4's auth clients speak ``VERSION 1 3`` and send ``protocol=`` instead of
``service=`` (plus ``final-resp-ok``); before authd understood them, ``doveadm auth test -a``
from 2.4 got "internal auth failure". Dovecot 2.3's doveadm runs on the host; 2.4's from the
Debian 13 root the rig builds (``chroot``, with /tmp bind-mounted in a private mount namespace
so authd's socket is at the same path inside).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailplugins.hashing import hash_password
from tests.e2e.releases import RELEASES, DoveadmRelease
from tests.rig import Daemons, short_tempdir

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    daemons: Daemons
    socket: Path


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = short_tempdir("mp-doveadm-")
    socket = root / "auth.sock"
    daemons = Daemons(
        root / "mp",
        {"authd": {"sasl_listen": f"unix:{socket}:mode=666", "failure_delay": "0.1s",
                   "penalty_threshold": 100}},
        ["authd"],
    )
    passwords = daemons.config.passwords
    daemons.store.add_domain("example.org")
    daemons.store.add_mailbox("alice@example.org", hash_password("alice-pw", passwords))
    daemons.store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
    daemons.store.set_master("admin@example.org", True)
    daemons.start()
    try:
        yield Rig(daemons, socket)
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=RELEASES, ids=[r.name for r in RELEASES])
def doveadm(request: pytest.FixtureRequest) -> DoveadmRelease:
    release: DoveadmRelease = request.param
    release.check()
    return release


def auth_test(
    release: DoveadmRelease, rig: Rig, *args: str
) -> subprocess.CompletedProcess[str]:
    return release.run(["doveadm", "auth", "test", "-a", str(rig.socket), *args])


def test_version_is_the_one_expected(doveadm: DoveadmRelease) -> None:
    assert doveadm.dovecot_version() == doveadm.expected_dovecot


@pytest.mark.parametrize("service", ["smtp", "imap", None])
def test_good_and_bad_password(doveadm: DoveadmRelease, rig: Rig, service: str | None) -> None:
    extra = ["-x", f"service={service}"] if service else []  # none: doveadm's own default
    ok = auth_test(doveadm, rig, *extra, "Alice@Example.org", "alice-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr + rig.daemons.output()[-2000:]
    assert "user=alice@example.org" in ok.stdout
    bad = auth_test(doveadm, rig, *extra, "alice@example.org", "wrong")
    assert bad.returncode == 77, bad.stdout + bad.stderr
    assert "internal" not in (bad.stdout + bad.stderr).lower()


def test_master_user(doveadm: DoveadmRelease, rig: Rig) -> None:
    ok = auth_test(doveadm, rig, "-x", "service=imap", "-M", "admin@example.org",
                   "alice@example.org", "master-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "user=alice@example.org" in ok.stdout


def test_no_protocol_error_was_logged(doveadm: DoveadmRelease, rig: Rig) -> None:
    auth_test(doveadm, rig, "alice@example.org", "alice-pw")
    assert "dropping auth-client connection" not in rig.daemons.output()
