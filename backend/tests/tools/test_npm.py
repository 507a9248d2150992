"""glisk.npm: the pinned Node.js packages install once into a private cache, and nowhere else."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from glisk import npm


def test_the_pinned_packages_install_once_and_anvil_runs() -> None:
    modules = npm.node_modules()
    anvil = modules / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
    out = subprocess.run([anvil, "--version"], capture_output=True, text=True, check=True)
    assert "anvil Version: 1.7.1" in out.stdout
    assert npm.node_modules() == modules  # found again by the lock file's hash


def test_a_cache_other_accounts_may_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("GLISK_NPM_CACHE", str(shared))
    with pytest.raises(npm.NodeToolsError, match="writable by other accounts"):
        npm.node_modules()
    assert os.listdir(shared) == []


def test_a_cache_that_is_a_link_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(elsewhere)
    monkeypatch.setenv("GLISK_NPM_CACHE", str(link))
    with pytest.raises(npm.NodeToolsError, match="not a plain directory"):
        npm.node_modules()
    assert os.listdir(elsewhere) == []


def test_a_missing_npm_is_one_line_naming_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLISK_NPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    with pytest.raises(npm.NodeToolsError) as caught:
        npm.node_modules()
    assert "apt-get install nodejs npm" in str(caught.value)
    assert "\n" not in str(caught.value)
