"""Database outages for the worker tests: a private PostgreSQL a test may stop and start again
(same port, same data, so workers reconnect), an audit of every claim and completion written by
the database itself, and ``glisk worker`` processes whose log the test reads.

Never the suite's shared server: stopping it would fail every other test running at the time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glisk import migrations
from glisk.core import processes
from glisk.core.config import BACKEND_DIR
from glisk.embedded import EmbeddedPostgres, free_port, service_user
from glisk.errors import EmbeddedPostgresError
from glisk.testing import connect
from tests.support.outage_handlers import SECONDS_ENV
from tests.support.processes import GLISK, glisk_env

# Written by the database in the transaction that claims or completes, so neither a lost answer
# nor a killed worker can hide a second claim or a second completion.
AUDIT = """
CREATE TABLE audit_claims (token_id int, claim uuid, holder text, attempt int, rescued bool);
CREATE TABLE audit_completions (token_id int, claim uuid, holder text);
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.claim_id IS NOT NULL AND NEW.claim_id IS DISTINCT FROM OLD.claim_id THEN
    INSERT INTO audit_claims
    VALUES (NEW.token_id, NEW.claim_id, NEW.claimed_by, NEW.attempts, OLD.claim_id IS NOT NULL);
  END IF;
  IF OLD.image_path IS NULL AND NEW.image_path IS NOT NULL THEN
    INSERT INTO audit_completions VALUES (NEW.token_id, OLD.claim_id, OLD.claimed_by);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER audit AFTER UPDATE ON tokens_s0 FOR EACH ROW EXECUTE FUNCTION audit();
"""


@contextmanager
def restartable_server() -> Iterator[EmbeddedPostgres]:
    """A private embedded PostgreSQL, migrated, with the audit tables; ``stop()`` and
    ``start()`` it at will (same port, same data). Removed when the block ends."""
    base = Path(tempfile.mkdtemp(prefix="glisk-outage-pg-"))
    if service_user() is not None:
        base.chmod(0o755)  # as root the server runs as an unprivileged user that must traverse it
    server: EmbeddedPostgres | None = None
    try:
        for _ in range(5):  # a free port can be taken by someone else before the server binds it
            candidate = EmbeddedPostgres(
                data_dir=base / "data", port=free_port(), max_connections=50, ephemeral=True
            )
            try:
                server = candidate.start()
                break
            except EmbeddedPostgresError:
                continue
        if server is None:
            raise RuntimeError("could not start a private embedded PostgreSQL")
        migrations.upgrade(server.url)
        with connect(server.url) as conn:
            conn.execute(AUDIT)  # type: ignore[arg-type]
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def seed_detected(url: str, count: int) -> None:
    """One author and ``count`` detected tokens, ids 1..count, minted in id order."""
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO authors (id, wallet_address, prompt_text, created_at) VALUES "
            "(gen_random_uuid(), '0x' || repeat('ab', 20), 'a prompt long enough', now())"
        )
        conn.execute(
            "INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp, "
            "created_at) SELECT gen_random_uuid(), g, (SELECT id FROM authors), "
            "'0x' || repeat('cd', 20), timestamp '2025-01-01' + g * interval '1 s', now() "
            "FROM generate_series(1, %(count)s) AS g",
            {"count": count},
        )


def rows(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        return list(conn.execute(query, params).fetchall())  # type: ignore[arg-type]


@dataclass
class WorkerProcess:
    """``glisk worker image`` with the outage handlers; its stderr in ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines_since(self, offset: int) -> list[str]:
        return self.text()[offset:].splitlines()

    def size(self) -> int:
        return len(self.text())

    def stop(self, seconds: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL after ``seconds``)."""
        processes.stop(self.process, seconds)
        return self.process.returncode


@contextmanager
def worker_process(
    url: str, log: Path, *, handler_seconds: float, **settings: str
) -> Iterator[WorkerProcess]:
    """A ``glisk worker image`` process on ``url`` (WORKER_* from ``settings``), killed at the end
    if the test did not stop it."""
    env = glisk_env(
        "WORKER_*",
        "DB_POOLER",
        DATABASE_URL=url,
        LOG_LEVEL="INFO",
        **{SECONDS_ENV: str(handler_seconds)},
        **settings,
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*GLISK, "worker", "image", "--handler", "tests.support.outage_handlers:image"],
            env=env,
            cwd=BACKEND_DIR,  # tests.support is importable from here
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    worker = WorkerProcess(process, log)
    try:
        yield worker
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
