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
token is revealed, in exactly one confirmed transaction, with the database and the chain
agreeing on which, no reveal left pending, after exactly one prediction, with every file pinned
under the CID computed for it.

The verdict is a pure function of facts gathered once the workers stopped (``DemoFacts``: what
the database, the chain and the stand-ins say, and how the run went): ``verdict(facts)``
decides, the gathering (``database_facts``, ``chain_facts``, ``gather_stage_facts``) reads, so
the verdict is tested on crafted facts and stays the same whatever node the chain facts come
from.
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
from glisk.ops.demo_stages import HANDLERS, StageFacts, stage_verdict
from glisk.pipeline import STAGES

if TYPE_CHECKING:
    from glisk.core.config import Settings

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
                database = database_facts(conn)
            chain_seen = chain_facts(asyncio.run(_chain_report(chain.url)))
            stage_facts = gather_stage_facts(dsn, services, args.tokens)
        facts = DemoFacts(
            minted=args.tokens,
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
        return decided.ok
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _chain_report(url: str) -> Any:
    from glisk.standins.chain_client import FakeChainControl

    return await FakeChainControl(url).report()


# -- the verdict: facts gathered once the workers stopped, then a pure decision ------------------


@dataclass(frozen=True)
class ChainTx:
    """A reveal transaction as the chain saw it."""

    tx_hash: str
    token_ids: tuple[int, ...]
    confirmed: bool  # mined, and it succeeded
    sends: int = 1  # how often it reached the node, rebroadcasts of the same one included


@dataclass(frozen=True)
class ChainFacts:
    transactions: tuple[ChainTx, ...]  # every reveal transaction the node saw
    revealed: dict[int, str]  # token id -> the transaction that revealed it, per the chain
    send_calls: int = 0  # eth_sendRawTransaction calls, repeats and refusals included


@dataclass(frozen=True)
class DatabaseFacts:
    statuses: dict[int, str]  # token id -> status
    reveal_hashes: dict[int, str]  # token id -> reveal_tx_hash, for tokens that have one
    pending_reveals: tuple[str, ...]  # tx hashes of reveal_transactions rows still pending
    confirmed_reveals: tuple[str, ...]  # tx hashes of reveal_transactions rows confirmed
    failed: tuple[tuple[str | None, str | None, int], ...] = ()  # (stage, reason, tokens)


@dataclass(frozen=True)
class DemoFacts:
    minted: int  # tokens the demo minted
    finished: bool  # every token was revealed or failed before --timeout
    database: DatabaseFacts
    chain: ChainFacts
    kills: int = 0
    workers_started: int = 0
    elapsed: float = 0.0
    # The image and upload stages against the Replicate and Pinata stand-ins (None: not run).
    stages: StageFacts | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: tuple[tuple[str, str], ...]  # the verification table: (check, value)
    problems: tuple[str, ...]  # why it is not ok, one line each


def database_facts(conn: Any) -> DatabaseFacts:
    """What the database says (``conn``: a psycopg connection to the demo's database)."""
    from glisk.ops.status import FAILED_BY_REASON

    statuses: dict[int, str] = {}
    hashes: dict[int, str] = {}
    for token_id, status, tx_hash in conn.execute(
        "SELECT token_id, status::text, reveal_tx_hash FROM tokens_s0"
    ):
        statuses[token_id] = status
        if tx_hash is not None:
            hashes[token_id] = tx_hash
    reveals: dict[str, list[str]] = {"pending": [], "confirmed": []}
    for status, tx_hash in conn.execute(
        "SELECT status::text, tx_hash FROM reveal_transactions ORDER BY created_at"
    ):
        reveals.setdefault(status, []).append(tx_hash or "")
    failed = tuple(
        (stage, reason, int(count)) for stage, reason, count in conn.execute(FAILED_BY_REASON)
    )
    return DatabaseFacts(
        statuses, hashes, tuple(reveals["pending"]), tuple(reveals["confirmed"]), failed
    )


def chain_facts(report: Any) -> ChainFacts:
    """What the chain says, from the fake node's report (glisk.standins.chain_client)."""
    return ChainFacts(
        transactions=tuple(
            ChainTx(
                tx.hash,
                tuple(tx.token_ids),
                tx.state == "mined" and tx.status == "success",
                tx.sends,
            )
            for tx in report.transactions
        ),
        revealed=dict(report.revealed),
        send_calls=report.send_calls,
    )


def _some(token_ids: Any, limit: int = 5) -> str:
    ordered = sorted(token_ids)
    shown = ", ".join(str(t) for t in ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def verdict(facts: DemoFacts) -> Verdict:
    """Whether every minted token is revealed, in exactly one confirmed transaction, with the
    database and the chain agreeing on which, and nothing left pending; the table to show and
    every problem found (ok exactly when there is none)."""
    db, chain = facts.database, facts.chain
    minted = set(db.statuses)  # the token ids the demo minted, as the database holds them
    confirmed = [tx for tx in chain.transactions if tx.confirmed]
    carriers: dict[int, list[str]] = {}
    for tx in confirmed:
        for token_id in tx.token_ids:
            carriers.setdefault(token_id, []).append(tx.tx_hash)
    revealed_db = {t for t, status in db.statuses.items() if status == "revealed"}
    once = {t for t, hashes in carriers.items() if len(hashes) == 1}
    twice = {t for t, hashes in carriers.items() if len(hashes) > 1}
    disagree = {
        t for t in revealed_db & set(chain.revealed) if db.reveal_hashes.get(t) != chain.revealed[t]
    }
    confirmed_hashes = {tx.tx_hash for tx in confirmed}

    problems: list[str] = []
    if not facts.finished:
        problems.append("the run gave up (--timeout) before every token was revealed or failed")
    if len(minted) != facts.minted:
        problems.append(f"the database holds {len(minted):,} tokens, {facts.minted:,} minted")
    if minted - revealed_db:
        problems.append(
            f"{len(minted - revealed_db):,} tokens not revealed in the database: "
            + _some(minted - revealed_db)
        )
    if minted - set(chain.revealed):
        problems.append(
            f"{len(minted - set(chain.revealed)):,} tokens not revealed on chain: "
            + _some(minted - set(chain.revealed))
        )
    if set(chain.revealed) - minted:
        problems.append(
            "the chain revealed tokens never minted: " + _some(set(chain.revealed) - minted)
        )
    if twice:
        problems.append(
            f"{len(twice):,} tokens in more than one confirmed transaction: " + _some(twice)
        )
    if minted - once - twice:
        problems.append(
            f"{len(minted - once - twice):,} tokens in no confirmed transaction: "
            + _some(minted - once - twice)
        )
    if disagree:
        first = min(disagree)
        problems.append(
            f"{len(disagree):,} tokens revealed on chain by another transaction than the "
            "database says: "
            f"{_some(disagree)} (token {first}: database {db.reveal_hashes.get(first)}, "
            f"chain {chain.revealed[first]})"
        )
    if db.pending_reveals:
        problems.append(
            f"{len(db.pending_reveals):,} reveal transactions still pending in the database: "
            + ", ".join(db.pending_reveals[:3])
        )
    if set(db.confirmed_reveals) - confirmed_hashes:
        problems.append(
            "reveal transactions confirmed in the database but not on chain: "
            + ", ".join(sorted(set(db.confirmed_reveals) - confirmed_hashes)[:3])
        )

    stage_rows: list[tuple[str, str]] = []
    for check, value, holds in stage_verdict(facts.stages) if facts.stages is not None else []:
        stage_rows.append((check, value))
        if not holds:
            problems.append(f"{check}: {value}")

    # How often each revealed token went out in a transaction (rebroadcasts included).
    sent: dict[int, int] = {}
    for tx in chain.transactions:
        for token_id in tx.token_ids:
            sent[token_id] = sent.get(token_id, 0) + tx.sends
    sends = [sent.get(token_id, 0) for token_id in chain.revealed]
    mean = sum(sends) / len(sends) if sends else 0.0
    rate = len(revealed_db) / facts.elapsed if facts.elapsed else 0.0
    rows = [
        ("tokens minted", f"{facts.minted:,}"),
        ("revealed (database)", f"{len(revealed_db):,}"),
        ("revealed on chain", f"{len(chain.revealed):,}"),
        ("in exactly one confirmed transaction", f"{len(once):,}"),
        ("in more than one confirmed transaction", f"{len(twice):,}"),
        ("chain and database disagree on the transaction", f"{len(disagree):,}"),
        ("reveal transactions pending (database)", f"{len(db.pending_reveals):,}"),
        *(
            (f"failed: {stage or '-'} / {reason or '-'}", f"{n:,}")
            for stage, reason, n in db.failed
        ),
        *stage_rows,
        ("reveal transactions confirmed", f"{len(confirmed):,}"),
        ("sends per revealed token: mean / max", f"{mean:.2f} / {max(sends, default=0)}"),
        ("eth_sendRawTransaction calls", f"{chain.send_calls:,}"),
        ("workers killed (chaos)", f"{facts.kills:,}"),
        ("worker processes started", f"{facts.workers_started:,}"),
        ("time", f"{facts.elapsed:.1f} s ({rate:.0f} tokens/s)"),
    ]
    return Verdict(not problems, tuple(rows), tuple(problems))


def show(console: Any, decided: Verdict) -> None:
    """The verification table, every problem, and the one-line outcome."""
    from rich.table import Table

    console.print()
    table = Table(title="verification", title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    for check, value in decided.rows:
        table.add_row(check, value)
    console.print(table)
    for problem in decided.problems:
        console.print(f"- {problem}", markup=False, highlight=False)
    console.print(
        "OK: every token revealed once"
        if decided.ok
        else "FAILED: not every token was revealed once"
    )
