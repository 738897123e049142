"""The client side of the data plane: one `asyncio.Protocol` per client connection, in the
manner of uvicorn's ``httptools_impl``: transport, httptools callbacks that only record,
pipelining, timers and lingering close.  What a request is answered with is the listener's
handler's business (`stcs.relay.handler`), run in a `RequestCycle`.

The connection's phase is one of `OPEN` (parsing), `STOPPED` (no more parsing: a framing error
or a refusal that closes; the request being served may finish), `LINGERING` (answered and
closing: what the client still sends is discarded) and `CLOSED`; it only moves forward.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import os
import socket
from collections.abc import Callable
from typing import Protocol, cast

import httptools
import structlog

from stcs.answers import status_of
from stcs.errors import (
    BadRequestError,
    BodyTooLargeError,
    HeadTooLargeError,
    RequestError,
    RequestTimeoutError,
    TooManyConnectionsError,
)
from stcs.log import RefusalLog
from stcs.metrics import Metrics
from stcs.relay.cycle import BODY_HIGH_WATER, SMALL_BODY, RequestCycle, RequestHandler
from stcs.relay.flow import FlowControl
from stcs.relay.head import (
    SPECIAL,
    Request,
    body_limit,
    check_head,
    duplicate_field,
    framing,
)
from stcs.relay.limits import Limits
from stcs.relay.wire import CONTINUE, client_address, error_response

log = structlog.get_logger("stcs.relay")

# What the parser is fed at a time outside a Content-Length body (bytes), and how many requests
# may be parsed ahead of the one being served: past either bound the rest of a read waits as raw
# bytes (`FlowControl.backlog`, reading paused), so a read of thousands of tiny pipelined
# requests costs that read, not thousands of parsed requests (~1 KB each).
FEED_SLICE = 1024
CHUNKED_SLICE = 8192  # inside a chunked body: a 20 MB upload costs ~2,500 parser calls
MAX_PIPELINED = 8
# Body pieces smaller than this are gathered into one buffer instead of kept one by one: a
# body in tiny chunks costs its size, not an object per chunk (bytes).
PIECE_GATHER = 4096
# After a refusal, how long stcs reads and discards what the client still sends before closing.
LINGER_S = 2.0
# A handle that fires less than this before its deadline runs the deadline's callback: the
# loop's clock and its timers are in milliseconds (libuv), so no re-arm for a few µs.
TIMER_SLACK_S = 0.001

# The connection's phases (ints, not an Enum: compared on every read and callback).
OPEN, STOPPED, LINGERING, CLOSED = 0, 1, 2, 3


class Cancellable(Protocol):
    """What serves a request: its task, or a request served in callbacks
    (`stcs.relay.handler.Exchange`)."""

    def done(self) -> bool: ...

    def cancel(self) -> object: ...


class Serving(Protocol):
    """What the listener counts and reads of the serving process (`stcs.state.State`)."""

    in_flight: int
    idle: asyncio.Event
    metrics: Metrics

    @property
    def shutting_down(self) -> bool: ...


class Listener:
    """What the connections of one listening socket share: the process's counts
    (``state``), the ``handler`` of their requests, the ``limits``, the event ``loop``, the
    open connections, and the refusals' log budget per client address (`RefusalLog`).
    Called by the loop for each accepted socket (``loop.create_server(listener, …)``)."""

    def __init__(
        self,
        state: Serving,
        handler: RequestHandler,
        limits: Limits,
        *,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.state = state
        self.handler = handler
        # The handler's way to serve a request in callbacks, with no task (`Handler.serve_now`);
        # None: every request is served in a task.
        self.serve_now: Callable[[RequestCycle], bool] | None = getattr(handler, "serve_now", None)
        # Whether to await the rest of a small body in callbacks first (`Handler.await_body`).
        self.await_body: Callable[[RequestCycle], bool] | None = getattr(
            handler, "await_body", None
        )
        self.limits = limits
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        # Lines of requests refused before a user is known: a budget per client address.
        self.refusals = RefusalLog(
            limits.log_refusals_per_second, limits.log_refusals_interval_s, loop=loop
        )

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def apply_limits(self, limits: Limits) -> None:
        """Reloaded settings (SIGHUP): connections accepted from now on get ``limits``; open
        ones keep the limits they were accepted with.  A changed log budget starts afresh (the
        old one's suppressed lines are summed up first)."""
        old = self.limits
        self.limits = limits
        if (old.log_refusals_per_second, old.log_refusals_interval_s) != (
            limits.log_refusals_per_second,
            limits.log_refusals_interval_s,
        ):
            self.refusals.flush()
            self.refusals = RefusalLog(
                limits.log_refusals_per_second, limits.log_refusals_interval_s, loop=self.loop
            )

    def close_idle(self) -> None:
        """Close every connection that is not serving a request (at shutdown, once
        ``State.shutting_down`` is set: busy ones close after their answer)."""
        for conn in list(self.connections):
            if conn.active is None:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        self.refusals.flush()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, serves them in order, enforces the edge limits."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl  # from connection_made on
        self.peer: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = OPEN
        self.msg: Request | None = None  # the request being parsed
        self.active: Request | None = None  # the request being served
        # What serves `active`: its task, or its `Exchange` (served in callbacks).
        self.task: Cancellable | None = None
        self.starting: Request | None = None  # `active`, served once this read is parsed
        # `active`, begun, its body awaited in callbacks (`await_body`) under `body_timer`;
        # `body_seen`: its bytes received when the timer was last set.
        self.awaiting: RequestCycle | None = None
        self.body_seen = 0
        self.pipeline: collections.deque[Request] = collections.deque()
        self.eof = False  # the client half-closed after complete requests: answer, then close
        self.probed = False  # after the half-close, an interim answer was sent (`check_gone`)
        self.feeding = False
        self.in_head = False
        self.head_bytes = 0
        # The connection's one deadline (head, body, keep-alive or linger): `on_deadline` runs
        # at `deadline` (loop time, s) unless cleared first; `timer` is the armed handle,
        # never later than `deadline` (`_set_timer`).
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self.waiting_to_serve = False  # a response done, the next waits for the client to read
        self.pending_refusal: RequestError | None = None  # answered once the current request ends
        self.unpaid = 0  # bytes of the current message since its last body byte (trailers...)

    @property
    def closed(self) -> bool:
        return self.phase == CLOSED

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        listener = self.listener
        if len(listener.connections) >= self.limits.max_connections:
            exc = TooManyConnectionsError("too many connections; retry later", retry_after_s=1)
            self.transport.write(error_response(exc, close=True))
            self.transport.close()
            self.phase = CLOSED
            if listener.refusals.admit(self.peer, 503):
                log.warning("connection refused", reason="maxConnections", client=self.peer)
            return
        listener.connections.add(self)
        # Until the first byte, the head timeout applies (as nginx's client_header_timeout).
        self._set_timer(self.limits.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.listener.connections.discard(self)
        self._drop_timer()
        self.flow.lost()
        msg = self.active
        if msg is not None:
            msg.wake()
        cycle = self.awaiting
        if cycle is not None:  # left mid-body: logged as 499, as the task path logs it
            self.awaiting = None
            contextvars.Context().run(cycle.end, 499, True)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: stop its request (logged as 499)

    def data_received(self, data: bytes) -> None:
        if self.phase:
            return  # refused or lingering: discarded
        flow = self.flow
        if flow.backlog:  # parsing is held back (reading is paused: the read in progress)
            flow.backlog += data
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        """The client half-closed.  After complete requests that is not a hang-up (RFC 9112
        §9.6 leaves the connection to close after the answers): keep writing, answer what was
        asked, then close.  Mid-request, or idle, the connection closes now."""
        if self.phase == LINGERING:
            self._end_linger()
            return None
        active = self.active
        asked = (active is not None and active.complete) or bool(self.pipeline)
        if asked and self.msg is None and self.phase != CLOSED:
            self.eof = True
            return True
        return None

    def pause_writing(self) -> None:
        """The client's socket buffer is full: read no more requests, and give it
        ``sendTimeout`` to read before the connection is aborted."""
        self.flow.pause_writing(self.loop, self.limits.send_timeout_s, self._send_timed_out)
        self.update_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self.waiting_to_serve and self.active is None and self.phase != CLOSED:
            self.waiting_to_serve = False
            self._next()
        self.update_reading()

    def _send_timed_out(self) -> None:
        log.info(
            "client stopped reading", client=self.peer, send_timeout_ms=self.limits.send_timeout_ms
        )
        self.abort()

    # -- parsing ----------------------------------------------------------------------------

    def _parsed_enough(self) -> bool:
        """Whether to parse no further for now: enough requests wait behind the one being
        served, or the body being received is over its high-water mark."""
        msg = self.msg
        return len(self.pipeline) >= MAX_PIPELINED or (
            msg is not None and msg.buffered > BODY_HIGH_WATER
        )

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time (a Content-Length body in one piece), keeping what
        is left as the backlog once `_parsed_enough`; `update_reading` feeds it later.  Slices
        are views: nothing is copied but a backlog."""
        self.feeding = True
        view = memoryview(data)
        offset, end = 0, len(data)
        try:
            while offset < end:
                if self.phase:
                    return
                if self._parsed_enough():
                    self.flow.backlog = bytes(view[offset:])
                    return
                msg = self.msg
                size = FEED_SLICE
                if msg is not None and not self.in_head:
                    if msg.content_length is not None:
                        size = max(size, msg.content_length - msg.received)
                    else:  # chunked: bigger slices (fewer calls), still few requests behind
                        size = CHUNKED_SLICE
                self._parse(view[offset : offset + size])
                offset += size
        finally:
            view.release()
            self.feeding = False
            msg, self.starting = self.starting, None
            if msg is not None:
                self._serve(msg)
            elif self.awaiting is not None:
                self._check_awaited()
            self.update_reading()

    def _parse(self, data: memoryview) -> None:
        if self.active is None and not self.in_head and self.msg is None:
            # First bytes of a new request on an idle connection: now the head timeout runs.
            self._set_timer(self.limits.head_timeout_s, self._head_timed_out)
        if self.msg is None or self.in_head:
            self.head_bytes += len(data)
        else:
            self.unpaid += len(data)  # reset by on_body: trailers and chunk extensions only
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or Upgrade: refused in on_headers_complete; nothing after it is read.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._framing_error(str(exc))
            return
        max_header_size = self.limits.max_header_size
        if self.unpaid > max_header_size + SMALL_BODY and not self.phase:
            self._framing_error("trailer section or chunk extensions too large")
            return
        if self.in_head and self.head_bytes > max_header_size:
            self._refuse_head(
                HeadTooLargeError(f"request head over the limit of {max_header_size} bytes")
            )

    # -- httptools callbacks: they only record ----------------------------------------------

    def on_message_begin(self) -> None:
        if self.phase:
            return
        self.msg = Request()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        msg = self.msg
        if msg is not None and not self.phase:
            msg.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self.msg
        if msg is None or self.phase or not self.in_head:
            return  # trailer fields are dropped (RFC 9110 §6.5.1), never merged into the head
        msg.headers.append((name, value))
        lower = name.lower()
        if lower in SPECIAL:
            if msg.reject is None:
                msg.reject = duplicate_field(msg, lower, name)
            msg.special[lower] = value
        elif lower == b"x-forwarded-for":
            msg.forwarded.append(value)

    def on_headers_complete(self) -> None:
        msg = self.msg
        if msg is None or self.phase:
            return
        self.in_head = False
        self.head_bytes = 0
        self._cancel_timer()
        parser = self.parser
        msg.method = parser.get_method()
        msg.version = parser.get_http_version()
        # HTTP/1.0 clients get their answer and the connection closes (no 1.0 keep-alive).
        msg.keep_alive = msg.version == "1.1" and parser.should_keep_alive()
        if msg.reject is None:
            msg.content_length, msg.chunked, msg.expect_continue = framing(msg.special, msg.version)
            msg.body_limit = body_limit(msg, self.limits)
            msg.reject = check_head(msg, self.limits)
        if msg.reject is not None:
            # Its body (if any) is not read: nothing after this request can be trusted.
            self.stop_parsing()
        if self.active is None:
            # Served at the end of this read (`_feed`): a body in the same read is complete by
            # then, and the request may be served in callbacks (`Handler.serve_now`).
            self.active = msg
            self.starting = msg
        else:
            self.pipeline.append(msg)
            self.update_reading()

    def on_body(self, body: bytes) -> None:
        msg = self.msg
        if msg is None or self.phase or msg.reject is not None:
            return
        self.unpaid = 0
        msg.received += len(body)
        if msg.received > msg.body_limit:
            if msg.body_error is None:
                msg.body_error = BodyTooLargeError(
                    f"request body exceeds the limit of {msg.body_limit} bytes"
                )
                self.stop_parsing()
            msg.wake()
            return
        pieces = msg.body
        if len(body) < PIECE_GATHER:
            last = pieces[-1] if pieces else None
            if isinstance(last, bytearray) and len(last) < PIECE_GATHER:
                last += body
            else:
                pieces.append(bytearray(body))
        else:
            pieces.append(body)
        msg.buffered += len(body)
        msg.wake()
        if msg.buffered > BODY_HIGH_WATER:
            self.update_reading()

    def on_message_complete(self) -> None:
        msg = self.msg
        if msg is None or self.phase:
            return
        msg.complete = True
        self.msg = None
        msg.wake()

    # -- pipelining -------------------------------------------------------------------------

    def _serve(self, msg: Request) -> None:
        """Serve ``msg``: in callbacks when the handler can (`Handler.serve_now`), after its
        small body when that is still coming (`Handler.await_body`), else in a task."""
        self.active = msg
        cycle = RequestCycle(self, msg)
        listener = self.listener
        if listener.serve_now is not None and self.phase == OPEN and not self.eof:
            if msg.complete:
                if self._now(listener.serve_now, cycle):
                    return
            elif listener.await_body is not None and self._now(listener.await_body, cycle):
                cycle.begin()  # in flight from now, as in a task
                self.awaiting = cycle
                self.body_seen = msg.received
                self._set_timer(self.limits.body_timeout_s, self._body_timed_out)
                return
        self._run(cycle)

    @staticmethod
    def _now(step: Callable[[RequestCycle], bool], cycle: RequestCycle) -> bool:
        """``step(cycle)``; a bug in it (logged with its traceback) leaves the request to the
        task path, never the connection's callbacks broken (their checks take nothing)."""
        try:
            return step(cycle)
        except Exception:
            # Logged outside whatever context this reader callback carries (`_run`).
            contextvars.Context().run(log.exception, "request failed")
            return False

    def _run(self, cycle: RequestCycle) -> None:
        # A context of its own (a copy of an empty one), whatever context the caller runs in
        # (a reader callback may carry one captured inside an earlier request's task): nothing
        # of another request reaches its log lines, and nothing needs clearing.
        task = contextvars.Context().run(self.loop.create_task, cycle.run(self.listener.handler))
        if cycle.begun:  # counted in flight already: ended even if cancelled before it runs
            task.add_done_callback(cycle.settle, context=contextvars.Context())
        self.task = task

    def _check_awaited(self) -> None:
        """After a read: serve the request whose body was awaited once the body is whole (or
        broken, or parsing stopped); else, if bytes of it came, its ``bodyTimeout`` anew (the
        task path's rule: the longest pause inside a body)."""
        cycle = self.awaiting
        assert cycle is not None
        msg = cycle.request
        if msg.complete or msg.body_error is not None or self.phase != OPEN:
            self.awaiting = None
            self._cancel_timer()
            serve_now = self.listener.serve_now
            if not (self.phase == OPEN and serve_now is not None and self._now(serve_now, cycle)):
                self._run(cycle)
        elif msg.received != self.body_seen:
            self.body_seen = msg.received
            self._set_timer(self.limits.body_timeout_s, self._body_timed_out)

    def _body_timed_out(self) -> None:
        """``bodyTimeout`` passed inside an awaited body: the task path answers 408, as when it
        waits itself (`RequestCycle._more_body`)."""
        cycle = self.awaiting
        if cycle is None:
            return
        self.awaiting = None
        cycle.request.body_error = RequestTimeoutError(
            f"no request body bytes for {self.limits.body_timeout_ms} ms"
        )
        self.stop_parsing()
        self._run(cycle)

    def cycle_done(self, msg: Request, close: bool) -> None:
        """After a response: next pipelined request, keep-alive wait, or close."""
        self.active = None
        self.task = None
        self.unpaid = 0
        if self.phase == CLOSED:
            return
        if self.pending_refusal is not None:  # a later request was refused while this one ran
            self._write(error_response(self.pending_refusal, close=True))
            self.close()
            return
        if self.eof and not self.pipeline and not self.flow.backlog:
            self._end_linger()  # nothing more can arrive: close once this answer is written
            return
        if close or not msg.keep_alive or not msg.complete or self.listener.state.shutting_down:
            # An unread (or half-read) body leaves the stream unparseable: close.
            self.close()
            return
        if not self.flow.writable.is_set():
            # The client has not read this answer yet: serve nothing more until it does.
            self.waiting_to_serve = True
            self.update_reading()
            return
        self._next()

    def _next(self) -> None:
        """Serve the next pipelined request, or wait for one (head or keep-alive timer)."""
        if self.pipeline:
            self._serve(self.pipeline.popleft())
        elif self.msg is not None and self.in_head:
            self._set_timer(self.limits.head_timeout_s, self._head_timed_out)
        else:
            self._set_timer(self.limits.keepalive_timeout_s, self._idle_timed_out)
        self.update_reading()

    def update_reading(self) -> None:
        """Feed the backlog if parsing may go on; pause or resume reading from the client as
        the pipeline, the unconsumed body, the phase and the client's reading require."""
        flow = self.flow
        if flow.backlog and not self.feeding and not self._parsed_enough():
            data, flow.backlog = flow.backlog, b""
            self._feed(data)  # ends with update_reading
            return
        msg = self.active
        pause = (
            bool(self.pipeline)
            or bool(flow.backlog)
            or bool(self.phase)
            or not flow.writable.is_set()
            or (msg is not None and msg.buffered > BODY_HIGH_WATER)
        )
        if self.msg is not None and self.msg is not msg and self.msg.buffered > BODY_HIGH_WATER:
            pause = True
        if self.phase == CLOSED:
            return
        if pause:
            flow.pause_reading()
        else:
            flow.resume_reading()

    # -- refusals ---------------------------------------------------------------------------

    def stop_parsing(self) -> None:
        """Parse nothing more (a framing error, a refused head or body): pause reading."""
        if self.phase == OPEN:
            self.phase = STOPPED
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self.phase != CLOSED:
            self.flow.pause_reading()

    def _refuse_head(self, exc: RequestError) -> None:
        """A head that cannot be completed (too large, too slow): answer and close, unless a
        request is being served (then only close after it)."""
        self.stop_parsing()
        self._cancel_timer()
        if self.active is None:
            self._write(error_response(exc, close=True))
            status = status_of(exc)
            if self.listener.refusals.admit(self.peer, status):
                log.info("request refused", status=status, reason=exc.message, client=self.peer)
            self.close()
        else:
            self.pipeline.clear()
            self.pending_refusal = exc

    def _framing_error(self, reason: str) -> None:
        msg = self.active
        if msg is not None and not msg.complete:
            # The body of the request being served is broken (bad chunk): fail it.
            msg.body_error = BadRequestError(f"malformed request body: {reason}")
            self.stop_parsing()
            msg.wake()
            return
        self._refuse_head(BadRequestError(f"malformed request: {reason}"))

    def _write(self, data: bytes) -> None:
        if self.phase != CLOSED and self.transport is not None:
            self.transport.write(data)

    # -- timers -----------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        if self.active is not None:
            return
        if self.msg is None and not self.in_head:
            self._end_linger()  # nothing sent yet: just close, as nginx does
            return
        self._refuse_head(
            RequestTimeoutError(
                f"request head not received within {self.limits.headers_timeout_ms} ms"
            )
        )

    def _idle_timed_out(self) -> None:
        if self.active is None and self.msg is None:
            self._end_linger()  # nothing pending: a plain close
        else:
            self.close()

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        """``callback`` in ``delay`` seconds, instead of any earlier deadline.

        Every keep-alive request moves the deadline several times (keep-alive, head, none while
        served): the handle is armed for the earlier of the deadline and `timer_step` from now,
        and kept while it fires no later than the new deadline.  A deadline set within the
        step costs no timer (a handle armed and one cancelled each, before: `call_later` makes
        a libuv timer, its cancel closes it on the next loop iteration); an idle connection's
        handle fires at most once a step early, and re-arms (`_timer_fired`)."""
        now = self.loop.time()
        when = now + delay
        self.deadline, self.on_deadline = when, callback
        timer = self.timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self.timer = self.loop.call_at(min(when, now + self.limits.timer_step_s), self._timer_fired)

    def _cancel_timer(self) -> None:
        """No deadline from now (the armed handle, if any, fires into nothing)."""
        self.on_deadline = None

    def _drop_timer(self) -> None:
        """No deadline and no armed handle (the connection is gone)."""
        self.on_deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timer_fired(self) -> None:
        self.timer = None
        callback = self.on_deadline
        if callback is None:
            return
        now = self.loop.time()
        if self.deadline - now > TIMER_SLACK_S:  # early: the deadline moved on since
            step = self.limits.timer_step_s
            self.timer = self.loop.call_at(min(self.deadline, now + step), self._timer_fired)
            return
        self.on_deadline = None
        callback()

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close after what was written; when the client may still be sending (a refused or
        half-read request), first *linger*: send FIN, read and discard for up to `LINGER_S`,
        so the client reads our answer instead of a reset (nginx ``lingering_close``)."""
        self._cancel_timer()
        transport = self.transport
        if transport is None or self.phase >= LINGERING:
            return
        msg = self.msg or self.active
        if self.phase == OPEN and (msg is None or msg.complete):
            self._end_linger()
            return
        self.phase = LINGERING
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.read_to_discard()
        self._set_timer(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        """Close; if what was written is still unread, abort after ``sendTimeout``."""
        self._cancel_timer()
        transport = self.transport
        if transport is not None and self.phase != CLOSED:
            self.phase = CLOSED
            transport.close()
            if transport.get_write_buffer_size():
                self.loop.call_later(self.limits.send_timeout_s, transport.abort)

    def abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None and self.phase != CLOSED:
            self.phase = CLOSED
            self.transport.abort()

    # -- the client as the supervisor and resolver see it (`supervisor.Requester`) ------------

    @property
    def address(self) -> str | None:
        """The client address of the request being served (`client_address`)."""
        msg = self.active
        return client_address(self.peer, msg.forwarded if msg else [], self.limits.trusted)

    def check_gone(self) -> None:
        """After a half-close, find out whether the client is still there (asked by the
        supervisor while the request waits in the start queue, a few times a second).

        TCP cannot tell a half-close (``shutdown(SHUT_WR)``, still reading) from a close: the
        difference shows only when something is sent, which a closed socket answers with a
        reset.  So the first call sends an interim ``100 Continue`` (HTTP/1.1 clients accept
        1xx answers at any time, RFC 9110 §15.2); the later ones read the socket's error
        (``SO_ERROR``, set by the reset) and, if it is set, abort the connection: its request is
        cancelled as if the client had reset it.  Not for HTTP/1.0 clients (no 1xx for them).
        """
        transport = self.transport
        msg = self.active
        if self.phase == CLOSED or not self.eof or transport is None or msg is None:
            return
        if not self.probed:
            self.probed = True
            if msg.version == "1.1":
                transport.write(CONTINUE)
            return
        sock = transport.get_extra_info("socket")
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock else 0
        except OSError:
            error = 0
        if error:
            log.info("client gone", client=self.address, error=os.strerror(error))
            self.abort()
