"""A TCP proxy in front of PostgreSQL that a test steers: hold the server's answers (a slow
database), or cut every connection and refuse new ones (a database gone), then restore."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class Proxy:
    """``async with Proxy(host, port) as proxy``: connect to 127.0.0.1:``proxy.port``. ``host``
    is a name, an address or a Unix socket directory (see ``target_of``).

    ``hold()``/``release()``: answers on the connections open now wait in the proxy (their
    queries get no answer); connections opened later are not held.
    ``cut()``: every connection is dropped and new ones are refused (nothing listens on the
    port); ``restore()`` listens on the same port again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.gates: list[asyncio.Event] = []  # one per connection: set while answers flow
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Proxy:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.release()
        for writer in self.writers:
            writer.transport.abort()
        # Aborted sockets end the pipes; a handler is cancelled only if that did not do it
        # (asyncio logs an error for a cancelled connection handler).
        if self.handlers:
            _, late = await asyncio.wait(self.handlers, timeout=2)
            for handler in late:
                handler.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
        self.handlers.clear()
        self.writers.clear()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            host, port = self.target
            if host.startswith("/"):  # a socket directory (the embedded server's default)
                server_r, server_w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.transport.abort()
            return
        self.writers.update((client_w, server_w))
        gate = asyncio.Event()
        gate.set()
        self.gates.append(gate)
        await asyncio.gather(
            self._pipe(client_r, server_w, gate=None),
            self._pipe(server_r, client_w, gate=gate),
            return_exceptions=True,
        )
        self.writers.difference_update((client_w, server_w))
        self.gates.remove(gate)
        self.handlers.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        gate: asyncio.Event | None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def hold(self) -> None:
        for gate in self.gates:
            gate.clear()

    def release(self) -> None:
        for gate in self.gates:
            gate.set()

    async def cut(self) -> None:
        await self._close()

    async def restore(self) -> None:
        await self._listen()


def target_of(url: str) -> tuple[str, int]:
    """The (host or socket directory, port) a libpq URL connects to."""
    from glisk.testing import libpq_kwargs

    server = libpq_kwargs(url)
    return str(server.get("host") or "127.0.0.1"), int(str(server.get("port") or 5432))
