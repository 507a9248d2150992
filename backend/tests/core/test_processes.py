"""glisk.core.processes: the parent-death signal and the stop sequence every launcher uses."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

from glisk.core import processes
from tests.support.processes import alive, wait_gone

# A child that takes SIGTERM (and SIGINT) for nothing: only an escalation stops it.
DEAF = (
    "import signal, sys, time\n"
    "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def _deaf_child() -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", DEAF], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"  # handlers set
    return child


def test_stop_ends_a_child_with_sigterm_when_it_listens() -> None:
    child = subprocess.Popen(["sleep", "60"])
    assert processes.stop(child, 30) == -signal.SIGTERM


def test_stop_kills_a_child_that_ignores_sigterm_once_the_grace_period_is_over() -> None:
    assert processes.stop(_deaf_child(), 0.2) == -signal.SIGKILL


def test_stop_escalates_through_the_given_signals_in_order() -> None:
    code = processes.stop(
        _deaf_child(), 0.2, first=signal.SIGINT, escalate=(signal.SIGQUIT, signal.SIGKILL)
    )
    assert code == -signal.SIGQUIT


def test_stop_of_a_child_that_already_exited_returns_its_code() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    assert processes.stop(child, 30) == 3


def test_stop_all_stops_popen_and_multiprocessing_children_and_kills_the_deaf() -> None:
    listening = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    listening.start()
    deaf = _deaf_child()
    processes.stop_all([deaf, listening], 0.5)
    assert listening.exitcode == -signal.SIGTERM
    assert deaf.returncode == -signal.SIGKILL


def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time\n"
            "from glisk.core import processes\n"
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=processes.die_with_parent())\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert alive(child)
        parent.kill()
        parent.wait()
        assert not wait_gone({child}, 30), "the child outlived its SIGKILLed parent"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
