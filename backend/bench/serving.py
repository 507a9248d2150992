"""Serving: ``GET /health`` next to ``GET /bare`` under wrk (``http``); the costs of starting:
imports, the embedded PostgreSQL, migrations, ``glisk serve``, the tests (``startup``)."""

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
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bench.harness import HTTP, database, quiet_env, say, start_server, stop_server, table
from glisk import migrations
from glisk.app import create_app
from glisk.core.config import load_settings
from glisk.embedded import EmbeddedPostgres, free_port
from glisk.testing import throwaway_database

# clients, the server's LOG_LEVEL, uvicorn worker processes
CELLS = [(1, "WARNING", 1), (32, "WARNING", 1), (128, "WARNING", 1), (32, "INFO", 1)]
CELLS += [(128, "WARNING", 2)]
# As glisk serve runs uvicorn; with workers > 1 each process calls the factory.
SERVE = "import sys, uvicorn; uvicorn.run('bench.serving:app', factory=True, host='127.0.0.1', "
SERVE += "port=int(sys.argv[1]), workers=int(sys.argv[2]), log_config=None, lifespan='on')"
# wrk gives latencies in microseconds; one JSON line with what the table needs.
REPORT = """done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "us": %d, "errors": %d, "p50": %d, "p95": %d, '
    .. '"p99": %d}\\n', summary.requests, summary.duration, e.status + e.connect + e.read
    + e.write + e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end"""


def app() -> FastAPI:
    """glisk's app, ``/bare`` (the constant /health answers), ``/pid`` (the process's counters)."""
    served = create_app()

    @served.get("/bare")
    async def bare() -> JSONResponse:
        return JSONResponse({"status": "healthy"})

    @served.get("/pid")
    async def pid() -> JSONResponse:
        return JSONResponse([os.getpid(), served.state.database_probe.sent, time.process_time()])

    return served


def counters(port: int, processes: int) -> tuple[int, float]:
    """SELECT 1 sent and CPU seconds, over the server's processes (until each has answered)."""
    seen: dict[int, tuple[int, float]] = {}
    for _ in range(1000):
        with urllib.request.urlopen(f"{HTTP}:{port}/pid", timeout=5) as answer:  # noqa: S310
            pid, sent, cpu = json.loads(answer.read())
        seen[pid] = (sent, cpu)
        if len(seen) == processes:
            return sum(s for s, _ in seen.values()), sum(c for _, c in seen.values())
    raise RuntimeError(f"{len(seen)} of {processes} server processes answered /pid")


def measure(port: int, path: str, clients: int, workers: int, args: Any) -> list[float]:
    """req/s, p50, p95, p99 ms, SELECT 1 per request, server cores busy, errors; after a warm-up."""
    wrk = ["wrk", "-t1", f"-c{clients}", "--timeout=10s", "-s", args.script, f"{HTTP}:{port}{path}"]
    subprocess.run([*wrk, "-d1s"], capture_output=True, check=True)
    (selects, cpu), started = counters(port, workers), time.monotonic()
    out = subprocess.run([*wrk, f"-d{args.seconds}s"], capture_output=True, text=True, check=True)
    (selects_after, cpu_after), elapsed = counters(port, workers), time.monotonic() - started
    found = json.loads(out.stdout[out.stdout.index('{"requests"') :].splitlines()[0])
    if not found["requests"]:
        raise RuntimeError(f"wrk got no answer from {path}")
    rate, per_request = found["requests"] / found["us"] * 1e6, selects_after - selects
    latency = [found[p] / 1000 for p in ("p50", "p95", "p99")]
    per_request /= found["requests"]
    return [rate, *latency, per_request, (cpu_after - cpu) / elapsed, found["errors"]]


