"""How a follower runs: ``FollowerOptions`` (``glisk ingest`` builds it from INGEST_*)."""

from __future__ import annotations

from dataclasses import dataclass

from glisk.repositories.mint_outcomes import DEFAULT_AUTHOR_PROMPT


@dataclass(frozen=True)
class FollowerOptions:
    """``confirmations``: blocks the follower stays behind the head; ``reorg_window``: how deep
    it keeps block hashes below its cursor (a reorg deeper than that stops it); ``start_block``:
    where it starts when there is no cursor; ``poll_interval``: seconds between looks at an
    unchanged head; ``gap_interval``: seconds between gap passes once caught up (0: never)."""

    confirmations: int = 2
    reorg_window: int = 200
    start_block: int = 0
    poll_interval: float = 2.0
    gap_interval: float = 300.0
    new_author_prompt: str = DEFAULT_AUTHOR_PROMPT

    def __post_init__(self) -> None:
        if self.confirmations < 0 or self.reorg_window < 1 or self.start_block < 0:
            raise ValueError("confirmations >= 0, reorg_window >= 1 and start_block >= 0")
