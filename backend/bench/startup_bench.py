"""Start-up costs: the embedded PostgreSQL, the migrations, ``glisk serve``, the test suite.

    cd backend && uv run python -m bench.startup_bench                 # ~2 min with the suite
    cd backend && uv run python -m bench.startup_bench --skip-suite    # ~40 s

Each step runs ``--repeat`` times (default 3) and is reported as median, min and max:

- embedded PostgreSQL cold start: ``EmbeddedPostgres.start()`` on a fresh data directory, i.e.
  initdb plus the server's start until a login succeeds; with the durable settings ``glisk
  serve`` uses (fsync on) and with the test harness's (fsync off, initdb --no-sync). Then its
  stop (fast shutdown, which writes a checkpoint) and a warm start on the same directory;
- ``alembic upgrade head`` on an empty database (a fresh CREATE DATABASE each time), both
  in-process (glisk.migrations.upgrade, what ``glisk serve`` runs) and as the ``alembic`` command
  in a new process (spec SC-002, < 5 s);
- ``glisk serve`` as a subprocess until the first 200 from GET /health: on a fresh data directory
  (cold: initdb, CREATE DATABASE, migrations) and again on the same directory (warm); then the
  time from SIGTERM to its exit (which stops its PostgreSQL);
- importing a worker (``python -X importtime``), with and without bytecode caches;
- once, the full test suite (``uv run pytest -q -p no:cacheprovider``) wall time (spec SC-003,
  < 60 s), unless ``--skip-suite``.

Everything listens on 127.0.0.1 only. One untimed start first brings the PostgreSQL binaries into
the page cache (and, as root, into the cached copy the service user can execute), so "cold" means
a new data directory, not a cold machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bench._common import Spread, load_line, markdown_table, workdir
from glisk import migrations
from glisk.core.config import BACKEND_DIR
from glisk.embedded_pg import EmbeddedPostgres, free_port

HOST = "127.0.0.1"
SERVE_LIMIT_SECONDS = 60.0


@dataclass(frozen=True)
class Row:
    step: str
    spread: Spread
    target: str = "-"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- embedded PostgreSQL ----------------------------------------------------------------------


def postgres_rows(base: Path, repeat: int) -> list[Row]:
    warm_up = EmbeddedPostgres(data_dir=base / "warm-up" / "data", port=free_port(), ephemeral=True)
    (base / "warm-up").mkdir(mode=0o755)
    try:
        warm_up.start()
    finally:
        warm_up.stop()
    variants = {"fsync on": False, "fsync off": True}
    cold: dict[str, list[float]] = {label: [] for label in variants}
    stop: dict[str, list[float]] = {label: [] for label in variants}
    warm: dict[str, list[float]] = {label: [] for label in variants}
    for i in range(repeat):
        for label, ephemeral in variants.items():  # interleaved, so drift hits both alike
            parent = base / f"pg-{label.replace(' ', '-')}-{i}"
            parent.mkdir(mode=0o755)
            data_dir = parent / "data"
            server = EmbeddedPostgres(data_dir=data_dir, port=free_port(), ephemeral=ephemeral)
            try:
                cold[label].append(timed(server.start))
                stop[label].append(timed(server.stop))
                server = EmbeddedPostgres(data_dir=data_dir, port=free_port(), ephemeral=ephemeral)
                warm[label].append(timed(server.start))
            finally:
                server.stop()
            shutil.rmtree(parent, ignore_errors=True)
    say("embedded PostgreSQL: done")
    rows: list[Row] = []
    for label in variants:
        rows += [
            Row(
                f"embedded PostgreSQL cold start, {label} (initdb + start)",
                Spread(tuple(cold[label])),
            ),
            Row(f"embedded PostgreSQL stop, {label} (fast shutdown)", Spread(tuple(stop[label]))),
            Row(
                f"embedded PostgreSQL warm start, {label} (existing data)",
                Spread(tuple(warm[label])),
            ),
        ]
    return rows


# --- migrations -------------------------------------------------------------------------------


def migration_rows(base: Path, repeat: int) -> list[Row]:
    parent = base / "pg-migrations"
    parent.mkdir(mode=0o755)
    server = EmbeddedPostgres(data_dir=parent / "data", port=free_port())
    alembic = Path(sys.executable).parent / "alembic"
    in_process, new_process = [], []
    try:
        server.start()
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            for i in range(2 * repeat):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"bench_{i}")))
        for i in range(repeat):
            url = server.url_for(f"bench_{i}")
            in_process.append(timed(lambda url=url: migrations.upgrade(url)))
            assert migrations.current_revision(url) == migrations.head_revision()
        for i in range(repeat, 2 * repeat):
            url = server.url_for(f"bench_{i}")
            env = {k: v for k, v in os.environ.items() if k != "APP_ENV"}
            env.update(DATABASE_URL=url, GLISK_ENV_FILE=os.devnull)
            started = time.perf_counter()
            result = subprocess.run(
                [str(alembic), "upgrade", "head"],
                cwd=BACKEND_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            new_process.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise RuntimeError(f"alembic upgrade head failed:\n{result.stderr[-2000:]}")
            assert migrations.current_revision(url) == migrations.head_revision()
    finally:
        server.stop()
    say("migrations: done")
    return [
        Row(
            "alembic upgrade head, empty database, in process (glisk.migrations.upgrade)",
            Spread(tuple(in_process)),
            "< 5 s (SC-002)",
        ),
        Row(
            "`alembic upgrade head`, empty database, new process",
            Spread(tuple(new_process)),
            "< 5 s (SC-002)",
        ),
    ]


# --- glisk serve ------------------------------------------------------------------------------


class Serve:
    """``python -m glisk.cli serve`` on 127.0.0.1 with the embedded PostgreSQL in ``data_dir``."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "APP_ENV")}
        env.update(
            GLISK_ENV_FILE=os.devnull,  # a developer's own .env must not leak in
            LOG_LEVEL="WARNING",
            GLISK_PG_DATA=str(data_dir),
            GLISK_PG_PORT=str(free_port()),
        )
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glisk.cli", "serve", "--host", HOST, "--port", str(self.port)],
            cwd=BACKEND_DIR,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_healthy(self) -> float:
        url = f"http://{HOST}:{self.port}/health"
        while time.perf_counter() - self.started < SERVE_LIMIT_SECONDS:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"glisk serve exited with code {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"glisk serve did not answer /health within {SERVE_LIMIT_SECONDS:.0f} s")

    def stop(self) -> float:
        """SIGTERM, then the time until the process (which stops its PostgreSQL) has exited."""
        started = time.perf_counter()
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            return time.perf_counter() - started
        finally:
            self._log.close()


