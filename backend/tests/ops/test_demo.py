"""``glisk demo`` end to end: worker processes, anvil and the real keeper, workers killed at
random, the verification read from the chain."""

from __future__ import annotations

import subprocess

import pytest

from glisk.ops.demo_handlers import cid_v1_raw, render_png
from tests.support.processes import GLISK, glisk_env


# The image and upload stages call two more services (the Replicate and Pinata stand-ins): more
# than the suite's default 120 s on a busy 2-core machine.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_with_chaos_reveals_every_token_exactly_once_and_exits_zero() -> None:
    result = subprocess.run(
        [*GLISK, "demo", "--tokens", "200", "--chaos"],
        env=glisk_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: every token revealed once" in result.stdout
    lines = result.stdout.splitlines()
    assert any("predictions created per token" in line and "1.00" in line for line in lines)
    assert any("in exactly one confirmed transaction" in line and "200" in line for line in lines)
    assert any("chain and database disagree" in line and line.rstrip("│ ").endswith("0")
               for line in lines)  # fmt: skip
    [killed] = [line for line in lines if "workers killed (chaos)" in line]
    assert int(killed.strip("│ ").split("│")[-1].strip().replace(",", "")) > 0


def test_the_content_store_gives_the_cid_ipfs_gives_a_one_block_raw_file() -> None:
    # `ipfs add --cid-version 1 --raw-leaves` of the bytes "hello world" (no newline): the CIDv1
    # of the raw block, sha2-256, base32.
    assert cid_v1_raw(b"hello world") == (
        "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    )
    png = render_png(7)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == render_png(7) != render_png(8)
