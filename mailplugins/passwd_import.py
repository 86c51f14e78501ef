# -*- test-case-name: tests.unit.test_passwd_import -*-
"""Reading Dovecot passwd-files for ``mailplugins user import``: one line in, one user out.

Moved out of ``cli.py`` as it was; the command itself (``App.cmd_user_import``) stays there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailplugins.hashing import HashError, check_password

#: Schemes ``check_password`` can verify (the part before any ``.ENCODING`` suffix).
IMPORTABLE_SCHEMES = frozenset({
    "ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "CRYPT",
    "DES-CRYPT", "SSHA512", "SSHA256", "SSHA", "SHA", "PLAIN", "PLAIN-MD5", "LDAP-MD5",
})
_CRYPT_PREFIXES = (("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"), ("$1$", "MD5-CRYPT"),
                   ("$2y$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"), ("$2a$", "BLF-CRYPT"))
_CRYPT_FORMATS = ("$6$", "$5$", "$1$", "$2y$", "$2b$", "$2a$", "$argon2id$", "$argon2i$")
_QUOTA_UNITS = {"": 1024, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class PasswdEntry:
    """One user of a Dovecot passwd-file, ready for the store."""

    address: str
    password: str
    quota_bytes: int


def _passwd_quota(extra: Sequence[str]) -> int:
    """``userdb_quota_rule=*:bytes=N`` or ``*:storage=N[kMGT]`` (storage counts kilobytes)."""
    for field_text in extra:
        name, _, value = field_text.partition("=")
        if name not in ("userdb_quota_rule", "quota_rule") or not value.startswith("*:"):
            continue
        kind, _, amount = value[2:].partition("=")
        match = re.fullmatch(r"(\d+)\s*([bBkKmMgGtT]?)", amount.strip())
        if kind not in ("bytes", "storage") or not match:
            raise ValueError(f"unreadable quota rule {value!r}")
        unit = match.group(2).upper()
        if kind == "bytes" and not unit:
            unit = "B"
        return int(match.group(1)) * _QUOTA_UNITS[unit]
    return 0


def never_logs_in(stored: str) -> str | None:
    """Why an account with this stored hash can never log in through authd, or None.

    authd refuses empty passwords (docs/authd.md), so a hash of the empty string locks the
    account as surely as a hash nobody can check. Costs one hash check.
    """
    try:
        if check_password("", stored):
            return "its password is empty, and authd refuses empty passwords"
    except HashError as exc:
        return f"its stored hash cannot be checked ({exc})"
    return None


def parse_passwd_line(line: str, default_domain: str | None = None) -> PasswdEntry | None:
    """A Dovecot passwd-file line (``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``).

    Returns None for blank and comment lines; raises ValueError (one line, never the hash)
    for lines that cannot be imported as they are.
    """
    text = line.rstrip("\r\n")
    if not text.strip() or text.lstrip().startswith("#"):
        return None
    fields = text.split(":")
    if len(fields) < 2 or not fields[0] or not fields[1]:
        raise ValueError("expected user:password[:uid:gid:gecos:home:shell:extra]")
    user, password = fields[0].strip(), fields[1].strip()
    extra = ":".join(fields[7:]).split()  # extra fields may contain colons (quota rules)
    if any(f in ("nopassword", "nologin", "nodelay") or f.startswith("proxy") for f in extra):
        raise ValueError(f"{user}: extra fields {' '.join(extra)!r} have no equivalent here")
    if "@" not in user:
        if not default_domain:
            raise ValueError(f"{user}: not an address (use --domain)")
        user = f"{user}@{default_domain}"
    if not password.startswith("{"):
        scheme = next((s for prefix, s in _CRYPT_PREFIXES if password.startswith(prefix)), "CRYPT")
        password = "{" + scheme + "}" + password
    scheme = password[1:password.find("}")].upper() if "}" in password else ""
    if scheme.partition(".")[0] not in IMPORTABLE_SCHEMES:
        raise ValueError(f"{user}: unsupported password scheme {scheme or '?'}")
    value = password[password.find("}") + 1:]
    if scheme == "CRYPT" and value.startswith("$") and not value.startswith(_CRYPT_FORMATS):
        # e.g. yescrypt ($y$, Debian's /etc/shadow default): Dovecot's libc could check it,
        # authd cannot, so such a user could log in to IMAP but never authenticate to SMTP.
        raise ValueError(f"{user}: crypt format {value.split('$')[1]!r} cannot be verified here "
                         "(the user needs a new password)")
    return PasswdEntry(user, password, _passwd_quota(extra))
