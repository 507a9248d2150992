"""The image and upload stages in ``glisk demo``: the real handlers (``glisk.handlers``) against
the Replicate and Pinata stand-ins, and what the demo's verification checks about them.

- ``stage_services(work, chaos=..., seed=...)`` starts both stand-ins (their own processes, with
  random throwaway tokens passed through the environment, never argv) and yields the
  environment the worker processes need (``.env``) and the stand-ins' controls. With chaos,
  the stand-ins inject faults at random: 429 with Retry-After, 5xx, replies lost after the work
  was done, slow predictions.
- ``gather_stage_facts(dsn, services)`` reads the counters of both stand-ins and the database,
  and fetches every metadata CID back from the Pinata stand-in (the gateway), checking its
  bytes, its JSON and the image it points at.
- ``stage_verdict(facts)`` turns the facts into verification rows, each with whether it holds
  (pure: no I/O).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glisk.standins.http_service import StandinControl, standin_process

IMAGE_HANDLER = "glisk.handlers.image:generate"
UPLOAD_HANDLER = "glisk.handlers.upload:upload"
HANDLERS = {"image": IMAGE_HANDLER, "upload": UPLOAD_HANDLER}

# The faults a chaos run injects, per request of each operation, and the Retry-After of a 429.
REPLICATE_CHAOS: dict[str, Any] = {
    "rates": {
        "create": {"429": 0.03, "503": 0.02, "lost": 0.03, "slow": 0.02},
        "get": {"429": 0.01, "lost": 0.01},
    },
    "retry_after": 0.5,
}
PINATA_CHAOS: dict[str, Any] = {
    "rates": {"pin": {"429": 0.03, "503": 0.02, "lost": 0.03}},
    "retry_after": 0.5,
}


@dataclass(frozen=True)
class StageServices:
    replicate: StandinControl
    pinata: StandinControl
    env: dict[str, str]  # for the worker processes: service URLs, tokens, the image directory


@contextlib.contextmanager
def stage_services(work: Path, *, chaos: bool, seed: int = 0) -> Iterator[StageServices]:
    """Both stand-ins running for the block; see the module docstring."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per admin request otherwise
    replicate_token = "r8_demo_" + secrets.token_hex(16)
    pinata_jwt = "demo." + secrets.token_hex(24)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICATE_", "PINATA_"))}
    with (
        standin_process(
            "glisk.standins.replicate", env={**base, "REPLICATE_API_TOKEN": replicate_token}
        ) as replicate,
        standin_process("glisk.standins.pinata", env={**base, "PINATA_JWT": pinata_jwt}) as pinata,
    ):
        replicate_control = StandinControl(replicate.url)
        pinata_control = StandinControl(pinata.url)
        # A little model time, so that predictions are in flight while workers are killed.
        replicate_control.configure(prediction_seconds=0.05, slow_seconds=2.0, seed=seed)
        if chaos:
            replicate_control.configure(**REPLICATE_CHAOS, seed=seed)
            pinata_control.configure(**PINATA_CHAOS, seed=seed)
        env = {
            "REPLICATE_API_TOKEN": replicate_token,
            "REPLICATE_BASE_URL": replicate.url,
            "REPLICATE_POLL_INTERVAL": "0.05",
            "REPLICATE_PREDICTION_TIMEOUT": "30",
            "REPLICATE_HTTP_TIMEOUT": "10",
            "PINATA_JWT": pinata_jwt,
            "PINATA_API_URL": pinata.url,
            "PINATA_HTTP_TIMEOUT": "10",
            "GLISK_IMAGE_DIR": str(work / "images"),
        }
        yield StageServices(replicate_control, pinata_control, env)


@dataclass(frozen=True)
class StageFacts:
    tokens: int
    predictions_created: int
    inputs_predicted_more_than_once: int
    predictions_recorded: int  # image_generation_jobs rows naming a prediction
    files_pinned: int  # distinct CIDs
    uploads: int  # pin requests that pinned (duplicates included)
    uploads_per_cid_max: int
    mismatched_pins: int  # pins answered under another CID (stand-in) or records refused
    upload_records_completed: int
    metadata_checked: int  # tokens with a metadata CID that was fetched back and checked
    metadata_valid: int  # ... whose bytes, JSON and image all check out
    faults_injected: int


