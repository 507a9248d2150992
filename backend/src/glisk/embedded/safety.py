"""Root never follows a path another account controls.

Two kinds of check, used wherever glisk runs as root:
- on the way to a directory: ``owned_by_us_and_not_shared`` and ``controlled_by_others`` say
  whether another account could swap something on it for a link;
- inside the data directory, the service account's ground: every path below it is one that
  account could have replaced with a link (to /etc/ld.so.preload, to /dev/zero). So nothing there
  is opened by path: the directory is opened once without following links (``opened_data_dir``),
  and each file relative to it with O_NOFOLLOW (``read_data_file``); a file glisk writes is
  created under a fresh name with O_EXCL, given to the service account through its descriptor,
  then renamed into place (``write_data_file``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from glisk.errors import EmbeddedPostgresError

# The files in a data directory that glisk itself opens (the rest is the server's business).
GLISK_READS = ("PG_VERSION", "pg_hba.conf", "postmaster.pid")


def owned_by_us_and_not_shared(path: Path) -> bool:
    """Owned by this process's user and writable by nobody else (no group/other write)."""
    st = path.lstat()
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def controlled_by_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (itself included) that an account other than
    ours could change: one it owns, or one it may write to that is not sticky (in a sticky
    directory like /tmp others may add entries, but not rename or remove ours). None when the
    whole way is ours. Links on the way are judged as the directories they lead to."""
    current = Path("/")
    for part in path.absolute().parts[1:]:
        current = current / part
        try:
            st = current.lstat()
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid != os.geteuid():
                    return current
                st = current.stat()
        except OSError:
            return current
        if st.st_uid != os.geteuid():
            return current
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return current
    return None


# -- inside the data directory ------------------------------------------------------------------


def refused_link(data_dir: Path, name: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"Refusing the data directory {data_dir}: {name} is a symbolic link. glisk never follows "
        "a link in a directory the server's account controls; remove it (and find out who made "
        "it)."
    )


@contextlib.contextmanager
def opened_data_dir(data_dir: Path) -> Iterator[int]:
    """A descriptor of ``data_dir`` itself, not of what a link there leads to, closed on exit.
    EmbeddedPostgresError if it cannot be opened so."""
    try:
        dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"Cannot open the data directory {data_dir}: {exc.strerror or exc}"
        ) from None
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def refuse_links(dir_fd: int, data_dir: Path) -> None:
    """EmbeddedPostgresError if one of the files glisk reads (``GLISK_READS``) is there but is
    not a regular file."""
    for name in GLISK_READS:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise refused_link(data_dir, name)
            raise EmbeddedPostgresError(
                f"Refusing the data directory {data_dir}: {name} is not a regular file."
            )


def read_data_file(dir_fd: int, data_dir: Path, name: str, limit: int = 1 << 20) -> bytes | None:
    """The content of ``name`` in the data directory (None if absent), read without following a
    link or blocking on a FIFO; EmbeddedPostgresError for a link, a non-file or a huge file."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refused_link(data_dir, name) from None
        raise EmbeddedPostgresError(f"Cannot read {data_dir / name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise EmbeddedPostgresError(
                f"Refusing the data directory {data_dir}: {name} is not a regular file."
            )
        content = f.read(limit + 1)
    if len(content) > limit:
        raise EmbeddedPostgresError(f"Refusing {data_dir / name}: larger than {limit} bytes.")
    return content


def write_data_file(
    dir_fd: int, name: str, content: bytes, owner: pwd.struct_passwd | None
) -> None:
    """Replace ``name`` in the data directory with ``content`` (mode 0600, owned by ``owner``
    when given), atomically and without following any link."""
    tmp = f".{name}.glisk-{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), owner.pw_uid, owner.pw_gid)  # the server must read it
            os.fchmod(f.fileno(), 0o600)
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def exists(dir_fd: int, name: str) -> bool:
    """Whether ``name`` is in the data directory (a link counts, unfollowed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
