"""The rig stops a stock Dovecot even when ``doveadm stop`` does not take."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devrig.instances import Dovecot, dovecot_static_auth
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