def gather_stage_facts(dsn: str, services: StageServices, tokens: int) -> StageFacts:
    """Read the stand-ins' counters and the database (libpq ``dsn``), and fetch every token's
    metadata and image back from the Pinata stand-in to check them."""
    import httpx
    import psycopg

    from glisk.ipfs.unixfs import file_cid

    replicate = services.replicate.stats()
    pinata = services.pinata.stats()
    with psycopg.connect(dsn, autocommit=True) as conn:
        recorded = conn.execute(
            "SELECT count(DISTINCT external_job_id) FROM image_generation_jobs "
            "WHERE external_job_id IS NOT NULL"
        ).fetchone()
        refused = conn.execute(
            "SELECT count(*) FROM ipfs_upload_records WHERE error_data ? 'pinned'"
        ).fetchone()
        completed = conn.execute(
            "SELECT count(*) FROM ipfs_upload_records WHERE status = 'completed'"
        ).fetchone()
        cids = [
            row[0]
            for row in conn.execute(
                "SELECT metadata_cid FROM tokens_s0 WHERE metadata_cid IS NOT NULL"
            ).fetchall()
        ]
    valid = 0
    with httpx.Client(base_url=services.pinata.url, timeout=30) as gateway:

        def fetch(cid: str) -> bytes | None:
            response = gateway.get(f"/ipfs/{cid}")
            return response.content if response.status_code == 200 else None

        for cid in cids:
            document = fetch(cid)
            if document is None or file_cid(document) != cid:
                continue
            try:
                metadata = json.loads(document)
            except ValueError:
                continue
            image_uri = metadata.get("image", "") if isinstance(metadata, dict) else ""
            if not metadata.get("name") or not image_uri.startswith("ipfs://"):
                continue
            image = fetch(image_uri.removeprefix("ipfs://"))
            if image is not None and file_cid(image) == image_uri.removeprefix("ipfs://"):
                valid += 1
    uploads_by_cid: dict[str, int] = pinata["uploads_by_cid"]
    return StageFacts(
        tokens=tokens,
        predictions_created=replicate["created"],
        inputs_predicted_more_than_once=sum(1 for n in replicate["by_input"].values() if n > 1),
        predictions_recorded=int(recorded[0]) if recorded else 0,
        files_pinned=pinata["pinned"],
        uploads=sum(uploads_by_cid.values()),
        uploads_per_cid_max=max(uploads_by_cid.values(), default=0),
        mismatched_pins=pinata["wrong_cids"] + (int(refused[0]) if refused else 0),
        upload_records_completed=int(completed[0]) if completed else 0,
        metadata_checked=len(cids),
        metadata_valid=valid,
        faults_injected=sum(replicate["faults"].values()) + sum(pinata["faults"].values()),
    )


def stage_verdict(facts: StageFacts) -> list[tuple[str, str, bool]]:
    """Verification rows (check, value, holds) for the image and upload stages."""
    per_token = facts.predictions_created / facts.tokens if facts.tokens else 0.0
    return [
        (
            "predictions created per token",
            f"{per_token:.2f} ({facts.predictions_created:,})",
            facts.predictions_created == facts.tokens,
        ),
        (
            "tokens predicted more than once",
            f"{facts.inputs_predicted_more_than_once:,}",
            facts.inputs_predicted_more_than_once == 0,
        ),
        (
            "predictions recorded (image_generation_jobs)",
            f"{facts.predictions_recorded:,}",
            facts.predictions_recorded == facts.predictions_created,
        ),
        (
            "files pinned (image + metadata)",
            f"{facts.files_pinned:,}",
            facts.files_pinned == 2 * facts.tokens,
        ),
        (
            "pins per file: uploads / max",
            f"{facts.uploads / facts.files_pinned if facts.files_pinned else 0:.2f} / "
            f"{facts.uploads_per_cid_max}",
            True,  # a file uploaded again after a lost reply is a duplicate, not a second pin
        ),
        ("pins under a mismatched CID", f"{facts.mismatched_pins:,}", facts.mismatched_pins == 0),
        (
            "upload records completed (ipfs_upload_records)",
            f"{facts.upload_records_completed:,}",
            facts.upload_records_completed == 2 * facts.tokens,
        ),
        (
            "CIDs verified (metadata and image fetched back)",
            f"{facts.metadata_valid:,} / {facts.metadata_checked:,}",
            facts.metadata_valid == facts.metadata_checked == facts.tokens,
        ),
        ("service faults injected", f"{facts.faults_injected:,}", True),
    ]
