"""Credentials of an embedded server: every connection needs the superuser's password, sent
only through SCRAM.

The password is random, kept in ``<data dir>.password`` beside the data directory (mode 0600,
owned by whoever runs glisk: ``password_file``, ``read_password``), and set in the cluster by
``glisk.embedded.cluster`` through single-user mode, so it never travels on a command line or an
open port. ``HBA_CONF`` asks for it on every connection; clients insist on SCRAM
(``REQUIRE_AUTH``), so a stand-in listening on the port never receives the password.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from glisk.errors import EmbeddedPostgresError

SUPERUSER = "postgres"
# The authentication the embedded server asks for, and the only one glisk's clients accept.
REQUIRE_AUTH = "scram-sha-256"

# The whole pg_hba.conf of an embedded server: a password (SCRAM) for every connection, on the
# Unix socket and, when TCP is on, on loopback. Its text, the old module's name included, stays as
# it was: a data directory whose pg_hba.conf differs by a byte has its password set again.
HBA_CONF = """\
# Managed by glisk (glisk/embedded_pg.py) and rewritten on start if it differs: every connection
# needs the password kept beside the data directory; nothing is trusted.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def password_file(data_dir: Path) -> Path:
    """Where the superuser password of the server in ``data_dir`` is kept (mode 0600)."""
    return data_dir.parent / f"{data_dir.name}.password"


def read_password(path: Path) -> str | None:
    """The password stored at ``path``; None if there is none (no file, or an empty one).

    Raises EmbeddedPostgresError if the file is not a regular file owned by this process's user
    that only that user can read: someone else could have read or planted it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"Cannot read the embedded PostgreSQL password: {exc}"
        ) from None
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise EmbeddedPostgresError(
                f"Refusing the password file {path}: it must be a regular file owned by you "
                f"(uid {os.geteuid()}) that only you can read (mode 0600). Remove it; the next "
                "start sets a new password."
            )
        return f.readline().strip() or None


def write_password(path: Path, password: str) -> None:
    """Write ``password`` to ``path`` atomically, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
