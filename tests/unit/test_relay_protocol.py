"""The data plane's client protocol in-process (as uvicorn's ``tests/protocols/test_http.py``):
the real `ClientConnection` and real httptools, fed bytes directly; a fake transport records what
is written and every pause and resume of reading; a fake handler stands in for auth, lease and
chroma (it records what reached it and answers a small JSON echo).

Framing and smuggling shapes, the edge limits (head size, header count, head and keep-alive
timeouts, connections), pipelining and flow control.  What needs a real chroma child (leases,
instances, the real handler's order of checks) stays in tests/e2e/test_relay.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from stcs.answers import status_of
from stcs.errors import RequestError
from stcs.metrics import Metrics
from stcs.relay import ClientConnection, Limits, Listener
from stcs.relay.cycle import RequestCycle
from stcs.relay.protocol import CLOSED, FEED_SLICE, LINGERING, MAX_PIPELINED
from stcs.relay.wire import error_response, json_response

TOKEN = "3f0b6c1e-0000-4000-8000-000000000001"


class FakeTransport(asyncio.Transport):
    """Records writes, pause/resume of reading, FIN, close and abort."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.pauses = 0
        self.resumes = 0
        self.eof_written = False
        self.closing = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.written += data

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True
        self.resumes += 1

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    @property
    def ended(self) -> bool:
        """The client sees the end of the stream: FIN (lingering) or close."""
        return self.eof_written or self.closing


@dataclass
class FakeState:
    """The counts a `Listener` keeps on the serving process (`stcs.state.State`)."""

    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: Metrics = field(default_factory=Metrics)
    shutting_down: bool = False


