"""Keep-alive HTTP/1.1 connections from stcs to its chroma instances and its control plane.

Why not aiohttp's client: the request path needs a fraction of its features (no redirects,
cookies, proxies, TLS; one host, 127.0.0.1) and its per-request CPU was most of stcs's
(docs/benchmarks.md).  Response parsing is ``httptools`` (llhttp, the parser of Node.js and
uvicorn), not ours.

Connections are pooled per *target*: one chroma child incarnation (`launcher.Child`: its port
*and* its process) or the control plane's unix socket.  A target that is gone (its child exited)
is never connected to again, so a request bound to a dead child can never reach whatever listens
on its old port now.  A connection carries one request at a time; it goes back to the pool only
after a complete response that allows keep-alive.  Header bytes are written as given: nothing is
decoded or re-encoded on the way.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

import httptools

CONNECT_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 30.0  # idle pooled connections older than this are closed
MAX_IDLE_PER_TARGET = 64
READ_HIGH_WATER = 1024 * 1024  # pause reading from upstream past this much unconsumed body
READ_LOW_WATER = 256 * 1024


class UnreachableError(Exception):
    """No connection could be opened: the request never reached the instance."""


class UpstreamFailedError(Exception):
    """The connection failed or the upstream sent something unparsable, mid-request."""


class Target(Protocol):
    """Where a pooled connection goes: ``address`` is ``(host, port)`` for TCP or a unix socket
    path; ``reachable`` turns False for good once the target is gone (its child exited)."""

    @property
    def address(self) -> tuple[str, int] | str: ...

    @property
    def reachable(self) -> bool: ...


class UnixTarget:
    """The control plane's unix socket (always reachable while stcs runs)."""

    reachable = True

    def __init__(self, path: str) -> None:
        self.address = path


class _Connection(asyncio.Protocol):
    """One connection; parses responses with httptools' callbacks."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # Made by the loop's protocol factory, so in it; kept: `get_running_loop` costs a
        # getpid system call per request (CPython 3.11).
        self.loop = asyncio.get_running_loop()
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
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # Garbage, or a 101 switch: stcs relays HTTP/1.1 only, never a tunnel.
            self._fail(UpstreamFailedError(f"unparsable answer from upstream: {exc!r}"))
            self.close()
        self._notify()

    def eof_received(self) -> bool | None:
        # A close-delimited body (no Content-Length, not chunked) ends here (RFC 9112 §6.3).
        resp = self._response
        if resp is not None and resp._head.done() and resp._close_delimited and not resp._done:
            resp.keep_alive = False
            resp._finish()
            self._notify()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._fail(UpstreamFailedError("upstream closed the connection"))
        self._notify()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        resp = self._response
        if resp is not None and resp._done:
            # A second answer to one request: the first stands, nothing after it is parsed
            # into it, and the connection is closed (raised into the parser: `data_received`).
            raise UpstreamFailedError("a second answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.headers.append((name, value))

    def on_status(self, status: bytes) -> None:
        if self._response is not None:
            self._response.reason = status

    def on_headers_complete(self) -> None:
        resp = self._response
        if resp is None or resp._head.done():
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim (RFC 9110 §15.2): not relayed, the final one follows
            resp.headers.clear()
            return
        resp.status = status
        resp._close_delimited = resp.content_length is None and not resp.chunked
        resp._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        resp = self._response
        if resp is not None and resp._head.done():
            resp.keep_alive = self._parser.should_keep_alive()
            resp._finish()

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._response is not None:
            self._response._fail(exc)

    def _notify(self) -> None:
        """Tell the response's ``watcher`` (a request served in callbacks) that its head, its
        end or a failure came: after the parser returned, never from inside it (the watcher
        may pool this connection and hand it to the next request at once)."""
        resp = self._response
        if (
            resp is not None
            and resp.watcher is not None
            and (resp._head.done() or resp._error is not None)
        ):
            resp.watcher()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def is_open(self) -> bool:
        """Neither closed nor closing: a request may be written on it."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def unsent(self) -> asyncio.Transport:
        """The transport, for a request's first write.  Raises UnreachableError when the
        connection closed before anything was sent on it (the peer reset it as it opened:
        uvloop's ``write`` would raise RuntimeError, a 500)."""
        if not self.is_open:
            self.close()
            raise UnreachableError("the connection closed before the request was sent")
        transport = self.transport
        assert transport is not None
        return transport

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed:
            raise UpstreamFailedError("upstream closed the connection")


