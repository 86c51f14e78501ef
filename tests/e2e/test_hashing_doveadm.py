"""Our hashes pass `doveadm pw -t`, and hashes from `doveadm pw -s` verify with our code.

On both releases (``release``: Dovecot 2.3 on Debian 12, 2.4 on Debian 13).
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from devrig.release import Release
from mailplugins.config.core import parse_passwords
from mailplugins.hashing import check_password, hash_password

pytestmark = pytest.mark.e2e
PASSWORD = "Pässwörd with spaces & symbols!"
DEFAULT = parse_passwords(None)


@pytest.fixture
def doveadm(release: Release) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``doveadm`` of the release under test."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(release.command(["doveadm", *args]), capture_output=True, text=True,
                              check=False, timeout=120)

    return run


@pytest.mark.parametrize(
    "config",
    [
        DEFAULT,
        dataclasses.replace(DEFAULT, scheme="BLF-CRYPT", bcrypt_cost=5),
        dataclasses.replace(DEFAULT, scheme="SHA512-CRYPT"),
    ],
    ids=["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT"],
)
def test_our_hashes_pass_doveadm(config: object, doveadm: Callable[..., Any]) -> None:
    stored = hash_password(PASSWORD, config)
    ok = doveadm("pw", "-t", stored, "-p", PASSWORD)
    assert ok.returncode == 0, ok.stderr
    assert "(verified)" in ok.stdout
    bad = doveadm("pw", "-t", stored, "-p", PASSWORD + "x")
    assert bad.returncode != 0


@pytest.mark.parametrize(
    "scheme",
    ["ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SSHA512", "SSHA256",
     "SSHA", "SHA", "CRYPT", "MD5-CRYPT", "PLAIN", "PLAIN-MD5", "SSHA512.b64", "PLAIN.b64"],
)
def test_doveadm_hashes_verify_here(scheme: str, doveadm: Callable[..., Any]) -> None:
    made = doveadm("pw", "-s", scheme, "-p", PASSWORD)
    assert made.returncode == 0, made.stderr
    stored = made.stdout.strip()
    assert check_password(PASSWORD, stored)
    assert not check_password(PASSWORD[:-1], stored)


def test_bcrypt_over_72_bytes_interoperates(doveadm: Callable[..., Any]) -> None:
    long = "x" * 80
    made = doveadm("pw", "-s", "BLF-CRYPT", "-p", long).stdout.strip()
    assert check_password(long, made)
    ours = hash_password(long, dataclasses.replace(DEFAULT, scheme="BLF-CRYPT", bcrypt_cost=5))
    assert doveadm("pw", "-t", ours, "-p", long).returncode == 0
