"""Settings from the environment and the repository-root ``.env``.

Nothing here runs at import: ``load_settings()`` is called by the CLI and the app factory, and tests
build ``Settings(...)`` directly. A bad value raises ``ConfigError`` whose message names the
environment variable and the rule it broke.

``Settings`` puts together groups of fields with their rules: the database, the application, the
embedded server and the workers (``CoreSettings``, here), the services and the chain
(``glisk.core.service_config``); the DATABASE_URL rules are ``glisk.core.database_url``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from glisk.core.database_url import (
    DRIVER,
    PoolerMode,
    normalize_database_url,
    require_auth_methods,
    with_connection_requirements,
)
from glisk.core.service_config import (
    DEFAULT_CONFIRMATIONS,
    ChainSettings,
    IngestOptions,
    ServiceSettings,
    blank_is_none,
)
from glisk.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIRMATIONS",
    "DRIVER",
    "ConfigError",
    "IngestOptions",
    "PoolerMode",
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

# application_name of each kind of process, so pg_stat_activity (and `glisk db check`) can tell
# who holds the connections.
Role = Literal["api", "worker", "cli", "ingest"]
APPLICATION_NAMES: dict[Role, str] = {
    "api": "glisk-api",
    "worker": "glisk-worker",
    "cli": "glisk-cli",
    "ingest": "glisk-ingest",
}

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


class EngineOptions(TypedDict):
    """Keyword arguments for glisk.core.database.setup_db_session / create_db_engine."""

    pool_size: int
    max_overflow: int
    connect_timeout: float
    application_name: str
    pooler: PoolerMode


class CoreSettings(BaseSettings):
    """The database, the application, the embedded server and the workers."""

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
        mode="before",
    )
    @classmethod
    def _blank_core_setting_is_unset(cls, value: Any) -> Any:
        return blank_is_none(value)

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
        return require_auth_methods(value) if isinstance(value, str) else value

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
    def _connection_requirements(self) -> CoreSettings:
        if self.database_url is not None:
            self.database_url = with_connection_requirements(
                self.database_url, self.db_require_auth, pooler=self.db_pooler
            )
        return self

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

    @property
    def worker_listen_enabled(self) -> bool:
        """Whether workers wake up on LISTEN/NOTIFY (polling stays on either way): WORKER_LISTEN
        when set, else on except behind a transaction-mode pooler. The combination
        WORKER_LISTEN=true with DB_POOLER=transaction is refused when the settings load."""
        if self.worker_listen is not None:
            return self.worker_listen
        return self.db_pooler != "transaction"

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


# pydantic takes the fields of the last base first: the groups in the order of .env.example.
class Settings(ChainSettings, ServiceSettings, CoreSettings):
    """Every variable the services read; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_file=None,  # load_settings() chooses it (default_env_file)
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # The compose file's postgres service reads these; the API only checks them in production.
    postgres_db: str = "glisk"
    postgres_user: str = "glisk"
    postgres_password: str | None = None

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
