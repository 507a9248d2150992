"""Scale-out: N no-op worker processes drain tokens through PgBouncer and directly, against
PostgreSQL 15 at max_connections=100 (figures: docs/deployment.md)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.harness import database, query, reset, say, seed, table
from glisk.embedded import free_port
from glisk.workers.connection import libpq_url

PG15 = Path("/usr/lib/postgresql/15/bin")
CONSOLE = {"autocommit": True, "cursor_factory": psycopg.ClientCursor}  # simple queries only
OTHERS = "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
# Polling workers (--no-listen) on both paths, with 2 connections each.
WORKER = "-m glisk.workers.noop --stages image --batch 10 --concurrency 8 --exit-when-idle "
WORKER += "--no-listen --poll 0.2"
LEFT = "SELECT count(*) FILTER (WHERE image_path IS NOT NULL), count(*) FILTER (WHERE claim_id IS "
LEFT += "NOT NULL) FROM tokens_s0"
PGBOUNCER = """[databases]
* = host={pg_socket_dir} port={pg_port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {dir}/userlist.txt
admin_users = postgres
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 40
max_db_connections = 60
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
"""


def pgbouncer(base: Path, pg_socket_dir: Path, pg_port: int, password: str) -> int:
    """PgBouncer in front of the server, reaching it on its Unix socket (run by the postgres
    account when we are root, the account that can enter the socket's directory); its port."""
    port = free_port()
    base.mkdir(mode=0o700)
    (base / "userlist.txt").write_text(f'"postgres" "{password}"\n')
    ini = PGBOUNCER.format(pg_socket_dir=pg_socket_dir, pg_port=pg_port, port=port, dir=base)
    (base / "pgbouncer.ini").write_text(ini)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        subprocess.run(["chown", "-R", "postgres:", str(base)], check=True)
    subprocess.run([*as_postgres, "pgbouncer", "-d", str(base / "pgbouncer.ini")], check=True)
    return port


def sample(url: str, console: str | None, tokens: int, stop: threading.Event) -> dict[str, float]:
    """Every 100 ms until ``stop``: peak connections; when the first and last token got done."""
    peak: dict[str, float] = dict.fromkeys(("server", "clients", "waiting", "first", "last"), 0.0)
    conn = psycopg.connect(libpq_url(url), autocommit=True)
    admin = console and psycopg.connect(console, **CONSOLE)
    while not stop.wait(0.1):
        ((server,),) = conn.execute(f"SELECT count(*) {OTHERS}").fetchall()
        ((done,),) = conn.execute("SELECT count(*) FROM tokens_s0 WHERE image_path IS NOT NULL")
        peak["server"] = max(peak["server"], server)
        peak["first"] = peak["first"] or (time.monotonic() if done else 0.0)
        peak["last"] = peak["last"] or (time.monotonic() if done == tokens else 0.0)
        pools = [r for r in admin.execute("SHOW POOLS") if r[0] != "pgbouncer"] if admin else []
        peak["clients"] = max(peak["clients"], sum(r[2] + r[3] for r in pools))
        peak["waiting"] = max(peak["waiting"], sum(r[3] for r in pools))
    for connection in (conn, admin or conn):
        connection.close()
    return peak


def drain(url: str, target: str, console: str | None, args: Namespace, n: int) -> list[object]:
    """One row: reset, start the workers at once, wait (at most 600 s), check."""
    reset(url)
    query(url, f"SELECT pg_terminate_backend(pid) {OTHERS}")  # PgBouncer's idle connections
    stop, logs = threading.Event(), [Path(args.logs) / f"worker-{i}.err" for i in range(n)]
    sampler = ThreadPoolExecutor(1).submit(sample, url, console, args.tokens, stop)
    env = {**os.environ, "DB_POOLER": "transaction" if console else "none"}
    command = [sys.executable, *shlex.split(WORKER), "--database-url", target]
    env["GLISK_ENV_FILE"], began = os.devnull, time.monotonic()
    workers = [subprocess.Popen(command, env=env, stdout=-1, stderr=log.open("w")) for log in logs]
    for worker in workers:
        try:
            worker.wait(max(1.0, began + 600 - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
    # Each worker prints its WorkerStats: their sum shows that no token was completed twice.
    lines = [line for w in workers for line in w.communicate()[0].splitlines()]
    completed = sum(json.loads(line)["completed"] for line in lines)
    db_errors = sum(json.loads(line)["db_errors"] for line in lines)
    wall = time.monotonic() - began
    stop.set()
    peak, errors = sampler.result(), "".join(log.read_text() for log in logs)
    ((done, claimed),) = query(url, LEFT)
    rate = f"{done / (peak['last'] - peak['first']):,.0f}" if peak["last"] else "-"
    row = ["PgBouncer" if console else "direct", n, f"{done:,} of {args.tokens:,}", claimed]
    row += [f"{completed:,}", rate, f"{wall:.1f}", sum(w.returncode != 0 for w in workers)]
    # Failed database calls from the workers' own counts (an outage is one log line, not one per
    # failed call), and the outages they logged.
    row += [db_errors, errors.count("database unreachable"), errors.count("too many clients")]
    clients = f"{peak['clients']:.0f} ({peak['waiting']:.0f} waiting)" if console else "-"
    return [*row, f"{peak['server']:.0f} of 100", clients]


def scaleout(args: Namespace) -> None:
    with database(100, bindir=PG15) as (server, url):
        base = args.logs = Path(server.data_dir).parent
        port = pgbouncer(base / "pgbouncer", server.socket_dir, server.port, server.password)
        try:
            seed(url, args.tokens)
            # PgBouncer on TCP, SCRAM as with the server (no socket, no peer to require).
            pooled = make_url(url).set(
                host="127.0.0.1", port=port, query={"require_auth": "scram-sha-256"}
            )
            console = libpq_url(pooled.set(database="pgbouncer").render_as_string(False))
            say("PgBouncer: transaction mode, default_pool_size 40, max_db_connections 60")
            rows = []
            for n in map(int, args.processes.split(",")):
                for target, admin in ((pooled.render_as_string(False), console), (url, None)):
                    rows.append(drain(url, target, admin, args, n))
                    say(" | ".join(map(str, rows[-1])))
        finally:
            os.kill(int((base / "pgbouncer" / "pgbouncer.pid").read_text()), signal.SIGTERM)
    headers = ["path", "processes", "tokens done", "left claimed", "completed (workers' stats)"]
    headers += ["tokens/s", "wall s", "failed exits", "database errors (workers' stats)"]
    headers += ["'database unreachable' lines", "of which 'too many clients'"]
    print(table([*headers, "peak server connections", "peak PgBouncer clients"], rows))
    print("concurrency 8, batch 10")
