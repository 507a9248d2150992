"""Stand-ins for the external world, for tests and benchmarks.

- ``mint_feed``: mint logs as a webhook delivers them: repeated, reordered, batched.

The chain is no stand-in any more: tests, CI and ``glisk demo`` run a real node (anvil, see
``glisk.chain``). Each module is imported on its own (nothing here is re-exported).
"""
