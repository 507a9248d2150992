"""CIDs computed by Helia's UnixFS importer (npm ``ipfs-unixfs-importer``), not by glisk.

The Pinata stand-in names what it pins with these CIDs, so a CID glisk computes itself
(``glisk.ipfs.unixfs``) is checked against IPFS's own code on every pin, and the tests compare
the two directly. One Node.js process (``unixfs_cid.mjs``) serves every request in order over
its stdin and stdout; the pinned packages come from ``glisk.npm`` (installed on first use).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from types import TracebackType

from glisk.errors import GliskError

SCRIPT = Path(__file__).with_name("unixfs_cid.mjs")
# A 5 MiB file is a 7 MB line of base64; the replies are short.
_LINE_LIMIT = 1 << 16


class HeliaError(GliskError):
    """The importer process failed or refused a request."""


class HeliaImporter:
    """``async with HeliaImporter() as helia: await helia.cid(data)``. Requests are answered one
    at a time, in order; the process is started on entry and stopped on exit."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        from glisk import npm

        # --input-type=module -e: bare imports resolve from the working directory, which holds
        # the pinned node_modules (ESM ignores NODE_PATH).
        self._process = await asyncio.create_subprocess_exec(
            npm.node(),
            "--input-type=module",
            "-e",
            SCRIPT.read_text(),
            cwd=npm.install_dir(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> HeliaImporter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def cid(
        self,
        data: bytes,
        *,
        cid_version: int = 1,
        chunk_size: int = 262_144,
        max_links: int = 174,
    ) -> str:
        """The CID Helia gives ``data`` as one file: fixed ``chunk_size`` chunks, a balanced DAG
        of ``max_links`` links per node; CIDv1 with raw leaves (``ipfs add --cid-version=1``) or
        CIDv0 with dag-pb leaves. Raises HeliaError."""
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise HeliaError("the importer is not running (use 'async with HeliaImporter()')")
        request = {
            "data": base64.b64encode(data).decode(),
            "cidVersion": cid_version,
            "chunkSize": chunk_size,
            "maxChildrenPerNode": max_links,
        }
        async with self._lock:
            process.stdin.write(json.dumps(request).encode() + b"\n")
            await process.stdin.drain()
            line = await process.stdout.readline()
        if not line:
            raise HeliaError(f"the importer process exited (code {process.returncode})")
        reply = json.loads(line)
        if "cid" not in reply:
            raise HeliaError(f"the importer refused the request: {reply.get('error')}")
        return str(reply["cid"])
