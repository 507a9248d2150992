"""Small helpers shared by the benchmark scripts (latency_bench, startup_bench).

Percentiles come from bench.http_bench (nearest-rank), so every benchmark reports them the same way.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.http_bench import _percentile
from glisk.embedded_pg import service_user

__all__ = ["Spread", "load_line", "markdown_table", "percentile", "workdir"]


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
