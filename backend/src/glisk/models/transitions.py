"""The token state machine's table: a leaf module (no SQLModel), so the worker runtime can check
its stages against it without importing the entities.

``Token`` (models/token.py) applies it: its ``mark_*`` methods are the only way to change a
status.
"""

from __future__ import annotations

from glisk.models.enums import InvalidStateTransition, TokenStatus

S = TokenStatus

# The whole state machine: target status -> the statuses it may be entered from.
# detected -> generating -> uploading -> ready -> revealed; any non-terminal state -> failed.
TRANSITIONS: dict[TokenStatus, tuple[TokenStatus, ...]] = {
    S.GENERATING: (S.DETECTED,),
    S.UPLOADING: (S.GENERATING,),
    S.READY: (S.UPLOADING,),
    S.REVEALED: (S.READY,),
    S.FAILED: (S.DETECTED, S.GENERATING, S.UPLOADING, S.READY),
}
TERMINAL: frozenset[TokenStatus] = frozenset({S.REVEALED, S.FAILED})


def check_transition(current: TokenStatus, target: TokenStatus) -> None:
    """Raise InvalidStateTransition unless ``current -> target`` is in the table."""
    allowed_from = TRANSITIONS.get(target, ())
    if current not in allowed_from:
        raise InvalidStateTransition(current, target, allowed_from)
