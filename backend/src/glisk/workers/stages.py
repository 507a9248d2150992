"""Deprecated: the stage table lives in ``glisk.pipeline`` (import it from there, or from
``glisk.workers``). Kept so that existing imports keep working."""

from glisk.pipeline import STAGES, Stage, StageName, resolve_stage

__all__ = ["STAGES", "Stage", "StageName", "resolve_stage"]
