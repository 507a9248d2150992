"""What recording a mint log answers: ``MintRecorded`` (``record_mint``) and ``MintOutcome``
(``record_mints``, one per input log), and the prompt an author first seen in a log gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from glisk.models import MintConflict, MintLog

# The prompt of an author first seen in a mint log (not registered through the API yet); the
# author can replace it later. Callers with a configured default pass their own.
DEFAULT_AUTHOR_PROMPT = "An original GLISK artwork, in the style chosen by its author"


@dataclass(frozen=True)
class MintRecorded:
    """What ``record_mint`` did with a log.

    ``new`` is True for exactly one delivery of a log, however many deliver it at once; a
    redelivery gets False and the id of the row recorded earlier. ``author_created`` is True when
    this call created the author (its wallet had not been seen).
    """

    new: bool
    event_id: UUID
    token_ids: range
    author_id: UUID | None
    author_created: bool


MintStatus = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class MintOutcome:
    """What ``record_mints`` did with one log of its input (same position).

    ``new``: recorded by this call (exactly one delivery of a log gets it, however many deliver
    it at once); ``duplicate``: recorded before (or earlier in the same input); ``conflict``:
    nothing written for it, ``conflict`` says why. ``event_id`` is the log's row when it is
    recorded; ``author_created`` is True on the first log of the input whose author this call
    created (exactly one log, across every writer, for each author created).
    """

    log: MintLog
    status: MintStatus
    event_id: UUID | None = None
    author_id: UUID | None = None
    author_created: bool = False
    conflict: MintConflict | None = None

    @property
    def new(self) -> bool:
        return self.status == "new"