class EchoHandler:
    """Stands in for `stcs.relay.Handler`: reads the whole body, records the request, answers
    200 with ``{"path", "body_len"}``.  While ``gate`` is clear, requests wait before reading
    their body (a slow upstream)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, cycle: RequestCycle) -> tuple[int, bool]:
        await self.gate.wait()
        request = cycle.request
        try:
            body = await cycle.whole_body() if request.has_body else b""
        except RequestError as exc:  # as `stcs.relay.Handler` answers a broken body
            cycle.write(error_response(exc, close=True))
            return status_of(exc), True
        self.seen.append(
            {"path": request.url.decode("latin-1"), "headers": request.headers, "body": body}
        )
        answer = json.dumps({"path": request.url.decode("latin-1"), "body_len": len(body)})
        cycle.write(json_response(200, b"OK", answer.encode(), False))
        return 200, False


def limits(**overrides: Any) -> Limits:
    values: dict[str, Any] = {
        "head_timeout_s": 0.3,
        "body_timeout_s": 0.3,
        "send_timeout_s": 0.3,
        "keepalive_timeout_s": 0.6,
        "headers_timeout_ms": 300,
        "body_timeout_ms": 300,
        "send_timeout_ms": 300,
        "max_header_size": 8192,
        "max_headers_count": 100,
        "max_body_size": 1024 * 1024,
        "max_connections": 4,
    }
    values.update(overrides)
    return Limits(**values)


@pytest.fixture
async def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
async def listener(handler: EchoHandler) -> Listener:
    return Listener(FakeState(), handler, limits(), loop=asyncio.get_running_loop())


def connect(listener: Listener) -> tuple[ClientConnection, FakeTransport]:
    conn = listener()
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Let the loop run until ``check()`` is true (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.002)


def responses(data: bytes | bytearray) -> list[tuple[int, dict[str, str], bytes]]:
    """The complete responses in ``data`` (parsed by httptools), in order."""
    found: list[tuple[int, dict[str, str], bytes]] = []

    class Collect:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            found.append((parser.get_status_code(), self.headers, self.body))
            self.headers, self.body = {}, b""

    parser = httptools.HttpResponseParser(Collect())
    rest = bytes(data)
    while rest.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        rest = rest[25:]
    with contextlib.suppress(httptools.HttpParserError):  # cut short: complete ones count
        parser.feed_data(rest)
    return found


def statuses(transport: FakeTransport) -> list[int]:
    return [status for status, _, _ in responses(transport.written)]


def head(method: str, target: str, *extra: str, token: str | None = TOKEN) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: stcs"]
    if token:
        lines.append(f"X-Chroma-Token: {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- framing and smuggling ----------------------------------------------------------------

SMUGGLING = {
    "cl-and-te": (b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", 400),
    "te-and-cl": (b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n", 400),
    "duplicate-cl-same": (b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc", 400),
    "duplicate-cl-differ": (b"Content-Length: 3\r\nContent-Length: 30\r\n", b"abc", 400),
    "cl-with-sign": (b"Content-Length: +3\r\n", b"abc", 400),
    "cl-list": (b"Content-Length: 3, 3\r\n", b"abc", 400),
    "te-gzip-chunked": (b"Transfer-Encoding: gzip, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 501),
    "te-chunked-gzip": (b"Transfer-Encoding: chunked, gzip\r\n", b"", 400),
    "te-identity": (b"Transfer-Encoding: identity\r\n", b"", 501),
    "bad-chunk-size": (b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n", 400),
    "chunk-no-crlf": (b"Transfer-Encoding: chunked\r\n", b"3\r\nabcX0\r\n\r\n", 400),
    "obs-fold": (b"X-A: a\r\n b\r\n", b"", 400),
    "space-before-colon": (b"Content-Length : 3\r\n", b"abc", 400),
    "lf-only": (b"X-A: a\nX-B: b\r\n", b"", 400),
    "nul-in-value": (b"X-A: a\x00b\r\n", b"", 400),
    "duplicate-token": (b"X-Chroma-Token: " + b"0" * 8 + b"\r\n", b"", 400),
    "expect-other": (b"Expect: 200-ok\r\n", b"", 400),
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
async def test_smuggling_shapes_are_refused_and_close(
    listener: Listener, handler: EchoHandler, shape: str
) -> None:
    framing, body, status = SMUGGLING[shape]
    conn, transport = connect(listener)
    conn.data_received(
        f"POST /echo/smuggle HTTP/1.1\r\nHost: stcs\r\nX-Chroma-Token: {TOKEN}\r\n".encode()
        + framing
        + b"\r\n"
        + body
        + head("GET", "/echo/second")  # a second request that must never be read as one
    )
    await until(lambda: transport.ended)
    [(got, _, payload)] = responses(transport.written)
    assert got == status, payload
    assert json.loads(payload)["error"] == "InvalidArgumentError"
    assert handler.seen == []


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET http://evil/echo/x HTTP/1.1\r\nHost: evil\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: stcs\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n",
        b"GET /echo/ws HTTP/1.1\r\nHost: stcs\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"GET /echo/h2c HTTP/1.1\r\nHost: stcs\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n",
    ],
    ids=["absolute-form", "asterisk", "connect", "websocket", "h2c"],
)
async def test_unroutable_targets_are_4xx_not_500(
    listener: Listener, handler: EchoHandler, request_head: bytes
) -> None:
    conn, transport = connect(listener)
    conn.data_received(request_head + f"X-Chroma-Token: {TOKEN}\r\n\r\n".encode())
    await until(lambda: transport.ended)
    [(status, _, payload)] = responses(transport.written)
    assert status == 400, payload
    assert json.loads(payload)["error"] == "InvalidArgumentError"
    assert handler.seen == []


# -- head limits ----------------------------------------------------------------------------


async def test_head_over_max_header_size_is_431(listener: Listener, handler: EchoHandler) -> None:
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/x", "X-Big: " + "a" * 20000))
    await until(lambda: transport.ended)
    assert statuses(transport) == [431]
    conn, transport = connect(listener)  # many small header lines: over maxHeadersCount
    conn.data_received(head("GET", "/echo/x", *[f"X-{i}: 1" for i in range(150)]))
    await until(lambda: transport.ended)
    assert statuses(transport) == [431]
    assert handler.seen == []


async def test_unfinished_huge_head_is_cut_at_the_limit(listener: Listener) -> None:
    """A head that never ends is refused once it passes maxHeaderSize: 431, the connection
    closes, and nothing the client sends after is kept (no backlog, nothing parsed)."""
    conn, transport = connect(listener)
    conn.data_received(b"GET /echo/x HTTP/1.1\r\n")
    sent = 0
    while not transport.written and sent < 1024 * 1024:
        conn.data_received(b"X-Pad: " + b"a" * 8000 + b"\r\n")
        sent += 8010
    assert statuses(transport) == [431]
    assert sent <= 8192 + 8010  # refused at the first read past the limit
    assert conn.phase == LINGERING and transport.eof_written
    for _ in range(100):  # lingering: read and discarded
        conn.data_received(b"X-Pad: " + b"a" * 8000 + b"\r\n")
    assert conn.flow.backlog == b"" and conn.msg is not None and conn.head_bytes <= 2 * 8192


# -- pipelining and keep-alive ------------------------------------------------------------


async def test_keep_alive_connection_serves_many_requests_and_idles_out(
    listener: Listener,
) -> None:
    conn, transport = connect(listener)
    for i in range(20):
        conn.data_received(head("GET", f"/echo/{i}"))
        await until(lambda i=i: len(responses(transport.written)) == i + 1)  # type: ignore[misc]
    answers = responses(transport.written)
    assert [json.loads(body)["path"] for _, _, body in answers] == [f"/echo/{i}" for i in range(20)]
    assert all(h.get("connection") != "close" for _, h, _ in answers)
    started = time.monotonic()
    await until(lambda: transport.closing)
    assert time.monotonic() - started > 0.5  # keepAliveTimeout 0.6 s, not the 0.3 s head timeout


async def test_pipelined_requests_are_answered_in_order_with_their_bodies(
    listener: Listener,
) -> None:
    conn, transport = connect(listener)
    conn.data_received(
        head("GET", "/echo/a-1")
        + head("POST", "/echo/b-1", "Content-Length: 5")
        + b"hello"
        + head("GET", "/echo/a-2")
        + head("POST", "/echo/b-2", "Transfer-Encoding: chunked")
        + b"3\r\nabc\r\n0\r\n\r\n"
    )
    await until(lambda: len(responses(transport.written)) == 4)
    answers = [json.loads(body) for _, _, body in responses(transport.written)]
    assert [(a["path"], a["body_len"]) for a in answers] == [
        ("/echo/a-1", 0),
        ("/echo/b-1", 5),
        ("/echo/a-2", 0),
        ("/echo/b-2", 3),
    ]


async def test_a_bad_pipelined_request_is_refused_right_after_the_current_one(
    listener: Listener, handler: EchoHandler
) -> None:
    handler.gate.clear()  # the first request is slow
    conn, transport = connect(listener)
    conn.data_received(
        head("POST", "/echo/first", "Content-Length: 2") + b"ok" + b"GET\x01 / HTTP/1.1\r\n\r\n"
    )
    await asyncio.sleep(0.05)
    assert transport.written == b""  # the refusal waits for the answer before it
    handler.gate.set()
    started = time.monotonic()
    await until(lambda: transport.ended)
    assert statuses(transport) == [200, 400]
    assert time.monotonic() - started < 0.25  # right after, not at the head timeout (0.3 s)


async def test_a_client_that_half_closes_after_its_requests_gets_every_answer(
    listener: Listener, handler: EchoHandler
) -> None:
    """A half-close after complete requests is not a hang-up: every request is answered,
    then the connection closes."""
    for count in (1, 5):
        handler.gate.clear()
        conn, transport = connect(listener)
        conn.data_received(b"".join(head("GET", f"/echo/{i}") for i in range(count)))
        assert conn.eof_received() is True  # keep the transport open for the answers
        handler.gate.set()
        await until(lambda t=transport: t.closing)  # type: ignore[misc]
        answers = responses(transport.written)
        assert [json.loads(b)["path"] for _, _, b in answers] == [
            f"/echo/{i}" for i in range(count)
        ]


# -- timeouts -----------------------------------------------------------------------------


async def test_slowloris_head_gets_408_at_the_head_timeout(listener: Listener) -> None:
    conn, transport = connect(listener)
    started = time.monotonic()
    conn.data_received(b"GET /echo/x HTTP/1.1\r\n")
    for _ in range(100):  # one header byte every 20 ms: never finishes
        if transport.written:
            break
        conn.data_received(b"X")
        await asyncio.sleep(0.02)
    assert statuses(transport) == [408]
    assert time.monotonic() - started < 1.5  # headersTimeout 0.3 s, not the bytes' pace
    assert transport.ended


async def test_idle_new_connection_is_closed_at_the_head_timeout(listener: Listener) -> None:
    _, transport = connect(listener)
    started = time.monotonic()
    await until(lambda: transport.closing)
    assert 0.25 < time.monotonic() - started < 2
    assert transport.written == b""  # nothing was asked: a plain close


async def test_a_slow_head_after_a_request_times_out_from_its_first_byte(
    handler: EchoHandler,
) -> None:
    """The keep-alive deadline (long) is followed by a head deadline (short): the connection's
    timer handle, armed after the first request, must not outlast the head's deadline."""
    listener = Listener(
        FakeState(), handler, limits(keepalive_timeout_s=5.0), loop=asyncio.get_running_loop()
    )
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/first"))
    await until(lambda: statuses(transport) == [200])
    await asyncio.sleep(0.4)  # idle past the head timeout: the keep-alive wait's handle is armed
    started = time.monotonic()
    conn.data_received(b"GET /echo/slow HTTP/1.1\r\nHost: stcs\r\n")  # and then nothing
    await until(lambda: len(statuses(transport)) == 2)
    took = time.monotonic() - started
    assert statuses(transport) == [200, 408]
    assert 0.25 < took < 1.0  # headersTimeout 0.3 s from the first byte, not keep-alive's 5 s


