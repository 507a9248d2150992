"""``glisk worker reveal --handler glisk.handlers.reveal:keeper``: built from the settings, checked
against the node before it claims anything, the key never on a command line or in a message."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from glisk.uow import UnitOfWorkFactory
from tests.support.chain import Chain, key_file
from tests.support.database import Database
from tests.support.factories import seed_in_bulk
from tests.support.processes import GLISK, glisk_env
from tests.support.waiting import eventually

# End to end (processes, tens of seconds each): .ci/run runs them, the default run leaves them out.
pytestmark = pytest.mark.slow

HANDLER = "glisk.handlers.reveal:keeper"


def _env(chain: Chain, database: Database, key: Path, **extra: str) -> dict[str, str]:
    return glisk_env(
        "WORKER_*",
        "CHAIN_*",
        "KEEPER_*",
        "REVEAL_*",
        DATABASE_URL=database.url,
        CHAIN_RPC_URL=chain.node.url,
        CHAIN_ID=str(chain.node.chain_id),
        GLISK_CONTRACT_ADDRESS=chain.address,
        KEEPER_PRIVATE_KEY_FILE=str(key),
        **{"LOG_LEVEL": "WARNING", **extra},
    )


def _worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GLISK, "worker", "reveal", "--handler", HANDLER],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"CHAIN_ID": "8453"}, "CHAIN_ID: is 8453 but the node at http://127.0.0.1:"),
        ({"GLISK_CONTRACT_ADDRESS": "0x" + "12" * 20}, "GLISK_CONTRACT_ADDRESS: no contract at"),
        ({"CHAIN_RPC_URL": ""}, "CHAIN_RPC_URL: required by the reveal keeper"),
    ],
)
def test_a_keeper_that_cannot_work_is_one_line_and_exit_2(
    glisk_chain: Chain,
    postgres_container: Database,
    tmp_path: Path,
    change: dict[str, str],
    message: str,
) -> None:
    key = key_file(tmp_path, glisk_chain.keeper)
    result = _worker({**_env(glisk_chain, postgres_container, key), **change})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert glisk_chain.keeper.key.hex() not in result.stderr + result.stdout


def test_a_key_without_the_keeper_role_is_refused_naming_its_address(
    glisk_chain: Chain, postgres_container: Database, tmp_path: Path
) -> None:
    stranger = glisk_chain.minters[0]
    result = _worker(_env(glisk_chain, postgres_container, key_file(tmp_path, stranger)))
    assert result.returncode == 2
    assert f"its address {stranger.address} lacks KEEPER_ROLE" in result.stderr
    assert stranger.key.hex() not in result.stderr


async def test_the_keeper_worker_reveals_and_stops_cleanly_on_sigterm(
    glisk_chain: Chain, postgres_container: Database, uow_factory: UnitOfWorkFactory, tmp_path: Path
) -> None:
    await glisk_chain.mint_many(12)
    await seed_in_bulk(uow_factory, 12, first_token_id=0, status="'ready'",
                       image_path="'/img.png'", metadata_cid="'bafkreicid' || g")  # fmt: skip
    env = _env(glisk_chain, postgres_container, key_file(tmp_path, glisk_chain.keeper),
               REVEAL_POLL_SECONDS="0.05", WORKER_POLL_INTERVAL="0.1", LOG_LEVEL="INFO")  # fmt: skip
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        [*GLISK, "worker", "reveal", "--handler", HANDLER],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    async def revealed() -> bool:
        async with uow_factory() as uow:
            count = await uow.session.execute(
                text("SELECT count(*) FROM tokens_s0 WHERE status = 'revealed'")
            )
            return count.scalar_one() == 12

    try:
        await eventually(revealed, 60, "12 tokens revealed by the keeper worker")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "keeper.nonce_reconciled" in output
    assert glisk_chain.keeper.key.hex() not in output
    on_chain = await glisk_chain.reveals_on_chain()
    assert sorted(on_chain) == list(range(1, 13)) and len({h[0] for h in on_chain.values()}) == 1