def serve_rows(base: Path, repeat: int) -> list[Row]:
    cold, warm, stops = [], [], []
    for i in range(repeat):
        parent = base / f"serve-{i}"
        parent.mkdir(mode=0o755)
        for times in (cold, warm):
            serve = Serve(parent / "pgdata", parent / f"serve-{len(times)}.log")
            try:
                times.append(serve.wait_healthy())
            finally:
                stops.append(serve.stop())
            if serve.process.returncode != 0:
                raise RuntimeError(
                    f"glisk serve exited with {serve.process.returncode} after SIGTERM:\n"
                    + serve.log_path.read_text(errors="replace")[-2000:]
                )
        shutil.rmtree(parent, ignore_errors=True)
    say("glisk serve: done")
    return [
        Row(
            "`glisk serve` to first 200 /health, fresh data dir (initdb, create db, migrate)",
            Spread(tuple(cold)),
        ),
        Row("`glisk serve` to first 200 /health, existing data dir", Spread(tuple(warm))),
        Row("`glisk serve` SIGTERM to exit (stops its PostgreSQL)", Spread(tuple(stops))),
    ]


# --- importing a worker ------------------------------------------------------------------------

# The web application is the reference: a worker process should import less.
IMPORTED = ("glisk.workers.worker", "glisk.workers.noop", "glisk.workers.command", "glisk.app")


