"""The image and upload stages' real handlers against the Replicate and Pinata stand-ins
(``stages``): tokens per second through both stages with zero-latency stand-ins next to the same
runtime with no-op handlers, and predictions in flight per process with slow predictions."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from statistics import fmean
from typing import Any

from bench.harness import database, query, say, seed, table
from glisk.core.config import Settings
from glisk.core.logs import configure_logging
from glisk.handlers.image import ImageStage
from glisk.handlers.records import Records
from glisk.handlers.upload import UploadStage
from glisk.pipeline import STAGES, StageName
from glisk.standins.http_service import StandinControl, standin_process
from glisk.workers.connection import ConnectOptions
from glisk.workers.noop import handlers
from glisk.workers.worker import Worker

TOKEN = "bench-token"  # noqa: S105 - the stand-ins' throwaway credential
READY = "SELECT count(*) FROM tokens_s0 WHERE status = 'ready'"
EMPTY = "TRUNCATE authors, tokens_s0, image_generation_jobs, ipfs_upload_records CASCADE"


def _settings(replicate: str, pinata: str, images: Path) -> Settings:
    return Settings(
        _env_file=None,  # pyright: ignore[reportCallIssue]
        replicate_api_token=TOKEN,
        replicate_base_url=replicate,
        replicate_poll_interval=0.5,
        replicate_prediction_timeout=600,
        pinata_jwt=TOKEN,
        pinata_api_url=pinata,
        glisk_image_dir=images,
    )


async def _through(url: str, image: Any, upload: Any, concurrency: int, tokens: int) -> float:
    """Seconds for ``tokens`` detected tokens to become ready through an image and an upload
    Worker in this process."""
    connect = ConnectOptions(url)
    options: dict[str, Any] = {"concurrency": concurrency, "batch": min(concurrency, 100)}
    options |= {"poll_interval": 0.05, "lease_seconds": 60}
    workers = [
        Worker(STAGES[StageName.IMAGE], image, connect, **options),
        Worker(STAGES[StageName.UPLOAD], upload, connect, **options),
    ]
    stop = asyncio.Event()
    started = time.perf_counter()
    running = [asyncio.create_task(worker.run(stop)) for worker in workers]
    # The upload stage idles until images arrive: both run until every token is ready.
    while (await asyncio.to_thread(query, url, READY))[0][0] < tokens:
        if any(task.done() for task in running):
            break  # a worker died: its exception surfaces below
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*running)
    (ready,) = query(url, READY)[0]
    assert ready == tokens, f"{ready} of {tokens} tokens ready"
    return elapsed


async def _in_flight(
    url: str, handler: Any, count: Any, concurrency: int, tokens: int, window: float
) -> list[int]:
    """Samples (every 0.5 s, for ``window`` seconds once the first is in flight) of ``count()``
    while one image Worker with ``concurrency`` runs ``handler``; then the worker stops."""
    worker = Worker(
        STAGES[StageName.IMAGE],
        handler,
        ConnectOptions(url),
        concurrency=concurrency,
        batch=min(concurrency, 100),
        poll_interval=0.05,
        lease_seconds=60,
        drain_timeout=1,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while await count() == 0:  # noqa: ASYNC110 - polling another process's counter
        await asyncio.sleep(0.05)
    samples: list[int] = []
    ends = time.monotonic() + window
    while time.monotonic() < ends:
        samples.append(await count())
        await asyncio.sleep(0.5)
    stop.set()
    await task
    assert tokens > concurrency
    return samples


def stages(args: Namespace) -> None:
    configure_logging("production", "WARNING")  # a line per commit would be the benchmark
    env = {**os.environ, "REPLICATE_API_TOKEN": TOKEN, "PINATA_JWT": TOKEN}
    with (
        database() as (_, url),
        standin_process("glisk.standins.replicate", env=env) as replicate,
        standin_process("glisk.standins.pinata", env=env) as pinata,
        tempfile.TemporaryDirectory(prefix="glisk-bench-images-") as images,
    ):
        replicate_control, pinata_control = (
            StandinControl(replicate.url),
            StandinControl(pinata.url),
        )
        settings = _settings(replicate.url, pinata.url, Path(images))
        noop = handlers()
        rows: list[list[object]] = []
        for concurrency in [int(c) for c in str(args.concurrency).split(",")]:
            cells: dict[str, float] = {}
            for name in ("no-op handlers", "Replicate + Pinata handlers"):
                query(url, EMPTY)
                seed(url, args.tokens)
                replicate_control.reset()
                pinata_control.reset()
                if name.startswith("no-op"):
                    image, upload = noop[StageName.IMAGE], noop[StageName.UPLOAD]
                    cells[name] = asyncio.run(
                        _through(url, image, upload, concurrency, args.tokens)
                    )
                    continue

                async def real(concurrency: int = concurrency) -> float:
                    image = ImageStage(settings, Records(ConnectOptions(url)))
                    upload = UploadStage(settings, Records(ConnectOptions(url)))
                    try:
                        return await _through(url, image, upload, concurrency, args.tokens)
                    finally:
                        await image.aclose()
                        await upload.aclose()

                cells[name] = asyncio.run(real())
                created = replicate_control.stats()["created"]
                assert created == args.tokens, f"{created} predictions for {args.tokens} tokens"
            for name, seconds in cells.items():
                rate = args.tokens / seconds
                rows.append([name, concurrency, f"{rate:,.0f}", f"{1000 / rate:.2f}"])
            say(f"concurrency {concurrency}: {cells}")
        print("tokens through the image and upload stages, zero-latency stand-ins")
        print(table(["handlers", "concurrency", "tokens/s", "ms per token"], rows))

        # Slow predictions: how many one process keeps in flight.
        replicate_control.reset()
        replicate_control.configure(prediction_seconds=args.prediction_seconds)
        flight_rows: list[list[object]] = []
        tokens = args.in_flight_concurrency * 3

        async def slow_noop() -> list[int]:
            running = 0

            async def handler(claim: Any) -> str:
                nonlocal running
                running += 1
                try:
                    await asyncio.sleep(args.prediction_seconds)
                finally:
                    running -= 1
                return "/bench/image.png"

            async def count() -> int:
                return running

            return await _in_flight(
                url, handler, count, args.in_flight_concurrency, tokens, args.window
            )

        async def slow_real() -> list[int]:
            image = ImageStage(settings, Records(ConnectOptions(url)))

            async def count() -> int:
                stats = await asyncio.to_thread(replicate_control.stats)
                return int(stats["in_flight"])

            try:
                return await _in_flight(
                    url, image, count, args.in_flight_concurrency, tokens, args.window
                )
            finally:
                await image.aclose()

        for name, run in (("sleeping no-op handler", slow_noop), ("Replicate handler", slow_real)):
            query(url, EMPTY)
            seed(url, tokens)
            samples = asyncio.run(run())
            flight_rows.append(
                [name, args.in_flight_concurrency, f"{fmean(samples):.1f}", max(samples)]
            )
        print(f"\npredictions in flight in one process, {args.prediction_seconds:g} s predictions")
        print(table(["handler", "concurrency", "in flight: mean", "max"], flight_rows))
