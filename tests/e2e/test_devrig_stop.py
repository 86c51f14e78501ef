"""The rig stops a stock Postfix or Dovecot even when its own stop command does not take."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from devrig.instances import Dovecot, Postfix, dovecot_static_auth, short_tempdir
from devrig.release import host


def test_a_dovecot_left_running_by_doveadm_stop_is_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/run's Ctrl-C once left Dovecot's master running after ``doveadm stop`` (its log
    showed no shutdown); the rig then kills it rather than leave it and its ports behind."""
    release = host()
    dovecot = Dovecot(tmp_path / "dc", release=release,
                      conf=dovecot_static_auth(release, "pw", uid="nobody", gid="nogroup",
                                               home=str(tmp_path / "home")))
    dovecot.start()
    pid = int((dovecot.base_dir / "master.pid").read_text())
    monkeypatch.setattr(dovecot, "doveadm", lambda *args, **kwargs: None)  # did not take
    monkeypatch.setattr(dovecot, "stop_timeout", 0.5)
    dovecot.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_postfix_left_running_by_postfix_stop_is_killed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for Postfix's master, which shares the rig's way of stopping."""
    root = short_tempdir("mp-stop-")  # Postfix's socket paths must be short
    try:
        postfix = Postfix(root, release=host())
        postfix.start()
        pid = int((postfix.queue_dir / "pid" / "master.pid").read_text())
        real = postfix._postfix

        def stop_does_not_take(*args: str, **kwargs: Any) -> Any:
            return None if args == ("stop",) else real(*args, **kwargs)

        monkeypatch.setattr(postfix, "_postfix", stop_does_not_take)
        monkeypatch.setattr(postfix, "stop_timeout", 0.5)
        postfix.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
