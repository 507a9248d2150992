"""A file's CIDv1 exactly as IPFS makes it, computed before anything is uploaded.

What ``ipfs add --cid-version=1`` (kubo) and Helia's ``ipfs-unixfs-importer`` do with one file
(no wrapping directory, no mode or mtime), and what this module reproduces:

- the bytes are cut into fixed 256 KiB chunks (the last one shorter);
- each chunk is a *raw leaf*: its CID is CIDv1, codec ``raw`` (0x55), sha2-256;
- a file of one chunk is that leaf (``bafkrei...``); an empty file is one empty leaf;
- otherwise leaves are grouped, in order, under dag-pb nodes of at most 174 links, and those
  nodes again, until one root is left (the *balanced* layout). Each node is a dag-pb ``PBNode``
  whose ``Data`` is a UnixFS ``File`` with ``filesize`` and one ``blocksizes`` entry per child
  (the child's file bytes) and whose links carry an empty ``Name`` and ``Tsize`` (a leaf's
  length; a node's encoded length plus its children's Tsize). Its CID is CIDv1, codec
  ``dag-pb`` (0x70), sha2-256 (``bafybei...``).

Protobuf is written by hand for the four fields involved; the CID, multihash and multibase come
from the ``multiformats`` library. ``tests/ipfs`` checks the result against Helia's importer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CHUNK_SIZE = 262_144  # kubo's and Helia's default chunker: size-262144
MAX_LINKS = 174  # kubo's and Helia's default balanced layout: links per node

_UNIXFS_FILE = 2  # unixfs.proto: Data.DataType.File


@dataclass(frozen=True)
class _Node:
    cid: bytes  # binary CID
    file_size: int  # bytes of the file below this node
    tsize: int  # bytes of every block below this node, this one included


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _cid(codec: str, block: bytes) -> bytes:
    from multiformats import CID, multihash

    digest = multihash.wrap(hashlib.sha256(block).digest(), "sha2-256")
    return bytes(CID("base32", 1, codec, digest))


def _leaf(chunk: bytes) -> _Node:
    return _Node(_cid("raw", chunk), len(chunk), len(chunk))


def _parent(children: list[_Node]) -> _Node:
    """A dag-pb node linking ``children`` in order (dag-pb's canonical form: links, then data)."""
    file_size = sum(child.file_size for child in children)
    data = _field_varint(1, _UNIXFS_FILE) + _field_varint(3, file_size)
    for child in children:
        data += _field_varint(4, child.file_size)  # blocksizes: repeated, not packed
    links = b"".join(
        _field_bytes(
            2,
            _field_bytes(1, child.cid) + _field_bytes(2, b"") + _field_varint(3, child.tsize),
        )
        for child in children
    )
    block = links + _field_bytes(1, data)
    return _Node(_cid("dag-pb", block), file_size, len(block) + sum(c.tsize for c in children))


def file_cid(data: bytes, *, chunk_size: int = CHUNK_SIZE, max_links: int = MAX_LINKS) -> str:
    """The CIDv1 (base32, ``b...``) IPFS gives ``data`` added as one file with raw leaves, fixed
    ``chunk_size`` chunks and a balanced DAG of ``max_links`` links per node. The defaults are
    IPFS's; the others exist to test deep trees on small inputs."""
    from multiformats import CID

    if chunk_size < 1 or max_links < 2:
        raise ValueError("chunk_size must be >= 1 and max_links >= 2")
    view = memoryview(data)
    level = [_leaf(bytes(view[i : i + chunk_size])) for i in range(0, len(data), chunk_size)]
    if not level:  # an empty file is one empty raw leaf
        level = [_leaf(b"")]
    # One chunk: the file is its raw leaf. More: parents of max_links children, level by level.
    while len(level) > 1:
        level = [_parent(level[i : i + max_links]) for i in range(0, len(level), max_links)]
    return CID.decode(level[0].cid).encode("base32")
