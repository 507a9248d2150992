"""Clients for the paid services the pipeline's stages call.

- ``replicate``: image predictions on Replicate's HTTP API, through Replicate's official Python
  client (pointed at ``REPLICATE_BASE_URL``), and the download of their output.
- ``pinata``: files pinned to IPFS through Pinata's pinning API (httpx).

Both translate every failure into ``glisk.errors`` (``ServiceRateLimited`` with the
``Retry-After`` delay, ``ServiceUnavailable`` when the outcome is unknown, ``ServiceRefused``
when sending the same request again cannot help) and never put a credential in a message.
Nothing here reads settings: the stage handlers (``glisk.handlers``) build these from them.
"""
