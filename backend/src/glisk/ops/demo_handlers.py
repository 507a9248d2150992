"""The handlers ``glisk demo`` runs in its worker processes, against local stand-ins:

- ``image``: renders a small PNG per token (a colour and a pattern derived from its id) into
  ``$GLISK_DEMO_DIR/images``; idempotent (the same bytes every time).
- ``upload``: stores the image and its ERC-721 metadata in a local content-addressed store
  (``$GLISK_DEMO_DIR/ipfs/<cid>``) under real CIDs: CIDv1, raw codec, sha2-256, base32 (what
  ``ipfs add --cid-version 1 --raw-leaves`` gives a file of one block); returns the metadata CID.

The reveal stage is no stand-in: the demo runs the real keeper (``glisk.handlers.reveal``) on
anvil.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from glisk.standins import png
from glisk.workers.claims import Claim

SIZE = 32


def _demo_dir() -> Path:
    return Path(os.environ["GLISK_DEMO_DIR"])


def cid_v1_raw(data: bytes) -> str:
    """The CIDv1 (raw codec 0x55, sha2-256 multihash) of ``data``, multibase base32 ('b...')."""
    digest = hashlib.sha256(data).digest()
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def render_png(token_id: int, size: int = SIZE) -> bytes:
    """A deterministic size x size RGB PNG for ``token_id``."""
    return png.render_png(f"glisk-demo-{token_id}".encode(), size)


def _write(path: Path, data: bytes) -> None:
    """Write atomically (a killed worker never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    temporary.replace(path)


def store(data: bytes) -> str:
    """Put ``data`` in the local content-addressed store; its CID."""
    cid = cid_v1_raw(data)
    target = _demo_dir() / "ipfs" / cid
    if not target.exists():
        _write(target, data)
    return cid


async def image(claim: Claim) -> str:
    path = _demo_dir() / "images" / f"{claim.token_id}.png"
    await asyncio.to_thread(_write, path, render_png(claim.token_id))
    return str(path)


def metadata(token_id: int, image_cid: str) -> bytes:
    document: dict[str, Any] = {
        "name": f"GLISK #{token_id}",
        "description": "A GLISK demo token",
        "image": f"ipfs://{image_cid}",
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


async def upload(claim: Claim) -> str:
    if claim.image_path is None:  # the upload stage only claims tokens with an image
        raise ValueError("image_path: is required to upload")
    image = await asyncio.to_thread(Path(claim.image_path).read_bytes)
    image_cid = await asyncio.to_thread(store, image)
    return await asyncio.to_thread(store, metadata(claim.token_id, image_cid))
