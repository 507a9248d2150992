"""HTTP benchmark: throughput and latency of ``GET /health`` against ``GET /bare``.

    cd backend && uv run python -m bench.http_bench                  # 10 s per cell (~2 min)
    cd backend && uv run python -m bench.http_bench --duration 5     # ~1 min

What runs, each in its own process:

- a private embedded PostgreSQL (glisk.embedded_pg, in a temporary directory, sized as
  ``glisk serve`` sizes it), migrated with glisk.migrations.upgrade;
- the server: bench.bench_app, i.e. ``create_app(settings)`` plus a constant ``GET /bare``, run by
  uvicorn exactly as ``glisk serve`` runs the app (one process, same settings), on 127.0.0.1;
- the load generator: Debian's ``wrk`` if ``which wrk`` finds it, otherwise a Python asyncio
  client (raw HTTP/1.1 keep-alive connections; httpx's own per-request cost would make the
  client, not the server, the bottleneck on a small machine). The output names the one used.

Each cell is a closed loop: N clients, each sending its next request when the previous answer
arrives, for a fixed duration after a short warm-up. The server logs at WARNING during the main
table (so logging does not dominate); one extra row repeats 32 clients at INFO, the production
level, where every request writes one log line; another runs 128 clients against two uvicorn
worker processes (``--workers 2``, as ``glisk serve --workers 2``). The load average before and
after the run is printed: on a shared machine it says how much the neighbours took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from glisk import migrations
from glisk.core.config import BACKEND_DIR, ConfigError, load_settings
from glisk.embedded_pg import EmbeddedPostgres, free_port, service_user

HOST = "127.0.0.1"  # requests go nowhere else
ENDPOINTS = ("/health", "/bare")
DATABASE = "glisk"
CLIENT_TIMEOUT_SECONDS = 10.0

# wrk reports latency in microseconds; this prints what the table needs as one JSON line.
WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Cell:
    path: str
    clients: int
    requests: int
    seconds: float
    errors: int  # non-2xx answers plus socket errors and timeouts
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu: float  # fraction of one core the server's processes used during the cell
    selects: int  # SELECT 1 statements the server's /health probes sent during the cell

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# --- load generators ------------------------------------------------------------------------


class Wrk:
    name = "wrk"

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.script = workdir / "report.lua"
        self.script.write_text(WRK_REPORT)
        version = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, check=False
        )
        first = (version.stdout or version.stderr).strip().splitlines()
        self.description = f"wrk ({first[0] if first else executable}), 1 thread"

    def run(self, url: str, clients: int, seconds: float) -> dict[str, Any]:
        result = subprocess.run(
            [
                self.executable,
                "-t1",
                f"-c{clients}",
                f"-d{max(1, math.ceil(seconds))}s",
                f"--timeout={CLIENT_TIMEOUT_SECONDS:.0f}s",
                "-s",
                str(self.script),
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        line = next(line for line in result.stdout.splitlines() if line.startswith('{"requests"'))
        raw = json.loads(line)
        return {
            "requests": raw["requests"],
            "seconds": raw["duration_us"] / 1e6,
            "errors": raw["status_errors"] + raw["socket_errors"],
            "p50_ms": raw["p50_us"] / 1000,
            "p95_ms": raw["p95_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
        }


class PythonClient:
    name = "python"
    description = "Python asyncio client (raw HTTP/1.1 keep-alive), in its own process"

    def run(self, url: str, clients: int, seconds: float) -> dict[str, Any]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.http_bench",
                "--load-worker",
                url,
                "--clients",
                str(clients),
                "--duration",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            cwd=BACKEND_DIR,
            timeout=seconds + 60,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])


async def _one_client(
    host: str, port: int, path: str, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: glisk-bench\r\n\r\n"
    payload = request.encode()
    try:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            writer.write(payload)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT_SECONDS)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(
                int(line.split(":", 1)[1])
                for line in lines[1:]
                if line.lower().startswith("content-length:")
            )
            await asyncio.wait_for(reader.readexactly(length), CLIENT_TIMEOUT_SECONDS)
            latencies.append(time.perf_counter() - sent)
            if not 200 <= status < 300:
                errors.append(status)
    finally:
        writer.close()


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _load(url: str, clients: int, seconds: float) -> dict[str, Any]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    deadline = started + seconds
    outcomes = await asyncio.gather(
        *(
            _one_client(host, int(port), "/" + path, deadline, latencies, errors)
            for _ in range(clients)
        ),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - started
    failures = sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "errors": len(errors) + failures,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p95_ms": _percentile(latencies, 95) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
    }


# --- the server and its database ------------------------------------------------------------


def start_database(workdir: Path, max_connections: int) -> tuple[EmbeddedPostgres, str]:
    """An embedded PostgreSQL like glisk serve's, in a throwaway directory, migrated."""
    base = workdir / "pg"
    base.mkdir()
    if service_user() is not None:  # as root the server runs as an unprivileged user
        workdir.chmod(0o755)
        base.chmod(0o755)
    server = EmbeddedPostgres(
        data_dir=base / "data", port=free_port(), max_connections=max_connections
    )
    server.start()
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    url = server.url_for(DATABASE)
    migrations.upgrade(url)
    return server, url


