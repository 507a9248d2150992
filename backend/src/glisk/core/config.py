"""Settings from the environment and the repository-root ``.env``.

Nothing here runs at import: ``load_settings()`` is called by the CLI and the app factory, and tests
build ``Settings(...)`` directly. A bad value raises ``ConfigError`` whose message names the
environment variable and the rule it broke.
"""

from __future__ import annotations

import os
import re
import stat
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict
from urllib.parse import parse_qs, urlencode, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from glisk.errors import ConfigError

__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "normalize_database_url",
    "with_connection_requirements",
]

# In a source checkout (an editable install): backend/src/glisk/core/config.py -> backend/, and
# the repository root, which holds the one .env every service shares. An installed wheel has no
# such tree: see project_dir().
BACKEND_DIR = Path(__file__).resolve().parents[3]
REPO_ROOT = BACKEND_DIR.parent
DEFAULT_ENV_FILE = REPO_ROOT / ".env"


def in_source_checkout() -> bool:
    """Whether this package runs from the repository's backend/src (not an installed wheel)."""
    return (BACKEND_DIR / "pyproject.toml").is_file() and (BACKEND_DIR / "src" / "glisk").is_dir()


def project_dir() -> Path:
    """Where the embedded database keeps its data (``.glisk/pgdata`` below it): backend/ of the
    source checkout, wherever the command runs; for an installed wheel, the current directory."""
    return BACKEND_DIR if in_source_checkout() else Path.cwd()


def default_env_file() -> Path:
    """The ``.env`` read when GLISK_ENV_FILE is unset: the repository root's in a source
    checkout, wherever the command runs; for an installed wheel, the current directory's."""
    return DEFAULT_ENV_FILE if in_source_checkout() else Path.cwd() / ".env"


# Values that mean "nobody chose a secret"; refused when APP_ENV=production.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "changethis", "password", "postgres", "secret"})

DRIVER = "postgresql+psycopg"

# What sits between the application and PostgreSQL (DB_POOLER).
PoolerMode = Literal["none", "session", "transaction"]
# application_name of each kind of process, so pg_stat_activity (and `glisk db check`) can tell
# who holds the connections.
Role = Literal["api", "worker", "cli", "ingest"]
APPLICATION_NAMES: dict[Role, str] = {
    "api": "glisk-api",
    "worker": "glisk-worker",
    "cli": "glisk-cli",
    "ingest": "glisk-ingest",
}
# Confirmations a reveal waits for when REVEAL_CONFIRMATIONS is unset, by chain id: Base and its
# testnet finalise on L1 and reorganise rarely and shallowly; Ethereum and its testnets get the
# customary 12; anvil (31337) none beyond its block. Any other chain: 12.
DEFAULT_CONFIRMATIONS = {1: 12, 11155111: 12, 17000: 12, 8453: 1, 84532: 1, 31337: 1}
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")

# A worker's pool when WORKER_DB_POOL_SIZE is unset: one connection per handler running at once
# (each completes its token in a short transaction) plus one for claims and one for heartbeats,
# capped because completions take milliseconds and a handler can wait for a free connection.
WORKER_POOL_CAP = 10


class WorkerOptions(TypedDict):
    lease_seconds: float
    max_attempts: int
    poll_interval: float
    concurrency: int | None
    batch: int | None
    backoff_base: float
    backoff_cap: float
    max_deferrals: int
    db_timeout: float
    drain_timeout: float | None
    reconnect_cap: float
    listen: bool
    prepare_statements: bool


class IngestOptions(TypedDict):
    """Keyword arguments for glisk.ingest.follower.FollowerOptions from INGEST_* settings."""

    confirmations: int
    reorg_window: int
    max_range: int
    start_block: int
    poll_interval: float
    gap_interval: float


class EngineOptions(TypedDict):
    """Keyword arguments for glisk.core.database.setup_db_session / create_db_engine."""

    pool_size: int
    max_overflow: int
    connect_timeout: float
    application_name: str
    pooler: PoolerMode


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