def _importtime(module: str, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """``python -X importtime -c 'import module'``: the module's cumulative import ms, the
    process's wall ms, and self ms per top-level package."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=BACKEND_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    wall = 1000 * (time.perf_counter() - started)
    total, packages = 0.0, {}
    for line in result.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue
        name = fields[2].strip()
        top = name.split(".")[0]
        packages[top] = packages.get(top, 0.0) + int(fields[0]) / 1000
        if name == module:
            total = int(fields[1]) / 1000
    return total, wall, packages


def import_rows(base: Path, repeat: int) -> list[list[str]]:
    """Each module with bytecode caches (in a PYTHONPYCACHEPREFIX written by an untimed first
    import) and without (PYTHONDONTWRITEBYTECODE=1 and an empty PYTHONPYCACHEPREFIX: nothing is
    read or written, the standard library included). The caller's own PYTHON* cache settings
    are replaced, so both cases are what they say."""
    rows = []
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
    warm = dict(plain, PYTHONPYCACHEPREFIX=str(base / "pycache-warm"))
    for module in IMPORTED:
        if importlib.util.find_spec(module) is None:
            say(f"imports: {module} does not exist here, skipped")
            continue
        _importtime(module, warm)  # writes the caches
        for cached in (True, False):
            runs = []
            for i in range(repeat):
                env = warm
                if not cached:
                    prefix = base / f"pycache-{module}-{i}"
                    prefix.mkdir()
                    env = dict(plain, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(prefix))
                runs.append(_importtime(module, env))
            runs.sort(key=lambda r: r[0])
            total, wall, packages = runs[len(runs) // 2]
            top = sorted(packages.items(), key=lambda kv: -kv[1])[:6]
            rows.append(
                [
                    f"`{module}`",
                    "yes" if cached else "no",
                    f"{total:.0f} ({runs[0][0]:.0f}-{runs[-1][0]:.0f})",
                    f"{wall:.0f}",
                    ", ".join(f"{name} {ms:.0f}" for name, ms in top),
                ]
            )
    say("imports: done")
    return rows


# --- the test suite ---------------------------------------------------------------------------


def suite_row(base: Path) -> tuple[Row, str, str]:
    uv = shutil.which("uv")
    pytest_args = ["pytest", "-q", "-p", "no:cacheprovider"]
    command = [uv, "run", *pytest_args] if uv else [sys.executable, "-m", *pytest_args]
    log_path = base / "pytest.log"
    shown = "uv run " + " ".join(pytest_args) if uv else "python -m " + " ".join(pytest_args)
    say(f"test suite: {shown}")
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        result = subprocess.run(
            command,
            cwd=BACKEND_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=900,
            check=False,
        )
        seconds = time.perf_counter() - started
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    row = Row(f"full test suite (`{shown}`), 1 run", Spread((seconds,)), "< 60 s (SC-003)")
    return row, summary, f"exit code {result.returncode}"


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.startup_bench",
        description="Start-up times: embedded PostgreSQL, migrations, glisk serve, the test suite.",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per step (default 3)")
    parser.add_argument("--skip-suite", action="store_true", help="do not run the test suite")
    parser.add_argument("--imports-only", action="store_true", help="only the import times")
    args = parser.parse_args(argv)

    started = time.monotonic()
    load_before = load_line()
    say(load_before)
    suite: tuple[Row, str, str] | None = None
    with workdir("glisk-startup-") as base:
        imports = import_rows(base, args.repeat)
        print(
            f"Importing a worker, ms (`python -X importtime -c 'import M'`: M's cumulative import "
            f"time, median (min-max) of {args.repeat}; the process's wall time; self time per "
            "top-level package, largest first):\n"
        )
        print(
            markdown_table(
                ["module", "bytecode caches", "import ms", "process ms", "top contributors, ms"],
                imports,
                "llrrl",
            )
        )
        print(flush=True)
        if args.imports_only:
            return 0
        rows = postgres_rows(base, args.repeat)
        rows += migration_rows(base, args.repeat)
        rows += serve_rows(base, args.repeat)
        if not args.skip_suite:
            suite = suite_row(base)
            rows.append(suite[0])

    print()
    print(
        f"Start-up, seconds (median, min, max of {args.repeat} runs; the test suite once). "
        f"Before: {load_before}."
    )
    print()
    print(
        markdown_table(
            ["step", "median s", "min s", "max s", "target"],
            [
                [
                    row.step,
                    f"{row.spread.median:.2f}",
                    f"{row.spread.low:.2f}",
                    f"{row.spread.high:.2f}",
                    row.target,
                ]
                for row in rows
            ],
            "lrrrl",
        )
    )
    if suite is not None:
        print()
        print(f"Test suite: {suite[1]} ({suite[2]}).")
    print()
    print(f"Total time {time.monotonic() - started:.0f} s; {load_line()} at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
