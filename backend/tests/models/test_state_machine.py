"""Every legal and illegal token status change, in memory and through the database."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from glisk.models import FieldValidationError, InvalidStateTransition, Token, TokenStatus
from glisk.uow import UnitOfWorkFactory
from tests.support import factories

S = TokenStatus

# Written out independently of glisk.models.token.TRANSITIONS, so a wrong table fails here.
LEGAL = {
    (S.DETECTED, S.GENERATING),
    (S.GENERATING, S.UPLOADING),
    (S.UPLOADING, S.READY),
    (S.READY, S.REVEALED),
    (S.DETECTED, S.FAILED),
    (S.GENERATING, S.FAILED),
    (S.UPLOADING, S.FAILED),
    (S.READY, S.FAILED),
    # The operator's retry: a failed token goes back to what its failed stage claims from.
    (S.FAILED, S.DETECTED),
    (S.FAILED, S.GENERATING),
    (S.FAILED, S.READY),
}
# The stage whose failure a retry to each status undoes.
RETRY_STAGE = {S.DETECTED: "image", S.GENERATING: "upload", S.READY: "reveal"}

METHODS: dict[TokenStatus, Callable[[Token], None]] = {
    S.GENERATING: lambda t: t.mark_generating(),
    S.UPLOADING: lambda t: t.mark_uploading("/images/1.png"),
    S.READY: lambda t: t.mark_ready("bafy-meta"),
    S.REVEALED: lambda t: t.mark_revealed("0x" + "ab" * 32),
    S.FAILED: lambda t: t.mark_failed({"reason": "boom"}),
}


def _token(status: TokenStatus) -> Token:
    if status == S.FAILED:
        # A failed token with everything any stage needs, so every retry target is reachable.
        return factories.token(
            uuid.uuid4(),
            status=status,
            image_path="/images/1.png",
            metadata_cid="bafy-meta",
            error_data={"reason": "boom"},
        )
    return factories.token(uuid.uuid4(), status=status)


def _change(token: Token, target: TokenStatus) -> None:
    if token.status == S.FAILED and target in RETRY_STAGE:
        token.error_data = {"reason": "boom", "stage": RETRY_STAGE[target]}
        token.retry_from_failed()
    elif target in METHODS:
        METHODS[target](token)
    else:  # only a retry leads back to 'detected'; otherwise the way to try is assignment
        token.status = target


@pytest.mark.parametrize("current", list(S), ids=str)
@pytest.mark.parametrize("target", list(S), ids=str)
def test_every_status_pair_is_allowed_exactly_when_the_state_machine_says_so(
    current: TokenStatus, target: TokenStatus
) -> None:
    token = _token(current)
    before: dict[str, Any] = dict(token.__dict__)
    if current == target == S.DETECTED:
        # No method leads to 'detected'; assigning the value it already has changes nothing.
        _change(token, target)
        assert token.status == S.DETECTED
    elif (current, target) in LEGAL:
        _change(token, target)
        assert token.status == target
    else:
        with pytest.raises(InvalidStateTransition) as info:
            _change(token, target)
        assert f"'{current}'" in str(info.value)
        assert f"'{target}'" in str(info.value)
        # A refused change leaves the token exactly as it was.
        assert token.status == current
        assert token.metadata_cid == before.get("metadata_cid")
        assert token.error_data == before.get("error_data")


def test_the_table_is_the_forward_edges_plus_the_retry_edges_and_matches_the_stages() -> None:
    from glisk.models.transitions import FORWARD, TRANSITIONS
    from glisk.pipeline import STAGES, retry_targets

    retry_to = retry_targets()

    table = {(source, target) for target, sources in TRANSITIONS.items() for source in sources}
    assert table == LEGAL
    forward = {(source, target) for target, sources in FORWARD.items() for source in sources}
    assert table - forward == {(S.FAILED, target) for target in retry_to.values()}
    assert {name: stage.claim_from for name, stage in STAGES.items()} == retry_to


@pytest.mark.parametrize("target", [S.GENERATING, S.READY], ids=str)
def test_a_failed_token_leaves_failed_only_through_the_retry(target: TokenStatus) -> None:
    token = _token(S.FAILED)
    with pytest.raises(InvalidStateTransition):
        METHODS[target](token)
    assert token.status == S.FAILED


@pytest.mark.parametrize("current", [s for s in S if s != S.FAILED], ids=str)
def test_retry_is_refused_for_every_status_but_failed(current: TokenStatus) -> None:
    token = _token(current)
    before = dict(token.__dict__)
    with pytest.raises(InvalidStateTransition, match=f"Cannot retry a token in '{current}'"):
        token.retry_from_failed()
    assert token.__dict__ == before


@pytest.mark.parametrize(
    ("error_data", "image_path", "metadata_cid", "target"),
    [
        ({"stage": "image"}, None, None, S.DETECTED),
        ({"stage": "upload"}, "/i.png", None, S.GENERATING),
        ({"stage": "reveal"}, "/i.png", "bafy", S.READY),
        # No stage recorded (the transactional path): the first stage whose input is missing.
        ({"reason": "x"}, None, None, S.DETECTED),
        ({"reason": "x"}, "/i.png", None, S.GENERATING),
        ({"reason": "x"}, "/i.png", "bafy", S.READY),
        (None, None, None, S.DETECTED),
    ],
)
def test_retry_goes_to_what_the_failed_stage_claims_from_and_resets_the_attempts(
    error_data: dict[str, Any] | None, image_path: str | None, metadata_cid: str | None, target: S
) -> None:
    token = factories.token(
        uuid.uuid4(),
        status=S.FAILED,
        image_path=image_path,
        metadata_cid=metadata_cid,
        error_data=error_data,
        attempts=3,
        deferrals=2,
        checkpoint={"step": 1},
    )
    assert token.retry_from_failed() == target
    assert (token.status, token.attempts, token.deferrals, token.checkpoint) == (target, 0, 0, None)
    assert token.error_data == {"history": [{**(error_data or {}), "retried_to": target.value}]}


def test_a_reveal_retry_keeps_the_pointer_at_a_transaction_that_may_still_be_mined() -> None:
    reveal = {"id": str(uuid.uuid4()), "tx_hash": "0x" + "ab" * 32, "data": {"nonce": 4}}
    token = factories.token(
        uuid.uuid4(),
        status=S.FAILED,
        image_path="/i.png",
        metadata_cid="bafy",
        error_data={"stage": "reveal", "reason": "max_attempts_exceeded"},
        checkpoint={"reveal": reveal, "step": "sent"},
    )
    assert token.retry_from_failed() == S.READY
    assert token.checkpoint == {"reveal": reveal}  # the reveal worker reconciles it first


def test_failing_a_retried_token_again_keeps_its_history() -> None:
    token = factories.token(uuid.uuid4(), status=S.FAILED, error_data={"reason": "first"})
    token.retry_from_failed()
    token.mark_generating()
    token.mark_failed({"reason": "second"})
    assert token.error_data == {
        "reason": "second",
        "history": [{"reason": "first", "retried_to": "detected"}],
    }


def test_retry_refuses_a_stage_whose_input_the_token_lacks() -> None:
    token = factories.token(uuid.uuid4(), status=S.FAILED, error_data={"stage": "upload"})
    with pytest.raises(InvalidStateTransition, match="without image_path"):
        token.retry_from_failed()
    assert token.status == S.FAILED and token.error_data == {"stage": "upload"}


def test_invalid_transition_message_names_current_and_required_state() -> None:
    token = _token(S.UPLOADING)
    with pytest.raises(InvalidStateTransition) as info:
        token.mark_revealed("0x" + "ab" * 32)
    assert str(info.value) == (
        "Cannot transition from 'uploading' to 'revealed'. Token must be in 'ready' state."
    )
    assert info.value.current == S.UPLOADING
    assert info.value.required == (S.READY,)


def test_failing_a_terminal_token_lists_the_states_it_could_have_been_in() -> None:
    with pytest.raises(InvalidStateTransition, match="one of 'detected', 'generating'"):
        _token(S.REVEALED).mark_failed({"reason": "late"})


@pytest.mark.parametrize(
    ("status", "call", "field"),
    [
        (S.UPLOADING, lambda t: t.mark_ready(""), "metadata_cid"),
        (S.READY, lambda t: t.mark_revealed(""), "tx_hash"),
        (S.READY, lambda t: t.mark_revealed("0x1234"), "tx_hash"),
        (S.GENERATING, lambda t: t.mark_uploading(""), "image_path"),
        (S.DETECTED, lambda t: t.mark_failed("not a dict"), "error_dict"),
    ],
)
def test_transition_arguments_are_validated_before_the_status_changes(
    status: TokenStatus, call: Callable[[Token], None], field: str
) -> None:
    token = _token(status)
    with pytest.raises(ValueError, match=field):
        call(token)
    assert token.status == status


# Each status-changing method with an argument it refuses, the field it names, and the statuses
# the method accepts (written out, not taken from TRANSITIONS).
BAD_CALLS: list[tuple[str, Callable[[Token], None], str, set[TokenStatus]]] = [
    ("mark_uploading", lambda t: t.mark_uploading(""), "image_path", {S.GENERATING}),
    ("mark_ready", lambda t: t.mark_ready(""), "metadata_cid", {S.UPLOADING}),
    ("mark_revealed", lambda t: t.mark_revealed("0xabc"), "tx_hash", {S.READY}),
    (
        "mark_failed",
        lambda t: t.mark_failed("not a dict"),  # type: ignore[arg-type]
        "error_dict",
        {S.DETECTED, S.GENERATING, S.UPLOADING, S.READY},
    ),
    (
        "record_generated_image",
        lambda t: t.record_generated_image(""),
        "image_path",
        {S.GENERATING},
    ),
]


@pytest.mark.parametrize("status", list(S), ids=str)
@pytest.mark.parametrize(
    ("call", "field", "accepted_in"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_a_wrong_state_is_reported_before_a_bad_argument(
    status: TokenStatus,
    call: Callable[[Token], None],
    field: str,
    accepted_in: set[TokenStatus],
) -> None:
    token = _token(status)
    before: dict[str, Any] = dict(token.__dict__)
    if status in accepted_in:
        with pytest.raises(FieldValidationError) as bad_argument:
            call(token)
        assert bad_argument.value.field == field
    else:
        with pytest.raises(InvalidStateTransition) as wrong_state:
            call(token)
        assert wrong_state.value.current == status
        assert f"'{status}'" in str(wrong_state.value)
    assert token.status == status
    for name in ("image_path", "metadata_cid", "reveal_tx_hash", "error_data"):
        assert getattr(token, name) == before.get(name)


def test_transitions_record_their_data() -> None:
    token = _token(S.DETECTED)
    token.mark_generating()
    token.mark_uploading("/images/7.png")
    token.mark_ready("bafy-meta-7")
    token.mark_revealed("0x" + "AB" * 32)
    assert (token.image_path, token.metadata_cid) == ("/images/7.png", "bafy-meta-7")
    assert token.reveal_tx_hash == "0x" + "ab" * 32  # stored lowercase
    assert token.is_terminal

    failed = _token(S.GENERATING)
    failed.mark_failed({"stage": "generation", "attempts": 3})
    assert failed.error_data == {"stage": "generation", "attempts": 3}


def test_assigning_status_directly_is_refused_even_for_a_legal_step() -> None:
    token = _token(S.DETECTED)
    with pytest.raises(InvalidStateTransition, match=r"use the Token\.mark_\* methods"):
        token.status = S.GENERATING
    assert token.status == S.DETECTED


def test_unknown_status_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(FieldValidationError, match="status: must be one of: detected"):
        factories.token(uuid.uuid4(), status="pending")  # type: ignore[arg-type]


async def test_transitions_persist_and_a_loaded_token_is_still_guarded(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        token = await uow.tokens.add(factories.token(author.id))
    async with uow_factory() as uow:
        loaded = await uow.tokens.get_by_id(token.id)
        assert loaded is not None
        loaded.mark_generating()
    async with uow_factory() as uow:
        loaded = await uow.tokens.get_by_id(token.id)
        assert loaded is not None and loaded.status == S.GENERATING
        with pytest.raises(InvalidStateTransition):
            loaded.mark_ready("bafy")
        with pytest.raises(InvalidStateTransition):
            loaded.status = S.REVEALED


async def test_database_refuses_a_ready_token_without_metadata_cid_even_from_raw_sql(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        token = await uow.tokens.add(factories.token(author.id, status=S.UPLOADING))
    with pytest.raises(Exception, match="metadata_cid_required_when_ready"):
        async with uow_factory() as uow:
            await uow.session.execute(
                text("UPDATE tokens_s0 SET status = 'ready' WHERE id = :id"), {"id": token.id}
            )


async def test_constructing_a_ready_token_without_metadata_cid_fails_at_flush_naming_the_field(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(FieldValidationError, match="metadata_cid: is required when status is"):
        async with uow_factory() as uow:
            author = await uow.authors.add(factories.author())
            await uow.tokens.add(factories.token(author.id, status=S.READY, metadata_cid=None))
