"""Settings: read from the repository-root .env wherever the command runs, and every bad value is
refused with a message naming the variable and the rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glisk.core.config import DEFAULT_ENV_FILE, REPO_ROOT, ConfigError, load_settings
from glisk.core.database import masked_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in {
            "DATABASE_URL",
            "APP_ENV",
            "DB_POOL_SIZE",
            "CORS_ORIGINS",
            "LOG_LEVEL",
            "PORT",
            "POSTGRES_PASSWORD",
            "GLISK_ENV_FILE",
            "DB_POOLER",
            "WORKER_LISTEN",
            "WORKER_DB_POOL_SIZE",
            "DB_REQUIRE_AUTH",
            "API_DOCS",
            "GLISK_PG_DATA",
            "GLISK_PG_BINDIR",
            "GLISK_PG_TCP",
            "CHAIN_RPC_URL",
            "CHAIN_ID",
            "GLISK_CONTRACT_ADDRESS",
            "KEEPER_PRIVATE_KEY",
            "KEEPER_PRIVATE_KEY_FILE",
            "REVEAL_CONFIRMATIONS",
            "REVEAL_MAX_GAS_PRICE_GWEI",
            "ALCHEMY_WEBHOOK_SIGNING_KEY",
        } or name.upper().startswith("INGEST_"):
            monkeypatch.delenv(name)


def test_the_env_file_is_the_one_at_the_repository_root() -> None:
    assert DEFAULT_ENV_FILE == REPO_ROOT / ".env"
    assert (REPO_ROOT / "backend" / "pyproject.toml").exists()


def test_settings_are_read_from_the_env_file_whatever_the_working_directory(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DB_POOL_SIZE=42\nCORS_ORIGINS=https://a.example, https://b.example\n")
    script = "from glisk.core.config import load_settings; s = load_settings(); print(s.db_pool_size, s.cors_origins)"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GLISK_ENV_FILE": str(env_file)},
    )
    assert out.stdout.strip() == "42 ['https://a.example', 'https://b.example']", out.stderr


def test_environment_variables_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DB_POOL_SIZE=42\n")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    assert load_settings(env_file).db_pool_size == 7


def test_defaults_are_the_ones_the_readme_documents() -> None:
    s = load_settings(os.devnull)
    assert (s.db_pool_size, s.app_env, s.log_level, s.host, s.port) == (
        200,
        "development",
        "INFO",
        "0.0.0.0",
        8000,
    )
    assert s.cors_origins == ["http://localhost:3000"]
    assert s.database_url is None and s.embedded


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE: Input should be greater than or equal to 1"),
        ("DB_POOL_SIZE", "many", "DB_POOL_SIZE: Input should be a valid integer"),
        ("APP_ENV", "staging", "APP_ENV: Input should be 'development' or 'production'"),
        ("LOG_LEVEL", "chatty", "LOG_LEVEL: Input should be 'DEBUG'"),
        (
            "CORS_ORIGINS",
            "localhost:3000",
            "CORS_ORIGINS: each origin must start with http:// or https://",
        ),
        (
            "DATABASE_URL",
            "sqlite:///glisk.db",
            "DATABASE_URL: must use the postgresql+psycopg:// scheme",
        ),
        ("DATABASE_URL", "not a url", "DATABASE_URL: must be a URL like postgresql+psycopg://"),
        ("PORT", "-1", "PORT: Input should be greater than or equal to 1"),
        ("CHAIN_RPC_URL", "ws://node:8546", "CHAIN_RPC_URL: must be an http:// or https:// URL"),
        ("CHAIN_ID", "base", "CHAIN_ID: Input should be a valid integer"),
        ("GLISK_CONTRACT_ADDRESS", "0x12", "GLISK_CONTRACT_ADDRESS: must be 0x followed by 40"),
        ("INGEST_CONFIRMATIONS", "-1", "INGEST_CONFIRMATIONS: Input should be greater than"),
        ("INGEST_REORG_WINDOW", "0", "INGEST_REORG_WINDOW: Input should be greater than"),
        ("INGEST_MAX_RANGE", "lots", "INGEST_MAX_RANGE: Input should be a valid integer"),
    ],
)
def test_bad_values_name_the_variable_and_the_rule(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    assert message in str(info.value)


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_provider_url_forms_are_normalised_to_psycopg(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"{scheme}://u:p@db:5432/glisk")
    assert load_settings(os.devnull).database_url == (
        "postgresql+psycopg://u:p@db:5432/glisk?require_auth=scram-sha-256"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "DATABASE_URL is required when APP_ENV=production"),
        (
            {"DATABASE_URL": "postgresql://glisk:changeme@db/glisk"},
            "DATABASE_URL has no password or a placeholder",
        ),
        (
            {"DATABASE_URL": "postgresql://glisk@db/glisk"},
            "DATABASE_URL has no password or a placeholder",
        ),
        (
            {
                "DATABASE_URL": "postgresql://glisk:s3cr3t-Zq@db/glisk",
                "POSTGRES_PASSWORD": "changeme",
            },
            "POSTGRES_PASSWORD is a placeholder",
        ),
        (
            {"DATABASE_URL": "postgresql://glisk:s3cr3t-Zq@db/glisk", "CORS_ORIGINS": "*"},
            "CORS_ORIGINS may not contain '*'",
        ),
    ],
)
def test_production_refuses_insecure_defaults(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_settings(os.devnull)


def test_production_with_real_secrets_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", "postgresql://glisk:s3cr3t-Zq@db/glisk")
    monkeypatch.setenv("POSTGRES_PASSWORD", "s3cr3t-Zq")
    assert load_settings(os.devnull).app_env == "production"


def test_transaction_pooler_with_listen_explicitly_on_is_refused_in_one_line_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_POOLER", "transaction")
    monkeypatch.setenv("WORKER_LISTEN", "true")
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    message = str(info.value)
    assert "\n" not in message
    assert "WORKER_LISTEN=true" in message and "DB_POOLER=transaction" in message


@pytest.mark.parametrize(
    ("pooler", "listen", "enabled"),
    [
        (None, None, True),  # the defaults: no pooler, LISTEN on
        ("transaction", None, False),  # unset follows the pooler
        ("transaction", "false", False),
        ("session", None, True),  # a session pooler keeps LISTEN sessions
        ("session", "true", True),
        ("none", "false", False),
        ("TRANSACTION", "", False),  # case-insensitive; an empty value means unset
    ],
)
def test_worker_listen_follows_the_pooler_unless_set(
    monkeypatch: pytest.MonkeyPatch, pooler: str | None, listen: str | None, enabled: bool
) -> None:
    if pooler is not None:
        monkeypatch.setenv("DB_POOLER", pooler)
    if listen is not None:
        monkeypatch.setenv("WORKER_LISTEN", listen)
    assert load_settings(os.devnull).worker_listen_enabled is enabled


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DB_POOLER", "pgbouncer", "DB_POOLER: Input should be 'none', 'session' or 'transaction'"),
        ("WORKER_LISTEN", "sometimes", "WORKER_LISTEN: Input should be a valid boolean"),
        (
            "WORKER_DB_POOL_SIZE",
            "0",
            "WORKER_DB_POOL_SIZE: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_pooler_settings_name_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    assert str(info.value).startswith(f"Invalid configuration: {message}")
    assert "\n" not in str(info.value)


def test_engine_options_size_and_name_each_role(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOLER", "transaction")
    monkeypatch.setenv("DB_POOL_SIZE", "40")
    settings = load_settings(os.devnull)
    api = settings.engine_options("api")
    assert (api["pool_size"], api["max_overflow"], api["application_name"]) == (40, 10, "glisk-api")
    worker = settings.engine_options("worker", concurrency=4)
    assert (worker["pool_size"], worker["max_overflow"]) == (6, 0)
    assert worker["application_name"] == "glisk-worker"
    assert settings.engine_options("worker", concurrency=50)["pool_size"] == 10  # capped
    assert {o["pooler"] for o in (api, worker, settings.engine_options("cli"))} == {"transaction"}

    monkeypatch.setenv("WORKER_DB_POOL_SIZE", "3")
    assert load_settings(os.devnull).engine_options("worker", concurrency=50)["pool_size"] == 3
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        settings.worker_pool_size(0)


def test_the_embedded_server_is_sized_for_every_api_process() -> None:
    settings = load_settings(os.devnull)
    assert settings.embedded_max_connections() == 260
    assert settings.embedded_max_connections(api_processes=3) == 3 * 210 + 50


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://u:p@db:5432/glisk",
            "postgresql+psycopg://u:p@db:5432/glisk?require_auth=scram-sha-256",
        ),
        (  # over TLS to PostgreSQL itself, SCRAM is bound to the TLS session too
            "postgresql://u:p@db/glisk?sslmode=verify-full",
            "postgresql+psycopg://u:p@db/glisk?sslmode=verify-full"
            "&require_auth=scram-sha-256&channel_binding=require",
        ),
        (  # the URL's own choice wins
            "postgresql://u:p@db/glisk?require_auth=md5&sslmode=require",
            "postgresql+psycopg://u:p@db/glisk?require_auth=md5&sslmode=require",
        ),
    ],
)
def test_every_database_url_requires_scram_unless_it_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert load_settings(os.devnull).database_url == expected


def test_db_require_auth_relaxes_the_requirement_and_refuses_what_libpq_would_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/glisk")
    monkeypatch.setenv("DB_REQUIRE_AUTH", "none")  # a trust-auth server
    assert load_settings(os.devnull).database_url == (
        "postgresql+psycopg://u@db/glisk?require_auth=none"
    )
    monkeypatch.setenv("DB_REQUIRE_AUTH", "any")
    assert load_settings(os.devnull).database_url == "postgresql+psycopg://u@db/glisk"
    for bad in ("scram", "md5,!password", "cleartext"):
        monkeypatch.setenv("DB_REQUIRE_AUTH", bad)
        with pytest.raises(ConfigError, match="DB_REQUIRE_AUTH: must be 'any' or libpq"):
            load_settings(os.devnull)


KEY = "0x" + "4c" * 32  # a throwaway key, for the settings only


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GLISK_PG_DATA", "relative/dir", "GLISK_PG_DATA: must be an absolute path"),
        ("GLISK_PG_BINDIR", "bin", "GLISK_PG_BINDIR: must be an absolute path"),
        ("API_DOCS", "sometimes", "API_DOCS: Input should be a valid boolean"),
        ("GLISK_PG_TCP", "maybe", "GLISK_PG_TCP: Input should be a valid boolean"),
        (
            "DATABASE_URL",
            "postgresql://u:p@h:notaport/db",
            "DATABASE_URL: the port must be a number from 1 to 65535 (got 'notaport')",
        ),
        ("CHAIN_RPC_URL", "ws://node:8546", "CHAIN_RPC_URL: must be an http:// or https:// URL"),
        ("CHAIN_ID", "0", "CHAIN_ID: Input should be greater than or equal to 1"),
        ("GLISK_CONTRACT_ADDRESS", "0x1234", "GLISK_CONTRACT_ADDRESS: must be 0x followed by 40"),
        ("REVEAL_CONFIRMATIONS", "0", "REVEAL_CONFIRMATIONS: Input should be greater than"),
        ("REVEAL_MAX_GAS_PRICE_GWEI", "-1", "REVEAL_MAX_GAS_PRICE_GWEI: Input should be greater"),
        ("REVEAL_STUCK_SECONDS", "0", "REVEAL_STUCK_SECONDS: Input should be greater than 0"),
    ],
)
def test_values_that_used_to_pass_silently_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_api_docs_are_on_in_development_and_off_in_production_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(os.devnull).api_docs_enabled
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", "postgresql://glisk:s3cr3t-Zq@db/glisk")
    assert not load_settings(os.devnull).api_docs_enabled
    monkeypatch.setenv("API_DOCS", "true")
    assert load_settings(os.devnull).api_docs_enabled


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:hunter2@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        (
            "postgresql+psycopg://u@h/db?password=hunter2",
            "postgresql+psycopg://u@h/db?password=***",
        ),
        (
            "postgresql+psycopg://u@h/db?sslmode=require&sslpassword=hunter2&PASSWORD=hunter2",
            "postgresql+psycopg://u@h/db?sslmode=require&sslpassword=***&PASSWORD=***",
        ),
        ("not a url with hunter2 in it", "***"),
        ("postgresql+psycopg://u:hunter2@h:notaport/db", "postgresql+psycopg://***"),
    ],
)
def test_masked_url_hides_every_credential_form(url: str, shown: str) -> None:
    assert masked_url(url) == shown


def test_a_malformed_keeper_key_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    almost = KEY[:-1] + "z"
    monkeypatch.setenv("KEEPER_PRIVATE_KEY", almost)
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    assert "KEEPER_PRIVATE_KEY: must be 64 hex digits" in str(info.value)
    assert almost[2:20] not in str(info.value)


def test_the_keeper_key_never_shows_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPER_PRIVATE_KEY", KEY)
    settings = load_settings(os.devnull)
    assert KEY[2:] not in repr(settings) and KEY[2:] not in str(settings.model_dump())
    assert settings.keeper_key().get_secret_value() == KEY


def test_a_key_file_others_may_read_is_refused_and_a_private_one_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "keeper.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    monkeypatch.setenv("KEEPER_PRIVATE_KEY_FILE", str(key_file))
    with pytest.raises(ConfigError) as info:
        load_settings(os.devnull)
    assert (
        "KEEPER_PRIVATE_KEY_FILE: must be readable by its owner only (chmod 600; it is 0644)"
        in (str(info.value))
    )
    key_file.chmod(0o600)
    assert load_settings(os.devnull).keeper_key().get_secret_value() == KEY
    monkeypatch.setenv("KEEPER_PRIVATE_KEY", KEY)
    with pytest.raises(ConfigError, match="both set"):
        load_settings(os.devnull)


def test_confirmations_default_by_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    for chain_id, expected in (("8453", 1), ("1", 12), ("31337", 1), ("10", 12)):
        monkeypatch.setenv("CHAIN_ID", chain_id)
        assert load_settings(os.devnull).confirmations == expected
    monkeypatch.setenv("REVEAL_CONFIRMATIONS", "3")
    assert load_settings(os.devnull).confirmations == 3


def test_chain_secrets_are_never_shown_and_the_webhook_key_is_unset_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = load_settings(os.devnull)
    assert defaults.alchemy_webhook_signing_key is None and defaults.chain_rpc_url is None
    assert (defaults.ingest_confirmations, defaults.ingest_reorg_window) == (2, 200)
    monkeypatch.setenv("CHAIN_RPC_URL", "https://base-mainnet.g.alchemy.com/v2/sk-live-123")
    monkeypatch.setenv("ALCHEMY_WEBHOOK_SIGNING_KEY", "whsec_live_456")
    settings = load_settings(os.devnull)
    shown = repr(settings) + str(settings.model_dump())
    assert "sk-live-123" not in shown and "whsec_live_456" not in shown
    assert settings.masked_rpc_url() == "https://base-mainnet.g.alchemy.com/***"
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", "postgresql://glisk:s3cr3t-Zq@db/glisk")
    monkeypatch.setenv("ALCHEMY_WEBHOOK_SIGNING_KEY", "changeme")
    with pytest.raises(ConfigError, match="ALCHEMY_WEBHOOK_SIGNING_KEY is a placeholder"):
        load_settings(os.devnull)
