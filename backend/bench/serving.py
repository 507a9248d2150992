"""Serving: requests per second and latency of ``GET /health`` next to ``GET /bare`` (the same JSON
constant through the same app and uvicorn settings), wrk as the load generator (``http``); and
start-up costs: imports, the embedded PostgreSQL, migrations, ``glisk serve``, the tests
(``startup``)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from argparse import Namespace
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bench.harness import HTTP, database, quiet_env, say, start_server, stop_server, table, workdir
from glisk import migrations
from glisk.app import create_app
from glisk.core.config import load_settings
from glisk.embedded_pg import EmbeddedPostgres, free_port
from glisk.testing import throwaway_database

# label, clients, server LOG_LEVEL, uvicorn worker processes
CELLS = [
    ("1", 1, "WARNING", 1),
    ("32", 32, "WARNING", 1),
    ("128", 128, "WARNING", 1),
    ("32, LOG_LEVEL=INFO", 32, "INFO", 1),
    ("128, --workers 2", 128, "WARNING", 2),
]
# As glisk serve runs uvicorn; with workers > 1 each process calls the factory.
SERVE = (
    "import sys, uvicorn; uvicorn.run('bench.serving:app', factory=True, host='127.0.0.1', "
    "port=int(sys.argv[1]), workers=int(sys.argv[2]), log_config=None, lifespan='on')"
)
# wrk reports latencies in microseconds: one JSON line with what the table needs.
REPORT = """done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "us": %d, "errors": %d, "p50": %d, "p95": %d, '
    .. '"p99": %d}\\n', summary.requests, summary.duration, e.status + e.connect + e.read
    + e.write + e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def app() -> FastAPI:
    """glisk's app, settings from the environment, plus ``/bare`` (the constant /health answers)
    and ``/pid`` (which process answered, the SELECT 1 its probe sent, its CPU seconds)."""
    served = create_app()

    @served.get("/bare", include_in_schema=False)
    async def bare() -> JSONResponse:
        return JSONResponse(content={"status": "healthy"})

    @served.get("/pid", include_in_schema=False)
    async def pid() -> JSONResponse:
        sent = served.state.database_probe.sent
        return JSONResponse(content=[os.getpid(), sent, time.process_time()])

    return served


def server_counters(port: int, processes: int) -> tuple[int, float]:
    """SELECT 1 sent and CPU seconds, summed over the server's processes (asked on new
    connections until each one has answered)."""
    seen: dict[int, tuple[int, float]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < processes and time.monotonic() < deadline:
        with urllib.request.urlopen(f"{HTTP}:{port}/pid", timeout=5) as answer:  # noqa: S310
            pid, sent, cpu = json.loads(answer.read())
        seen[pid] = (sent, cpu)
    if len(seen) < processes:
        raise RuntimeError(f"{len(seen)} of {processes} server processes answered /pid")
    return sum(s for s, _ in seen.values()), sum(c for _, c in seen.values())


def wrk(url: str, clients: int, seconds: int, script: Path) -> dict[str, int]:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout=10s", "-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index('{"requests"') :].splitlines()[0])


def measure(port: int, path: str, clients: int, workers: int, args: Namespace) -> list:
    """req/s, p50, p95, p99 ms, SELECT 1 per request, server CPU (cores), errors: wrk (1
    thread) after 1 s of warm-up, closed loop."""
    wrk(f"{HTTP}:{port}{path}", clients, 1, args.script)
    selects, cpu = server_counters(port, workers)
    result = wrk(f"{HTTP}:{port}{path}", clients, args.duration, args.script)
    selects_after, cpu_after = server_counters(port, workers)
    if not result["requests"]:
        raise RuntimeError(f"wrk got no answer from {path} with {clients} clients")
    seconds, requests = result["us"] / 1e6, result["requests"]
    latency = [f"{result[p] / 1000:.2f}" for p in ("p50", "p95", "p99")]
    per_request = (selects_after - selects) / requests
    return [
        requests / seconds,
        *latency,
        per_request,
        (cpu_after - cpu) / seconds,
        result["errors"],
    ]


def http(args: Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is the load generator and is not installed: apt-get install wrk")
    rows = []
    sized = load_settings(os.devnull).embedded_max_connections(api_processes=2)
    with database(sized) as (_, url), tempfile.TemporaryDirectory() as tmp:
        args.script = Path(tmp) / "report.lua"
        args.script.write_text(REPORT)
        for label, clients, level, workers in CELLS:
            port, env = free_port(), quiet_env(DATABASE_URL=url, LOG_LEVEL=level)
            command = [sys.executable, "-c", SERVE, str(port), str(workers)]
            server, _ = start_server(command, env, port, Path(tmp) / "server.log")
            try:
                health, bare = (
                    measure(port, p, clients, workers, args) for p in ("/health", "/bare")
                )
            finally:
                stop_server(server)
            shown = [f"{health[0]:,.0f}", *health[1:4], f"{bare[0]:,.0f}", *bare[1:4]]
            ratio = f"{health[0] / bare[0]:.2f}"
            cpu = f"{health[5]:.0%} / {bare[5]:.0%}"
            rows.append([label, *shown, ratio, f"{health[4]:.2f}", cpu, health[6] + bare[6]])
    print(f"wrk, 1 thread, {args.seconds} s per cell after 1 s of warm-up; latencies in ms\n")
    headers = ["clients", "/health req/s", "p50", "p95", "p99", "/bare req/s", "p50", "p95"]
    headers += ["p99", "/health ÷ /bare", "SELECT 1 per /health", "server CPU", "errors"]
    print(table(headers, rows))


# --- startup ------------------------------------------------------------------------------

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


def steps(base: Path, warm: dict[str, str], repeat: int) -> dict[str, list[float]]:
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


def startup(args: Namespace) -> None:
    with workdir() as base:
        warm = quiet_env()
        rows = imports(warm, args.repeat)
        print(f"Importing a module, ms: import (median, min-max of {args.repeat}), the process's")
        print("wall time, self time of the largest top-level packages\n")
        print(table(["module", "bytecode caches", "import ms", "process ms", "top, ms"], rows))
        if args.imports_only:
            return
        times = steps(base, warm, args.repeat)
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
