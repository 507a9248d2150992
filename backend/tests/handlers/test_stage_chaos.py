"""Stage chaos: the image and upload stages' real handlers in `glisk worker` processes, against
the Replicate and Pinata stand-ins injecting faults (429 with Retry-After, 5xx, replies lost
after the work was done, slow predictions), while workers are SIGKILLed and paused past their
leases. At the end every token is ready with a metadata CID whose content, fetched back from the
pinning service, is valid ERC-721 JSON pointing at the token's image; each token was predicted
exactly once (a rescued token resumed its prediction); no pin came back under another CID;
nothing is left claimed."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from glisk import migrations
from glisk.handlers.image import seed_for
from glisk.ipfs.unixfs import file_cid
from glisk.testing import libpq_kwargs, throwaway_database
from tests.support.database import Database
from tests.support.processes import GLISK, glisk_env
from tests.support.services import PINATA_JWT, REPLICATE_TOKEN, pinata_standin, replicate_standin

TOKENS = 120
WORKERS_PER_STAGE = 2
CHAOS_SECONDS = 15.0
DEADLINE_SECONDS = 150.0
LEASE = 2.0
PROMPT = "a lighthouse drawn in ink, seen from the sea"

SEED = f"""
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-0000000000c5', '0x' || repeat('c', 40), '{PROMPT}', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       created_at)
SELECT gen_random_uuid(), g, '00000000-0000-0000-0000-0000000000c5', '0x' || repeat('e', 40),
       'detected', timezone('utc', now()) - make_interval(secs => {TOKENS} - g), now()
