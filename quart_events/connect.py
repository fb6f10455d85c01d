"""The connect endpoint as a plain ASGI handler, in front of the Quart app.

Why not a Quart route: a server holds thousands of these streams open, and Quart's
per-request machinery (two tasks, a request and a response object, contexts) cost
about a third of the memory of each (measured: 29.7 KiB per idle stream through
Quart, see docs/performance.md). Here each stream costs hypercorn's connection, the
handler's task and one task that waits for the client to leave. Everything else
(lifespan, stats, 404s) goes on to Quart.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import urllib.parse
from typing import Any

from . import sse
from .bindings import BindingError, parse_bindings
from .hub import Hub, Stream
from .settings import ServerSettings

ASGIApp = Any  # (scope, receive, send) -> awaitable; hypercorn and Quart type it loosely
PATHS = frozenset(
    path + slash for path in ("/api/events/v1/connect", "/events/v1/connect") for slash in ("", "/")
)
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ConnectEndpoint:
    """Serves GET on the connect paths; passes every other request on to ``app``."""

    def __init__(self, app: ASGIApp, hub: Hub, settings: ServerSettings) -> None:
        self.app = app
        self.hub = hub
        self.settings = settings
        self.cors = [(b"access-control-allow-origin", settings.cors_allow_origin.encode())]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
        elif scope["method"] != "GET":
            await self._plain(send, 405, "Only GET is served here.\n", [(b"allow", b"GET")])
        else:
            await self._connect(scope, receive, send)

    async def _plain(
        self,
        send: Any,
        status: int,
        text: str,
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> None:
        body = text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                    *self.cors,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _connect(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        settings = self.settings
        if any(name.lower() == b"last-event-id" for name, _ in scope["headers"]):
            # An EventSource reconnecting after its stream ended: tell it to stop.
            await send({"type": "http.response.start", "status": 204, "headers": self.cors})
            await send({"type": "http.response.body", "body": b""})
            return
        if len(scope["raw_path"]) + len(scope["query_string"]) > settings.max_request_line:
            limit = settings.max_request_line
            await self._plain(send, 414, f"Request line too long: at most {limit} bytes.\n")
            return
        try:
            bindings = parse_bindings(_bindings_parameter(scope), settings.limits())
        except BindingError as error:
            await self._start_stream(send)
            await send({"type": "http.response.body", "body": sse.error(str(error))})
            return
        if len(self.hub.streams) >= settings.max_streams:
            retry_after = str(random.randint(5, 30)).encode()  # jittered: refused clients spread
            await self._plain(
                send,
                503,
                "Too many streams on this server; retry later.\n",
                [(b"retry-after", retry_after)],
            )
            return
        await self._start_stream(send)
        stream = self.hub.open(bindings)
        del bindings  # this frame lives as long as the stream: keep it small
        stream.task = asyncio.current_task()  # so the watchdog can cancel a stuck write
        watcher = asyncio.ensure_future(_until_disconnect(receive, stream, self.hub))
        try:
            while (chunk := await stream.next_chunk()) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            self.hub.close(stream)

    async def _start_stream(self, send: Any) -> None:
        # Headers go out at once, before any event (hypercorn sends them on this message).
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*STREAM_HEADERS, *self.cors]}
        )


def _bindings_parameter(scope: dict[str, Any]) -> str | None:
    """The first ``bindings`` query parameter; other parameters are ignored."""
    query_string: bytes = scope["query_string"]
    query = urllib.parse.parse_qs(
        query_string.decode("utf-8", "replace"), keep_blank_values=True, errors="replace"
    )
    values = query.get("bindings")
    return values[0] if values else None


async def _until_disconnect(receive: Any, stream: Stream, hub: Hub) -> None:
    """The client left: end its stream, which ends the handler's loop."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
    hub.close(stream)
