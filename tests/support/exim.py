"""Exim 4 as an LMTP client: the stock Debian binary, unpacked (not installed) by scripts/lib.sh.

``scripts/test`` (``ensure_exim``) unpacks exim4-daemon-heavy and the libraries the host lacks
under ``$MAILPLUGINS_RIG_CACHE/exim`` (installing it with apt would remove Postfix). Exim looks
up its compiled-in user ``Debian-exim`` before it reads any configuration, so each run happens
in a private mount namespace (``unshare --mount``, gone when Exim exits) where copies of
``/etc/passwd`` and ``/etc/group`` with that user (as ``nobody``) are bind-mounted over the
originals. Nothing outside the namespace sees them. ``exim_path`` and ``LD_LIBRARY_PATH``
(kept through Exim's environment purge) let it re-execute itself from the unpacked tree.

:meth:`Exim.send` submits one message (``-odi``: delivered before the command returns) through
a ``manualroute`` router and an ``smtp`` transport with ``protocol = lmtp`` to a TCP port, and
returns what Exim's main log says happened to each recipient.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("MAILPLUGINS_RIG_CACHE", "/var/cache/mailplugins-test")) / "exim"
NOBODY = 65534

_ENTER = r"""
here=$1; shift
mount --bind "$here/passwd" /etc/passwd && mount --bind "$here/group" /etc/group || exit 125
exec "$@"
"""

CONFIG = """\
exim_path = {binary}
keep_environment = LD_LIBRARY_PATH
exim_user = nobody
exim_group = nogroup
spool_directory = {spool}
log_file_path = {log}/%slog
primary_hostname = exim.test
qualify_domain = origin.test
never_users =
trusted_users = root
begin routers
to_lmtp:
  driver = manualroute
  senders = ! :
  route_list = * 127.0.0.1
  transport = lmtp_tcp
  self = send
begin transports
lmtp_tcp:
  driver = smtp
  protocol = lmtp
  port = {port}
  allow_localhost
  hosts_try_fastopen =
"""

#: A recipient's line in Exim's main log: "=>" delivered ("->" for more recipients of the
#: same delivery), "**" failed, "==" deferred.
_RESULT = re.compile(r"^\S+ \S+ (?:\[\d+\] )?(\S+) (=>|->|\*\*|==) (\S+)(.*)$", re.M)


@dataclass(frozen=True)
class Result:
    """What Exim logged for one recipient: the marker and the LMTP reply code, if any."""

    marker: str
    code: int | None


class Exim:
    """One Exim spool and configuration in ``root`` (a scratch directory)."""

    def __init__(self, root: Path, cache: Path = CACHE) -> None:
        self.binary = cache / "root" / "usr" / "sbin" / "exim4"
        if not self.binary.exists():
            raise RuntimeError(f"no Exim at {self.binary}: run scripts/test "
                               "(or: . scripts/lib.sh && ensure_exim)")
        self.libraries = ":".join(
            str(cache / "root" / sub) for sub in ("usr/lib/x86_64-linux-gnu", "usr/lib"))
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("spool", "log"):
            (root / name).mkdir(exist_ok=True)
            os.chown(root / name, NOBODY, NOBODY)
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        exim_user = f"Debian-exim:x:{NOBODY}:{NOBODY}::/nonexistent:/usr/sbin/nologin\n"
        (root / "passwd").write_text(passwd + exim_user)
        (root / "group").write_text(group + f"Debian-exim:x:{NOBODY}:\n")

    def _log(self) -> str:
        try:
            return (self.root / "log" / "mainlog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send(self, port: int, sender: str, recipients: list[str], message: bytes) -> dict[str, Result]:
        """Submit ``message`` and deliver it at once over LMTP to 127.0.0.1:``port``; the
        result for each of ``recipients`` (by address, lower-cased as Exim logs it)."""
        config = self.root / f"exim-{port}.conf"
        config.write_text(CONFIG.format(binary=self.binary, spool=self.root / "spool",
                                        log=self.root / "log", port=port))
        before = len(self._log())
        command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER, "sh",
                   str(self.root), "env", f"LD_LIBRARY_PATH={self.libraries}", str(self.binary),
                   "-C", str(config), "-odi", "-f", sender, "--", *recipients]
        done = subprocess.run(command, input=message, capture_output=True, timeout=60, check=False)
        log = self._log()[before:]
        wanted = {rcpt.lower() for rcpt in recipients}
        results = {}
        for match in _RESULT.finditer(log):
            address = match.group(3).lower()
            if address not in wanted or address in results:
                continue  # e.g. the bounce Exim sends the sender (the null sender is refused)
            code = re.search(r"\b([245]\d\d)[ -]", match.group(4))
            marker = "=>" if match.group(2) == "->" else match.group(2)
            results[address] = Result(marker, int(code.group(1)) if code else None)
        if set(results) != wanted:
            raise RuntimeError(f"Exim logged no delivery (exit {done.returncode}): "
                               f"{done.stderr.decode(errors='replace')}{log}")
        return results