PooledConnection = _Connection  # what `UpstreamPool.take_idle` gives


class UpstreamResponse:
    """A response being received.  ``status``, ``reason`` and ``headers`` (raw bytes, as sent)
    once the head arrived; the body through `read` (whole) or `chunks` (streamed); `release`
    when done.

    ``watcher``, when set (`UpstreamPool.send_now`), is called without arguments each time a
    read brought the head, the end of the answer, or a failure (``done``, ``failed``): the way
    a request served in callbacks learns of its answer, instead of awaiting it."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, head_only: bool) -> None:
        self._pool = pool
        self._conn = conn
        self._head_only = head_only
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._more = asyncio.Event()
        self._done = False
        self._close_delimited = False
        self._error: Exception | None = None
        self.status = 0
        self.reason = b""
        self.keep_alive = False
        self.watcher: Callable[[], None] | None = None

    @property
    def head_received(self) -> bool:
        """The final head arrived (``status``, ``reason``, ``headers`` are set)."""
        return self.status != 0

    @property
    def done(self) -> bool:
        """The whole answer arrived (its body is in `take_body`)."""
        return self._done

    @property
    def failed(self) -> Exception | None:
        """Why the answer broke (UpstreamFailedError), if it did before its end."""
        return None if self._done else self._error

    @property
    def content_length(self) -> int | None:
        """``Content-Length`` as a number (None: absent; llhttp refused malformed ones)."""
        for name, value in self.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                return int(value)
        return None

    @property
    def chunked(self) -> bool:
        return any(
            len(name) == 17 and name.lower() == b"transfer-encoding" for name, _ in self.headers
        )

    @property
    def has_body(self) -> bool:
        """False for HEAD answers, 1xx, 204 and 304 (RFC 9110 §6.4.1)."""
        return not (self._head_only or self.status in (204, 304))

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
        if not self.has_body:
            # No body, whatever Content-Length says; for HEAD the parser expects one: never
            # reuse that connection.
            self._done = True
            if self._head_only:
                self.keep_alive = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives.  Raises UpstreamFailedError if the upstream fails."""
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
        """The whole body.  Raises UpstreamFailedError if the upstream fails."""
        if self._done and not self._paused:  # all arrived (usual for small answers)
            return self.take_body()
        return b"".join([chunk async for chunk in self.chunks()])

    def take_body(self) -> bytes:
        """The body received so far: all of it once `done`."""
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    def release(self) -> None:
        """Return the connection to the pool (after a complete response) or close it."""
        conn, self._conn._response = self._conn, None
        # Not with reading paused (an answer past READ_HIGH_WATER left unread): nothing would
        # ever read the next answer on it.
        ok = self._done and self.keep_alive and self._error is None and not self._paused
        if ok and not conn.closed:
            self._pool._put(conn)
        else:
            conn.close()


