"""Scale-out: N no-op worker processes (image stage) drain seeded tokens through PgBouncer
(transaction mode) and directly, against Debian's PostgreSQL 15 with max_connections=100 (fsync
on). Reports the drain rate, exactly-once, database errors in the workers' logs, and the peak
server and PgBouncer client connections (sampled every 100 ms). Needs postgresql-15 and pgbouncer.

    cd backend && uv run python -m bench.scaleout_bench    # ~6 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from bench._common import load_line, markdown_table, workdir
from bench.claim_bench import SEED, reset, server_line
from glisk import migrations
from glisk.embedded_pg import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGBOUNCER = "/usr/sbin/pgbouncer"
OTHERS = "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
ACTIVITY = f"SELECT count(*) {OTHERS}"
HEADERS = (
    "path | processes | tokens done | left claimed | completed (workers' stats) | tokens/s | wall s"
    " | failed exits | database_error lines | too many clients | peak server connections"
    " | peak PgBouncer clients"
)
TERMINATE = f"SELECT pg_terminate_backend(pid) {OTHERS}"  # PgBouncer's idle server connections


def as_postgres(*cmd: str | Path) -> None:
    """initdb, postgres and pgbouncer refuse to run as root: use the postgres account then."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *map(str, cmd)], check=True, stdout=subprocess.DEVNULL)


def start(base: Path, pool_size: int) -> tuple[int, int]:
    """PostgreSQL 15 (trust on loopback, as .ci/run's PgBouncer step) and PgBouncer in front."""
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:", str(base)], check=True)
    pg_port, pgb_port = free_port(), free_port()
    as_postgres(PG_BIN / "initdb", "-D", base / "data", "-U", "postgres", "--auth=trust")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {pg_port} -c unix_socket_directories='' "
        "-c max_connections=100"
    )
    as_postgres(
        PG_BIN / "pg_ctl", "-D", base / "data", "-l", base / "pg.log", "-w", "start", "-o", options
    )
    (base / "userlist.txt").write_text('"postgres" ""\n')
    (base / "pgbouncer.ini").write_text(
        f"[databases]\n* = host=127.0.0.1 port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {pgb_port}\nunix_socket_dir =\nauth_type = trust\n"
        f"auth_file = {base}/userlist.txt\nadmin_users = postgres\npool_mode = transaction\n"
        f"max_client_conn = 2000\ndefault_pool_size = {pool_size}\nmax_db_connections = 60\n"
        f"logfile = {base}/pgbouncer.log\n"
        f"pidfile = {base}/pgbouncer.pid\n"
    )
    as_postgres(PGBOUNCER, "-d", base / "pgbouncer.ini")
    return pg_port, pgb_port


def stop(base: Path) -> None:
    if (base / "pgbouncer.pid").exists():
        subprocess.run(["kill", (base / "pgbouncer.pid").read_text().strip()], check=False)
    as_postgres(PG_BIN / "pg_ctl", "-D", base / "data", "-m", "fast", "stop")


