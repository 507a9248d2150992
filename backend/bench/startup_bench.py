"""Start-up costs: importing a worker (with and without bytecode caches), the embedded PostgreSQL,
the migrations, ``glisk serve`` until its first 200 from /health, and the test suite.

    cd backend && uv run python -m bench.startup_bench [--skip-suite] [--imports-only]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench.harness import database, quiet_env, say, start_server, stop_server, table, workdir
from glisk import migrations
from glisk.embedded_pg import EmbeddedPostgres, free_port
from glisk.testing import throwaway_database

# The web application is the reference: a worker process should import less.
IMPORTED = ("glisk.workers.worker", "glisk.workers.noop", "glisk.workers.command", "glisk.app")
SUITE = ["uv", "run", "pytest", "-q", "-p", "no:cacheprovider"]


def timed(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def importtime(module: str, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """``python -X importtime -c 'import M'``: M's cumulative import ms, the process's wall ms,
    and the self ms of each top-level package."""
    command = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
    started = time.perf_counter()
    lines = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stderr
    wall, total, packages = 1000 * (time.perf_counter() - started), 0.0, defaultdict(float)
    for fields in (line.removeprefix("import time:").split("|") for line in lines.splitlines()):
        if len(fields) == 3 and fields[0].strip().isdigit():
            name = fields[2].strip()
            packages[name.split(".")[0]] += int(fields[0]) / 1000
            total = int(fields[1]) / 1000 if name == module else total
    return total, wall, packages


def imports(warm: dict[str, str], repeat: int) -> list[list[object]]:
    """With caches: ``warm``, whose PYTHONPYCACHEPREFIX an untimed first import filled. Without:
    nothing read or written (PYTHONDONTWRITEBYTECODE=1, an empty PYTHONPYCACHEPREFIX)."""
    rows: list[list[object]] = []
    for module in IMPORTED:
        importtime(module, warm)
        for cached in (True, False):
            runs = []
            for _ in range(repeat):
                empty = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": tempfile.mkdtemp()}
                runs.append(importtime(module, warm if cached else warm | empty))
                shutil.rmtree(empty["PYTHONPYCACHEPREFIX"])
            runs.sort(key=lambda run: run[0])
            total, wall, packages = runs[len(runs) // 2]
            top = sorted(packages.items(), key=lambda item: -item[1])[:6]
            spread = f"{total:.0f} ({runs[0][0]:.0f}-{runs[-1][0]:.0f})"
            top_ms = ", ".join(f"{name} {ms:.0f}" for name, ms in top)
            rows.append([f"`{module}`", "yes" if cached else "no", spread, f"{wall:.0f}", top_ms])
    return rows


def startup(base: Path, warm: dict[str, str], repeat: int) -> dict[str, list[float]]:
    """Each step ``repeat`` times, interleaved so that drift hits every step alike, after an
    untimed round (the PostgreSQL binaries in the page cache, the bytecode caches written)."""
    times: dict[str, list[float]] = defaultdict(list)
    alembic = [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"]
    serve = [sys.executable, "-m", "glisk.cli", "serve", "--host", "127.0.0.1", "--port"]
    with database() as (server, _):
        for i in range(-1, repeat):
            record = times if i >= 0 else defaultdict(list)
            for label, ephemeral in (("fsync on", False), ("fsync off", True)):
                data = base / f"pg-{i}-{ephemeral}" / "data"
                pg = EmbeddedPostgres(data, free_port(), ephemeral=ephemeral)
                record[f"embedded PostgreSQL cold start, {label}"].append(timed(pg.start))
                record[f"embedded PostgreSQL fast stop, {label}"].append(timed(pg.stop))
                pg = EmbeddedPostgres(data, free_port(), ephemeral=ephemeral)
                record[f"embedded PostgreSQL warm start, {label}"].append(timed(pg.start))
                pg.stop()
            with throwaway_database(server.url) as url:
                step = "alembic upgrade head, empty database, in process"
                record[step].append(timed(migrations.upgrade, url))
            with throwaway_database(server.url) as url:
                run = {"env": warm | {"DATABASE_URL": url}, "capture_output": True, "check": True}
                step = "`alembic upgrade head`, empty database, new process"
                record[step].append(timed(subprocess.run, alembic, **run))
            for label in ("fresh data dir", "existing data"):
                port, data = free_port(), str(base / f"serve-{i}" / "pgdata")
                env = warm | {"GLISK_PG_DATA": data, "GLISK_PG_PORT": str(free_port())}
                process, seconds = start_server([*serve, str(port)], env, port, base / "log")
                record[f"`glisk serve` to the first 200 from /health, {label}"].append(seconds)
                record["`glisk serve` SIGTERM to exit (it stops its PostgreSQL)"].append(
                    stop_server(process)
                )
                if process.returncode:
                    raise RuntimeError(f"glisk serve exited with {process.returncode} on SIGTERM")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_bench")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step")
    parser.add_argument("--skip-suite", action="store_true", help="not the test suite")
    parser.add_argument("--imports-only", action="store_true")
    args = parser.parse_args()
    with workdir() as base:
        warm = quiet_env()
        rows = imports(warm, args.repeat)
        print(f"Importing a module, ms: import (median, min-max of {args.repeat}), the process's")
        print("wall time, self time of the largest top-level packages\n")
        print(table(["module", "bytecode caches", "import ms", "process ms", "top, ms"], rows))
        if args.imports_only:
            return
        times = startup(base, warm, args.repeat)
    summary = ""
    if not args.skip_suite:
        say(f"test suite: {' '.join(SUITE)}")
        started = time.perf_counter()
        suite = subprocess.run(SUITE, capture_output=True, text=True, check=False)
        times[f"full test suite, `{' '.join(SUITE)}`, once"].append(time.perf_counter() - started)
        summary = f"\nTest suite: {suite.stdout.strip().splitlines()[-1]} (exit {suite.returncode})"
    rows = [
        [step, *(f"{f(t):.2f}" for f in (statistics.median, min, max))] for step, t in times.items()
    ]
    print(f"\nStart-up, seconds: median, min, max of {args.repeat}\n")
    print(table(["step", "median", "min", "max"], rows) + summary)


if __name__ == "__main__":
    main()