class UpstreamPool:
    """Idle keep-alive connections, per target (chroma child incarnation or unix socket)."""

    def __init__(self) -> None:
        self._idle: dict[Target, list[_Connection]] = {}

    async def _get(self, target: Target) -> _Connection:
        if not target.reachable:  # its child exited: not even a pooled connection is used
            self.forget(target)
            raise UnreachableError("the instance is gone")
        idle = self.take_idle(target)
        if idle is not None:
            return idle
        loop = asyncio.get_running_loop()
        address = target.address
        try:
            if isinstance(address, str):
                opening = loop.create_unix_connection(lambda: _Connection(target), address)
            else:
                opening = loop.create_connection(lambda: _Connection(target), *address)
            transport, conn = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise UnreachableError(f"{address}: {exc}") from None
        # Set here too: not every event loop (uvloop) has called connection_made by now.
        conn.transport = transport
        return conn

    def take_idle(self, target: Target) -> _Connection | None:
        """An idle pooled connection to ``target`` that is still open, or None (none, or
        ``target`` is gone): what `send_now` writes on, with no wait."""
        if not target.reachable:
            return None
        idle = self._idle.get(target)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.is_open and now - conn.idle_since < IDLE_TIMEOUT_S:
                return conn
            conn.close()
        return None

    def send_now(
        self, conn: _Connection, data: bytes, watcher: Callable[[], None]
    ) -> UpstreamResponse:
        """Write a whole request (``data``: head and body; not HEAD) on ``conn`` (from
        `take_idle`) and return its response at once, empty: ``watcher`` is called as its head,
        its end or a failure arrives (`UpstreamResponse.watcher`)."""
        resp = UpstreamResponse(self, conn, False)
        resp.watcher = watcher
        conn._response = resp
        transport = conn.transport
        assert transport is not None
        transport.write(data)
        return resp

    def _put(self, conn: _Connection) -> None:
        if not conn.target.reachable:
            conn.close()
            return
        idle = self._idle.setdefault(conn.target, [])
        if len(idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def forget(self, target: Target) -> None:
        """Close the idle connections of a target that is gone."""
        for conn in self._idle.pop(target, []):
            conn.close()

    async def request(
        self,
        target: Target,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        chunked: bool = False,
        head_only: bool = False,
    ) -> UpstreamResponse:
        """Send a request to ``target``; return once the final response head arrived.

        ``head`` is the whole request head, framing headers and the blank line included.  A
        streamed ``body`` is sent as it comes, chunk-encoded when ``chunked``; ``head_only``
        for HEAD (the answer has no body).  Raises UnreachableError (nothing was sent: safe to
        retry) or UpstreamFailedError; whatever the body iterator raises passes through, and
        the connection is closed.
        """
        conn = await self._get(target)
        transport = conn.unsent()
        resp = UpstreamResponse(self, conn, head_only)
        conn._response = resp
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
            else:
                # The head goes out with the first piece of the body: one write, not two.
                pending = head
                async for chunk in body:
                    if not chunk:
                        continue
                    if conn.closed:
                        raise UpstreamFailedError("upstream closed the connection")
                    if chunked:
                        transport.writelines((pending, b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                    elif pending:
                        transport.writelines((pending, chunk))
                    else:
                        transport.write(chunk)
                    pending = b""
                    await conn.drain()
                if chunked:
                    transport.write(pending + b"0\r\n\r\n")
                elif pending:
                    transport.write(pending)
            await resp._wait_head()
        except BaseException:
            conn._response = None
            conn.close()
            raise
        return resp

    async def fetch(
        self,
        target: Target,
        method: str,
        path: str,
        json_body: bytes | None = None,
        *,
        timeout_s: float,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        """One small call of stcs's own (a heartbeat probe, a quota's count): ``method path``
        (``path`` as on the wire, latin-1) with ``json_body`` (JSON bytes, or none) on a pooled
        connection of ``target``; the status and the whole body (bytes).

        Within ``timeout_s`` seconds in all, connecting within ``connect_timeout_s`` of them.
        Raises UnreachableError, UpstreamFailedError or TimeoutError; a connection whose
        answer was not read to its end is closed, never pooled.
        """
        return await asyncio.wait_for(
            self._fetch(target, method, path, json_body, connect_timeout_s), timeout_s
        )

    async def _fetch(
        self,
        target: Target,
        method: str,
        path: str,
        json_body: bytes | None,
        connect_timeout_s: float,
    ) -> tuple[int, bytes]:
        conn = await asyncio.wait_for(self._get(target), connect_timeout_s)
        address = target.address
        if isinstance(address, str):
            host = b"localhost"
        else:
            host = b"%s:%d" % (address[0].encode(), address[1])
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode("latin-1"), host)
        if json_body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(json_body)
        transport = conn.unsent()
        resp = UpstreamResponse(self, conn, method == "HEAD")
        conn._response = resp
        try:
            transport.write(head + b"\r\n" + (json_body or b""))
            await resp._wait_head()
            body = await resp.read()
        finally:
            resp.release()  # pooled again only after a complete answer
        return resp.status, body

    def close(self) -> None:
        for target in list(self._idle):
            self.forget(target)
