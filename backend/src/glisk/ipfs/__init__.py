"""IPFS content identifiers computed locally, as IPFS computes them.

- ``unixfs``: a file's CIDv1 as ``ipfs add --cid-version=1`` (kubo) and Helia's UnixFS importer
  make it (raw leaves, 256 KiB chunks, balanced DAG of at most 174 links per node), on the
  ``multiformats`` library for the CID, multihash and multibase, with the few dag-pb and UnixFS
  protobuf fields a file needs written here.
"""
