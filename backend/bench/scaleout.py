"""Scale-out: N no-op worker processes (``python -m glisk.workers.noop``) drain tokens through
PgBouncer (transaction mode) and directly, against Debian's PostgreSQL 15 at max_connections=100:
drain rate, exactly-once, database errors, peak connections (figures: docs/deployment.md)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.harness import database, query, reset, say, seed, server_line, table
from glisk.embedded_pg import free_port
from glisk.workers.connection import libpq_url

PG15 = Path("/usr/lib/postgresql/15/bin")
POOL_SIZE = 40
OTHERS = "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
# --no-listen direct too: the same polling workers, 2 connections each, on both paths.
WORKER = "-m glisk.workers.noop --stages image --batch 10 --concurrency 8 --exit-when-idle "
WORKER += "--no-listen --poll 0.2"
DONE = "SELECT count(*) FROM tokens_s0 WHERE image_path IS NOT NULL"
PGBOUNCER_INI = """[databases]
* = host=127.0.0.1 port={pg_port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {dir}/userlist.txt
admin_users = postgres
pool_mode = transaction
max_client_conn = 2000
default_pool_size = {pool}
max_db_connections = 60
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
"""


def pgbouncer(base: Path, pg_port: int, password: str) -> int:
    """PgBouncer in front of the server, run by the postgres account when we are root."""
    base.mkdir(mode=0o700)
    port = free_port()
    (base / "userlist.txt").write_text(f'"postgres" "{password}"\n')
    ini = PGBOUNCER_INI.format(pg_port=pg_port, port=port, dir=base, pool=POOL_SIZE)
    (base / "pgbouncer.ini").write_text(ini)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        subprocess.run(["chown", "-R", "postgres:", str(base)], check=True)
    subprocess.run([*as_postgres, "pgbouncer", "-d", str(base / "pgbouncer.ini")], check=True)
    return port


class Sampler(threading.Thread):
    """Every 100 ms: server client backends, PgBouncer clients (active + waiting) and the tokens
    done, keeping the peaks and when the first and the last token got done."""

    def __init__(self, url: str, console: str | None, tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.console, self.tokens = url, console, tokens
        self.server = self.clients = self.waiting = 0
        self.first = self.last = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        conn = psycopg.connect(libpq_url(self.url), autocommit=True)
        # PgBouncer's console speaks the simple query protocol only.
        options = {"autocommit": True, "cursor_factory": psycopg.ClientCursor}
        admin = psycopg.connect(self.console, **options) if self.console else None
        while not self.done.wait(0.1):
            ((server,),) = conn.execute(f"SELECT count(*) {OTHERS}").fetchall()
            ((done,),) = conn.execute(DONE).fetchall()
            self.server = max(self.server, server)
            self.first = self.first or (time.monotonic() if done else 0.0)
            self.last = self.last or (time.monotonic() if done == self.tokens else 0.0)
            if admin:
                pools = [r for r in admin.execute("SHOW POOLS") if r[0] != "pgbouncer"]
                self.clients = max(self.clients, sum(r[2] + r[3] for r in pools))
                self.waiting = max(self.waiting, sum(r[3] for r in pools))
        conn.close()
        if admin:
            admin.close()


def drain(url: str, target: str, console: str | None, args: Namespace, n: int) -> list:
    """One row: reset, start the workers at once, wait (at most 600 s), check."""
    reset(url)
    query(url, f"SELECT pg_terminate_backend(pid) {OTHERS}")  # PgBouncer's idle connections
    sampler = Sampler(url, console, args.tokens)
    sampler.start()
    env = os.environ | {"DB_POOLER": "transaction" if console else "none"}
    command = [sys.executable, *shlex.split(WORKER), "--database-url", target]
    logs = [Path(args.logs) / f"worker-{i}" for i in range(n)]
    began = time.monotonic()
    workers = [
        subprocess.Popen(
            command,
            env=env | {"GLISK_ENV_FILE": os.devnull},
            stdout=log.with_suffix(".out").open("w"),
            stderr=log.with_suffix(".err").open("w"),
        )
        for log in logs
    ]
    for worker in workers:
        try:
            worker.wait(max(1.0, began + 600 - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    wall = time.monotonic() - began
    sampler.done.set()
    sampler.join()
    errors = "".join(log.with_suffix(".err").read_text() for log in logs)
    # Each worker prints its WorkerStats: their sum shows that no token was completed twice.
    out = "".join(log.with_suffix(".out").read_text() for log in logs)
    completed = sum(json.loads(line)["completed"] for line in out.splitlines())
    ((done, claimed),) = query(
        url,
        "SELECT count(*) FILTER (WHERE image_path IS NOT NULL), "
        "count(*) FILTER (WHERE claim_id IS NOT NULL) FROM tokens_s0",
    )
    window = sampler.last - sampler.first
    return [
        "PgBouncer" if console else "direct",
        n,
        f"{done:,} of {args.tokens:,}",
        claimed,
        f"{completed:,}",
        f"{done / window:,.0f}" if sampler.last else "-",
        f"{wall:.1f}",
        sum(1 for w in workers if w.returncode),
        errors.count("worker.database_error"),
        errors.count("too many clients"),
        f"{sampler.server} of 100",
        f"{sampler.clients} ({sampler.waiting} waiting)" if console else "-",
    ]


def scaleout(args: Namespace) -> None:
    with database(100, bindir=PG15) as (server, url):
        base = Path(server.data_dir).parent / "pgbouncer"
        port = pgbouncer(base, server.port, server.password)
        args.logs = base.parent
        try:
            seed(url, args.tokens)
            pooled = make_url(url).set(port=port)
            console = libpq_url(pooled.set(database="pgbouncer").render_as_string(False))
            say(f"{server_line(url)}; PgBouncer, transaction mode, pool {POOL_SIZE}, at most 60")
            rows = []
            for processes in map(int, args.processes.split(",")):
                for target, admin in ((pooled.render_as_string(False), console), (url, None)):
                    rows.append(drain(url, target, admin, args, processes))
                    say(" | ".join(map(str, rows[-1])))
        finally:
            subprocess.run(["kill", (base / "pgbouncer.pid").read_text().strip()], check=False)
    headers = ["path", "processes", "tokens done", "left claimed", "completed (workers' stats)"]
    headers += ["tokens/s", "wall s", "failed exits", "database_error lines", "too many clients"]
    print(table([*headers, "peak server connections", "peak PgBouncer clients"], rows))
    print("concurrency 8, batch 10")
