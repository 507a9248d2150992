"""What a handler raises to steer its token, and what the runtime raises (all in glisk.errors,
under GliskError; imported from here too)."""

from glisk.errors import DatabaseTimeout, LeaseLost, PermanentError, RetryLater

__all__ = ["DatabaseTimeout", "LeaseLost", "PermanentError", "RetryLater"]