class Settings(BaseSettings):
    """Every variable the services read; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_file=None,  # load_settings() chooses it (default_env_file)
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # Database
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset in development means the embedded server.",
    )
    db_pool_size: int = Field(default=200, ge=1, le=5000)
    db_max_overflow: int = Field(default=10, ge=0, le=5000)
    db_connect_timeout: float = Field(default=5.0, gt=0, le=300)
    db_pooler: PoolerMode = "none"
    # What libpq insists on when glisk connects to DATABASE_URL (its require_auth): by default
    # SCRAM, so the password never goes in clear to whatever answers at that address.
    db_require_auth: str = "scram-sha-256"

    # Application
    app_env: Literal["development", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # The level of the API's line per request (probes: DEBUG; 5xx and slow ones: WARNING).
    request_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    request_slow_seconds: float = Field(default=1.0, gt=0, le=3600)
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000"]
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    # /docs, /redoc and /openapi.json; None means "not set": on in development, off in
    # production (see api_docs_enabled).
    api_docs: bool | None = None

    # Embedded PostgreSQL (only used when DATABASE_URL is unset)
    glisk_pg_port: int = Field(default=54320, ge=1024, le=65535)
    glisk_pg_data: Path | None = None
    glisk_pg_bindir: Path | None = None
    # Also listen on 127.0.0.1:GLISK_PG_PORT (off: the private Unix socket only).
    glisk_pg_tcp: bool = False

    # Worker coordination (leased claims)
    worker_lease_seconds: float = Field(default=60.0, gt=0, le=86400)
    worker_max_attempts: int = Field(default=3, ge=1, le=100)
    worker_poll_interval: float = Field(default=1.0, gt=0, le=3600)
    worker_concurrency: int | None = Field(default=None, ge=1, le=10000)
    worker_batch: int | None = Field(default=None, ge=1, le=100)
    worker_backoff_base: float = Field(default=5.0, ge=0, le=86400)
    worker_backoff_cap: float = Field(default=600.0, ge=0, le=86400 * 7)
    worker_max_deferrals: int = Field(default=20, ge=0, le=10000)
    worker_db_timeout: float = Field(default=10.0, gt=0, le=3600)
    worker_drain_timeout: float | None = Field(default=25.0, gt=0, le=86400)
    # The longest pause between two reconnection tries while the database is unreachable.
    worker_reconnect_cap: float = Field(default=5.0, gt=0, le=3600)
    # None means "not set": on unless DB_POOLER=transaction (see worker_listen_enabled).
    worker_listen: bool | None = None
    # None means "sized from the worker's concurrency" (see worker_pool_size).
    worker_db_pool_size: int | None = Field(default=None, ge=1, le=1000)
    # A worker's Prometheus endpoint (glisk worker --metrics-port); unset: none.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # The image stage's handler (glisk.handlers.image): Replicate's HTTP API. Secrets are
    # SecretStr: their repr, logs and error messages show '**********'.
    replicate_api_token: SecretStr | None = None
    replicate_base_url: str = "https://api.replicate.com"
    replicate_model: str = "black-forest-labs/flux-schnell"
    # None: the model's latest version (POST /v1/models/{owner}/{name}/predictions).
    replicate_version: str | None = None
    # Extra model inputs (a JSON object) sent with every prediction, e.g. {"output_format":"png"}.
    replicate_input: dict[str, Any] = Field(default_factory=dict[str, Any])
    # The model input that takes a seed; each token gets its own, derived from its id, so a
    # prediction whose reply was lost can be recognised among the account's predictions.
    # Empty: the model takes no seed (a create whose reply was lost may then be paid twice).
    replicate_seed_input: str = "seed"
    replicate_poll_interval: float = Field(default=1.0, gt=0, le=60)
    replicate_prediction_timeout: float = Field(default=300.0, gt=0, le=86400)
    replicate_http_timeout: float = Field(default=30.0, gt=0, le=600)
    # Where generated images are stored, named after their sha256 (None: .glisk/images under
    # project_dir()). The upload stage's workers read them from there: share it between them.
    glisk_image_dir: Path | None = None

    # The upload stage's handler (glisk.handlers.upload): Pinata's pinning API.
    pinata_jwt: SecretStr | None = None
    pinata_api_url: str = "https://api.pinata.cloud"
    pinata_http_timeout: float = Field(default=60.0, gt=0, le=600)
    # The chain: the reveal keeper (glisk.handlers.reveal) reads them all, the mint follower
    # (glisk ingest) and POST /webhooks/alchemy the first three. The RPC URL often carries a
    # provider's API key in its path: it is a secret, never logged (see masked_rpc_url). The
    # key is never logged, never in argv, never in an error message.
    chain_rpc_url: SecretStr | None = None
    chain_id: int | None = Field(default=None, ge=1)
    glisk_contract_address: str | None = None
    keeper_private_key: SecretStr | None = None
    keeper_private_key_file: Path | None = None
    # None: by chain id (DEFAULT_CONFIRMATIONS).
    reveal_confirmations: int | None = Field(default=None, ge=1, le=1000)
    reveal_max_gas_price_gwei: Decimal = Field(default=Decimal(50), gt=0, le=100_000)
    reveal_stuck_seconds: float = Field(default=90.0, gt=0, le=86400)
    reveal_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # The log follower: how far behind the head it reads, how deep it keeps block hashes to
    # survive a reorg, the largest block range of one eth_getLogs, where it starts, how often it
    # polls and how often it looks for gaps (0: never).
    ingest_confirmations: int = Field(default=2, ge=0, le=10_000)
    ingest_reorg_window: int = Field(default=200, ge=1, le=100_000)
    ingest_max_range: int = Field(default=2000, ge=1, le=1_000_000)
    ingest_start_block: int = Field(default=0, ge=0)
    ingest_poll_interval: float = Field(default=2.0, gt=0, le=3600)
    ingest_gap_interval: float = Field(default=300.0, ge=0, le=86400)
    ingest_rpc_timeout: float = Field(default=10.0, gt=0, le=300)
    ingest_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Alchemy's per-webhook signing key (HMAC-SHA256 of the body). Unset: the route refuses all.
    alchemy_webhook_signing_key: SecretStr | None = None

    # The compose file's postgres service reads these; the API only checks them in production.
    postgres_db: str = "glisk"
    postgres_user: str = "glisk"
    postgres_password: str | None = None

    @field_validator("log_level", "request_log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("db_pooler", mode="before")
    @classmethod
    def _lower_pooler(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "worker_listen",
        "worker_db_pool_size",
        "api_docs",
        "glisk_pg_data",
        "glisk_pg_bindir",
        "chain_rpc_url",
        "chain_id",
        "glisk_contract_address",
        "keeper_private_key",
        "keeper_private_key_file",
        "reveal_confirmations",
        "ingest_metrics_port",
        "alchemy_webhook_signing_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `WORKER_LISTEN=` in a .env file means "not set", not an invalid boolean.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "replicate_api_token", "replicate_version", "pinata_jwt", "glisk_image_dir", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("replicate_base_url", "pinata_api_url")
    @classmethod
    def _service_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        scheme, _, host = value.partition("://")
        if scheme not in ("http", "https") or not host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("replicate_model")
    @classmethod
    def _replicate_model(cls, value: str) -> str:
        owner, sep, name = value.strip().partition("/")
        if not sep or not owner or not name or "/" in name or ":" in name:
            raise ValueError("must be owner/name (the version goes in REPLICATE_VERSION)")
        return f"{owner}/{name}"

    @field_validator("replicate_version")
    @classmethod
    def _replicate_version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value.strip()):
            raise ValueError("must be a version id: 64 lowercase hexadecimal characters")
        return None if value is None else value.strip()

    @field_validator("replicate_seed_input")
    @classmethod
    def _seed_input(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be an input name (letters, digits, _) or empty")
        return value

    @field_validator("glisk_pg_data", "glisk_pg_bindir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # A relative path would depend on where the command runs (and create directories there).
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path (got '{value}')")
        return value

    @field_validator("db_require_auth", mode="before")
    @classmethod
    def _require_auth(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
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

    @field_validator("chain_rpc_url", mode="after")
    @classmethod
    def _rpc_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (the node's JSON-RPC endpoint)")
        return value

    @field_validator("glisk_contract_address")
    @classmethod
    def _contract_address(cls, value: str | None) -> str | None:
        if value is not None and not _ADDRESS.fullmatch(value):
            raise ValueError("must be 0x followed by 40 hex digits")
        return value

    @field_validator("keeper_private_key", mode="before")
    @classmethod
    def _private_key(cls, value: Any) -> Any:
        # The message never repeats the value: it is a secret even when malformed.
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is not None and not (isinstance(raw, str) and _PRIVATE_KEY.fullmatch(raw.strip())):
            raise ValueError("must be 64 hex digits (32 bytes), 0x optional")
        return raw.strip() if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _keeper_key_rules(self) -> Settings:
        if self.keeper_private_key is not None and self.keeper_private_key_file is not None:
            raise ValueError(
                "KEEPER_PRIVATE_KEY and KEEPER_PRIVATE_KEY_FILE are both set: set one of them"
            )
        if self.keeper_private_key_file is not None:
            _check_key_file(self.keeper_private_key_file)
        return self

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return normalize_database_url(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            origins = [o.strip() for o in value.split(",") if o.strip()]
            for origin in origins:
                if origin != "*" and not origin.startswith(("http://", "https://")):
                    raise ValueError(
                        f"each origin must start with http:// or https:// (got '{origin}'); "
                        "separate origins with commas"
                    )
            return origins
        return value

    @model_validator(mode="after")
    def _connection_requirements(self) -> Settings:
        if self.database_url is not None:
            self.database_url = with_connection_requirements(
                self.database_url, self.db_require_auth, pooler=self.db_pooler
            )
        return self

    @model_validator(mode="after")
    def _pooler_rules(self) -> Settings:
        # A transaction-mode pooler hands each transaction to any server connection: a LISTEN
        # registered on one is lost (or heard by someone else) after the transaction ends.
        if self.db_pooler == "transaction" and self.worker_listen:
            raise ValueError(
                "WORKER_LISTEN=true cannot work with DB_POOLER=transaction (a transaction-mode "
                "pooler does not keep a LISTEN session); unset WORKER_LISTEN so workers poll, "
                "or use DB_POOLER=session"
            )
        return self

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.app_env != "production":
            return self
        if self.database_url is None:
            raise ValueError(
                "DATABASE_URL is required when APP_ENV=production "
                "(the embedded database is for development only)"
            )
        if (
            self.postgres_password is not None
            and self.postgres_password.lower() in PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                "POSTGRES_PASSWORD is a placeholder; set a real secret when APP_ENV=production"
            )
        from sqlalchemy.engine import make_url  # only here: worker start-up does without it

        url_password = make_url(self.database_url).password
        if url_password is None or str(url_password).lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "DATABASE_URL has no password or a placeholder one; "
                "set a real secret when APP_ENV=production"
            )
        if "*" in self.cors_origins:
            raise ValueError("CORS_ORIGINS may not contain '*' when APP_ENV=production")
        for name in ("replicate_base_url", "pinata_api_url"):
            if not getattr(self, name).startswith("https://"):
                raise ValueError(
                    f"{name.upper()} must use https:// when APP_ENV=production "
                    "(the API token travels with every request)"
                )
        key = self.alchemy_webhook_signing_key
        if key is not None and key.get_secret_value().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "ALCHEMY_WEBHOOK_SIGNING_KEY is a placeholder; set the webhook's signing key "
                "when APP_ENV=production"
            )
        return self

    def require_secret(self, name: Literal["replicate_api_token", "pinata_jwt"]) -> str:
        """The secret setting ``name``, for a handler that needs it. Raises ConfigError naming the
        variable when it is unset, or a placeholder when APP_ENV=production. The value is never
        part of a message."""
        secret: SecretStr | None = getattr(self, name)
        value = secret.get_secret_value().strip() if secret is not None else ""
        if not value:
            raise ConfigError(f"{name.upper()}: is required by this stage's handler")
        if self.app_env == "production" and value.lower() in PLACEHOLDER_SECRETS:
            raise ConfigError(f"{name.upper()}: is a placeholder; set the real token")
        return value

    @property
    def image_dir(self) -> Path:
        """Where the image stage stores images: GLISK_IMAGE_DIR, else .glisk/images under
        project_dir()."""
        return self.glisk_image_dir or project_dir() / ".glisk" / "images"

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def api_docs_enabled(self) -> bool:
        """Whether the API serves /docs, /redoc and /openapi.json: API_DOCS when set, else only
        in development (the schema maps every route for whoever asks)."""
        if self.api_docs is not None:
            return self.api_docs
        return self.app_env == "development"

    def worker_options(self) -> WorkerOptions:
        """Keyword arguments for glisk.workers.run_worker from WORKER_* settings."""
        return {
            "lease_seconds": self.worker_lease_seconds,
            "max_attempts": self.worker_max_attempts,
            "poll_interval": self.worker_poll_interval,
            "concurrency": self.worker_concurrency,
            "batch": self.worker_batch,
            "backoff_base": self.worker_backoff_base,
            "backoff_cap": self.worker_backoff_cap,
            "max_deferrals": self.worker_max_deferrals,
            "db_timeout": self.worker_db_timeout,
            "drain_timeout": self.worker_drain_timeout,
            "reconnect_cap": self.worker_reconnect_cap,
            "listen": self.worker_listen_enabled,
            # PgBouncer up to 1.20 in transaction mode does not keep prepared statements.
            "prepare_statements": self.db_pooler != "transaction",
        }

    def ingest_options(self) -> IngestOptions:
        """Keyword arguments for glisk.ingest.follower.FollowerOptions from INGEST_* settings."""
        return {
            "confirmations": self.ingest_confirmations,
            "reorg_window": self.ingest_reorg_window,
            "max_range": self.ingest_max_range,
            "start_block": self.ingest_start_block,
            "poll_interval": self.ingest_poll_interval,
            "gap_interval": self.ingest_gap_interval,
        }

    def masked_rpc_url(self) -> str | None:
        """CHAIN_RPC_URL as it may be logged: scheme, host and port only (providers put the
        API key in the path or the query)."""
        if self.chain_rpc_url is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(self.chain_rpc_url.get_secret_value())
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}/***"

    @property
    def worker_listen_enabled(self) -> bool:
        """Whether workers wake up on LISTEN/NOTIFY (polling stays on either way): WORKER_LISTEN
        when set, else on except behind a transaction-mode pooler. The combination
        WORKER_LISTEN=true with DB_POOLER=transaction is refused when the settings load."""
        if self.worker_listen is not None:
            return self.worker_listen
        return self.db_pooler != "transaction"

    @property
    def confirmations(self) -> int:
        """REVEAL_CONFIRMATIONS, or the chain's customary depth (DEFAULT_CONFIRMATIONS)."""
        if self.reveal_confirmations is not None:
            return self.reveal_confirmations
        return DEFAULT_CONFIRMATIONS.get(self.chain_id or 0, 12)

    def keeper_key(self) -> SecretStr:
        """The keeper's private key, from KEEPER_PRIVATE_KEY or the file KEEPER_PRIVATE_KEY_FILE
        names (checked again: it must still be private). ConfigError naming the variable."""
        if self.keeper_private_key is not None:
            return self.keeper_private_key
        if self.keeper_private_key_file is None:
            raise ConfigError(
                "KEEPER_PRIVATE_KEY: required by the reveal keeper (or KEEPER_PRIVATE_KEY_FILE, "
                "a file readable by its owner only)"
            )
        try:
            _check_key_file(self.keeper_private_key_file)
            text = self.keeper_private_key_file.read_text().strip()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"KEEPER_PRIVATE_KEY_FILE: cannot be read ({exc.strerror})") from None
        if not _PRIVATE_KEY.fullmatch(text):
            raise ConfigError(
                "KEEPER_PRIVATE_KEY_FILE: must hold 64 hex digits (32 bytes), 0x optional"
            )
        return SecretStr(text)

    def worker_pool_size(self, concurrency: int) -> int:
        """Connections in one worker process's pool: WORKER_DB_POOL_SIZE when set, else
        ``concurrency + 2`` (handlers completing, claims, heartbeats), at most WORKER_POOL_CAP."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        if self.worker_db_pool_size is not None:
            return self.worker_db_pool_size
        return min(concurrency + 2, WORKER_POOL_CAP)

    def engine_options(self, role: Role, *, concurrency: int = 1) -> EngineOptions:
        """Keyword arguments for setup_db_session / create_db_engine for one kind of process.

        - ``api``: DB_POOL_SIZE + DB_MAX_OVERFLOW (200 + 10 by default).
        - ``worker``: worker_pool_size(concurrency), no overflow, so the budget is exact.
        - ``cli``: one connection (migrations and checks open their own).
        - ``ingest``: two (the follower's step and its gap pass never overlap; one spare).
        Every role gets DB_CONNECT_TIMEOUT, DB_POOLER and its own application_name.
        """
        if role == "api":
            pool_size, max_overflow = self.db_pool_size, self.db_max_overflow
        elif role == "worker":
            pool_size, max_overflow = self.worker_pool_size(concurrency), 0
        elif role == "ingest":
            pool_size, max_overflow = 2, 0
        else:
            pool_size, max_overflow = 1, 1
        return {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "connect_timeout": self.db_connect_timeout,
            "application_name": APPLICATION_NAMES[role],
            "pooler": self.db_pooler,
        }

    def embedded_max_connections(self, *, api_processes: int = 1) -> int:
        """Pool plus overflow of each API process, with headroom for migrations, psql and worker
        processes."""
        return api_processes * (self.db_pool_size + self.db_max_overflow) + 50


def _check_key_file(path: Path) -> None:
    """A key file must be a regular file of ours that no one else may read or write."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"KEEPER_PRIVATE_KEY_FILE: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("KEEPER_PRIVATE_KEY_FILE: must be a regular file")
    if info.st_uid != os.geteuid():
        raise ValueError("KEEPER_PRIVATE_KEY_FILE: must belong to the user running glisk")
    if info.st_mode & 0o077:
        raise ValueError(
            "KEEPER_PRIVATE_KEY_FILE: must be readable by its owner only "
            f"(chmod 600; it is {stat.S_IMODE(info.st_mode):04o})"
        )


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if loc:
            lines.append(f"{'_'.join(loc).upper()}: {message}")
        else:
            lines.append(message)
    if len(lines) == 1:  # the usual case: one line an operator can read in a log
        return f"Invalid configuration: {lines[0]}"
    return "Invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(env_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the environment (and ``env_file``, default ``default_env_file()``; the
    ``GLISK_ENV_FILE`` variable overrides it). Raises ConfigError naming each bad variable."""
    chosen = env_file or os.environ.get("GLISK_ENV_FILE") or default_env_file()
    try:
        return Settings(_env_file=chosen, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
