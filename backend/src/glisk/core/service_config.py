"""The settings of the services glisk talks to: Replicate and Pinata (the image and upload
stages' handlers), and the chain (the reveal keeper, ``glisk ingest``, the Alchemy webhook).

Two groups of fields with their rules, which ``glisk.core.config.Settings`` puts together with
the rest; they are never built on their own. A validator's name must be unique across the groups:
pydantic lets one of the same name in another group replace it. Secrets are SecretStr: their
repr, logs and error messages show '**********'.
"""

from __future__ import annotations

import os
import re
import stat
from decimal import Decimal
from pathlib import Path
from typing import Any, TypedDict

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from glisk.errors import ConfigError

# Confirmations a reveal waits for when REVEAL_CONFIRMATIONS is unset, by chain id: Base and its
# testnet finalise on L1 and reorganise rarely and shallowly; Ethereum and its testnets get the
# customary 12; anvil (31337) none beyond its block. Any other chain: 12.
DEFAULT_CONFIRMATIONS = {1: 12, 11155111: 12, 17000: 12, 8453: 1, 84532: 1, 31337: 1}
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def blank_is_none(value: Any) -> Any:
    """A validator's rule: an empty or blank string is "not set" (``WORKER_LISTEN=`` in a .env
    file means unset, not an invalid boolean)."""
    return None if isinstance(value, str) and not value.strip() else value


class IngestOptions(TypedDict):
    """Keyword arguments for glisk.ingest.follower.FollowerOptions from INGEST_* settings."""

    confirmations: int
    reorg_window: int
    max_range: int
    start_block: int
    poll_interval: float
    gap_interval: float


class ServiceSettings(BaseSettings):
    """Replicate (the image stage) and Pinata (the upload stage)."""

    # The image stage's handler (glisk.handlers.image): Replicate's HTTP API.
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

    @field_validator(
        "replicate_api_token", "replicate_version", "pinata_jwt", "glisk_image_dir", mode="before"
    )
    @classmethod
    def _blank_service_setting_is_unset(cls, value: Any) -> Any:
        return blank_is_none(value)

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


class ChainSettings(BaseSettings):
    """The chain: the reveal keeper (glisk.handlers.reveal) reads them all, the mint follower
    (glisk ingest) and POST /webhooks/alchemy the first three."""

    # The RPC URL often carries a provider's API key in its path: it is a secret, never logged
    # (see masked_rpc_url). The key is never logged, never in argv, never in an error message.
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

    @field_validator(
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
    def _blank_chain_setting_is_unset(cls, value: Any) -> Any:
        return blank_is_none(value)

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
    def _keeper_key_rules(self) -> ChainSettings:
        if self.keeper_private_key is not None and self.keeper_private_key_file is not None:
            raise ValueError(
                "KEEPER_PRIVATE_KEY and KEEPER_PRIVATE_KEY_FILE are both set: set one of them"
            )
        if self.keeper_private_key_file is not None:
            _check_key_file(self.keeper_private_key_file)
        return self

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
