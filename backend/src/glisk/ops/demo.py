"""``glisk demo``: the whole pipeline on this machine, in worker processes, with nothing to set.

A throwaway embedded PostgreSQL (never DATABASE_URL: the demo must not write into a real
database), migrated; one author and N minted tokens; the fake chain in its own process, the
Replicate and Pinata stand-ins in theirs; for each stage ``--workers`` ``glisk worker``
processes: the image and upload stages run the real handlers (``glisk.handlers``) against the
stand-ins (``glisk.ops.demo_stages``), the reveal stage ``glisk.ops.demo_handlers``. Progress is
``glisk status``'s table, refreshed in place. ``--chaos`` SIGKILLs a random worker about every
second and starts a new one in its place: leases expire, tokens are rescued, a reveal in flight
is reconciled, and every token must still be revealed exactly once; the stand-ins inject 429s,
5xx, lost replies and slow predictions. Ends with a verification table; exit 0 only if every
token is revealed, in exactly one confirmed transaction, after exactly one prediction, with
every file pinned under the CID computed for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glisk.errors import ConfigError, OperatorError
from glisk.ops.demo_stages import HANDLERS
from glisk.pipeline import STAGES

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.ops.demo_stages import StageFacts

# Under chaos, a worker is killed only once it has run this long.
MIN_AGE = 3.0

SEED = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-00000000d3e0', '0x' || repeat('d', 40),
        'a lighthouse drawn by a demo', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       created_at)
SELECT gen_random_uuid(), g, '00000000-0000-0000-0000-00000000d3e0',
       '0x' || substr(md5('minter' || g) || md5('wallet' || g), 1, 40), 'detected',
       timezone('utc', now()) - make_interval(secs => %(tokens)s - g), now()
FROM generate_series(1, %(tokens)s) AS g;
"""


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the whole pipeline locally against stand-ins and verify it"
    )
    demo.add_argument("--tokens", type=int, default=1000, help="tokens to mint (default 1000)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes per stage")
    demo.add_argument("--chaos", action="store_true", help="SIGKILL random workers as it runs")
    demo.add_argument("--seed", type=int, default=0, help="chaos random seed")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after SECONDS")
    demo.set_defaults(handler=cmd_demo)


