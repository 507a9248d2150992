"""Another local account, for the tests that check what one can and cannot reach: a throwaway
system account made with ``useradd`` (root only) and removed afterwards, and commands run as it
with ``runuser``. Without root there is no second account to be: those tests skip."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

# A Python the throwaway account can run: the suite's own may live in a directory only root can
# enter (a clone in mktemp -d), the system's is world-readable.
SYSTEM_PYTHON = Path("/usr/bin/python3")


@contextmanager
def throwaway_account() -> Iterator[pwd.struct_passwd]:
    """A new system account with no home and no login shell, deleted when the block ends.
    Skips the test when not root (or when useradd is missing)."""
    if os.geteuid() != 0:
        pytest.skip("a second local account can only be made and used as root")
    if shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("useradd and runuser are needed to act as another local account")
    name = f"glisk-t{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    account = pwd.getpwnam(name)
    try:
        yield account
    finally:
        _kill_processes_of(account.pw_uid)  # userdel refuses an account that still runs one
        subprocess.run(["userdel", name], check=True, capture_output=True, timeout=60)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL, by pid, every process the throwaway account ``uid`` still runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def as_account(account: pwd.struct_passwd | str, args: Sequence[str]) -> list[str]:
    """The command line that runs ``args`` as ``account`` (runuser: no password, no PAM
    session), in a clean environment."""
    name = account if isinstance(account, str) else account.pw_name
    return ["runuser", "-u", name, "--", "env", "-i", "PATH=/usr/bin:/bin", *args]


def run_as(
    account: pwd.struct_passwd | str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as ``account`` from /, its output captured; never raises on failure."""
    return subprocess.run(
        as_account(account, args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        check=False,
    )
