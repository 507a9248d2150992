"""Child processes glisk starts and must not leave behind.

- ``die_with_parent(signum)``: a ``preexec_fn`` that asks the kernel to send ``signum`` to the
  child when the thread that started it exits (PR_SET_PDEATHSIG), so even a SIGKILL of the parent
  leaves no orphan. Start such children from the main thread (or one that outlives them).
- ``stop(process, timeout)``: the stop sequence every launcher uses: SIGTERM, wait, SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when its parent dies. Linux only (elsewhere it
    does nothing). If the parent died before the request took effect, the child exits at once."""
    parent = os.getpid()

    def request() -> None:
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return request


def stop(process: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL and wait. Returns the exit code (None only if
    even SIGKILL left it running, which the kernel does not allow for long)."""
    if process.poll() is not None:
        return process.returncode
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            process.send_signal(sig)
            return process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return process.poll()