class Sampler(threading.Thread):
    """Every 100 ms: server client backends (direct), PgBouncer clients (cl_active + cl_waiting)
    and the tokens done so far, keeping the peaks and when the first and last tokens got done."""

    def __init__(self, dsn: str, admin: str | None, tokens: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.admin, self.tokens = dsn, admin, tokens
        self.server = self.clients = self.waiting = 0
        self.first = self.last = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            pgb = (
                psycopg.connect(self.admin, autocommit=True, cursor_factory=psycopg.ClientCursor)
                if self.admin
                else None
            )
            while not self.done.wait(0.1):
                server = conn.execute(ACTIVITY).fetchone()
                done = conn.execute(
                    "SELECT count(*) FROM tokens_s0 WHERE image_path IS NOT NULL"
                ).fetchone()
                self.server = max(self.server, server[0] if server else 0)
                if done and done[0] and not self.first:
                    self.first = time.monotonic()
                if done and done[0] == self.tokens and not self.last:
                    self.last = time.monotonic()
                if pgb is not None:
                    pools = [r for r in pgb.execute("SHOW POOLS").fetchall() if r[0] != "pgbouncer"]
                    self.clients = max(self.clients, sum(r[2] + r[3] for r in pools))
                    self.waiting = max(self.waiting, sum(r[3] for r in pools))
            if pgb is not None:
                pgb.close()


def drain(
    base: Path, dsn: str, url: str, admin: str | None, args: argparse.Namespace, processes: int
) -> list[str]:
    """One cell: reset, start the workers together, wait (at most --limit s), check, report."""
    reset(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TERMINATE)
    sampler = Sampler(dsn, admin, args.tokens)
    sampler.start()
    env = {
        **os.environ,
        "DB_POOLER": "transaction" if admin else "none",
        "GLISK_ENV_FILE": "/dev/null",
    }
    # --no-listen direct too: the same polling workers, 2 connections each, on both paths.
    flags = (
        f"--stages image --batch 10 --concurrency {args.concurrency} --exit-when-idle --no-listen"
    )
    command = [sys.executable, "-m", "glisk.workers.noop", "--database-url", url, *flags.split()]
    command += ["--poll", "0.2"]
    logs = [base / f"worker-{i}.err" for i in range(processes)]
    began = time.monotonic()
    workers = [
        subprocess.Popen(
            command, env=env, stdout=log.with_suffix(".out").open("w"), stderr=log.open("w")
        )
        for log in logs
    ]
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(max(1.0, began + args.limit - time.monotonic())))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait())
    wall = time.monotonic() - began
    sampler.done.set()
    sampler.join()
    errors = sum(log.read_text().count("worker.database_error") for log in logs)
    too_many = sum(log.read_text().count("too many clients") for log in logs)
    # Each worker prints its WorkerStats: their sum shows no token was completed twice.
    outputs = [log.with_suffix(".out").read_text().splitlines() for log in logs]
    completed = sum(json.loads(line)["completed"] for lines in outputs for line in lines)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE image_path IS NOT NULL), "
            "count(*) FILTER (WHERE claim_id IS NOT NULL) FROM tokens_s0"
        ).fetchone()
    done, claimed = row if row else (0, 0)
    window = sampler.last - sampler.first if sampler.last else 0.0
    return [
        "PgBouncer" if admin else "direct",
        str(processes),
        f"{done:,} of {args.tokens:,}",
        str(claimed),
        f"{completed:,}",
        f"{done / window:,.0f}" if window else "-",
        f"{wall:.1f}",
        str(sum(1 for c in codes if c)),
        str(errors),
        str(too_many),
        f"{sampler.server} of 100",
        f"{sampler.clients} ({sampler.waiting} waiting)" if admin else "-",
    ]


def run(args: argparse.Namespace) -> int:
    with workdir("glisk-scaleout-") as base:
        pg_port, pgb_port = start(base, args.pool_size)
        try:
            dsn = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
            migrations.upgrade(f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/postgres")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SEED.format(count=args.tokens).encode())
            pooled = f"postgresql+psycopg://postgres@127.0.0.1:{pgb_port}/postgres"
            admin = f"postgresql://postgres@127.0.0.1:{pgb_port}/pgbouncer"
            direct = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/postgres"
            print(
                f"{server_line(dsn)}, max_connections=100; PgBouncer transaction mode, "
                f"default_pool_size={args.pool_size}, max_db_connections=60; {load_line()}",
                flush=True,
            )
            rows = []
            for processes in args.processes:
                for target, console in ((pooled, admin), (direct, None)):
                    rows.append(drain(base, dsn, target, console, args, processes))
                    print(" | ".join(rows[-1]), flush=True)
        finally:
            stop(base)
    headers = HEADERS.split(" | ")
    print(markdown_table(headers, rows))
    print(f"concurrency {args.concurrency}, batch 10, {load_line()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout_bench")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=40, help="PgBouncer default_pool_size")
    parser.add_argument(
        "--limit", type=float, default=600.0, help="seconds before workers are killed"
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
