"""The pipeline's stages: one table, read by everything that knows a stage.

Each row says which tokens a stage claims (the predicate of its partial claim index, the status a
fresh token waits in, the status it works in), where its result goes and the rule it must pass,
how it batches, which stage its completions feed, and where an operator's retry sends a token it
failed. The worker runtime (claims, completions, NOTIFY channels), the ``Token`` entity (its claim
indexes, ``retry_from_failed``), the ``glisk`` command's stage choices, ``glisk status``,
``glisk tokens retry``, the demo and the migrations' DDL (``glisk.migrations.stage_ddl``) all read
it. Adding a stage is a row here, a handler, and a migration rendered from the row.

A leaf: it imports only the light ``glisk.models`` modules (enums, validation, transitions), which
load without SQLModel, so the worker runtime and the entities can both import it. Every status
change a row implies is an edge of the token state machine, checked when this module loads, so the
set-based statements in ``glisk.workers.queries`` can only do what ``Token``'s methods would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from glisk.errors import FieldValidationError
from glisk.models import validation as v
from glisk.models.enums import TokenStatus
from glisk.models.transitions import check_transition

S = TokenStatus


class StageName(StrEnum):
    """The stages glisk ships (a stage's name is any string; these are the built-in rows)."""

    IMAGE = "image"
    UPLOAD = "upload"
    REVEAL = "reveal"


def _image_path(value: Any) -> str:
    v.required_when("image_path", value, "recording a generated image")
    return v.text_length("image_path", value, 1, 2048)


def _metadata_cid(value: Any) -> str:
    v.required_when("metadata_cid", value, "marking a token ready")
    return v.text_length("metadata_cid", value, 1, 255)


def _tx_hash(value: Any) -> str:
    v.required_when("tx_hash", value, "marking a token revealed")
    return v.tx_hash("tx_hash", value)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    A stage claims tokens that are fresh (``fresh``: in ``claim_from``, ready for it) or abandoned
    (in ``working`` with no live lease: released, failed and past their backoff, or the holder
    died); ``predicate`` covers both and is the predicate of the stage's partial claim index, to
    the letter (the claim statement repeats it so the planner can prove the index applies).
    Claiming moves a fresh token to ``working``; completing writes the handler's result into
    ``result_column`` and moves the token to ``done``.
    """

    name: str
    claim_from: TokenStatus
    working: TokenStatus
    done: TokenStatus
    predicate: str
    # Tokens a stage may take the moment they appear (the insert trigger's NOTIFY condition).
    fresh: str
    # The column the handler's result goes to, and the rule it must pass first (the same rule the
    # Token method of that transition applies; FieldValidationError names the field).
    result_column: str
    validate_result: Callable[[Any], str]
    # The Token method that applies the completion by hand (``uow.leases.complete``): the same
    # edge and rule as the worker's set-based completion.
    complete_with: str
    default_batch: int
    max_batch: int
    # True when one handler call serves the whole batch (one reveal transaction for all tokens).
    whole_batch: bool = False
    # The stage whose tokens this one's completions make claimable (woken by NOTIFY).
    feeds: str | None = None
    # A column the stage's input must hold (an operator's retry into a stage needs it).
    requires: str | None = None

    def __post_init__(self) -> None:
        # A plain string, whether given as a StageName or not: names go into SQL text, logs,
        # metric labels and JSON, and compare equal to the StageName members either way.
        object.__setattr__(self, "name", str(self.name))
        if self.feeds is not None:
            object.__setattr__(self, "feeds", str(self.feeds))

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel announcing tokens this stage can claim."""
        return f"glisk_stage_{self.name}"

    @property
    def index_name(self) -> str:
        return f"ix_tokens_s0_claim_{self.name}"

    @property
    def index_predicate(self) -> str:
        return self.predicate

    @property
    def retry_target(self) -> TokenStatus:
        """Where ``glisk tokens retry`` sends a token this stage failed: the status it claims."""
        return self.claim_from


STAGES: dict[str, Stage] = {
    StageName.IMAGE: Stage(
        StageName.IMAGE,
        claim_from=S.DETECTED,
        working=S.GENERATING,
        done=S.GENERATING,  # the upload stage's claim takes it on to 'uploading'
        predicate=(
            "image_path IS NULL AND (status = 'detected'"
            " OR (status = 'generating' AND claimed_by IS NOT NULL))"
        ),
        fresh="status = 'detected' AND image_path IS NULL",
        result_column="image_path",
        validate_result=_image_path,
        complete_with="record_generated_image",
        default_batch=1,
        max_batch=100,
        feeds=StageName.UPLOAD,
    ),
    StageName.UPLOAD: Stage(
        StageName.UPLOAD,
        claim_from=S.GENERATING,
        working=S.UPLOADING,
        done=S.READY,
        predicate=(
            "image_path IS NOT NULL AND (status = 'generating'"
            " OR (status = 'uploading' AND claimed_by IS NOT NULL))"
        ),
        fresh="status = 'generating' AND image_path IS NOT NULL",
        result_column="metadata_cid",
        validate_result=_metadata_cid,
        complete_with="mark_ready",
        default_batch=1,
        max_batch=100,
        feeds=StageName.REVEAL,
        requires="image_path",
    ),
    StageName.REVEAL: Stage(
        StageName.REVEAL,
        claim_from=S.READY,
        working=S.READY,
        done=S.REVEALED,
        predicate="status = 'ready'",
        fresh="status = 'ready'",
        result_column="reveal_tx_hash",
        validate_result=_tx_hash,
        complete_with="mark_revealed",
        default_batch=50,
        max_batch=50,  # one reveal transaction holds at most 50 tokens
        whole_batch=True,
        requires="metadata_cid",
    ),
}


def stage_names() -> list[str]:
    """The stages' names in pipeline order (for command-line choices and reports)."""
    return list(STAGES)


def resolve_stage(stage: Stage | str) -> Stage:
    """The Stage for a name; FieldValidationError naming the choices for an unknown one."""
    if isinstance(stage, Stage):
        return stage
    found = STAGES.get(stage) if isinstance(stage, str) else None
    if found is None:
        raise FieldValidationError("stage", f"must be one of: {', '.join(STAGES)}", stage)
    return found


def retry_targets() -> dict[str, TokenStatus]:
    """Stage name -> the status an operator's retry sends a token that stage failed back to."""
    return {name: stage.retry_target for name, stage in STAGES.items()}


def check_stage(stage: Stage) -> None:
    """Raise InvalidStateTransition unless every status change ``stage`` makes is an edge of the
    state machine (claiming, completing, failing)."""
    if stage.claim_from != stage.working:
        check_transition(stage.claim_from, stage.working)
    if stage.done != stage.working:
        check_transition(stage.working, stage.done)
    check_transition(stage.working, S.FAILED)


for _stage in STAGES.values():
    check_stage(_stage)
