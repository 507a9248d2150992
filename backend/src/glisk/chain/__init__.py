"""Everything EVM: the GLISK contract, a real node to run it on, and the reveal keeper.

- ``contracts/GliskNFT.sol`` and ``artifacts/GliskNFT.json``: the contract and its compiled
  artifact (``python -m glisk.chain.compile [--check]``, solc from npm).
- ``anvil``: Foundry's anvil started like the embedded PostgreSQL (tests, CI, ``glisk demo``).
- ``client``: the web3 client factory (AsyncWeb3 over HTTP, calls counted, node refusals sorted,
  the transport errors worth waiting out).
- ``contract``: the artifact, deploy and mint helpers, the contract's errors decoded.
- The reveal keeper: ``keeper`` (a batch, start-up, reconcile), ``keeper_config``, ``outbox``
  (sign and send), ``watch`` (receipts, confirmations, nonce takers), ``settle`` (a reveal's
  nonce until confirmed or failed: rebroadcasts, replacements, fillers), ``nonces`` (the
  allocator in PostgreSQL), ``fees`` (EIP-1559 under a cap), ``ledger`` (its records) and
  ``queries`` (its SQL).

Modules are imported on their own; nothing is built at import.
"""
