"""The paid services' stand-ins as the tests run them (one process each, a token each), and the
settings that point the stage handlers at them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glisk.core.config import Settings
from glisk.handlers.records import Records
from glisk.standins.http_service import RunningStandin, StandinControl, standin_process
from glisk.uow import UnitOfWorkFactory
from glisk.workers.run import connect_options_of

REPLICATE_TOKEN = "r8_test_token"
PINATA_JWT = "pinata.test.jwt"


@contextlib.contextmanager
def replicate_standin() -> Iterator[tuple[RunningStandin, StandinControl]]:
    env = {**os.environ, "REPLICATE_API_TOKEN": REPLICATE_TOKEN}
    with standin_process("glisk.standins.replicate", env=env) as running:
        yield running, StandinControl(running.url)


@contextlib.contextmanager
def pinata_standin() -> Iterator[tuple[RunningStandin, StandinControl]]:
    env = {**os.environ, "PINATA_JWT": PINATA_JWT}
    with standin_process("glisk.standins.pinata", env=env) as running:
        yield running, StandinControl(running.url)


def handler_settings(
    image_dir: Path,
    *,
    replicate_url: str = "http://127.0.0.1:9",
    pinata_url: str = "http://127.0.0.1:9",
    **overrides: Any,
) -> Settings:
    """Settings for the stage handlers against the stand-ins: fast polls, short timeouts."""
    fields: dict[str, Any] = {
        "replicate_api_token": REPLICATE_TOKEN,
        "replicate_base_url": replicate_url,
        "replicate_poll_interval": 0.02,
        "replicate_http_timeout": 10,
        "pinata_jwt": PINATA_JWT,
        "pinata_api_url": pinata_url,
        "pinata_http_timeout": 10,
        "glisk_image_dir": image_dir,
    }
    fields.update(overrides)
    return Settings(_env_file=None, **fields)  # pyright: ignore[reportCallIssue]


def records_on(uow_factory: UnitOfWorkFactory) -> Records:
    """The handlers' database access on the test database."""
    return Records(connect_options_of(uow_factory))
