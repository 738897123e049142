"""The upstream client (stcs/upstream.py) at the byte level, against raw loopback servers that
answer with exactly the bytes each test gives: chunked, close-delimited, HEAD, 204/304, 1xx,
keep-alive off, garbage, an early close, back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from stcs.upstream import (
    READ_HIGH_WATER,
    UnreachableError,
    UpstreamFailedError,
    UpstreamPool,
)

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


@dataclass(eq=False)
class RawServer:
    """A loopback server answering each request head with ``answer(head)`` (bytes), or with
    nothing (``None``: keeps the connection open)."""

    answer: Callable[[bytes], bytes | None]
    close_after: bool = False
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.AbstractServer | None = None
    reachable: bool = True

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                reply = self.answer(head)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def fixed(reply: bytes, **kw: object) -> RawServer:
    return RawServer(lambda _head: reply, **kw)  # type: ignore[arg-type]


async def test_content_length_body_and_keep_alive_reuse() -> None:
    async with fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: \xc3\xa9\r\n\r\nhello") as srv:
        pool = UpstreamPool()
        for _ in range(3):
            resp = await pool.request(srv, GET, None)
            assert resp.status == 200 and resp.content_length == 5
            assert (b"X-A", b"\xc3\xa9") in resp.headers  # bytes as sent
            assert await resp.read() == b"hello"
            resp.release()
        assert srv.connections == 1  # one kept-alive connection served all three
        pool.close()


async def test_chunked_body_is_decoded() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with fixed(reply) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        assert resp.chunked and resp.content_length is None
        assert b"".join([c async for c in resp.chunks()]) == b"abcde"
        resp.release()
        resp = await pool.request(srv, GET, None)  # and the connection is reusable
        assert await resp.read() == b"abcde"
        resp.release()
        assert srv.connections == 1


async def test_close_delimited_body_ends_at_eof_and_is_not_reused() -> None:
    async with fixed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=True) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        assert await resp.read() == b"until the end"
        assert not resp.keep_alive
        resp.release()
        resp = await pool.request(srv, GET, None)
        assert await resp.read() == b"until the end"
        resp.release()
        assert srv.connections == 2


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(status: int) -> None:
    reply = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status
    async with fixed(reply) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        assert resp.status == status and not resp.has_body
        assert await resp.read() == b""
        resp.release()


async def test_head_answer_has_no_body_and_its_connection_is_not_reused() -> None:
    async with fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n") as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, b"HEAD /x HTTP/1.1\r\n\r\n", None, head_only=True)
        assert resp.status == 200 and resp.content_length == 1000
        assert await resp.read() == b""
        resp.release()
        resp = await pool.request(srv, b"HEAD /x HTTP/1.1\r\n\r\n", None, head_only=True)
        resp.release()
        assert srv.connections == 2


async def test_interim_1xx_is_skipped_for_the_final_answer() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    async with fixed(reply) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        assert resp.status == 201 and await resp.read() == b"ok"
        assert (b"Content-Length", b"2") in resp.headers
        resp.release()


async def test_keep_alive_off_closes_the_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with fixed(reply) as srv:
        pool = UpstreamPool()
        for _ in range(2):
            resp = await pool.request(srv, GET, None)
            assert await resp.read() == b"ok" and not resp.keep_alive
            resp.release()
        assert srv.connections == 2


async def test_garbage_answer_is_upstream_failed() -> None:
    async with fixed(b"SSH-2.0-OpenSSH\r\n\r\n") as srv:
        with pytest.raises(UpstreamFailedError):
            await UpstreamPool().request(srv, GET, None)


async def test_early_close_mid_body_is_upstream_failed() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    async with fixed(reply, close_after=True) as srv:
        resp = await UpstreamPool().request(srv, GET, None)
        with pytest.raises(UpstreamFailedError):
            await resp.read()
        resp.release()


async def test_close_before_any_answer_is_upstream_failed() -> None:
    async with RawServer(lambda _h: None, close_after=True) as srv:
        with pytest.raises(UpstreamFailedError):
            await UpstreamPool().request(srv, GET, None)


async def test_bytes_on_an_idle_connection_retire_it() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"
    async with fixed(reply) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        assert await resp.read() == b"ok"
        resp.release()
        await asyncio.sleep(0.05)
        resp = await pool.request(srv, GET, None)  # not the poisoned connection
        resp.release()
        assert srv.connections == 2


async def test_a_target_that_is_gone_is_never_connected() -> None:
    async with fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as srv:
        srv.reachable = False
        with pytest.raises(UnreachableError):
            await UpstreamPool().request(srv, GET, None)
        assert srv.connections == 0


async def test_refused_connection_is_unreachable() -> None:
    async with fixed(b"") as srv:
        port = srv.port
    srv.port = port  # closed now
    with pytest.raises(UnreachableError):
        await UpstreamPool().request(srv, GET, None)


async def test_streamed_body_is_sent_chunked() -> None:
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    srv = RawServer(lambda _h: None, port=server.sockets[0].getsockname()[1])

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # empty pieces are skipped, never a premature last-chunk
        yield b"de"

    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp = await UpstreamPool().request(srv, head, body(), chunked=True)
    assert resp.status == 200
    resp.release()
    server.close()
    assert received == [head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"]


async def test_a_slow_consumer_pauses_reading_from_upstream() -> None:
    size = 8 * READ_HIGH_WATER
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with fixed(reply) as srv:
        resp = await UpstreamPool().request(srv, GET, None)
        await asyncio.sleep(0.3)  # nobody consumes: at most about the high-water mark buffered
        assert resp._paused
        assert resp._buffered < 2 * READ_HIGH_WATER + 1024 * 1024
        got = 0
        async for chunk in resp.chunks():
            got += len(chunk)
        assert got == size
        resp.release()


async def test_a_101_switch_is_refused_not_tunnelled() -> None:
    async with fixed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\x00\x01") as srv:
        with pytest.raises(UpstreamFailedError):
            await UpstreamPool().request(srv, GET, None)


async def test_fetch_returns_status_and_body_and_reuses_its_connection() -> None:
    """A probe or a count (`UpstreamPool.fetch`) rides the pool: keep-alive, one connection."""
    async with fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n42") as srv:
        pool = UpstreamPool()
        for _ in range(3):
            assert await pool.fetch(srv, "GET", "/c/count", timeout_s=1.0) == (200, b"42")
        assert srv.connections == 1
        assert srv.heads[0] == b"GET /c/count HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % srv.port
        pool.close()


async def test_fetch_sends_a_json_body_with_its_length() -> None:
    async with fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as srv:
        pool = UpstreamPool()
        assert await pool.fetch(srv, "POST", "/g", b'{"ids":[]}', timeout_s=1.0) == (200, b"{}")
        assert b"Content-Length: 10\r\n" in srv.heads[0]
        assert b"Content-Type: application/json\r\n" in srv.heads[0]
        pool.close()


async def test_fetch_times_out_and_never_pools_the_silent_connection() -> None:
    """A wedged child (no answer) costs ``timeout_s``, and its connection is not reused."""
    async with RawServer(lambda _head: None) as srv:
        pool = UpstreamPool()
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await pool.fetch(srv, "GET", "/api/v2/heartbeat", timeout_s=0.2)
        assert asyncio.get_running_loop().time() - started < 2.0
        with pytest.raises(TimeoutError):
            await pool.fetch(srv, "GET", "/api/v2/heartbeat", timeout_s=0.2)
        assert srv.connections == 2
        pool.close()


@pytest.mark.parametrize("way", ["awaited", "watched"])
async def test_a_second_answer_to_one_request_is_dropped_and_the_connection_not_reused(
    way: str,
) -> None:
    """An upstream that answers one request twice (in one write): the first answer is the
    request's, unaltered (the second's status line, headers and body do not leak into it), and
    the connection is never used again — its next bytes belong to no request (found in
    review: the second answer was parsed into the first, the connection pooled)."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-N: 1\r\n\r\nfirst"
    second = b"HTTP/1.1 404 Not Found\r\nContent-Length: 6\r\nX-N: 2\r\n\r\nsecond"
    async with fixed(first + second) as srv:
        pool = UpstreamPool()
        for _ in range(2):
            if way == "awaited":
                resp = await pool.request(srv, GET, None)
            else:  # as a request served in callbacks gets it (`send_now`)
                conn = pool.take_idle(srv) or await pool._get(srv)
                came = asyncio.Event()
                resp = pool.send_now(conn, GET, came.set)
                await asyncio.wait_for(came.wait(), 5)
                await asyncio.sleep(0.05)  # every byte of the write parsed
                assert resp.done
            assert (resp.status, resp.reason) == (200, b"OK")
            assert [v for k, v in resp.headers if k == b"X-N"] == [b"1"]
            assert await resp.read() == b"first"
            resp.release()
        assert srv.connections == 2


