"""The pipeline stages that workers claim with a lease.

A stage claims tokens that are fresh (in ``claim_from``, unclaimed) or abandoned (in ``working``,
with no live lease: released, failed and past their backoff, or the holder died). Claiming moves a
fresh token to ``working``; completing writes the handler's result into ``result_column`` and moves
the token to ``done``. Every status change a stage makes is an edge of the token state machine,
checked against ``TRANSITIONS`` when this module loads, so the set-based statements in
``glisk.workers.queries`` can only do what ``Token``'s methods would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from glisk.models import validation as v
from glisk.models.enums import TokenStatus
from glisk.models.transitions import check_transition
from glisk.workers.predicates import CLAIM_INDEX_PREDICATES

S = TokenStatus


class StageName(StrEnum):
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
    name: StageName
    claim_from: TokenStatus
    working: TokenStatus
    done: TokenStatus
    # The column the handler's result goes to, and the rule it must pass first (the same rule the
    # Token method of that transition applies; FieldValidationError names the field).
    result_column: str
    validate_result: Callable[[Any], str]
    default_batch: int
    max_batch: int
    # True when one handler call serves the whole batch (one reveal transaction for all tokens).
    whole_batch: bool = False
    # The stage whose tokens this one's completions make claimable (woken by NOTIFY).
    feeds: StageName | None = None

    @property
    def index_predicate(self) -> str:
        return CLAIM_INDEX_PREDICATES[self.name.value]

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel announcing tokens this stage can claim."""
        return f"glisk_stage_{self.name.value}"


STAGES: dict[StageName, Stage] = {
    StageName.IMAGE: Stage(
        StageName.IMAGE,
        claim_from=S.DETECTED,
        working=S.GENERATING,
        done=S.GENERATING,  # the upload stage's claim takes it on to 'uploading'
        result_column="image_path",
        validate_result=_image_path,
        default_batch=1,
        max_batch=100,
        feeds=StageName.UPLOAD,
    ),
    StageName.UPLOAD: Stage(
        StageName.UPLOAD,
        claim_from=S.GENERATING,
        working=S.UPLOADING,
        done=S.READY,
        result_column="metadata_cid",
        validate_result=_metadata_cid,
        default_batch=1,
        max_batch=100,
        feeds=StageName.REVEAL,
    ),
    StageName.REVEAL: Stage(
        StageName.REVEAL,
        claim_from=S.READY,
        working=S.READY,
        done=S.REVEALED,
        result_column="reveal_tx_hash",
        validate_result=_tx_hash,
        default_batch=50,
        max_batch=50,  # one reveal transaction holds at most 50 tokens
        whole_batch=True,
    ),
}


def resolve_stage(stage: Stage | StageName | str) -> Stage:
    """The Stage for a name; FieldValidationError naming the choices for an unknown one."""
    if isinstance(stage, Stage):
        return stage
    return STAGES[v.one_of("stage", stage, StageName)]


for _stage in STAGES.values():
    if _stage.claim_from != _stage.working:
        check_transition(_stage.claim_from, _stage.working)
    if _stage.done != _stage.working:
        check_transition(_stage.working, _stage.done)
    check_transition(_stage.working, S.FAILED)
