"""Servers already running, and ports: what a start must not collide with.

``running_postmaster`` finds the live server of a data directory (from its postmaster.pid, read
without following links); ``port_taken_message`` says who holds a TCP port (another glisk
embedded server, recognised by its ``cluster_name``, or some other program).
"""

from __future__ import annotations

import socket
from pathlib import Path

from glisk.embedded.safety import opened_data_dir, read_data_file
from glisk.errors import EmbeddedPostgresError

# Shown in `ps` ("postgres: glisk: checkpointer") and how glisk recognises its own servers.
CLUSTER_NAME = "glisk"


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


def port_taken_message(port: int) -> str:
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


def running_postmaster(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server of ``data_dir``, from its postmaster.pid."""
    with opened_data_dir(data_dir) as dir_fd:
        content = read_data_file(dir_fd, data_dir, "postmaster.pid", limit=4096)
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


def already_running(data_dir: Path, pid: int) -> EmbeddedPostgresError:
    """The refusal to start a second server on ``data_dir``, whose server ``pid`` runs."""
    parent = _parent_of(pid)
    by = f", started by process {parent}" if parent and parent != 1 else ""
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL in {data_dir} is already running (pid {pid}{by}), "
        "e.g. under another glisk serve of this checkout: stop that one first, or give this "
        "one its own data directory with GLISK_PG_DATA."
    )


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
