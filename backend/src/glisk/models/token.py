from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, Integer, String, text
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import UUID as PGUUID
from sqlalchemy.orm import validates
from sqlalchemy.orm.attributes import flag_modified
from sqlmodel import Field

from glisk.errors import InvalidStateTransition
from glisk.models import validation as v
from glisk.models._columns import (
    created_at_field,
    error_data_field,
    optional_jsonb_field,
    optional_timestamp_field,
    timestamp_column,
)
from glisk.models.base import Entity
from glisk.models.enums import TokenStatus
from glisk.models.transitions import TERMINAL, TRANSITIONS, check_transition
from glisk.pipeline import STAGES, retry_targets

S = TokenStatus

TOKEN_STATUS_ENUM = SAEnum(
    TokenStatus,
    name="token_status_enum",
    values_callable=lambda enum: [member.value for member in enum],
    validate_strings=True,
)


class Token(Entity, table=True):
    """An NFT of season 0 and its place in the pipeline.

    Status changes only through the ``mark_*`` methods, which consult ``TRANSITIONS``. Assigning
    ``token.status`` directly on a loaded or constructed token raises InvalidStateTransition (a new
    token may be built in any status, e.g. for backfills). The database backs the rules that need
    no history: a ready or revealed token has a metadata_cid (CHECK), and the status is a native
    enum.
    """

    __tablename__ = "tokens_s0"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        CheckConstraint(f"minter_address ~ '{v.WALLET_PATTERN}'", name="minter_address_format"),
        CheckConstraint(
            "status NOT IN ('ready', 'revealed') OR metadata_cid IS NOT NULL",
            name="metadata_cid_required_when_ready",
        ),
        CheckConstraint(
            f"reveal_tx_hash IS NULL OR reveal_tx_hash ~ '{v.TX_HASH_STORED_PATTERN}'",
            name="reveal_tx_hash_format",
        ),
        CheckConstraint("token_id >= 0", name="token_id_non_negative"),
        Index("ix_tokens_s0_status_mint_timestamp", "status", "mint_timestamp"),
        # Leased claims (glisk.workers): a claim is a fencing id plus a lease, both or neither;
        # a finished token is never claimed.
        CheckConstraint("(claim_id IS NULL) = (lease_expires_at IS NULL)", name="claim_has_lease"),
        CheckConstraint("claim_id IS NULL OR claimed_by IS NOT NULL", name="claim_has_holder"),
        CheckConstraint(
            "claim_id IS NULL OR status NOT IN ('revealed', 'failed')",
            name="finished_token_not_claimed",
        ),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("deferrals >= 0", name="deferrals_non_negative"),
        # Fencing: every write after a claim finds its row by claim_id. Only live and expired
        # claims are in this index, so it stays small however large the table grows.
        Index(
            "ix_tokens_s0_claim_id",
            "claim_id",
            postgresql_where=text("claim_id IS NOT NULL"),
        ),
        # One partial index per leased stage, matching its claim query's WHERE and ORDER BY, so
        # finished tokens (the vast majority over time) are never scanned by a claim.
        *(
            Index(stage.index_name, "mint_timestamp", "id", postgresql_where=text(stage.predicate))
            for stage in STAGES.values()
        ),
    )

    id: UUID = Field(default_factory=uuid4, primary_key=True)
    token_id: int = Field(sa_column=Column(Integer, nullable=False, unique=True))
    author_id: UUID = Field(
        sa_column=Column(ForeignKey("authors.id", ondelete="RESTRICT"), nullable=False, index=True)
    )
    minter_address: str = Field(sa_column=Column(String(42), nullable=False))
    status: TokenStatus = Field(
        default=S.DETECTED,
        sa_column=Column(TOKEN_STATUS_ENUM, nullable=False, server_default=S.DETECTED.value),
    )
    mint_timestamp: datetime = Field(sa_column=timestamp_column())
    image_path: str | None = Field(default=None, sa_column=Column(String(2048), nullable=True))
    image_cid: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    metadata_cid: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    reveal_tx_hash: str | None = Field(default=None, sa_column=Column(String(66), nullable=True))
    error_data: dict[str, Any] | None = error_data_field()
    created_at: datetime = created_at_field()
    # Leased claims: who holds the token (kept after release, as the last holder), the fencing id
    # of the live claim, until when, and how many claims the current stage has had.
    claimed_by: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    claim_id: UUID | None = Field(
        default=None, sa_column=Column(PGUUID(as_uuid=True), nullable=True)
    )
    lease_expires_at: datetime | None = optional_timestamp_field()
    attempts: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    # Backoff: a failed attempt (or a RetryLater) makes the token claimable again only from
    # not_before on; deferrals counts the RetryLaters of the current stage.
    not_before: datetime | None = optional_timestamp_field()
    deferrals: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    # What a handler recorded for its claim before an external effect; handed to the next holder
    # after a rescue, cleared when the stage completes or the token fails for good.
    checkpoint: dict[str, Any] | None = optional_jsonb_field()

    # -- state machine -------------------------------------------------------------------------
    # Every mark_* (and record_generated_image) checks the transition before its argument: a token
    # in the wrong state is the more basic mistake, and callers written against the upstream
    # foundation expect InvalidStateTransition then, whatever the argument.

    def mark_generating(self) -> None:
        """detected -> generating."""
        self._transition(S.GENERATING)

    def mark_uploading(self, image_path: str) -> None:
        """generating -> uploading; records where the generated image is. Raises
        InvalidStateTransition first, then FieldValidationError for a bad image_path."""
        check_transition(self.status, S.UPLOADING)
        v.required_when("image_path", image_path, "marking a token uploading")
        path = v.text_length("image_path", image_path, 1, 2048)
        self._transition(S.UPLOADING)
        self.image_path = path

    def mark_ready(self, metadata_cid: str) -> None:
        """uploading -> ready; stores metadata_cid. Raises InvalidStateTransition first, then
        FieldValidationError (a ValueError) for an empty or too long metadata_cid."""
        check_transition(self.status, S.READY)
        v.required_when("metadata_cid", metadata_cid, "marking a token ready")
        cid = v.text_length("metadata_cid", metadata_cid, 1, 255)
        self.metadata_cid = cid
        self._transition(S.READY)

    def mark_revealed(self, tx_hash: str) -> None:
        """ready -> revealed; stores the reveal tx hash. Raises InvalidStateTransition first, then
        FieldValidationError (a ValueError) for an empty or malformed tx_hash."""
        check_transition(self.status, S.REVEALED)
        v.required_when("tx_hash", tx_hash, "marking a token revealed")
        normalized = v.tx_hash("tx_hash", tx_hash)
        self._transition(S.REVEALED)
        self.reveal_tx_hash = normalized

    def record_generated_image(self, image_path: str) -> None:
        """Generation finished: store where the image is. Only while 'generating'; the status does
        not change (the upload stage's claim takes the token to 'uploading'). Raises
        InvalidStateTransition first, then FieldValidationError for a bad image_path."""
        if self.status != S.GENERATING:
            raise InvalidStateTransition(
                self.status,
                S.GENERATING,
                (S.GENERATING,),
                message=(
                    f"Cannot record a generated image for a token in '{self.status}'. "
                    "Token must be in 'generating' state."
                ),
            )
        v.required_when("image_path", image_path, "recording a generated image")
        self.image_path = v.text_length("image_path", image_path, 1, 2048)

    def mark_failed(self, error_dict: dict[str, Any]) -> None:
        """Any non-terminal state -> failed; stores error_dict as error_data, keeping the
        ``history`` of failures an operator retried (retry_from_failed) unless error_dict
        brings its own. Retrying attempts is the workers' business, not the model's. Raises
        InvalidStateTransition first (a revealed or failed token), then FieldValidationError
        when error_dict is not a dict."""
        check_transition(self.status, S.FAILED)
        if not isinstance(error_dict, dict):
            raise v.FieldValidationError("error_dict", "must be a dict", error_dict)
        history = (self.error_data or {}).get("history")
        self._transition(S.FAILED)
        self.error_data = (
            {**error_dict, "history": history}
            if history is not None and "history" not in error_dict
            else error_dict
        )

    def retry_from_failed(self, *, at: datetime | None = None) -> TokenStatus:
        """failed -> the status its failed stage claims from; returns that status.

        The stage is ``error_data['stage']``; its ``retry_target`` in ``glisk.pipeline`` says
        where it goes (image -> detected, upload -> generating, reveal -> ready). A failure that
        names no known stage (the transactional path's mark_failed) is sent back to the latest
        stage whose input the token has: reveal if it has a metadata_cid, upload if it has an
        image_path, image otherwise. The token starts that stage afresh: attempts, deferrals,
        backoff and checkpoint reset, and the stage's result column is cleared (the image stage
        claims only tokens without an image_path), except a checkpoint's pointer at a reveal
        transaction (``checkpoint['reveal']``), which is kept: that transaction may still be
        mined, so the reveal worker reconciles it before it puts the token in a new one
        (confirmed: the token completes with it). The previous
        failure is appended to ``error_data['history']`` (with ``retried_at`` when ``at`` is
        given) and is the only thing error_data then holds.

        Raises InvalidStateTransition for a token in any other status, and for a stage whose
        input the token lacks (upload without image_path, reveal without metadata_cid).
        """
        previous = dict(self.error_data or {})
        stage = previous.get("stage")
        targets = retry_targets()
        if self.status != S.FAILED:
            target = targets.get(stage, S.DETECTED) if isinstance(stage, str) else S.DETECTED
            raise InvalidStateTransition(
                self.status,
                target,
                (S.FAILED,),
                message=(
                    f"Cannot retry a token in '{self.status}': only a token in 'failed' "
                    "state can be sent back to its stage."
                ),
            )
        if not (isinstance(stage, str) and stage in STAGES):
            # The latest stage whose input the token has (reveal, upload, else image).
            stage = next(
                s.name for s in reversed(STAGES.values()) if self._has_input_for(s.requires)
            )
        target = targets[stage]
        requires = STAGES[stage].requires
        if not self._has_input_for(requires):
            raise InvalidStateTransition(
                S.FAILED,
                target,
                (S.FAILED,),
                message=(
                    f"Cannot retry the {stage} stage of a token without {requires}: "
                    f"moving it to '{target}' would leave it in no stage's queue."
                ),
            )
        history = list(previous.pop("history", None) or [])
        entry: dict[str, Any] = {**previous, "retried_to": target.value}
        if at is not None:
            entry["retried_at"] = at.isoformat()
        history.append(entry)
        self._set_status(target)
        # The stage claims only tokens without its result (the image stage: no image_path).
        setattr(self, STAGES[stage].result_column, None)
        self.attempts = 0
        self.deferrals = 0
        self.not_before = None
        reveal = (self.checkpoint or {}).get("reveal")
        self.checkpoint = {"reveal": reveal} if stage == "reveal" and reveal else None
        self.claim_id = None
        self.lease_expires_at = None
        self.error_data = {"history": history}
        return target

    def _has_input_for(self, column: str | None) -> bool:
        return column is None or bool(getattr(self, column))

    def _transition(self, target: TokenStatus) -> None:
        check_transition(self.status, target)
        self._set_status(target)

    def _set_status(self, target: TokenStatus) -> None:
        # The one write of status that does not go through the validator (which refuses every
        # change): straight into the row's state, then marked changed so the flush writes it.
        vars(self)["status"] = target
        flag_modified(self, "status")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    # -- write-time validation -----------------------------------------------------------------

    @validates("status")
    def _status(self, key: str, value: Any) -> TokenStatus:
        new = v.one_of(key, value, TokenStatus)
        current = self.__dict__.get("status")
        if current is not None and current != new:
            # Direct assignment around the state machine: refuse it loudly.
            allowed_from = TRANSITIONS.get(new, ())
            raise InvalidStateTransition(
                TokenStatus(current),
                new,
                allowed_from,
                message=(
                    f"Cannot set status from '{current}' to '{new}' directly; "
                    "use the Token.mark_* methods."
                ),
            )
        return new

    @validates("minter_address")
    def _minter(self, key: str, value: Any) -> str:
        return v.wallet(key, value)

    @validates("token_id")
    def _token_id(self, key: str, value: Any) -> int:
        return v.int_at_least(key, value, 0)

    @validates("reveal_tx_hash")
    def _reveal_tx_hash(self, key: str, value: Any) -> str | None:
        return v.optional_tx_hash(key, value)

    def check_row(self) -> None:
        if self.status in (S.READY, S.REVEALED):
            v.required_when("metadata_cid", self.metadata_cid, f"status is '{self.status}'")
