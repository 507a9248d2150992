"""Who runs the embedded server, and how its processes are started.

As root, initdb and postgres refuse to run, so they run as an existing unprivileged account
(``postgres`` if present, else ``nobody``): ``service_user()``. Every PostgreSQL process glisk
starts runs as that account (``as_user``) in a clean environment (``server_env``), from the
temporary directory; ``run_as`` runs one to completion so.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from pathlib import Path
from typing import TypedDict

from glisk.errors import EmbeddedPostgresError


def service_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise EmbeddedPostgresError(
        "Running as root, but neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL "
        "(initdb and postgres refuse to run as root). Run as an ordinary user or set DATABASE_URL."
    )


def server_account() -> str | None:
    """The account name the embedded server runs as (the service user as root, else ours);
    None when ours has no name (a container's arbitrary uid), where libpq could not check it."""
    user = service_user()
    if user is not None:
        return user.pw_name
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` can traverse every ancestor of ``path`` (search permission on each)."""
    path = path.resolve()
    for ancestor in [path, *path.parents]:
        try:
            st = ancestor.stat()
        except OSError:
            return False
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == user.pw_gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


def server_env() -> dict[str, str]:
    """The environment of every PostgreSQL process we start: no PG* variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["TZ"] = "UTC"
    env["LC_ALL"] = "C"
    return env


class RunAs(TypedDict, total=False):
    """The arguments of ``subprocess.Popen`` that choose the child's account."""

    user: int
    group: int
    extra_groups: list[int]


def as_user(user: pwd.struct_passwd | None) -> RunAs:
    """subprocess arguments that run the child as ``user`` (nothing when we are not root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def run_as(
    user: pwd.struct_passwd | None, args: list[str], *, timeout: float, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary to completion as ``user`` (None: as ourselves), with
    ``server_env()``, from the temporary directory (one the service account can enter), ``stdin``
    as its input, its output captured as text. Raises what ``subprocess.run`` raises (OSError,
    TimeoutExpired); a non-zero exit is the caller's to judge."""
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env=server_env(),
        timeout=timeout,
        **as_user(user),
    )