class Server:
    """bench.bench_app under uvicorn, in its own process (and its workers' processes)."""

    def __init__(
        self, database_url: str, log_level: str, app_env: str, log_file: Path, workers: int = 1
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_file = log_file
        self._log: IO[bytes] = open(log_file, "wb")  # noqa: SIM115 - closed in stop()
        self.workers = workers
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bench_app",
                "--database-url",
                database_url,
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--log-level",
                log_level,
                "--app-env",
                app_env,
                "--workers",
                str(workers),
            ],
            cwd=BACKEND_DIR,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._wait_ready()

    def _wait_ready(self, limit: float = 60.0) -> None:
        """Until /health answers 200 and every worker process has answered /pid (a new
        connection each time, so the kernel hands them to whichever process accepts)."""
        deadline = time.monotonic() + limit
        answered: dict[int, int] = {}
        healthy = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode}:\n"
                    + self.log_file.read_text(errors="replace")[-2000:]
                )
            try:
                if not healthy:
                    with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:  # noqa: S310 - our own http://127.0.0.1 URL
                        healthy = response.status == 200
                answered.update(self._pids(0.5))
                if healthy and len(answered) >= self.workers:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"the server did not answer /health from {self.workers} process(es) within "
            f"{limit:.0f} s"
        )

    def _pids(self, limit: float) -> dict[int, int]:
        """Ask /pid on new connections until every worker process has answered: pid -> SELECT 1
        its probe has sent."""
        answered: dict[int, int] = {}
        deadline = time.monotonic() + limit
        while len(answered) < self.workers and time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.base_url}/pid", timeout=2) as response:  # noqa: S310 - our own http://127.0.0.1 URL
                body = json.loads(response.read())
            answered[body["pid"]] = body["selects"]
        return answered

    def selects(self) -> int:
        answered = self._pids(30.0)
        if len(answered) < self.workers:
            raise RuntimeError(f"only {len(answered)} of {self.workers} processes answered /pid")
        return sum(answered.values())

    def cpu_seconds(self) -> float:
        """CPU time of the server process and its live children (uvicorn's workers)."""
        ticks = 0
        for pid in (self.process.pid, *_children(self.process.pid)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# --- running and reporting ------------------------------------------------------------------


def measure(
    client: Wrk | PythonClient,
    server: Server,
    path: str,
    clients: int,
    seconds: float,
    warmup: float,
) -> Cell:
    url = f"{server.base_url}{path}"
    if warmup > 0:  # fills the connection pool and warms caches; not counted
        client.run(url, clients, warmup)
    selects_before = server.selects()
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    raw = client.run(url, clients, seconds)
    cpu = (server.cpu_seconds() - cpu_before) / max(1e-9, time.monotonic() - wall_before)
    selects = server.selects() - selects_before
    cell = Cell(path=path, clients=clients, server_cpu=cpu, selects=selects, **raw)
    per_request = cell.selects / cell.requests if cell.requests else math.nan
    print(
        f"  {path:<8} {clients:>4} clients: {cell.rps:8.0f} req/s, p50 {cell.p50_ms:.2f} ms, "
        f"p95 {cell.p95_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, errors {cell.errors}, "
        f"{per_request:.2f} SELECT 1 per request",
        file=sys.stderr,
        flush=True,
    )
    return cell


def table(rows: list[tuple[str, Cell, Cell]]) -> str:
    lines = [
        "| clients | /health req/s | p50 ms | p95 ms | p99 ms "
        "| /bare req/s | p50 ms | p95 ms | p99 ms "
        "| /health ÷ /bare req/s | p95 ratio | server CPU (health/bare) "
        "| SELECT 1 per /health | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, health, bare in rows:
        ratio = health.rps / bare.rps if bare.rps else math.nan
        p95_ratio = health.p95_ms / bare.p95_ms if bare.p95_ms else math.nan
        per_probe = health.selects / health.requests if health.requests else math.nan
        lines.append(
            f"| {label} | {health.rps:,.0f} | {health.p50_ms:.2f} | {health.p95_ms:.2f} "
            f"| {health.p99_ms:.2f} | {bare.rps:,.0f} | {bare.p50_ms:.2f} | {bare.p95_ms:.2f} "
            f"| {bare.p99_ms:.2f} | {ratio:.2f} | {p95_ratio:.2f} "
            f"| {health.server_cpu:.0%} / {bare.server_cpu:.0%} | {per_probe:.2f} "
            f"| {health.errors + bare.errors} |"
        )
    return "\n".join(lines)


def pick_client(choice: str, workdir: Path) -> Wrk | PythonClient:
    wrk = shutil.which("wrk")
    if choice == "wrk" and wrk is None:
        raise SystemExit("--client wrk: `which wrk` finds nothing (apt-get install wrk)")
    if choice in ("auto", "wrk") and wrk is not None:
        return Wrk(wrk, workdir)
    return PythonClient()


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="glisk-bench-"))
    server: Server | None = None
    database: EmbeddedPostgres | None = None
    started = time.monotonic()
    load_before = load_average()
    try:
        client = pick_client(args.client, workdir)
        processes = max(1, args.workers)
        database, url = start_database(
            workdir, settings.embedded_max_connections(api_processes=processes)
        )
        print(f"database ready ({time.monotonic() - started:.1f} s)", file=sys.stderr)

        server = Server(url, "WARNING", args.app_env, workdir / "server-warning.log")
        rows: list[tuple[str, Cell, Cell]] = []
        for clients in levels:
            health, bare = (
                measure(client, server, path, clients, args.duration, args.warmup)
                for path in ENDPOINTS
            )
            rows.append((str(clients), health, bare))
        server.stop()
        server = None

        info_rows: list[tuple[str, Cell, Cell]] = []
        info_lines = 0
        if args.info_clients > 0:
            log_file = workdir / "server-info.log"
            server = Server(url, "INFO", args.app_env, log_file)
            health, bare = (
                measure(client, server, path, args.info_clients, args.duration, args.warmup)
                for path in ENDPOINTS
            )
            info_rows.append((f"{args.info_clients} (INFO)", health, bare))
            server.stop()
            server = None
            info_lines = sum(1 for _ in log_file.open("rb"))

        workers_rows: list[tuple[str, Cell, Cell]] = []
        if args.workers > 1 and args.workers_clients > 0:
            server = Server(
                url, "WARNING", args.app_env, workdir / "server-workers.log", args.workers
            )
            health, bare = (
                measure(client, server, path, args.workers_clients, args.duration, args.warmup)
                for path in ENDPOINTS
            )
            label = f"{args.workers_clients} (--workers {args.workers})"
            workers_rows.append((label, health, bare))
            server.stop()
            server = None

        cores = os.cpu_count() or 0
        print()
        print(
            f"Load generator: {client.description}. Server: bench.bench_app under uvicorn "
            f"(1 process, as `glisk serve`), APP_ENV={args.app_env}, DB_POOL_SIZE="
            f"{settings.db_pool_size}, embedded PostgreSQL on the same {cores}-core machine. "
            f"{args.duration:g} s per cell after {args.warmup:g} s warm-up; closed loop."
        )
        print()
        print("Server LOG_LEVEL=WARNING:")
        print()
        print(table(rows))
        if info_rows:
            print()
            print(
                f"Server LOG_LEVEL=INFO (one log line per request; {info_lines:,} lines "
                "written during that row, warm-ups included):"
            )
            print()
            print(table(info_rows))
        if workers_rows:
            print()
            print(
                f"Server LOG_LEVEL=WARNING, {args.workers} uvicorn worker processes "
                "(server CPU summed over them):"
            )
            print()
            print(table(workers_rows))
        print()
        print(
            f"Total time {time.monotonic() - started:.0f} s. Load average (1/5/15 min) on "
            f"{cores} cores: {load_before} before, {load_average()} after."
        )
        return 0
    finally:
        if server is not None:
            server.stop()
        if database is not None:
            database.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_bench",
        description="Throughput and latency of GET /health against a bare GET /bare.",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per cell (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each cell"
    )
    parser.add_argument(
        "--concurrency", default="1,32,128", help="comma-separated client counts (default 1,32,128)"
    )
    parser.add_argument(
        "--info-clients",
        type=int,
        default=32,
        help="clients for the extra LOG_LEVEL=INFO row (0 skips it)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="uvicorn worker processes for the extra multi-process row (default 2; 1 skips it)",
    )
    parser.add_argument(
        "--workers-clients",
        type=int,
        default=128,
        help="clients for the multi-process row (default 128)",
    )
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--app-env", choices=["development", "production"], default="development")
    # Internal: the Python load generator's own process.
    parser.add_argument("--load-worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.load_worker:
        if not args.load_worker.startswith(f"http://{HOST}:"):
            parser.error(f"the load worker only sends requests to http://{HOST}")
        print(json.dumps(asyncio.run(_load(args.load_worker, args.clients, args.duration))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
