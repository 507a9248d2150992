"""A fake webhook feed: the mint logs of a simulated chain, delivered as badly as real feeds do.

    feed = MintFeed.generate(tokens=500, seed=7)      # the distinct logs, in chain order
    for payload in feed.deliveries(seed=1):           # webhook payloads of 1 to 4 logs,
        for log in payload:                           # some logs again, out of order
            ...                                       # uow.mint_events.record_mint(log)
    streams = feed.streams(8, seed=2)                 # 8 overlapping feeds covering every log

The logs look like GliskNFT's: ``BatchMinted`` mints 1 to ``max_batch`` consecutive token ids from
1 on; its log_index follows the ERC-721 Transfer logs of the same call; a few transactions hold
two mints; the same author's wallet arrives in different letter case (authors are found
case-insensitively). Everything is derived from the seeds, so a failing run can be replayed.

The real chain is ``glisk.ingest`` (the log follower on a node, the Alchemy webhook), proven on
anvil in ``tests/ingest``; this feed stays for what needs many logs without a chain: the mint
storm (concurrent recording) and the recording benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from glisk.models import MintLog

GENESIS = datetime(2025, 1, 1)
BLOCK_SECONDS = 2  # Base's block time


@dataclass(frozen=True)
class MintFeed:
    logs: tuple[MintLog, ...]  # distinct, in chain order; token ids 1..tokens without a gap

    @property
    def token_count(self) -> int:
        return sum(log.quantity for log in self.logs)

    @classmethod
    def generate(
        cls,
        tokens: int,
        *,
        seed: int = 0,
        authors: int = 20,
        max_batch: int = 5,
        first_token_id: int = 1,
        first_block: int = 1_000,
    ) -> MintFeed:
        rng = random.Random(seed)  # noqa: S311  (simulated data, not secrets)
        wallets = [_hex(rng, 40) for _ in range(authors)]
        logs: list[MintLog] = []
        next_id, block = first_token_id, first_block
        while next_id < first_token_id + tokens:
            block += rng.choice((0, 1, 1, 2))
            tx_hash, log_index = "0x" + _hex(rng, 64), 0
            for _ in range(2 if rng.random() < 0.1 else 1):  # a tx with two mints, sometimes
                left = first_token_id + tokens - next_id
                if left == 0:
                    break
                quantity = min(left, rng.randint(1, max_batch))
                log_index += quantity  # the Transfer logs of this call come first
                logs.append(
                    MintLog(
                        tx_hash=tx_hash,
                        log_index=log_index,
                        block_number=block,
                        block_timestamp=GENESIS + timedelta(seconds=BLOCK_SECONDS * block),
                        minter="0x" + _hex(rng, 40),
                        author="0x" + _any_case(rng, rng.choice(wallets)),
                        start_token_id=next_id,
                        quantity=quantity,
                    )
                )
                next_id += quantity
                log_index += 1
        return cls(tuple(logs))

    def deliveries(
        self,
        *,
        seed: int,
        logs: Sequence[MintLog] | None = None,
        repeat: float = 0.3,
        window: int = 10,
        payload: int = 4,
    ) -> list[list[MintLog]]:
        """Webhook payloads of 1 to ``payload`` logs carrying every log of ``logs`` (default: all)
        at least once, a share ``repeat`` of them a second time later on, each displaced up to
        ``window`` positions from chain order."""
        rng = random.Random(seed)  # noqa: S311
        chosen = list(self.logs if logs is None else logs)
        # Sort keys: chain position plus a random displacement; a repeat comes later.
        keyed = [(i + rng.uniform(0, window), log) for i, log in enumerate(chosen)]
        keyed += [
            (i + rng.uniform(0, 4 * window), log)
            for i, log in enumerate(chosen)
            if rng.random() < repeat
        ]
        ordered = [log for _, log in sorted(keyed, key=lambda pair: pair[0])]
        payloads: list[list[MintLog]] = []
        while ordered:
            size = rng.randint(1, payload)
            payloads.append(ordered[:size])
            ordered = ordered[size:]
        return payloads

    def streams(self, count: int, *, seed: int, share: float = 0.4) -> list[list[list[MintLog]]]:
        """``count`` delivery streams (lists of payloads, see ``deliveries``) that together carry
        every log: each log goes to one stream for sure and to each other one with probability
        ``share``, as when a webhook, a block poller and a recovery pass overlap."""
        rng = random.Random(seed)  # noqa: S311
        assigned: list[list[MintLog]] = [[] for _ in range(count)]
        for log in self.logs:
            owner = rng.randrange(count)
            for i in range(count):
                if i == owner or rng.random() < share:
                    assigned[i].append(log)
        return [self.deliveries(seed=rng.randrange(2**32), logs=chosen) for chosen in assigned]


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(4 * digits):0{digits}x}"


def _any_case(rng: random.Random, hex_digits: str) -> str:
    style = rng.randrange(3)
    if style == 0:
        return hex_digits.lower()
    if style == 1:
        return hex_digits.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in hex_digits)