async def test_an_idle_connection_closes_at_keep_alive_after_a_long_head_timeout(
    handler: EchoHandler,
) -> None:
    """The head deadline (long) is followed by the keep-alive one (short): the idle connection
    closes at keepAliveTimeout, not when the head's timer would have fired."""
    listener = Listener(
        FakeState(), handler, limits(head_timeout_s=5.0), loop=asyncio.get_running_loop()
    )
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/one"))
    await until(lambda: statuses(transport) == [200])
    started = time.monotonic()
    await until(lambda: transport.closing)
    assert 0.55 < time.monotonic() - started < 1.5  # keepAliveTimeout 0.6 s
    conn.connection_lost(None)
    assert conn.timer is None  # no handle left holding the closed connection


async def test_a_connection_busy_past_its_timeouts_is_not_closed_early(
    listener: Listener,
) -> None:
    """Requests every 0.2 s for 1.5 s (past the 0.3 s head and 0.6 s keep-alive timeouts):
    each moves the deadline, so none of the early timer wake-ups closes the connection."""
    conn, transport = connect(listener)
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < 1.5:
        conn.data_received(head("GET", f"/echo/{count}"))
        count += 1
        await until(lambda n=count: len(statuses(transport)) == n)  # type: ignore[misc]
        await asyncio.sleep(0.2)
    assert not transport.closing
    assert statuses(transport) == [200] * count
    idle = time.monotonic()
    await until(lambda: transport.closing)
    assert time.monotonic() - idle > 0.35  # keep-alive 0.6 s from the last answer (minus the sleep)


