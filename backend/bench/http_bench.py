"""HTTP: requests per second and latency of ``GET /health`` next to ``GET /bare``, the same JSON
constant through the same app, middleware and uvicorn settings as ``glisk serve``, with wrk as the
load generator.

    cd backend && uv run python -m bench.http_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bench.harness import HTTP, database, quiet_env, start_server, stop_server, table
from glisk.app import create_app
from glisk.core.config import load_settings
from glisk.embedded_pg import free_port

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
    "import sys, uvicorn; uvicorn.run('bench.http_bench:app', factory=True, host='127.0.0.1', "
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


def measure(port: int, path: str, clients: int, workers: int, args: argparse.Namespace) -> list:
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_bench")
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per cell")
    args = parser.parse_args()
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
    print(f"wrk, 1 thread, {args.duration} s per cell after 1 s of warm-up; latencies in ms\n")
    headers = ["clients", "/health req/s", "p50", "p95", "p99", "/bare req/s", "p50", "p95"]
    headers += ["p99", "/health ÷ /bare", "SELECT 1 per /health", "server CPU", "errors"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
