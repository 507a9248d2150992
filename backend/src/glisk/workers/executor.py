"""Running handlers: one task per claim (per batch for a whole-batch stage), no transaction open.

The worker hands the executor what it claimed (``start``); each task opens the handler's scope
(``checkpoint`` and ``record_reveal`` write through the worker's writer), lets the stage's
settle step deal with what earlier holders left (the reveal stage's reconcile; most stages have
none), calls the handler and hands the outcome to the completer: a result the stage's rules
accept, a failure the retry policy shaped, or, when the handler stopped on LeaseLost, nothing
(lost claims are refused; claims an outage cut off are given back).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from glisk.errors import LeaseLost
from glisk.pipeline import Stage
from glisk.workers.checkpoints import HandlerScope, current_scope
from glisk.workers.claims import Claim
from glisk.workers.completer import Completer
from glisk.workers.connection import DATABASE_ERRORS
from glisk.workers.leases import Leases
from glisk.workers.retry import RetryPolicy
from glisk.workers.writes import Writer

TokenHandler = Callable[[Claim], Awaitable[str]]
# One result for the whole batch, one per claim (in order), or a mapping token uuid -> result.
BatchHandler = Callable[[Sequence[Claim]], Awaitable[str | Sequence[str] | Mapping[uuid.UUID, str]]]
Handler = TokenHandler | BatchHandler


class Settle(Protocol):
    """A stage's step before its handler (glisk.workers.reveal.Reconcile): settle what earlier
    holders of these claims left behind, hand what that decides to the completer, and return
    the claims still to be handed to the handler. Raises LeaseLost when its writes could not
    reach the database while the leases lived, a DATABASE_ERRORS error for a statement error
    (retried and given up on)."""

    def __call__(self, claims: list[Claim]) -> Awaitable[list[Claim]]: ...


class Executor:
    """Runs ``handler`` over claims; see the module docstring. ``running`` maps each task to
    the claims it holds; ``slot_free`` is set whenever one finishes."""

    def __init__(
        self,
        stage: Stage,
        handler: Handler,
        completer: Completer,
        leases: Leases,
        writer: Writer,
        retry: RetryPolicy,
        log: Any,
        *,
        settle: Settle | None = None,
    ) -> None:
        self.stage = stage
        self.handler = handler
        self._completer = completer
        self._leases = leases
        self._writer = writer
        self._retry = retry
        self._log = log
        self._settle = settle
        self.running: dict[asyncio.Task[None], list[Claim]] = {}
        self.slot_free = asyncio.Event()

    def busy(self) -> bool:
        return bool(self.running)

    def start(self, claims: list[Claim]) -> None:
        """A task per claim, or one for the batch when the stage hands its handler the batch."""
        groups = [claims] if self.stage.whole_batch else [[c] for c in claims]
        for group in groups:
            task = asyncio.create_task(self._handle(group))
            self.running[task] = group

    async def drain(self, seconds: float | None) -> list[Claim]:
        """Let running handlers finish (up to ``seconds``), cancel the rest; returns the
        claims of the cancelled ones, to be given back without spending an attempt."""
        if not self.running:
            return []
        self._log.info("worker.draining", in_flight=len(self.running))
        _, pending = await asyncio.wait(list(self.running), timeout=seconds)
        if not pending:
            return []
        abandoned = [claim for task in pending for claim in self.running.get(task, [])]
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)
        return abandoned

    async def _handle(self, claims: list[Claim]) -> None:
        # Set in this task only: checkpoint() and record_reveal() in this handler call write
        # through the worker's writer, fenced by these claims.
        current_scope.set(HandlerScope(claims, self._writer))
        try:
            fresh = claims if self._settle is None else await self._settled(self._settle, claims)
            if fresh and self.stage.whole_batch:
                await self._handle_batch(fresh)
            elif fresh:
                await self._handle_one(fresh[0])
        finally:
            self.running.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self.slot_free.set()
            self._completer.flush_soon()

    async def _settled(self, settle: Settle, claims: list[Claim]) -> list[Claim]:
        """The claims ``settle`` leaves for the handler; none when it failed (the claims are
        given back, refused or failed as its error says)."""
        try:
            return await settle(claims)
        except LeaseLost:  # its writes could not reach the database while the leases lived
            self._completer.give_back(self._leases.drop(claims))
        except DATABASE_ERRORS as exc:  # a statement error, retried and given up on
            self._completer.add_failures(self._retry.failure(claim, exc) for claim in claims)
        return []

    async def _handle_one(self, claim: Claim) -> None:
        try:
            value = self.stage.validate_result(await self.handler(claim))  # type: ignore[arg-type]
        except LeaseLost:
            self._completer.give_back(self._leases.drop([claim]))
        except Exception as exc:  # the handler's failure (or a result the rules refuse)
            self._completer.add_failures([self._retry.failure(claim, exc)])
        else:
            self._completer.add_results([(claim, value)])

    async def _handle_batch(self, claims: list[Claim]) -> None:
        try:
            outcome = await self.handler(claims)  # type: ignore[arg-type]
        except LeaseLost:
            self._completer.give_back(self._leases.drop(claims))
            return
        except Exception as exc:
            self._completer.add_failures(self._retry.failure(claim, exc) for claim in claims)
            return
        for claim, result in _per_claim(claims, outcome):
            try:
                self._completer.add_results([(claim, self.stage.validate_result(result))])
            except Exception as exc:
                self._completer.add_failures([self._retry.failure(claim, exc)])


def _per_claim(claims: list[Claim], outcome: Any) -> list[tuple[Claim, Any]]:
    """A batch handler returns one result for all, a sequence aligned with the claims, or a
    mapping from token uuid to result (a token it leaves out gets None: a failed attempt)."""
    if isinstance(outcome, Mapping):
        results: Mapping[Any, Any] = outcome
        return [(c, results.get(c.token_uuid)) for c in claims]
    if isinstance(outcome, Sequence) and not isinstance(outcome, str | bytes):
        if len(outcome) != len(claims):
            error = f"{len(outcome)} results for {len(claims)} tokens"
            return [(c, error) for c in claims]  # refused by the stage's rules below
        return list(zip(claims, outcome, strict=True))
    return [(c, outcome) for c in claims]
