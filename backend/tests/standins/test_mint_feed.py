"""The fake mint feed: mint logs as a webhook delivers them (repeated, reordered, batched)."""

from __future__ import annotations

from collections import Counter

from glisk.standins.mint_feed import MintFeed

# -- the webhook feed -----------------------------------------------------------------------------


def test_the_feed_mints_every_token_once_in_batches_from_one_with_unique_log_keys() -> None:
    feed = MintFeed.generate(tokens=300, seed=5, authors=6, max_batch=5)
    ids = [t for log in feed.logs for t in log.token_ids]
    assert ids == list(range(1, 301))
    assert feed.token_count == 300
    assert len({log.key for log in feed.logs}) == len(feed.logs)
    assert {log.quantity for log in feed.logs} == {1, 2, 3, 4, 5}
    assert any(a.key[0] == b.key[0] for a, b in zip(feed.logs, feed.logs[1:], strict=False))
    spellings: dict[str, set[str]] = {}
    for log in feed.logs:
        spellings.setdefault(log.author.lower(), set()).add(log.author)
    assert len(spellings) <= 6
    assert any(len(s) > 1 for s in spellings.values()), "no author in two letter cases"
    assert MintFeed.generate(tokens=300, seed=5, authors=6) == feed


def test_deliveries_carry_every_log_some_twice_out_of_order_in_small_payloads() -> None:
    feed = MintFeed.generate(tokens=400, seed=1)
    payloads = feed.deliveries(seed=2, repeat=0.3, payload=4)
    delivered = [log for payload in payloads for log in payload]
    counts = Counter(log.key for log in delivered)
    assert set(counts) == {log.key for log in feed.logs}
    assert 0.15 < sum(c > 1 for c in counts.values()) / len(counts) < 0.45
    assert delivered[: len(feed.logs)] != list(feed.logs)
    assert {len(p) for p in payloads} <= {1, 2, 3, 4}


def test_streams_overlap_and_together_cover_every_log() -> None:
    feed = MintFeed.generate(tokens=400, seed=1)
    streams = feed.streams(8, seed=3, share=0.4)
    seen = [{log.key for payload in stream for log in payload} for stream in streams]
    assert set().union(*seen) == {log.key for log in feed.logs}
    assert all(0 < len(keys) < len(feed.logs) for keys in seen)
    per_log = Counter(key for keys in seen for key in keys)
    assert max(per_log.values()) >= 4
