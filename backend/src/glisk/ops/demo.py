"""``glisk demo``'s run: the whole pipeline on this machine, in worker processes, nothing to set.

A throwaway embedded PostgreSQL (never DATABASE_URL: the demo must not write into a real
database), migrated; a real EVM node (anvil, from the pinned npm packages) with the GLISK contract
deployed and N tokens minted by real ``mint`` transactions, each BatchMinted log recorded as the
mint follower records it; the Replicate and Pinata stand-ins in their own processes; for each
stage ``--workers`` ``glisk worker`` processes running the real handlers: image and upload
(``glisk.handlers``) against the stand-ins (``glisk.ops.demo_stages``), reveal the real keeper
(``glisk.handlers.reveal:keeper``, signed EIP-1559 transactions, nonces from the database).
Progress is ``glisk status``'s table, refreshed in place. ``--chaos`` SIGKILLs a random worker
holding claims about every second and starts a new one in its place: leases expire, tokens are
rescued, a reveal in flight is reconciled, and every token must still be revealed exactly once;
the stand-ins inject 429s, 5xx, lost replies and slow predictions. Ends with a verification read
from the chain and the stand-ins (glisk.ops.demo_verdict); exit 0 only if every token is
revealed on chain, in exactly one transaction, the one the database names, with the URI the
pipeline made, after exactly one prediction, every file pinned under the CID computed for it.
The command (its options, exit code) is ``glisk.cli.demo``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glisk.core.processes import stop_all
from glisk.ops.demo_stages import HANDLERS as STAGE_HANDLERS
from glisk.ops.demo_verdict import DemoFacts, database_facts, show, verdict
from glisk.ops.queries import LIVE_HOLDER_PIDS
from glisk.pipeline import STAGES

if TYPE_CHECKING:
    from glisk.core.config import Settings

REPLACEMENT_GRACE = 30.0  # seconds chaos waits at most for the last replacement to get to work

# The handler each stage's workers run: the real ones (image and upload against the stand-ins,
# the keeper against anvil).
HANDLERS = {**STAGE_HANDLERS, "reveal": "glisk.handlers.reveal:keeper"}


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
    replacement: tuple[subprocess.Popen[bytes], float] | None = None  # the last one, and when

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
                HANDLERS[stage],
                *options,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return process

    def start(self) -> None:
        for stage in STAGES:
            self.processes[stage] = [self.spawn(stage) for _ in range(self.workers)]

    def kill_one(self, rng: random.Random, holders: set[int]) -> bool:
        """SIGKILL a random worker among those holding live claims (``holders``: their pids) and
        start another in its place; returns whether one was killed. Not before the last
        replacement holds claims itself (or REPLACEMENT_GRACE has passed): a worker still
        importing or connecting has nothing in hand, and killing workers faster than they start
        would only starve a slow machine."""
        last = self.replacement
        if (
            last is not None
            and last[0].pid not in holders
            and time.monotonic() - last[1] < REPLACEMENT_GRACE
            and last[0].poll() is None
        ):
            return False
        working = [
            (stage, index)
            for stage, processes in self.processes.items()
            for index, process in enumerate(processes)
            if process.pid in holders
        ]
        if not working:
            return False
        stage, index = rng.choice(working)
        victims = self.processes[stage]
        victims[index].kill()
        victims[index].wait()
        self.kills += 1
        victims[index] = self.spawn(stage)
        self.replacement = (victims[index], time.monotonic())
        return True

    def stop(self) -> None:
        """SIGTERM every worker (each drains), SIGKILL those still running 30 s later."""
        stop_all([p for ps in self.processes.values() for p in ps], 30)


def run_demo(
    settings: Settings,
    *,
    tokens: int,
    workers: int,
    chaos: bool = False,
    seed: int = 0,
    timeout: float = 600.0,
) -> bool:
    """Mint ``tokens`` tokens, run ``workers`` worker processes per stage (SIGKILLing them at
    random with ``chaos``, seeded by ``seed``) until every token is revealed or failed or
    ``timeout`` seconds have passed, and show the verdict. Whether it is ok."""
    import psycopg
    from rich.console import Console, Group
    from rich.live import Live

    from glisk import migrations
    from glisk.chain.anvil import Anvil
    from glisk.embedded import ephemeral_server
    from glisk.ops import demo_chain
    from glisk.ops.demo_stages import gather_stage_facts, stage_services
    from glisk.ops.status import collect, render
    from glisk.workers.connection import libpq_url

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="glisk-demo-"))
    ok = False
    server = ephemeral_server(bindir=settings.glisk_pg_bindir)
    server.start()
    try:
        url = server.url_for("postgres")
        migrations.upgrade(url)
        dsn = libpq_url(url)
        with (
            Anvil() as node,
            stage_services(work, chaos=chaos, seed=seed) as services,
        ):
            chain = asyncio.run(demo_chain.set_up(node, url, tokens, work))
            console.print(
                f"Minted {tokens:,} tokens in {chain.mint_transactions} mint transactions "
                f"on anvil (chain {node.chain_id}, GLISK at {chain.contract}); files in {work}"
            )
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
                **chain.worker_env(),
                # Short leases so a killed worker's tokens come back within seconds; attempts
                # enough that chaos alone never fails a token.
                "WORKER_LEASE_SECONDS": "3",
                "WORKER_MAX_ATTEMPTS": "50",
                "WORKER_MAX_DEFERRALS": "200",
                "WORKER_BACKOFF_BASE": "0.1",
                "WORKER_BACKOFF_CAP": "1",
                "WORKER_POLL_INTERVAL": "0.2",
                "WORKER_DRAIN_TIMEOUT": "10",
            }
            for name in ("WORKER_METRICS_PORT", "KEEPER_PRIVATE_KEY"):
                env.pop(name, None)
            (work / "logs").mkdir()
            pool = Pool(env, work / "logs", workers)
            rng = random.Random(seed)  # noqa: S311 - chaos, not secrets
            started = time.monotonic()
            finished = False
            with psycopg.connect(dsn, autocommit=True) as conn:
                pool.start()
                try:
                    with Live(console=console, refresh_per_second=4) as live:
                        # The first kill as soon as workers hold tokens (a fast machine can
                        # finish 200 tokens in a second or two), then one about every second.
                        next_kill: float | None = None
                        while time.monotonic() - started < timeout:
                            status = collect(conn, exact=True)
                            done = status.statuses["revealed"] + status.statuses["failed"]
                            elapsed = time.monotonic() - started
                            live.update(
                                Group(
                                    render(status),
                                    f"revealed {status.statuses['revealed']:,}/{tokens:,}"
                                    f"  workers killed {pool.kills}  {elapsed:.0f} s",
                                )
                            )
                            if done >= tokens:
                                finished = True
                                break
                            if next_kill is None and status.statuses["detected"] < tokens:
                                next_kill = time.monotonic()
                            if (
                                chaos
                                and next_kill is not None
                                and time.monotonic() >= next_kill
                                and pool.kill_one(rng, _holders(conn))
                            ):
                                next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
                            time.sleep(0.25)
                finally:
                    pool.stop()
                elapsed = time.monotonic() - started
                database = database_facts(conn)
                chain_seen = asyncio.run(demo_chain.chain_facts(chain, conn))
            stage_facts = gather_stage_facts(dsn, services, tokens)
        facts = DemoFacts(
            minted=tokens,
            finished=finished,
            database=database,
            chain=chain_seen,
            kills=pool.kills,
            workers_started=pool.started,
            elapsed=elapsed,
            stages=stage_facts,
        )
        decided = verdict(facts)
        show(console, decided)
        ok = decided.ok
        if not ok:  # the workers' logs say why: keep them
            console.print(f"worker logs kept in {work / 'logs'}")
        return ok
    finally:
        server.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)


def _holders(conn: Any) -> set[int]:
    rows = conn.execute(LIVE_HOLDER_PIDS.encode()).fetchall()
    return {int(pid) for (pid,) in rows if pid.isdigit()}
