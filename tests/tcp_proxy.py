"""A TCP proxy for fault injection: between a client and the API server, it can cut every
connection and refuse new ones, and it can delay what it forwards.

It forwards bytes as they are (TLS passes through), on its own event loop in a thread, so both
an in-process operator and an operator process can be pointed at it through a kubeconfig.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_CHUNK = 64 * 1024


class TcpProxy:
    """Listens on a free loopback port and forwards each connection to `target`.

    `delay`: seconds each chunk waits before it is passed on, in both directions (latency, not
    a bandwidth limit: chunks keep their order and do not wait for each other).
    """

    def __init__(self, host: str, port: int, delay: float = 0.0) -> None:
        self.target = (host, port)
        self.delay = delay
        self.port = 0  # chosen when it first listens, then kept
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        # Each connection's task, and its two ends.
        self._connections: dict[asyncio.Task[Any], tuple[asyncio.BaseTransport, ...]] = {}

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def cut(self) -> None:
        """Drops every connection and refuses new ones (nothing listens on the port)."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accepts connections again, on the same port."""
        self._call(self._listen())

    def kubeconfig(self, original: Path, target: Path) -> Path:
        """A copy of `original` whose server is this proxy (the same certificates and names)."""
        config = yaml.safe_load(original.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        target.write_text(yaml.safe_dump(config))
        return target

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for ends in self._connections.values():
            for transport in ends:
                transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self.target)
        except OSError:
            client_out.transport.abort()
            return
        connection = asyncio.current_task()
        assert connection is not None
        ends = self._connections[connection] = (client_out.transport, server_out.transport)
        try:
            await asyncio.gather(
                self._forward(client_in, server_out), self._forward(server_in, client_out)
            )
        finally:
            for transport in ends:
                transport.abort()
            del self._connections[connection]

    async def _forward(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Passes chunks on, each `delay` after it arrived, until either side closes."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                arrived, chunk = await chunks.get()
                if not chunk:
                    sink.write_eof()
                    return
                await asyncio.sleep(arrived + self.delay - time.monotonic())
                sink.write(chunk)
                await sink.drain()

        sender = asyncio.create_task(send())
        try:
            while chunk := await source.read(_CHUNK):
                chunks.put_nowait((time.monotonic(), chunk))
            chunks.put_nowait((time.monotonic(), b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
