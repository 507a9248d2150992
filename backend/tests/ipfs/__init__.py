"""Tests of glisk.ipfs: CIDs against IPFS's own importer."""
