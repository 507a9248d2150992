"""Where an embedded server keeps its data and its socket, and making those directories safe.

- ``default_data_dir``: where ``glisk serve`` keeps its database between runs.
- ``socket_dir_for``: the server listens on a Unix socket in a directory only its account (and
  root) can enter: the data directory itself, or, when that path is too long for a socket, a
  private directory in the temporary directory (``prepare_socket_dir`` makes it). No other local
  account can reach the server there, or listen there in its place.
- ``prepare_data_dir``: creates the data directory for the service account and, as root, refuses
  one that another account could swap for a link on the way.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import tempfile
from pathlib import Path

from glisk.embedded.accounts import reachable, service_user
from glisk.embedded.safety import (
    controlled_by_others,
    opened_data_dir,
    owned_by_us_and_not_shared,
    refuse_links,
)
from glisk.errors import EmbeddedPostgresError

# sun_path holds 108 bytes with its terminating NUL; postgres adds "/.s.PGSQL.<port>".
SOCKET_PATH_MAX = 107


def default_data_dir(project_dir: Path) -> Path:
    """Where ``glisk serve`` keeps its database between runs.

    ``<project>/.glisk/pgdata`` when the server's user can reach it (the normal case). As root in a
    directory that 'postgres' cannot traverse (e.g. under /root), ``/var/tmp/glisk-<hash>/pgdata``,
    stable for the same project path, so data still survives restarts.
    """
    preferred = project_dir / ".glisk" / "pgdata"
    user = service_user()
    if user is None or reachable(project_dir, user):
        return preferred
    digest = hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:12]
    # /var/tmp survives reboots, unlike /tmp; the directory is ours (created 0700 for the user).
    return Path("/var/tmp") / f"glisk-{digest}" / "pgdata"  # noqa: S108


def socket_dir_for(data_dir: Path) -> Path:
    """Where the server in ``data_dir`` puts its Unix socket: the data directory itself (only
    the server's account and root can enter it), or, when ``<data dir>/.s.PGSQL.65535`` would
    not fit in a socket address, ``glisk-sock-<hash>`` in the temporary directory (created
    private to that account by ``prepare_socket_dir``)."""
    if len(os.fsencode(data_dir)) + len("/.s.PGSQL.65535") <= SOCKET_PATH_MAX:
        return data_dir
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"glisk-sock-{digest}"


def prepare_data_dir(data_dir: Path, user: pwd.struct_passwd | None) -> None:
    """Make ``data_dir`` (and its parents) if needed, owned by ``user`` (the service account, as
    root) with mode 0700. Raises EmbeddedPostgresError naming what is in the way: a parent that
    is not a directory; as root, a directory on the way that another account controls, a data
    directory of a third account, or one the service account cannot reach; a data directory that
    is a link or not a directory, or whose files glisk reads are links."""
    parent = data_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not parent.is_dir():
            # /etc/passwd/x: say which part is in the way, not "File exists".
            blocking = next(
                (p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None
            )
            why = f"{blocking} is not a directory" if blocking else exc.strerror or str(exc)
            raise EmbeddedPostgresError(
                f"Cannot use {data_dir} for the embedded PostgreSQL data (GLISK_PG_DATA): {why}"
            ) from None
    if user is not None:
        # As root, a directory another user controls (the parent, or any above it) could
        # swap the data directory for a link: refuse it rather than chown or start anything.
        shared = parent if not owned_by_us_and_not_shared(parent) else None
        if (blocker := shared or controlled_by_others(parent)) is not None:
            raise EmbeddedPostgresError(
                f"Refusing to use {parent} for the embedded PostgreSQL data: {blocker} must "
                "be owned by root and not writable by group or others (so must every "
                "directory on the way, unless sticky like /tmp). Remove it or set "
                "GLISK_PG_DATA."
            )
    try:
        st: os.stat_result | None = os.lstat(data_dir)
    except FileNotFoundError:
        st = None
    if st is None:
        try:
            os.mkdir(data_dir, 0o700)
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"Cannot create the data directory {data_dir}: {exc.strerror or exc}"
            ) from None
        if user is not None:
            os.chown(data_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
    elif not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise EmbeddedPostgresError(
            f"The embedded PostgreSQL data directory {data_dir} is {what}: remove it or "
            "set GLISK_PG_DATA."
        )
    elif user is not None and st.st_uid != user.pw_uid:
        if st.st_uid != os.geteuid():
            raise EmbeddedPostgresError(
                f"Refusing the data directory {data_dir}: it belongs to uid {st.st_uid}, "
                f"neither root nor the '{user.pw_name}' account that runs PostgreSQL."
            )
        # Ours (an earlier start stopped between mkdir and chown); in a root-only parent.
        os.chown(data_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
    if user is not None and not reachable(data_dir.parent, user):
        raise EmbeddedPostgresError(
            f"The data directory {data_dir} is not reachable by the '{user.pw_name}' user "
            "that runs PostgreSQL when glisk runs as root. Choose one under a directory it can "
            "traverse with GLISK_PG_DATA (e.g. /var/tmp/glisk/pgdata)."
        )
    with opened_data_dir(data_dir) as dir_fd:
        refuse_links(dir_fd, data_dir)


def prepare_socket_dir(data_dir: Path, port: int, user: pwd.struct_passwd | None) -> None:
    """Make the socket directory of the server in ``data_dir`` when it is not the data directory:
    private to the server's account. One that exists is used only if it is that account's, mode
    0700, not a link; EmbeddedPostgresError otherwise, or if the socket's path is too long."""
    sockets = socket_dir_for(data_dir)
    if len(os.fsencode(sockets)) + len(f"/.s.PGSQL.{port}") > SOCKET_PATH_MAX:
        raise EmbeddedPostgresError(
            f"The socket directory {sockets} is too long for a Unix socket: set TMPDIR or "
            "GLISK_PG_DATA to a shorter path."
        )
    if sockets == data_dir:
        return
    owner = user.pw_uid if user is not None else os.geteuid()
    try:
        os.mkdir(sockets, 0o700)
        if user is not None:
            os.chown(sockets, user.pw_uid, user.pw_gid, follow_symlinks=False)
    except FileExistsError:
        pass
    st = os.lstat(sockets)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o077:
        raise EmbeddedPostgresError(
            f"Refusing the socket directory {sockets}: it must be a directory of uid {owner} "
            "with mode 0700 (someone else may have made it). Remove it."
        )
