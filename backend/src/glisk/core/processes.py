"""Child processes glisk starts and must not leave behind: the one home of the parent-death
signal and of the stop sequence.

- ``die_with_parent(signum)``: a ``preexec_fn`` that asks the kernel to send ``signum`` to the
  child when the thread that started it exits (PR_SET_PDEATHSIG), so even a SIGKILL of the parent
  leaves no orphan. Start such children from the main thread (or one that outlives them).
- ``signal_on_parent_death(signum, parent)``: the same request from inside a process that was
  not started with that ``preexec_fn`` (an API process uvicorn starts).
- ``stop(process, grace)``: SIGTERM, wait, SIGKILL (or another escalation, as PostgreSQL's
  shutdown modes want). ``stop_all(processes, grace)``: the same for many at once, each given
  the whole grace period; for ``subprocess.Popen`` and ``multiprocessing`` processes alike.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

PR_SET_PDEATHSIG = 1
# How long each signal after the first is given: SIGKILL (and PostgreSQL's immediate shutdown)
# take effect at once unless the machine is in trouble.
ESCALATION_WAIT = 5.0

Process = subprocess.Popen[Any] | BaseProcess


def signal_on_parent_death(signum: int, parent: int) -> bool:
    """Ask the kernel to send ``signum`` to the calling process when its parent dies. Returns
    False if its parent is no longer ``parent`` (it died before the request took effect: the
    caller must act as the signal would have), True otherwise. Linux only (elsewhere it does
    nothing and returns True)."""
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when its parent (the caller of this function)
    dies. It runs in the child after ``user=``/``group=`` took effect (a change of uid would clear
    the request) and before exec. If the parent died before the request took effect, the child
    exits at once with status 1."""
    parent = os.getpid()

    def request() -> None:
        if not signal_on_parent_death(signum, parent):
            os._exit(1)

    return request


def stop(
    process: subprocess.Popen[Any],
    grace: float = 5.0,
    *,
    first: int = signal.SIGTERM,
    escalate: Sequence[int] = (signal.SIGKILL,),
) -> int | None:
    """Send ``first`` and wait up to ``grace`` seconds; then each signal of ``escalate`` in turn,
    waiting up to ``ESCALATION_WAIT`` after each. Reaps the process. Returns its exit code (None
    only if even SIGKILL left it running, which the kernel does not allow for long)."""
    if process.poll() is not None:
        return process.returncode
    for sig, wait in ((first, grace), *((sig, ESCALATION_WAIT) for sig in escalate)):
        try:
            process.send_signal(sig)  # nothing is sent once it has been reaped
            return process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return process.poll()


def stop_all(processes: Sequence[Process], grace: float) -> None:
    """SIGTERM every process still running (a worker drains), then wait until each has exited or
    ``grace`` seconds have passed since the signals went out; SIGKILL the late and reap them."""
    for process in processes:
        if _exit_code(process) is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        if not _exited_within(process, max(0.1, deadline - time.monotonic())):
            process.kill()
            _exited_within(process, ESCALATION_WAIT)


def _exit_code(process: Process) -> int | None:
    if isinstance(process, subprocess.Popen):
        return process.poll()
    return process.exitcode


def _exited_within(process: Process, seconds: float) -> bool:
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    process.join(seconds)
    return process.exitcode is not None
