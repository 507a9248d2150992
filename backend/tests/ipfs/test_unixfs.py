"""glisk's CIDs against IPFS's own: Helia's UnixFS importer (npm ipfs-unixfs-importer), run by
Node.js, on the same bytes. What a pinning service computes for a file is what these compute."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

from glisk.ipfs.unixfs import CHUNK_SIZE, file_cid
from glisk.standins.helia import HeliaImporter

KIB = 1024
MIB = 1024 * KIB


def content(size: int, seed: str = "glisk") -> bytes:
    """``size`` bytes that differ from chunk to chunk (identical chunks would hide mistakes)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture(scope="module")
async def helia() -> AsyncIterator[HeliaImporter]:
    async with HeliaImporter() as importer:
        yield importer


@pytest.mark.parametrize(
    "size",
    [1, 256 * KIB, 256 * KIB + 1, 5 * MIB],
    ids=["1 byte", "256 KiB", "256 KiB + 1", "5 MiB"],
)
async def test_a_file_cid_equals_what_ipfs_computes(helia: HeliaImporter, size: int) -> None:
    data = content(size)
    assert file_cid(data) == await helia.cid(data)


async def test_one_chunk_is_a_raw_leaf_and_two_are_a_dag_pb_root(helia: HeliaImporter) -> None:
    assert file_cid(content(CHUNK_SIZE)).startswith("bafkrei")
    assert file_cid(content(CHUNK_SIZE + 1)).startswith("bafybei")
    assert file_cid(b"") == await helia.cid(b"")


@pytest.mark.parametrize("chunks", [3, 4, 5, 16, 17, 27])
async def test_trees_deeper_than_one_level_match_too(helia: HeliaImporter, chunks: int) -> None:
    # 64-byte chunks and at most 4 links per node: 17 chunks make a tree three levels deep, the
    # shape a 43.5 MiB file takes with the real parameters.
    data = content(64 * chunks - 5)
    ours = file_cid(data, chunk_size=64, max_links=4)
    assert ours == await helia.cid(data, chunk_size=64, max_links=4)
    assert ours != file_cid(data)