@dataclass
class Pool:
    """The worker processes, by stage; kills and restarts under chaos."""

    env: dict[str, str]
    logs: Path
    workers: int
    processes: dict[str, list[subprocess.Popen[bytes]]] = field(
        default_factory=dict[str, list[subprocess.Popen[bytes]]]
    )
    kills: int = 0
    started: int = 0
    born: dict[int, float] = field(default_factory=dict[int, float])  # pid -> monotonic start

    def spawn(self, stage: str) -> subprocess.Popen[bytes]:
        self.started += 1
        log = (self.logs / f"{stage}-{self.started}.log").open("wb")
        options = (
            ["--batch", "10"] if stage != "reveal" else ["--batch", "20", "--concurrency", "2"]
        )
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "glisk.cli",
                "worker",
                stage,
                "--handler",
                HANDLERS.get(stage, f"glisk.ops.demo_handlers:{stage}"),
                *options,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.born[process.pid] = time.monotonic()
        return process

    def start(self) -> None:
        for stage in STAGES:
            self.processes[stage] = [self.spawn(stage) for _ in range(self.workers)]

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random worker that has run at least MIN_AGE seconds (a machine slow to start
        processes would otherwise kill workers before they ever claim), and start another."""
        now = time.monotonic()
        old = [
            (stage, index)
            for stage in STAGES
            for index, process in enumerate(self.processes[stage])
            if now - self.born.get(process.pid, now) >= MIN_AGE
        ]
        if not old:
            return
        stage, index = rng.choice(old)
        victims = self.processes[stage]
        victims[index].kill()
        victims[index].wait()
        self.kills += 1
        victims[index] = self.spawn(stage)

    def stop(self) -> None:
        everyone = [p for ps in self.processes.values() for p in ps]
        for process in everyone:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in everyone:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    if not 1 <= args.tokens <= 100_000:
        raise ConfigError("--tokens: must be 1 to 100000")
    if not 1 <= args.workers <= 8:
        raise ConfigError("--workers: must be 1 to 8")
    if not _run(settings, args):
        raise OperatorError("the demo's verification failed (see the table above)")


def _run(settings: Settings, args: argparse.Namespace) -> bool:
    import psycopg
    from rich.console import Console, Group
    from rich.live import Live

    from glisk import migrations
    from glisk.embedded_pg import ephemeral_server
    from glisk.ops.demo_stages import gather_stage_facts, stage_services
    from glisk.ops.status import collect, render
    from glisk.standins.chain_client import fake_chain_process
    from glisk.workers.connection import libpq_url

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="glisk-demo-"))
    server = ephemeral_server(bindir=settings.glisk_pg_bindir)
    server.start()
    try:
        url = server.url_for("postgres")
        migrations.upgrade(url)
        dsn = libpq_url(url)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SEED.replace("%(tokens)s", str(int(args.tokens))).encode())
        console.print(f"Minted {args.tokens:,} tokens on a throwaway PostgreSQL; files in {work}")
        with (
            fake_chain_process() as chain,
            stage_services(work, chaos=args.chaos, seed=args.seed) as services,
        ):
            env = {
                **{
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("REPLICATE_", "PINATA_"))
                },
                **services.env,
                "DATABASE_URL": url,
                "GLISK_ENV_FILE": os.devnull,
                "LOG_LEVEL": "WARNING",
                "APP_ENV": "development",
                "GLISK_DEMO_DIR": str(work),
                "GLISK_DEMO_CHAIN_URL": chain.url,
                # Short leases so a killed worker's tokens come back within seconds; attempts
                # enough that chaos alone never fails a token.
                "WORKER_LEASE_SECONDS": "3",
                "WORKER_MAX_ATTEMPTS": "50",
                "WORKER_BACKOFF_BASE": "0.1",
                "WORKER_BACKOFF_CAP": "1",
                "WORKER_POLL_INTERVAL": "0.2",
                "WORKER_DRAIN_TIMEOUT": "10",
            }
            env.pop("WORKER_METRICS_PORT", None)
            (work / "logs").mkdir()
            pool = Pool(env, work / "logs", args.workers)
            rng = random.Random(args.seed)  # noqa: S311 - chaos, not secrets
            started = time.monotonic()
            finished = False
            with psycopg.connect(dsn, autocommit=True) as conn:
                pool.start()
                try:
                    with Live(console=console, refresh_per_second=4) as live:
                        # The first kill as soon as workers hold tokens (a fast machine can
                        # finish 200 tokens in a second or two), then one about every second.
                        next_kill: float | None = None
                        while time.monotonic() - started < args.timeout:
                            status = collect(conn, exact=True)
                            done = status.statuses["revealed"] + status.statuses["failed"]
                            elapsed = time.monotonic() - started
                            live.update(
                                Group(
                                    render(status),
                                    f"revealed {status.statuses['revealed']:,}/{args.tokens:,}"
                                    f"  workers killed {pool.kills}  {elapsed:.0f} s",
                                )
                            )
                            if done >= args.tokens:
                                finished = True
                                break
                            if next_kill is None and status.statuses["detected"] < args.tokens:
                                next_kill = time.monotonic()
                            if (
                                args.chaos
                                and next_kill is not None
                                and time.monotonic() >= next_kill
                            ):
                                pool.kill_one(rng)
                                next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
                            time.sleep(0.25)
                finally:
                    pool.stop()
                elapsed = time.monotonic() - started
                final = collect(conn, exact=True)
            report = asyncio.run(_chain_report(chain.url))
            stage_facts = gather_stage_facts(dsn, services, args.tokens)
        return _verify(console, args, final, report, pool, elapsed, finished, stage_facts)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _chain_report(url: str) -> Any:
    from glisk.standins.chain_client import FakeChainControl

    return await FakeChainControl(url).report()


def _verify(
    console: Any,
    args: argparse.Namespace,
    final: Any,
    report: Any,
    pool: Pool,
    elapsed: float,
    finished: bool,
    stage_facts: StageFacts,
) -> bool:
    from rich.table import Table

    from glisk.ops.demo_stages import stage_verdict

    console.print()
    confirmed_per_token: dict[int, int] = {}
    for tx in report.confirmed:
        for token_id in tx.token_ids:
            confirmed_per_token[token_id] = confirmed_per_token.get(token_id, 0) + 1
    revealed = final.statuses["revealed"]
    once = sum(1 for n in confirmed_per_token.values() if n == 1)
    more = sum(1 for n in confirmed_per_token.values() if n > 1)
    ok = (
        finished
        and revealed == args.tokens
        and once == args.tokens
        and more == 0
        and len(report.revealed) == args.tokens
    )
    table = Table(title="verification", title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_row("tokens minted", f"{args.tokens:,}")
    table.add_row("revealed (database)", f"{revealed:,}")
    table.add_row("revealed on chain", f"{len(report.revealed):,}")
    table.add_row("in exactly one confirmed transaction", f"{once:,}")
    table.add_row("in more than one confirmed transaction", f"{more:,}")
    for group in final.failed:
        table.add_row(f"failed: {group.stage or '-'} / {group.reason or '-'}", f"{group.count:,}")
    for check, value, holds in stage_verdict(stage_facts):
        table.add_row(check, value if holds else f"[red]{value}[/red]")
        ok = ok and holds
    table.add_row("reveal transactions confirmed", f"{len(report.confirmed):,}")
    # How often each token went out in a transaction (rebroadcasts of the same one included).
    sends = [
        sum(tx.sends for tx in report.transactions if token_id in tx.token_ids)
        for token_id in report.revealed
    ]
    mean = sum(sends) / len(sends) if sends else 0.0
    table.add_row("sends per revealed token: mean / max", f"{mean:.2f} / {max(sends, default=0)}")
    table.add_row("eth_sendRawTransaction calls", f"{report.send_calls:,}")
    table.add_row("workers killed (chaos)", f"{pool.kills:,}")
    table.add_row("worker processes started", f"{pool.started:,}")
    table.add_row("time", f"{elapsed:.1f} s ({revealed / elapsed if elapsed else 0:.0f} tokens/s)")
    console.print(table)
    console.print(
        "OK: every token revealed once" if ok else "FAILED: not every token was revealed once"
    )
    return ok
