"""Packaging: the PEP 621 metadata in pyproject.toml is the only metadata, and it says what ships.

The venv stamp in scripts/lib.sh hashes pyproject.toml alone, so a second metadata file
(setup.cfg, setup.py) would change the install without rebuilding the venv.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        table: dict[str, object] = tomllib.load(handle)["project"]
    return table


def test_pyproject_is_the_only_metadata() -> None:
    assert not (ROOT / "setup.cfg").exists()
    assert not (ROOT / "setup.py").exists()
    assert project()["name"] == "mailplugins"


def test_license_file_matches_the_declared_license() -> None:
    assert project()["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_installed_distribution_has_the_daemons_and_the_command() -> None:
    distribution = importlib.metadata.distribution("mailplugins")
    daemons = {entry.name for entry in distribution.entry_points if entry.group == "mailplugins.daemons"}
    scripts = {entry.name for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert daemons == {"policyd", "authd", "deliver", "milterd"}
    assert "mailplugins" in scripts
    assert distribution.metadata["License-Expression"] == "MIT"


def test_stamp_hashes_the_metadata_file() -> None:
    lib = (ROOT / "scripts" / "lib.sh").read_text()
    assert "sha256sum pyproject.toml" in lib
