"""A small TCP proxy between a server and RabbitMQ, to cut the connection in tests.

It runs its own event loop in a thread, so it is independent of the test's loop and
keeps forwarding while a test awaits. ``cut()`` drops every connection and stops
listening (the broker looks gone); ``restore()`` listens again on the same port.
``hold_on(marker)`` makes the next connection that sends ``marker`` towards the
broker go silent from there on (the broker never hears the rest): a way to catch
the server in the middle of an operation and cut it there. With ``ssl`` the proxy
speaks TLS to the server and plain AMQP to the broker. ``received`` keeps what the
server sent, to check what went over the wire. ``freeze()`` makes the connections
open now go silent both ways without closing them (a link that died without a FIN
or RST); new connections pass as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator

from helpers import free_port


class TcpProxy:
    def __init__(
        self, target_port: int = 5672, port: int | None = None, ssl: ssl.SSLContext | None = None
    ) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.ssl = ssl
        self.received = bytearray()
        self.held = threading.Event()
        self._marker: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()
        self._thread.start()

    def _call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if upstream:
                    self.received += data
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        self.held.set()
                        while await reader.read(65536):  # swallow the rest: it never arrives
                            pass
                        break
                if writer in self._frozen:
                    continue  # a dead link: what is sent goes nowhere, nothing closes
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer, True), self._pipe(upstream_reader, writer, False)
        )
        self._writers -= {writer, upstream_writer}

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.ssl
        )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # a hard cut: no AMQP close handshake
        self._writers.clear()

    def listen(self) -> None:
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._cut())

    restore = listen

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._frozen.update, set(self._writers))

    def hold_on(self, marker: bytes) -> None:
        self.held.clear()
        self._marker = marker

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, listening: bool = True, ssl: ssl.SSLContext | None = None
    ) -> Iterator[TcpProxy]:
        proxy = cls(ssl=ssl)
        try:
            if listening:
                proxy.listen()
            yield proxy
        finally:
            proxy.close()
