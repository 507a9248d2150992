"""A port thief: a stand-in that listens where a PostgreSQL server should and asks every client
for its password in clear (AuthenticationCleartextPassword), as an attacker who grabbed the port
would. It prints one line per event on stdout: ``listening``, ``connection``, and
``password <what it received>`` when a client sends one.

Standard library only and no file access, so another account can run it from its source
(``python3 -c SOURCE PORT``): see ``fake_server_command``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CLEARTEXT_PASSWORD = 3


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _handle(conn: socket.socket) -> None:
    print("connection", flush=True)
    try:
        while True:  # the start-up packet, after any encryption request (refused)
            (length,) = struct.unpack("!I", _read_exact(conn, 4))
            body = _read_exact(conn, length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                conn.sendall(b"N")
                continue
            break
        conn.sendall(b"R" + struct.pack("!II", 8, CLEARTEXT_PASSWORD))
        kind = _read_exact(conn, 1)
        (length,) = struct.unpack("!I", _read_exact(conn, 4))
        payload = _read_exact(conn, length - 4)
        if kind == b"p":
            print("password", payload.rstrip(b"\0").decode(errors="replace"), flush=True)
    except OSError:
        pass
    finally:
        conn.close()


def serve(port: int, bind_for: float = 60.0) -> None:
    """Listen on 127.0.0.1:``port`` (trying to bind it for up to ``bind_for`` seconds, as a thief
    waiting for the port to come free would) and serve until killed."""
    deadline = time.monotonic() + bind_for
    while True:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
            break
        except OSError:
            listener.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    listener.listen(64)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


class PortThief:
    """The stand-in running in its own process (``command``, e.g. as another account); its
    events collected from its output. ``wait_listening`` returns once it holds the port."""

    def __init__(self, command: list[str]) -> None:
        # A session of its own: runuser forks, and the stand-in must die with it (stop()).
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_listening(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while "listening" not in self.lines:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the port thief did not get the port: {self.lines}")
            time.sleep(0.02)

    def passwords(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith("password ")]

    def stop(self) -> None:
        """Kill the stand-in and everything in its session (as root: another account's)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._reader.join(10)


def fake_server_command(python: str, port: int) -> list[str]:
    """``python -c <this module's source> PORT``: the stand-in, runnable by any account."""
    return [python, "-c", Path(__file__).read_text(), str(port)]


if __name__ == "__main__":
    serve(int(sys.argv[1]))
