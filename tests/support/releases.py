"""Dovecot 2.3 (this machine) and 2.4 (the Debian 13 root) side by side, for the e2e modules.

A stop-gap until the rig's ``release`` fixture lands: Debian 13's ``doveconf``/``dovecot``/
``doveadm`` run chrooted into the root that ``scripts/test`` builds, inside a private mount
namespace (``unshare -m``) where the host's ``/tmp`` (every test's scratch directory, sockets
and Maildirs) is bind-mounted at the same path and ``/proc`` is mounted. The namespace dies with
its last process, so nothing is left mounted when a test fails, and other instances never see
the mounts. The loopback network is shared, so TCP needs nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from devrig.instances import Dovecot, port_open, wait_until

#: Where scripts/test keeps the Debian 13 root (Postfix 3.10, Dovecot 2.4).
TRIXIE_ROOT = Path(os.environ.get("MAILPLUGINS_TRIXIE_ROOT",
                                  "/var/cache/mailplugins-test/trixie-prebuilt"))
RELEASES = ("2.3", "2.4")


def have_trixie() -> bool:
    return (TRIXIE_ROOT / "usr" / "sbin" / "dovecot").exists()


def needs_release(release: str) -> None:
    """Skip (visibly) a 2.4 case when the Debian 13 root has not been built."""
    if release == "2.4" and not have_trixie():
        pytest.skip(f"no Debian 13 root at {TRIXIE_ROOT} (scripts/test builds it)")


def in_root(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run in the Debian 13 root with /tmp and /proc visible (see the module docstring)."""
    root = shlex.quote(str(TRIXIE_ROOT))
    script = (f"mount --bind /tmp {root}/tmp && mount -t proc proc {root}/proc && "
              f'exec chroot {root} "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


def command(release: str, cmd: Sequence[str]) -> list[str]:
    return in_root(cmd) if release == "2.4" else list(cmd)


def run_tool(release: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(release, cmd), capture_output=True, text=True, timeout=120,
                          check=check)


def tool_dir(release: str, directory: Path) -> Path:
    """A directory of ``doveconf``/``dovecot``/``doveadm``/``postconf`` wrappers running ``release``'s
    tools, to put first in PATH for a program that runs them itself (``mailplugins doctor``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("doveconf", "dovecot", "doveadm", "postconf"):
        # Absolute paths: the wrapper directory comes first in PATH, in and out of the root.
        if release == "2.4":
            where = next(f"/usr/{d}/{tool}" for d in ("sbin", "bin")
                         if (TRIXIE_ROOT / "usr" / d / tool).exists())
        else:
            where = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") or tool
        wrapper = directory / tool
        wrapper.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(part) for part in
                                                           command(release, [where])) + ' "$@"\n')
        wrapper.chmod(0o755)
    return directory


class Dovecot24(Dovecot):
    """A private Dovecot 2.4 instance in the Debian 13 root: the same API as the 2.3 one."""

    def write(self) -> None:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lmtp = ""
        if self.lmtp_port:
            lmtp = (f"service lmtp {{\n  inet_listener lmtp {{\n    listen = 127.0.0.1\n"
                    f"    port = {self.lmtp_port}\n  }}\n}}\n")
        text = f"""dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
instance_name = mp-{uuid.uuid4().hex[:8]}
base_dir = {self.base_dir}
state_dir = {self.root}/state
log_path = {self.log_path}
protocols = {' '.join(self.protocols)}
listen = 127.0.0.1
ssl = no
auth_allow_cleartext = yes
auth_mechanisms = plain login
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{lmtp}{self.conf}
"""
        self.config_path.write_text(text)

    def start(self) -> Dovecot24:
        self.write()
        check = run_tool("2.4", "doveconf", "-c", str(self.config_path), "-n")
        if check.returncode != 0:
            raise RuntimeError(f"doveconf 2.4: {check.stderr}")
        with open(self.root / "dovecot.stderr", "ab") as out:
            result = subprocess.run(in_root(["dovecot", "-c", str(self.config_path)]),
                                    stdout=out, stderr=out, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"dovecot exited {result.returncode}: "
                               f"{(self.root / 'dovecot.stderr').read_text()}{self.log_text()}")
        if "imap" in self.protocols:
            wait_until(lambda: port_open(self.imap_port), what=f"dovecot 2.4 imap on {self.imap_port}")
        if self.lmtp_port:
            wait_until(lambda: port_open(self.lmtp_port or 0), what="dovecot 2.4 lmtp")
        return self

    def doveadm(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run_tool("2.4", "doveadm", "-c", str(self.config_path), *args, check=check)


def make_dovecot(release: str, root: str | Path, **kwargs: Any) -> Dovecot:
    """A private Dovecot of ``release`` (2.3: this machine's, 2.4: the Debian 13 root's)."""
    return Dovecot24(root, **kwargs) if release == "2.4" else Dovecot(root, **kwargs)
