"""Mints from the chain: the GLISK contract's ``BatchMinted`` logs, recorded exactly once.

Two ways in, which may run at once and agree:

- ``glisk ingest`` (``follower.py``; the process, its checks and ``--rewind-to`` in ``run.py``):
  reads the logs with ``eth_getLogs`` over adaptive block ranges (``node.py``), trailing the head
  by INGEST_CONFIRMATIONS, checks the chain against the block hashes it consumed (``reorg.py``,
  the ``chain_blocks`` window) at every step, rolls back what an orphaned block recorded and
  re-reads from the common ancestor; its cursor and counters live in ``system_state``
  (``state.py``) and move by compare-and-set. ``gaps.py`` compares the contract's
  ``nextTokenId()`` with the tokens recorded and backfills missing ranges from logs.
- ``POST /webhooks/alchemy`` (``glisk.api.webhooks``): Alchemy custom-webhook payloads, signature
  checked and decoded by ``alchemy.py``, recorded by ``delivery.py``.

``logs.py`` decodes a ``BatchMinted`` log whichever way it came. Recording is
``uow.mint_events.record_mints`` (one statement for many logs) and rolling back
``uow.mint_events.roll_back``.
"""
