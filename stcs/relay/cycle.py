"""One request's cycle on a client connection (uvicorn's ``RequestResponseCycle``): its log
fields, the answer written on its behalf, its body as it arrives, and the run that wraps the
handler (request id, in-flight count, one log line and the metrics at the end)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from stcs.answers import UNEXPECTED, status_of
from stcs.errors import RequestTimeoutError
from stcs.relay.head import Request
from stcs.relay.wire import CONTINUE, answer_response, client_address, error_response
from stcs.relay.wire import next_request_id as _next_request_id

if TYPE_CHECKING:
    from stcs.relay.protocol import ClientConnection

log = structlog.get_logger("stcs.relay")

# Bodies up to this size (bytes) with a Content-Length are read whole *before* an instance is
# leased, and go upstream with the head in one write; larger and chunked ones are streamed.
SMALL_BODY = 64 * 1024
# Unconsumed request body above this (bytes) pauses reading from the client.
BODY_HIGH_WATER = 256 * 1024
_FAULTS = (500, 502)  # never held back by the refusals' log budget

# What serves a request: (status for the log line, close the connection after it).
RequestHandler = Callable[["RequestCycle"], Awaitable[tuple[int, bool]]]


class RequestCycle:
    """The request being served on ``conn`` and what its log line says about it.

    ``held``: what the handler wrote, sent after the log line (`send_held`) unless the answer
    is streamed (``response_started``: from then on an error can only abort the connection).
    """

    __slots__ = (
        "accounted",
        "cold_start",
        "conn",
        "held",
        "request",
        "request_id",
        "response_started",
        "started",
        "upstream_port",
        "upstream_status",
        "user_id",
    )

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.request_id = _next_request_id()
        self.user_id: str | None = None
        self.cold_start = False
        self.upstream_port: int | None = None
        self.upstream_status: int | None = None  # chroma's status when the answer broke (502)
        self.response_started = False
        self.held: list[bytes] | None = []
        self.started = 0.0  # monotonic s, from `begin`
        self.accounted = False  # `account` ran

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "user_id": self.user_id,
            "cold_start": self.cold_start,
            "upstream_port": self.upstream_port,
        }
        if self.upstream_status is not None:
            fields["upstream_status"] = self.upstream_status
        return fields

    # -- the run --------------------------------------------------------------------------

    async def run(self, handler: RequestHandler) -> None:
        """Serve the request with ``handler`` (a refusal of its head is answered here), write
        its log line and metrics, send the answer, hand the connection back
        (`ClientConnection.cycle_done`).  The request may have `begun` already: its body was
        awaited in callbacks, or its answer turned out to need a task (`stcs.relay.handler`)."""
        conn = self.conn
        request = self.request
        # This task runs in a context of its own (`ClientConnection._serve`): no clearing.
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        if not self.begun:
            self.begin()
        status = 500
        close = False
        try:
            if request.reject is not None:
                self.write(error_response(request.reject, close=True))
                status, close = status_of(request.reject), True
            else:
                status, close = await handler(self)
        except asyncio.CancelledError:
            status = 499  # the client left (nginx's convention)
            close = True
        except Exception:
            log.exception("request failed")
            status = 500
            close = True
            if not conn.closed and not self.response_started:
                self.write(answer_response(UNEXPECTED, close=True))
        finally:
            self.account(status)
        self.send_held()
        # The connection goes on outside this request's log context: timers set and requests
        # served from here (the next head's timer, a pipelined request's refusal) are the
        # connection's, or the next request's, not this one's.
        contextvars.Context().run(conn.cycle_done, request, close)

    @property
    def begun(self) -> bool:
        return self.started != 0.0

    def begin(self) -> None:
        """The request is served from now on: its clock starts, it counts as in flight."""
        state = self.conn.listener.state
        self.started = time.monotonic()
        state.in_flight += 1
        state.idle.clear()

    def account(self, status: int) -> None:
        """The request ended with ``status``: out of the in-flight count, into the metrics,
        and its log line written (within the refusals' budget, `stcs.log.RefusalLog`)."""
        self.accounted = True
        conn = self.conn
        listener = conn.listener
        state = listener.state
        request = self.request
        state.in_flight -= 1
        if not state.in_flight:
            state.idle.set()
        duration = time.monotonic() - self.started
        method = request.method.decode("latin-1")
        state.metrics.observe_request(method, status, duration)
        client = client_address(conn.peer, request.forwarded, listener.limits.trusted)
        # Refused before a user is known: within the address's line budget (log.RefusalLog).
        # stcs's own faults (500, 502) are always written: the operator must see each one.
        if (
            self.user_id is not None
            or status < 400
            or status in _FAULTS
            or listener.refusals.admit(client, status)
        ):
            log.info(
                "request",
                request_id=self.request_id,
                method=method,
                path=request.path.decode("latin-1"),
                status=status,
                duration_ms=round(duration * 1000, 2),
                client=client,
                **self.log_fields(),
            )

    def settle(self, _task: asyncio.Task[None]) -> None:
        """Done callback of the task of a cycle that had `begun` before it (its body awaited
        in callbacks, or its answer handed over): a task cancelled before its first step —
        its client gone as it was made — ran none of `run`, so the request is ended here, as
        a 499, and leaves no in-flight count behind."""
        if not self.accounted:
            self.end(499, True)

    def end(self, status: int, close: bool) -> None:
        """`account`, `send_held`, then the connection goes on (`cycle_done`) outside this
        request's log context: the end of a request served in callbacks, as `run` ends."""
        self.account(status)
        self.send_held()
        contextvars.Context().run(self.conn.cycle_done, self.request, close)

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed or conn.transport is None:
            return
        if self.held is not None:
            self.held.append(data)  # sent after the request line is logged (`run`)
        else:
            conn.transport.write(data)

    def send_held(self) -> None:
        """Send what the handler wrote: after its log line, so a client that has its answer
        finds the line already written (as aiohttp did)."""
        held, self.held = self.held, None
        conn = self.conn
        if held and not conn.closed and conn.transport is not None:
            conn.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write_chunk(self, chunk: bytes, head: bytes = b"") -> None:
        """One piece of a streamed answer in the chunked coding (RFC 9112 §7.1), after
        ``head`` (the response head, with the first piece): one write."""
        transport = self.conn.transport
        assert transport is not None
        transport.writelines((head, b"%x\r\n" % len(chunk), chunk, b"\r\n"))

    def write_after(self, head: bytes, chunk: bytes) -> None:
        """A piece of a streamed answer after ``head`` (empty but for the first piece): one
        write (``writelines``: no copy of ``chunk``)."""
        conn = self.conn
        if conn.closed or conn.transport is None:
            return
        if head:
            conn.transport.writelines((head, chunk))
        else:
            conn.transport.write(chunk)

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` (after the auth and size checks), once."""
        request = self.request
        if request.expect_continue and not request.received and not request.complete:
            request.expect_continue = False
            conn = self.conn
            if conn.transport is not None and not conn.closed:  # now, not after the log line
                conn.transport.write(CONTINUE)

    # -- the request body -----------------------------------------------------------------

    async def body_for_upstream(self) -> tuple[bytes | AsyncIterator[bytes] | None, bool]:
        """(body, chunked) to send upstream: None, the whole small body, or a stream."""
        request = self.request
        if not request.has_body:
            return None, False
        if request.content_length is not None and request.content_length <= SMALL_BODY:
            return await self.read_body(), False
        return self.stream_body(), request.chunked

    async def read_body(self) -> bytes:
        """The whole body of a request with ``Content-Length`` ≤ `SMALL_BODY` (so `prefetch`
        ends with it complete).  Raises what `prefetch` raises."""
        await self.prefetch()
        return self.take_body()

    async def whole_body(self) -> bytes:
        """The whole body of any request (up to ``maxBodySize``), read into memory.  Raises
        what `stream_body` raises."""
        return b"".join([chunk async for chunk in self.stream_body()])

    def take_body(self) -> bytes:
        """The body buffered so far (all of it, once `prefetch` ends with it complete)."""
        request = self.request
        data = b"".join(request.body)
        request.body.clear()
        request.buffered = 0
        flow = self.conn.flow
        if flow.reading_paused or flow.backlog:  # held back by this body: read on
            self.conn.update_reading()
        return data

    async def prefetch(self) -> None:
        """Wait until the body is complete or `SMALL_BODY` bytes of it are buffered.  Raises
        what the body stream raises (timeout, size, framing)."""
        self.send_continue()
        request = self.request
        while not request.complete and request.buffered < SMALL_BODY:
            if request.body_error is not None:
                raise request.body_error
            await self._more_body()
        if request.body_error is not None:
            raise request.body_error

    async def _more_body(self) -> None:
        """Wait for the next piece of the body (or its end, or an error).  Raises
        RequestTimeoutError after ``bodyTimeout`` without one; CancelledError if the client
        left (logged 499).

        A future resolved by the parser's callbacks (`Request.wake`) and one timer handle on
        the loop: no task, no ``asyncio.wait_for`` (a task and a timer per wait)."""
        request = self.request
        conn = self.conn
        if conn.closed:
            raise asyncio.CancelledError
        loop = conn.loop
        waiter: asyncio.Future[bool] = loop.create_future()
        request.waiter = waiter
        limits = conn.listener.limits
        timer = loop.call_later(limits.body_timeout_s, _time_out, waiter)
        try:
            arrived = await waiter
        finally:
            timer.cancel()
            request.waiter = None
        if not arrived:
            request.body_error = RequestTimeoutError(
                f"no request body bytes for {limits.body_timeout_ms} ms"
            )
            conn.stop_parsing()
            raise request.body_error

    async def stream_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, with back-pressure on the client.  Raises
        RequestTimeoutError after ``bodyTimeout`` without a byte, BodyTooLargeError past
        ``maxBodySize``, BadRequestError if the client closed mid-body."""
        self.send_continue()
        request = self.request
        conn = self.conn
        while True:
            while request.body:
                chunk = request.body.popleft()
                request.buffered -= len(chunk)
                if conn.flow.reading_paused and request.buffered < BODY_HIGH_WATER // 2:
                    conn.update_reading()
                yield chunk if isinstance(chunk, bytes) else bytes(chunk)  # gathered: ≤ 4 KiB
            if request.body_error is not None:
                raise request.body_error
            if request.complete:
                return
            await self._more_body()


def _time_out(waiter: asyncio.Future[bool]) -> None:
    """``bodyTimeout`` passed without body bytes: the waiting cycle resumes with False."""
    if not waiter.done():
        waiter.set_result(False)
