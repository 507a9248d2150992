"""The operator's commands against a real database: ``glisk status`` and ``glisk tokens``."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from glisk.cli import main
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from tests.support.database import Database
from tests.support.seeding import EXPECTED_STAGES, seed, sql


@pytest.fixture
def seeded(postgres_container: Database, uow_factory: UnitOfWorkFactory) -> str:
    seed(postgres_container.url)
    return postgres_container.url


@pytest.fixture
def glisk(
    postgres_container: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Any]:
    """Run ``glisk ARGS`` in this process against the test database: (exit code, out, err)."""
    monkeypatch.setenv("GLISK_ENV_FILE", os.devnull)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("DATABASE_URL", postgres_container.url)
    monkeypatch.delenv("APP_ENV", raising=False)
    saved = structlog.get_config()

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    structlog.configure(**saved)


def test_status_json_agrees_with_direct_sql_on_every_state_lease_and_backoff(
    seeded: str, glisk: Any
) -> None:
    # Oldest waiting token: the first waiting one of each stage in mint order. Its age as the
    # database tells it just before and just after the command bounds what the command reports.
    first_waiting = {"image": 1, "upload": 11, "reveal": 17}
    ages = (
        "SELECT token_id, extract(epoch FROM timezone('utc', now()) - mint_timestamp) "
        "FROM tokens_s0 WHERE token_id = ANY(%s)"
    )
    before = dict(sql(seeded, ages, list(first_waiting.values())))
    code, out, _ = glisk("status", "--json")
    after = dict(sql(seeded, ages, list(first_waiting.values())))
    assert code == 0
    status = json.loads(out)
    for name, expected in EXPECTED_STAGES.items():
        got = status["stages"][name]
        assert {k: got[k] for k in expected} == expected, name
    for name, token in first_waiting.items():
        reported = status["stages"][name]["oldest_waiting_seconds"]  # rounded to the millisecond
        assert float(before[token]) - 0.001 <= reported <= float(after[token]) + 0.001, name
    by_status = dict(sql(seeded, "SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1"))
    assert status["statuses"] == {
        s: by_status.get(s, 0)
        for s in ("detected", "generating", "uploading", "ready", "revealed", "failed")
    }
    assert status["revealed_estimated"] is False
    failed = {(g["stage"], g["reason"]): g["count"] for g in status["failed"]}
    assert failed == {
        (stage, reason): n
        for stage, reason, n in sql(
            seeded,
            "SELECT error_data->>'stage', error_data->>'reason', count(*) FROM tokens_s0 "
            "WHERE status = 'failed' GROUP BY 1, 2",
        )
    }
    assert failed == {
        ("image", "max_attempts_exceeded"): 2,
        ("upload", "permanent_error"): 1,
        ("reveal", "max_attempts_exceeded"): 1,
        (None, "gave_up"): 1,
    }


def test_status_estimates_revealed_from_planner_statistics_above_the_threshold(
    seeded: str,
) -> None:
    from glisk.ops.status import collect

    sql(seeded, "ANALYZE tokens_s0")
    with connect(seeded) as conn:
        estimated = collect(conn, estimate_above=0)
        exact = collect(conn, exact=True, estimate_above=0)
    assert estimated.revealed_estimated and not exact.revealed_estimated
    # Freshly analyzed, the planner's row count is exact, so is the estimate.
    assert estimated.statuses == exact.statuses
    assert exact.statuses["revealed"] == 5


def test_status_table_names_every_stage_and_holder(seeded: str, glisk: Any) -> None:
    code, out, _ = glisk("status")
    assert code == 0
    for word in ("image", "upload", "reveal", "w1: 2", "w2: 1", "max_attempts_exceeded", "gave_up"):
        assert word in out


def _failed_ids(url: str) -> list[int]:
    return [
        r[0] for r in sql(url, "SELECT token_id FROM tokens_s0 WHERE status = 'failed' ORDER BY 1")
    ]


def _snapshot(url: str) -> list[tuple[Any, ...]]:
    return sql(url, "SELECT * FROM tokens_s0 ORDER BY token_id")


def test_a_dry_run_changes_nothing_and_says_what_would_move(seeded: str, glisk: Any) -> None:
    before = _snapshot(seeded)
    code, out, _ = glisk("tokens", "retry", "--stage", "image", "--dry-run")
    assert code == 0
    assert "2 token(s) would move: 2 to detected" in out
    assert _snapshot(seeded) == before


def test_retry_moves_exactly_the_selected_failed_tokens_back_to_their_stage(
    seeded: str, glisk: Any
) -> None:
    failed = _failed_ids(seeded)
    untouched = {r[1]: r for r in _snapshot(seeded) if r[1] not in failed}  # r[1]: token_id
    with connect(seeded) as listener:
        listener.execute("LISTEN glisk_stage_image")
        listener.execute("LISTEN glisk_stage_upload")
        code, out, _ = glisk(
            "tokens", "retry", "--reason", "max_attempts_exceeded", "--stage", "image"
        )
        assert code == 0, out
        channels = {n.channel for n in listener.notifies(timeout=2, stop_after=1)}
    assert channels == {"glisk_stage_image"}
    assert "2 token(s) moved: 2 to detected" in out
    rows = sql(
        seeded,
        "SELECT token_id, status::text, attempts, deferrals, not_before, checkpoint, image_path, "
        "error_data FROM tokens_s0 WHERE token_id = ANY(%s) ORDER BY token_id",
        failed,
    )
    moved = [r for r in rows if r[1] != "failed"]
    assert [r[0] for r in moved] == failed[:2]
    for _, status, attempts, deferrals, not_before, checkpoint, image_path, error in moved:
        assert (status, attempts, deferrals, not_before, checkpoint, image_path) == (
            "detected",
            0,
            0,
            None,
            None,
            None,
        )
        [entry] = error["history"]
        assert entry["reason"] == "max_attempts_exceeded" and entry["stage"] == "image"
        assert entry["retried_to"] == "detected" and "retried_at" in entry
        assert set(error) == {"history"}
    assert all(r[1] == "failed" for r in rows if r[0] not in failed[:2])
    # Nothing else moved.
    assert {r[1]: r for r in _snapshot(seeded) if r[1] not in failed} == untouched
    # The retried tokens are back in the image stage's queue.
    code, out, _ = glisk("status", "--json")
    assert json.loads(out)["stages"]["image"]["waiting"] == EXPECTED_STAGES["image"]["waiting"] + 2


def test_retry_sends_each_stage_back_to_what_it_claims_from_and_keeps_the_history(
    seeded: str, glisk: Any
) -> None:
    failed = _failed_ids(seeded)
    code, out, _ = glisk("tokens", "retry", "--ids", ",".join(map(str, failed)))
    assert code == 0, out
    statuses = dict(
        sql(seeded, "SELECT token_id, status::text FROM tokens_s0 WHERE token_id = ANY(%s)", failed)
    )
    # image x2 -> detected, upload -> generating (image kept), reveal -> ready, no stage and no
    # image -> the image stage.
    assert [statuses[i] for i in failed] == [
        "detected",
        "detected",
        "generating",
        "ready",
        "detected",
    ]
    code, out, _ = glisk("status", "--json")
    stages = json.loads(out)["stages"]
    assert stages["image"]["waiting"] == EXPECTED_STAGES["image"]["waiting"] + 3
    assert stages["upload"]["waiting"] == EXPECTED_STAGES["upload"]["waiting"] + 1
    assert stages["reveal"]["waiting"] == EXPECTED_STAGES["reveal"]["waiting"] + 1
    # Fail one again and retry it: the history keeps both failures, oldest first.
    sql(
        seeded,
        "UPDATE tokens_s0 SET status = 'failed', error_data = error_data || "
        '\'{"reason": "permanent_error", "stage": "upload"}\' WHERE token_id = %s '
        "RETURNING 1",
        failed[2],
    )
    assert glisk("tokens", "retry", "--ids", str(failed[2]))[0] == 0
    code, out, _ = glisk("tokens", "show", str(failed[2]))
    assert code == 0
    shown = json.loads(out)
    assert shown["status"] == "generating" and shown["lease"] == "none"
    assert [h["reason"] for h in shown["error_data"]["history"]] == [
        "permanent_error",
        "permanent_error",
    ]
    assert len(shown["error_data"]["history"]) == 2


def test_retry_refuses_tokens_that_are_not_failed_and_moves_the_rest(
    seeded: str, glisk: Any
) -> None:
    failed = _failed_ids(seeded)
    before = _snapshot(seeded)
    code, out, err = glisk("tokens", "retry", "--ids", f"1,4,26,{failed[0]},9999")
    assert code == 1
    assert "token 1: refused: Cannot retry a token in 'detected'" in err
    assert "token 4: refused" in err and "token 26: refused" in err
    assert "token 9999: refused: no such token" in err
    assert "1 token(s) moved" in out
    after = {r[1]: r for r in _snapshot(seeded)}  # by token_id
    for row in before:
        if row[1] != failed[0]:
            assert after[row[1]] == row
    assert after[failed[0]][4] == "detected"


def test_retry_needs_a_filter_and_names_a_bad_option(seeded: str, glisk: Any) -> None:
    code, _, err = glisk("tokens", "retry")
    assert code == 2 and "give at least one of --ids" in err
    code, _, err = glisk("tokens", "retry", "--ids", "1,x")
    assert code == 2 and "--ids: must be token ids" in err
    code, _, err = glisk("tokens", "retry", "--since", "yesterday")
    assert code == 2 and "--since: must be an ISO date" in err


def test_retry_since_selects_by_mint_time(seeded: str, glisk: Any) -> None:
    failed = _failed_ids(seeded)
    (since,) = sql(seeded, "SELECT mint_timestamp FROM tokens_s0 WHERE token_id = %s", failed[3])[0]
    code, out, _ = glisk("tokens", "retry", "--since", since.isoformat() + "+00:00")
    assert code == 0, out
    assert "2 token(s) moved" in out
    assert _failed_ids(seeded) == failed[:3]


def test_show_prints_lease_holder_attempts_and_refuses_an_unknown_token(
    seeded: str, glisk: Any
) -> None:
    code, out, _ = glisk("tokens", "show", "5")
    assert code == 0
    shown = json.loads(out)
    assert (shown["status"], shown["lease"], shown["claimed_by"], shown["attempts"]) == (
        "generating",
        "live",
        "w1",
        2,
    )
    code, out, _ = glisk("tokens", "show", "8")
    assert json.loads(out)["lease"] == "expired"
    code, _, err = glisk("tokens", "show", "424242")
    assert code == 1 and "token_id 424242: no such token" in err


async def test_a_retried_token_that_fails_again_keeps_its_history_through_the_worker(
    seeded: str, uow_factory: UnitOfWorkFactory
) -> None:
    from glisk.ops.tokens import RetryFilter, retry_failed
    from glisk.workers import Claim, ConnectOptions, PermanentError, RetryLater, Worker
    from glisk.workers.run import database_url_of

    failed = _failed_ids(seeded)
    with connect(seeded) as conn:
        selection = RetryFilter.parse(ids=f"{failed[0]},{failed[1]}")
        assert len(retry_failed(conn, selection).moved) == 2
    # Everything else of the image stage out of the way: only the two retried tokens remain.
    sql(
        seeded,
        "UPDATE tokens_s0 SET status = 'revealed', metadata_cid = 'bafy', claim_id = NULL, "
        "lease_expires_at = NULL WHERE token_id <> ALL(%s) AND status <> 'failed' RETURNING 1",
        failed,
    )
    calls: dict[int, int] = {}

    async def image(claim: Claim) -> str:
        calls[claim.token_id] = calls.get(claim.token_id, 0) + 1
        if claim.token_id == failed[0]:
            raise PermanentError("still broken")
        if calls[claim.token_id] == 1:
            raise RetryLater(0.01, "busy")  # an attempt's error_data, then success
        raise RuntimeError("flaky")  # a retried attempt, then out of attempts

    worker = Worker(
        "image",
        image,
        ConnectOptions(database_url_of(uow_factory)),
        max_attempts=1,
        poll_interval=0.02,
        backoff_base=0,
    )
    await asyncio.wait_for(worker.run(exit_when_idle=True), 30)
    for token_id, reason in ((failed[0], "permanent_error"), (failed[1], "max_attempts_exceeded")):
        ((status, error),) = sql(
            seeded, "SELECT status::text, error_data FROM tokens_s0 WHERE token_id = %s", token_id
        )
        assert status == "failed" and error["reason"] == reason
        assert [h["reason"] for h in error["history"]] == ["max_attempts_exceeded"], token_id
