"""The Node.js packages glisk runs, installed on first use into a private cache.

``package.json`` and ``package-lock.json`` beside this module pin them: anvil (a real EVM node, for
tests, CI and ``glisk demo``), solc and OpenZeppelin's contracts (the GLISK contract's compiler and
base), and Helia's UnixFS importer (CIDs computed by IPFS's own code). Like the embedded
PostgreSQL, no setting is needed: the first caller runs ``npm ci`` once, later callers find the
installation by the lock file's hash.

Contract:
- ``node_modules()`` returns the installed ``node_modules`` directory, installing it first if
  needed; raises ``NodeToolsError`` (an OperatorError, one line) when Node.js or npm is missing or
  the install fails.
- The cache is ``$GLISK_NPM_CACHE`` or ``$XDG_CACHE_HOME/glisk`` (default ``~/.cache/glisk``),
  one directory per lock file (``npm-<hash>``). Every directory on the way must belong to the
  current user and be writable by no one else: as root, glisk never runs a program from, or
  writes into, a path another account controls.
- Installs are atomic (staged in a temporary directory, then renamed into place) and serialised
  across processes by a lock file, so concurrent test processes install once.
- ``npm ci --ignore-scripts``: no package's install script runs. anvil's binary comes from its
  platform package (an optional dependency), which needs no script.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glisk.errors import OperatorError

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "package.json"
LOCK = HERE / "package-lock.json"
# Written last into a finished installation: the hash of the lock file it was installed from.
STAMP = ".glisk-installed"
INSTALL_TIMEOUT = 600.0


class NodeToolsError(OperatorError):
    """Node.js or npm is missing, or the pinned packages could not be installed."""


def lock_hash() -> str:
    digest = hashlib.sha256(MANIFEST.read_bytes() + b"\0" + LOCK.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """Where installations live (not created here)."""
    if explicit := os.environ.get("GLISK_NPM_CACHE"):
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().absolute() / "glisk"


def _check_private(path: Path) -> None:
    """Refuse a directory that is a link, belongs to another account or that others may write."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NodeToolsError(
            f"{path} is not a plain directory: refusing to use it for npm packages"
        )
    if info.st_uid != os.geteuid():
        raise NodeToolsError(f"{path} belongs to another account: refusing to use it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NodeToolsError(f"{path} is writable by other accounts: refusing to use it")


def _private_dir(path: Path) -> Path:
    """``path`` created (0700) if missing, then checked like ``_check_private``. Parents that
    exist already are only required not to be links to elsewhere for the last component."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path)
    return path


def _npm() -> str:
    npm = shutil.which("npm")
    node = shutil.which("node")
    if npm is None or node is None:
        raise NodeToolsError(
            "Node.js and npm are needed for anvil, solc and the UnixFS importer: install them "
            "(Debian/Ubuntu: apt-get install nodejs npm) and run the command again"
        )
    return npm


@contextmanager
def _install_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / "npm.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _installed(target: Path, digest: str) -> bool:
    stamp = target / STAMP
    try:
        _check_private(target)
        return stamp.read_text().strip() == digest and not stamp.is_symlink()
    except (OSError, NodeToolsError):
        return False


def _install(root: Path, target: Path, digest: str) -> None:
    npm = _npm()
    staging = Path(tempfile.mkdtemp(prefix=f".npm-{digest}-", dir=root))
    try:
        shutil.copyfile(MANIFEST, staging / "package.json")
        shutil.copyfile(LOCK, staging / "package-lock.json")
        try:
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeToolsError(f"npm ci did not finish within {INSTALL_TIMEOUT:.0f} s") from exc
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
            raise NodeToolsError(f"npm ci failed (exit {result.returncode}): {last[0]}")
        (staging / STAMP).write_text(digest + "\n")
        if target.exists() or target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)  # a broken or stale install of ours
            if target.is_symlink():
                target.unlink()
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def install_dir() -> Path:
    """The directory holding ``node_modules`` for the pinned packages, installed if needed."""
    root = _private_dir(cache_root())
    digest = lock_hash()
    target = root / f"npm-{digest}"
    if _installed(target, digest):
        return target
    with _install_lock(root):
        if not _installed(target, digest):  # another process may have installed meanwhile
            _install(root, target, digest)
    return target


def node_modules() -> Path:
    """The pinned packages' ``node_modules`` directory (installed on first use)."""
    return install_dir() / "node_modules"


def node() -> str:
    """The ``node`` program; NodeToolsError naming what to install when it is missing."""
    _npm()
    return shutil.which("node") or "node"