FROM generate_series(1, {TOKENS}) AS g;
"""

REPLICATE_FAULTS = {
    "rates": {
        "create": {"429": 0.05, "503": 0.03, "lost": 0.06, "slow": 0.05},
        "get": {"429": 0.02, "500": 0.01, "lost": 0.02},
    },
    "retry_after": 0.3,
    "prediction_seconds": 0.3,  # predictions in flight while workers die
    "slow_seconds": 3.0,  # longer than a lease: kept alive by heartbeats, or rescued
    "seed": 26,
}
PINATA_FAULTS = {
    "rates": {"pin": {"429": 0.05, "503": 0.03, "lost": 0.06}},
    "retry_after": 0.3,
    "seed": 26,
}


def _worker(stage: str, env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    handler = {"image": "glisk.handlers.image:generate", "upload": "glisk.handlers.upload:upload"}
    with (logs / f"{stage}-{n}.log").open("wb") as log:
        return subprocess.Popen(
            [*GLISK, "worker", stage, "--handler", handler[stage], "--concurrency", "8"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _count(conn: psycopg.Connection[Any], where: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM tokens_s0 WHERE {where}").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


@pytest.mark.proof
@pytest.mark.timeout(400)
def test_killed_and_paused_workers_pay_once_pin_true_and_finish_every_token(
    postgres_container: Database, tmp_path: Path
) -> None:
    rng = random.Random(26)
    logs = tmp_path / "logs"
    logs.mkdir()
    with (
        throwaway_database(postgres_container.url) as url,
        replicate_standin() as (replicate, replicate_control),
        pinata_standin() as (pinata, pinata_control),
    ):
        migrations.upgrade(url)
        replicate_control.configure(**REPLICATE_FAULTS)
        pinata_control.configure(**PINATA_FAULTS)
        env = glisk_env(
            "REPLICATE_*",
            "PINATA_*",
            "WORKER_*",
            DATABASE_URL=url,
            LOG_LEVEL="INFO",
            REPLICATE_API_TOKEN=REPLICATE_TOKEN,
            REPLICATE_BASE_URL=replicate.url,
            REPLICATE_POLL_INTERVAL="0.05",
            REPLICATE_PREDICTION_TIMEOUT="60",
            PINATA_JWT=PINATA_JWT,
            PINATA_API_URL=pinata.url,
            GLISK_IMAGE_DIR=str(tmp_path / "images"),
            WORKER_LEASE_SECONDS=str(LEASE),
            WORKER_MAX_ATTEMPTS="30",
            WORKER_MAX_DEFERRALS="200",
            WORKER_BACKOFF_BASE="0.05",
            WORKER_BACKOFF_CAP="0.5",
            WORKER_POLL_INTERVAL="0.2",
            WORKER_DRAIN_TIMEOUT="5",
        )
        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(SEED.encode())
            started = 0
            workers: list[tuple[str, subprocess.Popen[bytes]]] = []
            for stage in ("image", "upload"):
                for _ in range(WORKERS_PER_STAGE):
                    workers.append((stage, _worker(stage, env, logs, started)))
                    started += 1
            kills = pauses = 0
            paused: dict[int, float] = {}  # pid -> when to SIGCONT
            try:
                chaos_until = time.monotonic() + CHAOS_SECONDS
                while time.monotonic() < chaos_until and _count(conn, "status <> 'ready'"):
                    time.sleep(rng.uniform(0.5, 1.2))
                    for _, process in workers:
                        if process.pid in paused and time.monotonic() >= paused[process.pid]:
                            process.send_signal(signal.SIGCONT)
                            del paused[process.pid]
                    index = rng.randrange(len(workers))
                    stage, victim = workers[index]
                    if victim.pid in paused:
                        continue
                    if rng.random() < 0.3:  # paused past its lease: its claims are rescued
                        victim.send_signal(signal.SIGSTOP)
                        paused[victim.pid] = time.monotonic() + LEASE + 1.5
                        pauses += 1
                    else:
                        victim.kill()
                        victim.wait()
                        kills += 1
                        workers[index] = (stage, _worker(stage, env, logs, started))
                        started += 1
                for _, process in workers:
                    if process.pid in paused:
                        process.send_signal(signal.SIGCONT)
                paused.clear()
                deadline = time.monotonic() + DEADLINE_SECONDS
                while _count(conn, "status NOT IN ('ready', 'failed')") and (
                    time.monotonic() < deadline
                ):
                    time.sleep(0.5)
            finally:
                for _, process in workers:
                    if process.pid in paused:
                        process.send_signal(signal.SIGCONT)
                    process.terminate()
                for _, process in workers:
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()

            tokens = conn.execute(
                "SELECT id, token_id, status::text, image_path, metadata_cid, claim_id, error_data "
                "FROM tokens_s0 ORDER BY token_id"
            ).fetchall()
            refused_pins = _count_records(conn, "error_data ? 'pinned'")
            completed_records = _count_records(conn, "status = 'completed'")
            jobs = conn.execute(
                "SELECT count(DISTINCT external_job_id) FROM image_generation_jobs"
            ).fetchone()
        replicate_stats = replicate_control.stats()
        pinata_stats = pinata_control.stats()
        with httpx.Client(base_url=pinata.url, timeout=30) as gateway:
            fetched = {
                token_id: (
                    gateway.get(f"/ipfs/{cid}").content if cid else b"",
                    Path(image_path).read_bytes() if image_path else b"",
                )
                for _, token_id, _, image_path, cid, _, _ in tokens
            }
            images = {
                token_id: gateway.get(f"/ipfs/{file_cid(image)}").content
                for token_id, (_, image) in fetched.items()
                if image
            }

    log_text = "\n".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert "Traceback" not in log_text, log_text[-3000:]
    statuses = {status for _, _, status, *_ in tokens}
    assert statuses == {"ready"}, [t[6] for t in tokens if t[2] != "ready"][:3]
    assert all(t[5] is None for t in tokens), "tokens left claimed"
    # Exactly one prediction per token: one per distinct input, and every token's input seen.
    twice = {k: n for k, n in replicate_stats["by_input"].items() if n > 1}
    ours = {seed_for(token_uuid) for token_uuid, *_ in tokens}
    strangers = [k for k in replicate_stats["by_input"] if json.loads(k)["seed"] not in ours]
    assert replicate_stats["created"] == TOKENS, (twice, strangers, replicate_stats["created"])
    assert set(replicate_stats["by_input"].values()) == {1}
    seeds = {json.loads(key)["seed"] for key in replicate_stats["by_input"]}
    assert seeds == {seed_for(token_uuid) for token_uuid, *_ in tokens}
    assert jobs == (TOKENS,)  # every prediction recorded in image_generation_jobs
    # Every file pinned once under the CID computed for it; re-uploads were duplicates.
    assert pinata_stats["wrong_cids"] == 0 and refused_pins == 0
    assert pinata_stats["pinned"] == 2 * TOKENS
    assert completed_records == 2 * TOKENS
    for _, token_id, _, _, cid, _, _ in tokens:
        document, image = fetched[token_id]
        assert file_cid(document) == cid
        metadata = json.loads(document)
        assert metadata["name"] == f"GLISK #{token_id}"
        assert metadata["description"] == PROMPT
        assert metadata["image"] == f"ipfs://{file_cid(image)}"
        assert images[token_id] == image
    # The chaos happened: workers died and froze, faults were injected and survived.
    assert kills >= 3 and pauses >= 1, (kills, pauses)
    assert replicate_stats["lost_replies"] > 0 and pinata_stats["lost_replies"] > 0
    assert sum(replicate_stats["faults"].values()) > 0 and pinata_stats["duplicates"] > 0
    print(
        f"stage chaos: {kills} kills, {pauses} pauses, {started} processes; replicate "
        f"{replicate_stats['faults']}; pinata {pinata_stats['faults']}, "
        f"{pinata_stats['duplicates']} duplicate uploads"
    )


def _count_records(conn: psycopg.Connection[Any], where: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM ipfs_upload_records WHERE {where}").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])
