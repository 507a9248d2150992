"""The token state machine's table: a leaf module (no SQLModel), so the worker runtime can check
its stages against it without importing the entities.

``Token`` (models/token.py) applies it: its ``mark_*`` methods are the only way to change a
status.
"""

from __future__ import annotations

from glisk.errors import InvalidStateTransition
from glisk.models.enums import TokenStatus

S = TokenStatus

# The pipeline's forward edges, taken by the mark_* methods and the workers' stages:
# detected -> generating -> uploading -> ready -> revealed; any non-terminal state -> failed.
FORWARD: dict[TokenStatus, tuple[TokenStatus, ...]] = {
    S.GENERATING: (S.DETECTED,),
    S.UPLOADING: (S.GENERATING,),
    S.READY: (S.UPLOADING,),
    S.REVEALED: (S.READY,),
    S.FAILED: (S.DETECTED, S.GENERATING, S.UPLOADING, S.READY),
}
# The whole state machine: target status -> the statuses it may be entered from. The edges out of
# 'failed' are an operator's retry, taken only by Token.retry_from_failed, to the status the failed
# stage claims from (glisk.pipeline; a test keeps the two equal, this leaf cannot import it).
TRANSITIONS: dict[TokenStatus, tuple[TokenStatus, ...]] = {
    S.DETECTED: (S.FAILED,),
    S.GENERATING: (S.DETECTED, S.FAILED),
    S.UPLOADING: (S.GENERATING,),
    S.READY: (S.UPLOADING, S.FAILED),
    S.REVEALED: (S.READY,),
    S.FAILED: (S.DETECTED, S.GENERATING, S.UPLOADING, S.READY),
}
# Finished for the pipeline: no worker claims these ('failed' is left only by an operator's retry).
TERMINAL: frozenset[TokenStatus] = frozenset({S.REVEALED, S.FAILED})


def check_transition(current: TokenStatus, target: TokenStatus) -> None:
    """Raise InvalidStateTransition unless ``current -> target`` is a forward edge (the mark_*
    methods and the stages; leaving 'failed' is Token.retry_from_failed's alone)."""
    allowed_from = FORWARD.get(target, ())
    if current not in allowed_from:
        raise InvalidStateTransition(current, target, allowed_from)
