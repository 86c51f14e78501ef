"""Our hashes pass `doveadm pw -t`, and hashes from `doveadm pw -s` verify with our code."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from mailplugins.config.core import parse_passwords
from mailplugins.hashing import check_password, hash_password

pytestmark = pytest.mark.e2e
PASSWORD = "Pässwörd with spaces & symbols!"
DEFAULT = parse_passwords(None)


def doveadm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["doveadm", *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "config",
    [
        DEFAULT,
        dataclasses.replace(DEFAULT, scheme="BLF-CRYPT", bcrypt_cost=5),
        dataclasses.replace(DEFAULT, scheme="SHA512-CRYPT"),
    ],
    ids=["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT"],
)
def test_our_hashes_pass_doveadm(config: object) -> None:
    stored = hash_password(PASSWORD, config)  # type: ignore[arg-type]
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
def test_doveadm_hashes_verify_here(scheme: str) -> None:
    made = doveadm("pw", "-s", scheme, "-p", PASSWORD)
    assert made.returncode == 0, made.stderr
    stored = made.stdout.strip()
    assert check_password(PASSWORD, stored)
    assert not check_password(PASSWORD[:-1], stored)


def test_bcrypt_over_72_bytes_interoperates() -> None:
    long = "x" * 80
    made = doveadm("pw", "-s", "BLF-CRYPT", "-p", long).stdout.strip()
    assert check_password(long, made)
    ours = hash_password(long, dataclasses.replace(DEFAULT, scheme="BLF-CRYPT", bcrypt_cost=5))
    assert doveadm("pw", "-t", ours, "-p", long).returncode == 0