class TimerCountingLoop:
    """The running loop, counting the timers armed through it (`call_at`, `call_later`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.armed = 0

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.armed += 1
        return self.loop.call_at(when, callback, *args)

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.armed += 1
        return self.loop.call_later(delay, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


async def test_keep_alive_requests_arm_no_timer_each(handler: EchoHandler) -> None:
    """The head and keep-alive deadlines of a keep-alive request move one timer handle: 50
    requests arm a handful of timers, not two each (a libuv timer made and closed per
    deadline, issue 24)."""
    loop = TimerCountingLoop(asyncio.get_running_loop())
    listener = Listener(FakeState(), handler, limits(), loop=loop)  # type: ignore[arg-type]
    conn, transport = connect(listener)
    for i in range(50):
        conn.data_received(head("GET", f"/echo/{i}"))
        await until(lambda i=i: len(statuses(transport)) == i + 1)  # type: ignore[misc]
    assert statuses(transport) == [200] * 50
    assert loop.armed <= 5


# -- connection limit ---------------------------------------------------------------------


async def test_connections_beyond_max_connections_get_503_and_health_recovers(
    listener: Listener,
) -> None:
    held = [connect(listener) for _ in range(4)]  # maxConnections 4
    _, transport = connect(listener)
    [(status, headers, payload)] = responses(transport.written)
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(payload)["error"] == "RateLimitError"
    assert transport.closing
    held[0][0].connection_lost(None)
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/after"))
    await until(lambda: statuses(transport) == [200])


# -- flow control -------------------------------------------------------------------------


async def test_pipelined_flood_to_a_client_that_never_reads_stays_bounded(
    listener: Listener, handler: EchoHandler
) -> None:
    """While the client reads none of our answers (its socket buffer full: pause_writing),
    nothing more is served or parsed, and reading from it stays paused."""
    conn, transport = connect(listener)
    conn.pause_writing()  # the kernel's buffer to the client is full
    assert not transport.reading
    one = head("GET", "/echo/x")
    flood = one * 2000
    conn.data_received(flood)
    await asyncio.sleep(0.05)
    assert len(handler.seen) == 1  # the first one; its answer waits for the client
    assert len(conn.pipeline) <= MAX_PIPELINED + FEED_SLICE // len(one)  # the slice's last
    assert len(conn.flow.backlog) > len(flood) // 2  # the rest waits as raw bytes
    assert not transport.reading
    conn.resume_writing()  # the client reads again: all served, in order
    await until(lambda: len(handler.seen) == 2000)
    assert transport.reading


async def test_pipelined_requests_that_are_never_read_cost_little_memory(
    listener: Listener, handler: EchoHandler
) -> None:
    """Thousands of tiny pipelined requests in one read are parsed only a few at a time ahead
    of the one being served; the rest waits as raw bytes, reading paused."""
    handler.gate.clear()  # the first request never ends
    conn, transport = connect(listener)
    one = b"GET /health HTTP/1.1\r\nHost: s\r\n\r\n"
    flood = one * 8000  # 264 KB: one read
    conn.data_received(flood)
    # Parsing stops at the slice that reaches MAX_PIPELINED: ~340 MB on 50 connections before.
    assert MAX_PIPELINED <= len(conn.pipeline) <= MAX_PIPELINED + FEED_SLICE // len(one)
    assert len(conn.flow.backlog) > len(flood) - 20 * 1024
    assert not transport.reading and transport.pauses == 1


async def test_a_client_that_stops_reading_is_aborted_at_the_send_timeout(
    listener: Listener,
) -> None:
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/x"))
    await until(lambda: statuses(transport) == [200])
    conn.pause_writing()
    started = time.monotonic()
    await until(lambda: transport.aborted)
    assert time.monotonic() - started > 0.25  # sendTimeout 0.3 s


async def test_a_client_that_reads_again_in_time_is_not_aborted(listener: Listener) -> None:
    conn, transport = connect(listener)
    conn.pause_writing()
    await asyncio.sleep(0.1)
    conn.resume_writing()
    await asyncio.sleep(0.4)  # past the 0.3 s sendTimeout
    assert not transport.aborted


async def test_an_unconsumed_body_pauses_reading_past_its_high_water_mark(
    listener: Listener, handler: EchoHandler
) -> None:
    handler.gate.clear()  # the handler does not read the body yet
    conn, transport = connect(listener)
    conn.data_received(head("POST", "/echo/up", "Transfer-Encoding: chunked"))
    piece = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    for _ in range(9):  # 288 KiB, over the 256 KiB high-water mark
        conn.data_received(piece)
    assert not transport.reading
    handler.gate.set()  # consumed: reading resumes, the rest arrives
    await until(lambda: transport.reading)
    conn.data_received(b"0\r\n\r\n")
    await until(lambda: statuses(transport) == [200])
    assert len(handler.seen[0]["body"]) == 9 * 0x8000


async def test_a_body_in_tiny_chunks_costs_its_size_not_an_object_per_chunk(
    listener: Listener, handler: EchoHandler
) -> None:
    handler.gate.clear()  # the body is not consumed
    conn, _ = connect(listener)
    conn.data_received(head("POST", "/echo/x", "Transfer-Encoding: chunked"))
    conn.data_received(b"2\r\nab\r\n" * 32000)  # 224 KB on the wire, 64 KB of data
    request = conn.active
    assert request is not None and request.buffered == 64000
    assert len(request.body) <= 64000 // 4096 + 1  # ~32,000 objects before


# -- trailers -----------------------------------------------------------------------------


async def test_trailers_are_not_forwarded_and_are_bounded(
    listener: Listener, handler: EchoHandler
) -> None:
    conn, transport = connect(listener)
    conn.data_received(
        head("POST", "/echo/t", "Transfer-Encoding: chunked")
        + b"5\r\nhello\r\n0\r\nX-Injected: from-trailer\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    await until(lambda: statuses(transport) == [200])
    [seen] = handler.seen
    assert seen["body"] == b"hello"
    names = {k.lower() for k, _ in seen["headers"]}
    assert b"x-injected" not in names and b"x-forwarded-for" not in names
    assert conn.active is None and not conn.pipeline
    conn, transport = connect(listener)  # an endless trailer section: refused, not buffered
    conn.data_received(head("POST", "/echo/t", "Transfer-Encoding: chunked") + b"0\r\n")
    for _ in range(100):
        if transport.ended:
            break
        conn.data_received(b"a: b\r\n" * 1000)
        await asyncio.sleep(0)
    await until(lambda: transport.ended)
    assert statuses(transport) == [400]


# -- the handler's answer -------------------------------------------------------------------


async def test_a_handler_that_fails_gets_a_500_and_the_connection_closes() -> None:
    async def broken(cycle: RequestCycle) -> tuple[int, bool]:
        raise RuntimeError("bug")

    state = FakeState()
    listener = Listener(state, broken, limits(), loop=asyncio.get_running_loop())
    conn, transport = connect(listener)
    conn.data_received(head("GET", "/echo/x"))
    await until(lambda: transport.ended)
    assert statuses(transport) == [500]
    assert state.in_flight == 0 and state.idle.is_set()


async def test_the_body_is_streamed_with_back_pressure(listener: Listener) -> None:
    """A body the handler streams arrives whole, in order, however the reads cut it."""

    async def streaming(cycle: RequestCycle) -> tuple[int, bool]:
        total = 0
        stream: AsyncIterator[bytes] = cycle.stream_body()
        async for chunk in stream:
            total += len(chunk)
        cycle.write(json_response(200, b"OK", b'{"n": %d}' % total, False))
        return 200, False

    streamed = Listener(FakeState(), streaming, limits(), loop=asyncio.get_running_loop())
    conn, transport = connect(streamed)
    body = b"y" * (600 * 1024)
    data = head("PUT", "/echo/s", f"Content-Length: {len(body)}") + body
    for start in range(0, len(data), 50_000):
        conn.data_received(data[start : start + 50_000])
        await asyncio.sleep(0)
    await until(lambda: bool(responses(transport.written)))
    [(status, _, payload)] = responses(transport.written)
    assert status == 200 and json.loads(payload)["n"] == len(body)
    assert conn.phase != CLOSED


async def test_reloaded_limits_apply_to_new_connections_and_open_ones_keep_theirs(
    listener: Listener,
) -> None:
    """SIGHUP (`stcs.reload` → `Relay.apply`): a smaller ``maxHeaderSize`` refuses the next
    connection's big head with 431; a connection accepted before keeps its limits."""
    before, before_transport = connect(listener)
    listener.apply_limits(limits(max_header_size=1024))
    after, after_transport = connect(listener)
    big = head("GET", "/echo/x", "X-Pad: " + "p" * 2000)
    before.data_received(big)
    after.data_received(big)
    await until(lambda: bool(before_transport.written) and bool(after_transport.written))
    assert statuses(before_transport) == [200]
    assert statuses(after_transport) == [431]


