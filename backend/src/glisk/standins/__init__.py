"""Stand-ins for the external world, for tests, benchmarks and local demos.

- ``tx``: reveal transactions signed by (sender, nonce) and identified by their hash.
- ``chain``: a fake Ethereum node, run as its own process (``python -m glisk.standins.chain``)
  so that every worker process shares it and it outlives any of them.
- ``chain_client``: the async client handlers use (nonce, send, receipt), the test-side control
  (faults, report) and a launcher for the node process.
- ``mint_feed``: mint logs as a webhook delivers them: repeated, reordered, batched.

Each module is imported on its own (nothing here is re-exported), so the node process starts
without loading the database layer.
"""
