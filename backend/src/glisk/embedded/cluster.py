"""The stopped cluster: ``initdb``, and the password it requires, set through single-user mode.

A new cluster is made with ``--auth=reject`` and lets nobody in until ``require_password`` has
set the password and written glisk's pg_hba.conf, so no moment exists at which it would accept a
connection without the password. ``require_password`` also converts a data directory that an
older glisk made with ``trust``, and one whose password file was lost.
"""

from __future__ import annotations

import pwd
import secrets
from pathlib import Path

from glisk.embedded.accounts import run_as
from glisk.embedded.credentials import (
    HBA_CONF,
    SUPERUSER,
    password_file,
    read_password,
    write_password,
)
from glisk.embedded.safety import opened_data_dir, read_data_file, write_data_file
from glisk.errors import EmbeddedPostgresError


def initdb(
    bindir: Path, data_dir: Path, user: pwd.struct_passwd | None, *, ephemeral: bool
) -> None:
    """Initialise the empty ``data_dir`` as ``user``, every login refused (``--auth=reject``);
    without fsync when ``ephemeral``. EmbeddedPostgresError with initdb's output if it fails."""
    result = run_as(
        user,
        [
            str(bindir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            SUPERUSER,
            "--auth=reject",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
            *(["--no-sync"] if ephemeral else []),
        ],
        timeout=120,
    )
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        raise EmbeddedPostgresError(f"initdb failed for {data_dir}: {output}")


def require_password(
    bindir: Path,
    data_dir: Path,
    user: pwd.struct_passwd | None,
    *,
    fresh: bool,
    ephemeral: bool,
) -> str:
    """Make the stopped cluster in ``data_dir`` accept nothing but the password in
    ``password_file(data_dir)``, and return that password.

    Nothing to do when the file exists and pg_hba.conf is ours. Otherwise (a new cluster, a
    lost password file, or a cluster an older glisk created with ``trust``): keep the existing
    password or write a new random one, set it in single-user mode, then write pg_hba.conf.
    In that order, so an interruption at any point is finished by the next start.
    """
    with opened_data_dir(data_dir) as dir_fd:
        hba = None if fresh else read_data_file(dir_fd, data_dir, "pg_hba.conf")
        password = None if fresh else read_password(password_file(data_dir))
        if password is not None and hba == HBA_CONF.encode():
            return password
        if password is None:
            password = secrets.token_urlsafe(32)
            write_password(password_file(data_dir), password)
        _set_password(bindir, data_dir, user, password, ephemeral=ephemeral)
        write_data_file(dir_fd, "pg_hba.conf", HBA_CONF.encode(), user)
        return password


def _set_password(
    bindir: Path,
    data_dir: Path,
    user: pwd.struct_passwd | None,
    password: str,
    *,
    ephemeral: bool,
) -> None:
    # Single-user mode: no port is open, and the password travels on stdin, never in argv.
    quoted = password.replace("'", "''")
    statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{quoted}'\n"
    result = run_as(
        user,
        [
            str(bindir / "postgres"),
            "--single",
            "-D",
            str(data_dir),
            "-c",
            "exit_on_error=on",
            "-c",
            "password_encryption=scram-sha-256",
            *(["-c", "fsync=off"] if ephemeral else []),
            "postgres",
        ],
        timeout=120,
        stdin=statement,
    )
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).replace(password, "***")
        raise EmbeddedPostgresError(
            f"Could not set the embedded PostgreSQL password in {data_dir} "
            f"(is another server running on it?): {output}"
        )
