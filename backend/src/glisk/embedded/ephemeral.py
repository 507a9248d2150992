"""Throwaway servers for tests, benchmarks and the demo: fsync off, in a fresh directory,
deleted by ``stop()``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from glisk.embedded.accounts import service_user
from glisk.embedded.postmasters import free_port
from glisk.embedded.server import EmbeddedPostgres
from glisk.errors import EmbeddedPostgresError

# A throwaway cluster is about 60 MB; RAM is used for it only with room for many.
SCRATCH_MIN_FREE_BYTES = 2 * 1024**3


def scratch_parent() -> Path:
    """Where throwaway clusters and test data go: /dev/shm when it is a writable RAM disk with
    room (initdb, fsync and deleting the files cost next to nothing there, and nothing competes
    for the disk), else the temporary directory."""
    shm = Path("/dev/shm")  # noqa: S108 - only fresh mkdtemp directories are made there
    try:
        vfs = os.statvfs(shm)
    except OSError:
        return Path(tempfile.gettempdir())
    if os.access(shm, os.W_OK | os.X_OK) and vfs.f_bavail * vfs.f_frsize >= SCRATCH_MIN_FREE_BYTES:
        return shm
    return Path(tempfile.gettempdir())


def ephemeral_server(
    max_connections: int = 300,
    bindir: Path | None = None,
    startup_timeout: float = 30.0,
    *,
    tcp: bool = False,
) -> EmbeddedPostgres:
    """A throwaway server for tests: a fresh directory under ``scratch_parent()`` the service user
    can reach, a free port (retried if another process grabs it first), fsync off, TCP only when
    ``tcp``. The caller must stop() it."""
    user = service_user()
    last_error: EmbeddedPostgresError | None = None
    for _ in range(5):
        base = Path(tempfile.mkdtemp(prefix="glisk-pg-", dir=scratch_parent()))
        if user is not None:
            base.chmod(0o755)  # our own fresh directory: let the service user traverse it
        server = EmbeddedPostgres(
            data_dir=base / "data",
            port=free_port(),
            max_connections=max_connections,
            ephemeral=True,
            bindir=bindir,
            owned_dir=base,
            startup_timeout=startup_timeout,
            tcp=tcp,
        )
        try:
            server.start()
        except EmbeddedPostgresError as exc:
            shutil.rmtree(base, ignore_errors=True)
            last_error = exc
            continue
        return server
    assert last_error is not None
    raise last_error