# -- the body path: what a request with a body costs (issue 24) -----------------------------


@contextlib.contextmanager
def counting_tasks() -> Any:
    """Count the tasks created on the running loop meanwhile (``counted[0]``)."""
    loop = asyncio.get_running_loop()
    counted = [0]
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        counted[0] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield counted
    finally:
        loop.set_task_factory(previous)


async def test_a_body_after_its_head_costs_one_task_not_one_per_wait(
    listener: Listener, handler: EchoHandler
) -> None:
    """Head and body in separate reads (as http.client and httpx send them): the cycle waits
    for the body on a future and one loop timer, not ``asyncio.wait_for`` (a task and a
    timer per wait: 2 tasks per request before, and one more per further piece)."""
    conn, transport = connect(listener)
    body = b"q" * 7800
    with counting_tasks() as counted:
        conn.data_received(head("POST", "/echo/q", f"Content-Length: {len(body)}"))
        for _ in range(3):
            await asyncio.sleep(0)  # the cycle runs and waits for the body
        for start in range(0, len(body), 2600):  # and the body comes in three pieces
            conn.data_received(body[start : start + 2600])
            await asyncio.sleep(0)
        await until(lambda: statuses(transport) == [200])
    assert counted[0] == 1  # the cycle's own task
    assert len(handler.seen[0]["body"]) == len(body)
    assert conn.active is None and conn.phase != CLOSED


async def test_a_stalled_body_still_gets_408_at_the_body_timeout(
    listener: Listener, handler: EchoHandler
) -> None:
    conn, transport = connect(listener)
    started = time.monotonic()
    conn.data_received(head("POST", "/echo/slow", "Content-Length: 100") + b"x" * 10)
    await until(lambda: transport.ended)
    assert 0.25 < time.monotonic() - started < 3.0  # bodyTimeout 0.3 s
    assert statuses(transport) == [408]
    assert listener.state.in_flight == 0


async def test_a_client_that_leaves_mid_body_ends_its_cycle(listener: Listener) -> None:
    conn, transport = connect(listener)
    conn.data_received(head("POST", "/echo/gone", "Content-Length: 100") + b"x" * 10)
    for _ in range(3):
        await asyncio.sleep(0)
    request = conn.active
    assert request is not None and request.waiter is not None
    conn.connection_lost(None)
    await until(lambda: listener.state.in_flight == 0)
    assert request.waiter is None and not transport.written
