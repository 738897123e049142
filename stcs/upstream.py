"""Keep-alive HTTP/1.1 connections from stcs to its chroma instances.

Why not aiohttp's client: it costs ~113 µs of CPU per request against chroma, where the
request path of stcs needs only a fraction of its features (no redirects, cookies, proxies,
TLS, tracing; one host, 127.0.0.1).  Measured in docs/benchmarks.md.  Response parsing is
``httptools`` (llhttp, the parser of Node.js and uvicorn), not ours.

One `UpstreamPool` per application keeps idle connections per instance port.  A connection
carries one request at a time; it goes back to the pool only after a complete response that
allows keep-alive.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools

CONNECT_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 30.0  # idle pooled connections older than this are closed
MAX_IDLE_PER_PORT = 64
READ_HIGH_WATER = 1024 * 1024  # pause reading from chroma past this much unconsumed body
READ_LOW_WATER = 256 * 1024


class UnreachableError(Exception):
    """No connection could be opened: the request never reached the instance."""


class UpstreamFailedError(Exception):
    """The connection failed or the instance sent something unparsable, mid-request."""


class _Connection(asyncio.Protocol):
    """One connection; parses responses with httptools' callbacks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.monotonic()
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is not an asyncio.Transport subclass, only alike).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._response is None:  # bytes on an idle connection: it can't be trusted again
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailedError(f"unparsable answer from the instance: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._fail(UpstreamFailedError("the instance closed the connection"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_status(self, status: bytes) -> None:
        if self._response is not None:
            self._response.reason = status.decode("latin-1")

    def on_headers_complete(self) -> None:
        resp = self._response
        if resp is not None and not resp._head.done():
            resp.status = self._parser.get_status_code()
            resp._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        resp = self._response
        if resp is not None:
            resp.keep_alive = self._parser.should_keep_alive()
            resp._finish()

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._response is not None:
            self._response._fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed:
            raise UpstreamFailedError("the instance closed the connection")


class UpstreamResponse:
    """A response being received.  ``status``, ``reason``, ``headers`` once the head arrived;
    the body through `read` (whole) or `chunks` (streamed); `release` when done."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, head_only: bool) -> None:
        self._pool = pool
        self._conn = conn
        self._head_only = head_only
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._raw_headers: list[tuple[str, str]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._more = asyncio.Event()
        self._done = False
        self._error: Exception | None = None
        self.status = 0
        self.reason = ""
        self.keep_alive = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._raw_headers

    @property
    def content_length(self) -> int | None:
        for name, value in self._raw_headers:
            if name.lower() == "content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._more.set()
        if self._buffered > READ_HIGH_WATER and not self._paused and self._conn.transport:
            self._paused = True
            self._conn.transport.pause_reading()

    def _finish(self) -> None:
        self._done = True
        self._more.set()

    def _fail(self, exc: Exception) -> None:
        if self._done:
            return
        self._error = exc
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved by whoever awaits it
        self._more.set()

    async def _wait_head(self) -> None:
        await self._head
        if self._head_only:  # a HEAD answer has no body, whatever its Content-Length says
            self._done = True
            self.keep_alive = False  # the parser expects a body: never reuse this connection

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives.  Raises UpstreamFailedError if the instance fails."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < READ_LOW_WATER and self._conn.transport:
                    self._paused = False
                    self._conn.transport.resume_reading()
                yield chunk
            if self._done:
                return
            if self._error is not None:
                raise self._error
            self._more.clear()
            await self._more.wait()

    async def read(self) -> bytes:
        """The whole body.  Raises UpstreamFailedError if the instance fails."""
        if self._done and not self._paused:  # all arrived (usual for small answers)
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Return the connection to the pool (after a complete response) or close it."""
        conn, self._conn._response = self._conn, None
        if self._done and self.keep_alive and self._error is None:
            self._pool._put(conn)
        else:
            conn.close()


class UpstreamPool:
    """Idle keep-alive connections to 127.0.0.1, per instance port."""

    def __init__(self) -> None:
        self._idle: dict[int, list[_Connection]] = {}

    async def _get(self, port: int) -> _Connection:
        idle = self._idle.get(port)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(port), "127.0.0.1", port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UnreachableError(f"127.0.0.1:{port}: {exc}") from None
        # Set here too: not every event loop (uvloop) has called connection_made by now.
        conn.transport = transport
        return conn

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.port, [])
        if len(idle) >= MAX_IDLE_PER_PORT:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def forget(self, port: int) -> None:
        """Close the idle connections of an instance that is gone."""
        for conn in self._idle.pop(port, []):
            conn.close()

    async def request(
        self,
        port: int,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        """Send a request to the instance on ``port``; return once the response head arrived.

        ``target`` is the raw path and query; ``headers`` exclude Host, Content-Length and
        Transfer-Encoding (set here).  A streamed ``body`` without ``content_length`` is sent
        chunked.  Raises UnreachableError (nothing was sent) or UpstreamFailedError.
        """
        conn = await self._get(port)
        resp = UpstreamResponse(self, conn, head_only=method == "HEAD")
        conn._response = resp
        lines = [f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        chunked = False
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            if content_length is None:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                lines.append(f"Content-Length: {content_length}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        assert conn.transport is not None
        try:
            if isinstance(body, bytes) or body is None:
                conn.transport.write(head + body if body else head)
            else:
                conn.transport.write(head)
                async for chunk in body:
                    if not chunk:
                        continue
                    if conn.closed:
                        raise UpstreamFailedError("the instance closed the connection")
                    if chunked:
                        conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        conn.transport.write(chunk)
                    await conn.drain()
                if chunked:
                    conn.transport.write(b"0\r\n\r\n")
            await resp._wait_head()
        except BaseException:
            conn._response = None
            conn.close()
            raise
        return resp

    def close(self) -> None:
        for port in list(self._idle):
            self.forget(port)
