"""DATABASE_URL as glisk accepts it, and what libpq must insist on when it connects there.

Plain functions raising ``ValueError`` with the rule broken; ``glisk.core.config`` runs them as
its validators (the message then names the variable), and the stage handlers normalise the
embedded server's URL with the same ``normalize_database_url``.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, urlencode, urlsplit

DRIVER = "postgresql+psycopg"

# What sits between the application and PostgreSQL (DB_POOLER).
PoolerMode = Literal["none", "session", "transaction"]

# libpq's require_auth methods (DB_REQUIRE_AUTH); "any" adds no requirement.
AUTH_METHODS = frozenset({"password", "md5", "gss", "sspi", "scram-sha-256", "none"})
# sslmode values under which the connection is always encrypted, so SCRAM can bind to it.
TLS_REQUIRED = frozenset({"require", "verify-ca", "verify-full"})


def normalize_database_url(url: str) -> str:
    """Accept the URL forms hosting providers hand out and return the psycopg 3 async form.

    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://``; any other driver
    (``+asyncpg``, ``sqlite``) is refused because the application only ships psycopg, and so is
    a port that is not a number from 1 to 65535.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ValueError("must be a URL like postgresql+psycopg://user:password@host:5432/dbname")
    if scheme not in ("postgres", "postgresql", DRIVER):
        raise ValueError(
            f"must use the postgresql+psycopg:// scheme (got '{scheme}://'); "
            "postgres:// and postgresql:// are accepted and converted"
        )
    try:
        # Raises for a port that is not a number, or outside 0-65535.
        port = urlsplit(f"postgresql://{rest}").port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        hostport = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        raise ValueError(
            f"the port must be a number from 1 to 65535 (got '{hostport.rpartition(':')[2]}')"
        )
    return f"{DRIVER}://{rest}"


def require_auth_methods(value: str) -> str:
    """DB_REQUIRE_AUTH, lower-cased: 'any', or libpq require_auth methods separated by commas,
    all or none negated with '!'."""
    value = value.strip().lower()
    methods = [m.strip() for m in value.split(",")]
    negated = {m.startswith("!") for m in methods}
    if value == "any" or (
        len(negated) == 1 and all(m.lstrip("!") in AUTH_METHODS for m in methods)
    ):
        return value
    raise ValueError(
        "must be 'any' or libpq require_auth methods separated by commas, all or none "
        f"negated with '!' (from {', '.join(sorted(AUTH_METHODS))}; got '{value}')"
    )


def with_connection_requirements(url: str, require_auth: str, *, pooler: PoolerMode) -> str:
    """``url`` with what libpq must insist on, unless the URL says otherwise itself:
    ``require_auth`` (DB_REQUIRE_AUTH; "any": nothing), and ``channel_binding=require`` when the
    requirement is SCRAM over a connection that is always encrypted (sslmode require or
    verify-*) to PostgreSQL itself (a pooler in between ends the TLS session SCRAM binds to)."""
    query = parse_qs(urlsplit(url).query)
    extra: dict[str, str] = {}
    if require_auth != "any" and "require_auth" not in query:
        extra["require_auth"] = require_auth
    scram = query.get("require_auth", [require_auth])[-1] == "scram-sha-256"
    tls = query.get("sslmode", [""])[-1] in TLS_REQUIRED
    if scram and tls and pooler == "none" and "channel_binding" not in query:
        extra["channel_binding"] = "require"
    if not extra:
        return url
    return f"{url}{'&' if '?' in url else '?'}{urlencode(extra)}"
