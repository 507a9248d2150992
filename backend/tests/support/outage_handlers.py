"""Handlers for the ``glisk worker`` processes of the outage tests (tests/workers/
test_worker_outages.py), named by ``--handler tests.support.outage_handlers:image``.

Each call takes ``GLISK_TEST_HANDLER_SECONDS`` (read per call: nothing happens at import), so a
test can stop the database while handlers are in flight and let them finish during the outage.
"""

from __future__ import annotations

import asyncio
import os

from glisk.workers import Claim

SECONDS_ENV = "GLISK_TEST_HANDLER_SECONDS"


async def image(claim: Claim) -> str:
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    return f"/images/{claim.token_id}.png"