def http(args: Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is the load generator and is not installed: apt-get install wrk")
    rows: list[list[object]] = []
    connections = load_settings(os.devnull).embedded_max_connections(api_processes=2)
    with database(connections) as (_, url), tempfile.TemporaryDirectory() as tmp:
        args.script = str(Path(tmp) / "report.lua")
        Path(args.script).write_text(REPORT)
        for clients, level, workers in CELLS:
            port, env = free_port(), quiet_env(DATABASE_URL=url, LOG_LEVEL=level)
            command = [sys.executable, "-c", SERVE, str(port), str(workers)]
            process, _ = start_server(command, env, port, Path(tmp) / "server.log")
            try:
                health = measure(port, "/health", clients, workers, args)
                bare = measure(port, "/bare", clients, workers, args)
            finally:
                stop_server(process)
            label = f"{clients}" + (f", LOG_LEVEL={level}" if level != "WARNING" else "")
            row: list[object] = [label + (f", --workers {workers}" if workers > 1 else "")]
            for cell in (health, bare):
                row += [f"{cell[0]:,.0f}", *(f"{ms:.2f}" for ms in cell[1:4])]
            row += [f"{health[0] / bare[0]:.2f}", f"{health[4]:.2f}"]
            rows.append([*row, f"{health[5]:.0%} / {bare[5]:.0%}", health[6] + bare[6]])
    print(f"wrk, 1 thread, {args.seconds} s per cell after 1 s of warm-up; latencies in ms\n")
    headers = ["clients", "/health req/s", "p50", "p95", "p99", "/bare req/s", "p50", "p95", "p99"]
    headers += ["/health ÷ /bare", "SELECT 1 per /health", "server CPU", "errors"]
    print(table(headers, rows))


# --- startup ------------------------------------------------------------------------------------

# The web application is the reference: a worker process should import less.
IMPORTED = ("glisk.workers.worker", "glisk.workers.noop", "glisk.cli.worker", "glisk.app")
SUITE = ["uv", "run", "pytest", "-q", "-p", "no:cacheprovider"]


def importtime(module: str, env: dict[str, str]) -> tuple[float, float, str]:
    """``python -X importtime``: import ms, process ms, the packages with the most self time."""
    command = [sys.executable, "-X", "importtime", "-c", "import " + module]
    started = time.perf_counter()
    lines = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stderr
    wall, total, packages = 1000 * (time.perf_counter() - started), 0.0, defaultdict(float)
    for fields in (line.removeprefix("import time:").split("|") for line in lines.splitlines()):
        if len(fields) == 3 and fields[0].strip().isdigit():
            packages[fields[2].strip().split(".")[0]] += int(fields[0]) / 1000
            total = int(fields[1]) / 1000 if fields[2].strip() == module else total
    top = sorted(packages.items(), key=lambda item: -item[1])[:6]
    return total, wall, ", ".join(f"{name} {ms:.0f}" for name, ms in top)


def timed(action: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def steps(repeat: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Each step ``repeat`` times, interleaved, after an untimed round."""
    times: dict[str, list[float]] = defaultdict(list)
    alembic = [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"]
    with database() as (server, _):
        base = Path(server.data_dir).parent
        for i in range(-1, repeat):
            record = times if i >= 0 else defaultdict(list)
            for fsync, ephemeral in (("fsync on", False), ("fsync off", True)):
                pg = EmbeddedPostgres(
                    base / f"{i}-{fsync}" / "data", free_port(), ephemeral=ephemeral
                )
                record[f"embedded PostgreSQL cold start, {fsync}"].append(timed(pg.start))
                record[f"embedded PostgreSQL fast stop, {fsync}"].append(timed(pg.stop))
                record[f"embedded PostgreSQL warm start, {fsync}"].append(timed(pg.start))
                pg.stop()
            step = "alembic upgrade head, empty database, "
            with throwaway_database(server.url) as url:
                record[step + "in process"].append(timed(migrations.upgrade, url))
            with throwaway_database(server.url) as url:
                run = {"env": env | {"DATABASE_URL": url}, "capture_output": True, "check": True}
                record[step + "new process"].append(timed(subprocess.run, alembic, **run))
            for data in ("fresh data dir", "existing data"):
                port, pg_port = free_port(), str(free_port())
                serve = [sys.executable, "-m", "glisk.cli", "serve", "--host", "127.0.0.1"]
                serve_env = env | {
                    "GLISK_PG_DATA": str(base / f"serve-{i}"),
                    "GLISK_PG_PORT": pg_port,
                }
                process, seconds = start_server(
                    [*serve, "--port", str(port)], serve_env, port, base / "log"
                )
                record[f"`glisk serve` to the first 200 from /health, {data}"].append(seconds)
                record["`glisk serve` SIGTERM to exit (it stops its PostgreSQL)"].append(
                    stop_server(process)
                )
                if process.returncode:
                    raise RuntimeError(f"glisk serve exited with {process.returncode} on SIGTERM")
    return times


def startup(args: Namespace) -> None:
    env, rows = quiet_env(), []  # bytecode caches in PYCACHE, written by an untimed first import
    for module in IMPORTED:
        importtime(module, env)
        for cached in (True, False):
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as empty:  # nothing read or written
                    uncached = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": empty}
                    runs.append(importtime(module, env if cached else env | uncached))
            total, wall, top = sorted(runs)[len(runs) // 2]
            spread = f"{total:.0f} ({min(runs)[0]:.0f}-{max(runs)[0]:.0f})"
            rows.append([f"`{module}`", "yes" if cached else "no", spread, f"{wall:.0f}", top])
    print(f"Importing a module, ms: import (median, min-max of {args.repeat}), process wall time,")
    print("self time of the largest top-level packages\n")
    print(table(["module", "bytecode caches", "import ms", "process ms", "top, ms"], rows))
    if args.imports_only:
        return
    times, summary = steps(args.repeat, env), ""
    if not args.skip_suite:
        say(f"test suite: {' '.join(SUITE)}")
        started = time.perf_counter()
        suite = subprocess.run(SUITE, capture_output=True, text=True, check=False)
        times[f"full test suite, `{' '.join(SUITE)}`, once"].append(time.perf_counter() - started)
        summary = f"\nTest suite: {suite.stdout.strip().splitlines()[-1]} (exit {suite.returncode})"
    stats = (statistics.median, min, max)
    rows = [[step, *(f"{f(t):.2f}" for f in stats)] for step, t in times.items()]
    print(f"\nStart-up, seconds: median, min, max of {args.repeat}\n")
    print(table(["step", "median", "min", "max"], rows) + summary)
