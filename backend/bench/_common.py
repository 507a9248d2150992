"""Helpers shared by the benchmark scripts: tables, percentiles (nearest-rank, from
bench.http_bench), temporary directories, and worker processes started together on a barrier.
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.http_bench import _percentile
from glisk.embedded_pg import service_user

__all__ = [
    "Cell",
    "Outcome",
    "Ready",
    "Spread",
    "load_line",
    "markdown_table",
    "percentile",
    "run_processes",
    "workdir",
]


def percentile(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile of ``values`` (any order)."""
    return _percentile(sorted(values), percent)


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a few repetitions."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub-flavoured table; ``align`` has one character per column, 'l' or 'r' (default:
    first column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, deleted afterwards. As root the embedded PostgreSQL runs as an
    unprivileged user, so the directory is made traversable (0755) for data directories inside."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if service_user() is not None:
            path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- processes started together -----------------------------------------------------------------

Ready = Callable[[], float]
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Outcome:
    """What one process moved, from the common start to its end, and the CPU it spent meanwhile
    (user + sys of the whole process: its event loop, psycopg, the handlers)."""

    moved: int
    seconds: float
    cpu_seconds: float


@dataclass(frozen=True)
class Cell:
    """The processes of one measurement. Raises when they moved nothing: a 0 is never a figure."""

    outcomes: tuple[Outcome, ...]

    def __post_init__(self) -> None:
        if self.moved <= 0:
            raise RuntimeError(f"a cell measured nothing: {self.outcomes}")

    @property
    def moved(self) -> int:
        return sum(o.moved for o in self.outcomes)

    @property
    def seconds(self) -> float:
        return max(o.seconds for o in self.outcomes)

    @property
    def rate(self) -> float:
        return self.moved / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Worker CPU per token or job, in ms."""
        return 1000 * sum(o.cpu_seconds for o in self.outcomes) / self.moved


Target = Callable[..., "int | tuple[int, float]"]


def _process(target: Target, args: tuple[Any, ...], barrier: Any, results: Any) -> None:
    marks: list[float] = []

    def ready() -> float:
        """Wait until every process is ready; the clock starts. Returns time.monotonic()."""
        barrier.wait(READY_TIMEOUT)
        marks[:] = [time.monotonic(), time.process_time()]
        return marks[0]

    try:
        result = target(*args, ready)
        moved, finished = result if isinstance(result, tuple) else (result, time.monotonic())
        if not marks:
            raise RuntimeError(f"{target.__name__} never called ready()")
        results.put(Outcome(moved, finished - marks[0], time.process_time() - marks[1]))
    except BaseException:
        barrier.abort()
        results.put(traceback.format_exc())


def run_processes(
    context: Any, target: Target, args: Sequence[tuple[Any, ...]], limit: float = 600
) -> Cell:
    """Run ``target(*a, ready)`` for each ``a`` in its own process of the multiprocessing
    ``context``. Each target connects, calls ``ready()`` (which returns once all are ready: the
    clock starts there, not at the launch), works, and returns how much it moved, optionally with
    the ``time.monotonic()`` its work ended (else its return stops the clock; CPU is counted up to
    the return either way). Raises with the first child's traceback if one fails."""
    barrier = context.Barrier(len(args) + 1)
    results = context.Queue()
    processes = [
        context.Process(target=_process, args=(target, a, barrier, results), daemon=True)
        for a in args
    ]
    for process in processes:
        process.start()
    with suppress(threading.BrokenBarrierError):  # a child failed: its traceback follows
        barrier.wait(READY_TIMEOUT)
    outcomes: list[Outcome | str] = []
    try:
        outcomes = [results.get(timeout=limit) for _ in processes]
    except queue.Empty:
        outcomes.append(f"no result within {limit:g} s")
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
    errors = [o for o in outcomes if isinstance(o, str)]
    if errors:
        raise RuntimeError("a benchmark process failed:\n" + errors[0])
    return Cell(tuple(o for o in outcomes if isinstance(o, Outcome)))
