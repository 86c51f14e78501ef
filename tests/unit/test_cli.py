"""The mailplugins command (mailplugins.cli.main): configuration, exit codes, usage errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from mailplugins.cli import main


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f"database:\n  url: sqlite:///{tmp_path}/m.db\n")
    out = io.StringIO()
    assert main(["--config", str(good), "check-config"], io.StringIO(), out, io.StringIO()) == 0
    assert "OK" in out.getvalue()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailplugins.cli", *args],
                          capture_output=True, text=True, env=env, check=False)


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"database:\n  url: sqlite:///{tmp_path}/m.db\n"
                   "policyd:\n  listen: tcp:1\n  mynetworks: [127.0.0.0/8, 10.0.0.300/8]\n")
    result = run_cli("--config", str(bad), "check-config")
    assert result.returncode == 2
    assert result.stderr == (
        'mailplugins: policyd.mynetworks[1]: not an IP network: "10.0.0.300/8"\n')
    assert result.stdout == ""


def test_config_from_environment_and_missing_file(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, MAILPLUGINS_CONFIG=str(tmp_path / "absent.yaml"))
    result = run_cli("check-config", env=env)
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_missing_schema_is_explained(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path}/m.db\n")
    result = run_cli("--config", str(config), "domain", "list")
    assert result.returncode == 1
    assert result.stderr == (
        "mailplugins: database error: the schema is missing: run 'mailplugins db upgrade'\n")


def test_password_never_on_argv() -> None:
    result = run_cli("user", "add", "--help")
    assert "--password-stdin" in result.stdout
    assert "--password " not in result.stdout
