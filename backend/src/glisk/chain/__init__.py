"""Everything EVM: the GLISK contract and a real node to run it on.

- ``contracts/GliskNFT.sol`` and ``artifacts/GliskNFT.json``: the contract and its compiled
  artifact (``python -m glisk.chain.compile [--check]``, solc from npm).
- ``anvil``: Foundry's anvil started like the embedded PostgreSQL (tests, CI, ``glisk demo``).
- ``client``: the web3 client factory (AsyncWeb3 over HTTP, calls counted).
- ``contract``: the artifact, deploy and mint helpers, the contract's errors decoded.

Modules are imported on their own; nothing is built at import.
"""
