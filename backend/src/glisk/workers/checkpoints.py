"""Durable progress for a claim, written before an external effect.

A handler runs with no transaction open and may be cut off at any point (a SIGKILL, a lost
lease). ``checkpoint`` records what it is about to do (``{"tx_hash": ..., "nonce": ...}``) for its
claim, fenced like a completion: the write happens only while every claim named is live, and
``LeaseLost`` is raised otherwise, so the handler never goes on to an effect another worker may
be making too. After a rescue, the next holder finds the last checkpoint in ``Claim.checkpoint``.
A completion, or a final failure, clears it.

These functions work inside a handler that a Worker runs: the worker's executor opens a
``HandlerScope`` (the claims it handed the handler and the worker's ``Writer``) in the handler's
task, and they write through that writer, on the worker's write connection. A context variable
carries the scope because the public calls name no worker (``checkpoint(claim, data)``); it is
set in the handler's own task, so handlers running side by side each see their own. Elsewhere,
use ``uow.leases.checkpoint``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from glisk.errors import FieldValidationError, LeaseLost
from glisk.workers import queries
from glisk.workers.claims import Claim

if TYPE_CHECKING:
    from glisk.workers.writes import Writer


@dataclass(frozen=True)
class HandlerScope:
    """What the worker running the current handler call lends it: the claims it was handed and
    the worker's writer."""

    claims: Sequence[Claim]
    writer: Writer

    async def write(self, query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        """Run a handler's statement through the worker's writer. An unreachable database is
        waited out while the leases of the claims the statement names (``claim_ids``), else of
        the handler's own claims, are certainly live; then LeaseLost (see Writer.write_for)."""
        named = params.get("claim_ids")
        ids = [claim.claim_id for claim in self.claims] if named is None else list(named)
        return await self.writer.handler_write(ids, query, params)


current_scope: ContextVar[HandlerScope | None] = ContextVar("glisk_handler_scope", default=None)


def _scope() -> HandlerScope:
    scope = current_scope.get()
    if scope is None:
        raise RuntimeError("checkpoints are written from inside a handler that a Worker runs")
    return scope


def _claim_ids(claims: Claim | Sequence[Claim]) -> list[UUID]:
    chosen = [claims] if isinstance(claims, Claim) else list(claims)
    if not chosen:
        raise FieldValidationError("claims", "must name at least one claim", chosen)
    return sorted({c.claim_id for c in chosen})


async def checkpoint(claims: Claim | Sequence[Claim], data: Mapping[str, Any]) -> None:
    """Record ``data`` (JSON) as the checkpoint of ``claims``, all or none. Raises LeaseLost when
    any of them is no longer live: stop, do not make the effect."""
    ids = _claim_ids(claims)
    params = {"claim_ids": ids, "checkpoint": json.dumps(dict(data))}
    rows = await _scope().write(queries.CHECKPOINT, params)
    if len(rows) != len(ids):
        raise LeaseLost(f"{len(ids) - len(rows)} of {len(ids)} claims are no longer live")


def lease_left(claims: Claim | Sequence[Claim]) -> float:
    """Seconds this worker still certainly holds every one of ``claims`` by its own clock (a
    lease counts from when its claim or last heartbeat was sent); 0 when any is lost."""
    return _scope().writer.lease_left(_claim_ids(claims))[0]


def lease_seconds() -> float:
    """The lease length of the worker running this handler, in seconds."""
    return _scope().writer.lease_seconds


def ensure_live(claims: Claim | Sequence[Claim], *, margin: float | None = None) -> None:
    """Raise LeaseLost unless every one of ``claims`` is held for at least ``margin`` more
    seconds (default: half the lease; heartbeats renew it every third). Call it right before an
    external effect whose intent a checkpoint recorded: a process paused between the checkpoint
    and the call (SIGSTOP, a frozen VM, a long GC) may have lost its lease meanwhile, and its
    rescuer, finding nothing made yet, may be making the same effect. Synchronous on purpose:
    nothing may run between the check and the call that follows it."""
    left, lease = _scope().writer.lease_left(_claim_ids(claims))
    needed = lease / 2 if margin is None else margin
    if left < needed:
        raise LeaseLost(
            f"the lease has {left:.2f} s left, under the {needed:.2f} s an external effect needs"
        )


async def record_reveal(
    claims: Sequence[Claim], tx_hash: str, data: Mapping[str, Any] | None = None
) -> UUID:
    """Before sending a reveal transaction: record it as a pending ``reveal_transactions`` row
    for the batch, and point each token's checkpoint at it (``{"reveal": {"id", "tx_hash",
    "data"}}``), in one statement, only while every claim is live. ``data`` holds what a rescuer
    needs to reconcile (the signed transaction, its nonce). Returns the row's id; raises
    LeaseLost (nothing written) when any claim is no longer live."""
    from glisk.models import validation as v

    ids = _claim_ids(claims)
    params = {
        "claim_ids": ids,
        "tx_hash": v.tx_hash("tx_hash", tx_hash),
        "data": json.dumps(dict(data or {})),
    }
    rows = await _scope().write(queries.RECORD_REVEAL, params)
    if not rows:
        raise LeaseLost("the batch's claims are no longer all live; nothing was recorded")
    return rows[0][0]


async def handler_write(query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
    """Run one of a handler's own statements on the worker's write connection (retried like the
    worker's writes) and return its rows: for handlers that record their progress with statements
    of their own (the reveal keeper, glisk.chain). Fencing is the statement's business: name the
    claims and write only while they are live, as CHECKPOINT does."""
    return await _scope().write(query, params)