async def test_an_answer_left_unread_past_the_high_water_mark_does_not_pool_its_connection() -> (
    None
):
    """An answer just over `READ_HIGH_WATER` whose last read paused reading from the upstream
    and also ended it, released unread (its client left): the connection is not pooled with
    reading paused — the next request on it would wait for ever (found in review)."""
    body = b"x" * (READ_HIGH_WATER + 1000)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with fixed(answer) as srv:
        pool = UpstreamPool()
        resp = await pool.request(srv, GET, None)
        for _ in range(100):  # every byte read, nothing consumed
            if resp.done:
                break
            await asyncio.sleep(0.01)
        resp.release()
        nxt = await asyncio.wait_for(pool.request(srv, GET, None), 5)
        assert nxt.status == 200 and len(await asyncio.wait_for(nxt.read(), 5)) == len(body)
        nxt.release()


def test_a_connection_reset_as_it_opens_is_unreachable_not_a_crash() -> None:
    """A peer that resets each connection as it accepts it (a child starting or stopping, a
    squatter): on uvloop, stcs's default loop, writing on the already-closed transport raised
    RuntimeError, which escaped the readiness probe ("never raises") and failed a start with a
    500 (seen once in the churn bench).  Now UnreachableError: nothing was sent."""
    uvloop = pytest.importorskip("uvloop")

    async def reset(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.WriteTransport)
        transport.abort()

    async def main() -> list[str]:
        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        target = RawServer(lambda _head: None, port=server.sockets[0].getsockname()[1])
        pool = UpstreamPool()
        seen = []
        for _ in range(20):
            with pytest.raises((UnreachableError, UpstreamFailedError)) as caught:
                await pool.fetch(target, "GET", "/x", timeout_s=2)
            seen.append(type(caught.value).__name__)
            with pytest.raises((UnreachableError, UpstreamFailedError)):
                await pool.request(target, GET, None)
        server.close()
        return seen

    assert set(uvloop.run(main())) <= {"UnreachableError", "UpstreamFailedError"}
