"""UTC everywhere: the process clock, and naive UTC timestamps for the database.

Columns are naive ``TIMESTAMP`` holding UTC (docs/schema.md); ``utcnow()`` is the only way the
application produces one, so local time can never reach the database.
"""

import os
import time
from datetime import UTC, datetime

# The database clock as a naive UTC timestamp, for SQL written out whole: every time a statement
# compares or writes comes from the database, never from a process clock.
DB_NOW = "(now() AT TIME ZONE 'utc')"


def enforce_utc() -> None:
    """Set the process time zone to UTC. Called by the CLI and the app factory, not at import."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def utcnow() -> datetime:
    """The current time as a naive datetime in UTC (what a ``TIMESTAMP`` column stores)."""
    return datetime.now(UTC).replace(tzinfo=None)
