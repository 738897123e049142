"""What a Python relay on this event loop costs at the least, per request (issue 24): not stcs.

    python scripts/reference/floor-request-path.py UPSTREAM_PORT PORT pipe|essentials|bare

pipe: a TCP pipe, one upstream connection per client connection, bytes relayed as read, nothing
  parsed: the floor of any asyncio relay (uvloop).
essentials: what stcs's data plane must do per request and nothing else, in protocol callbacks
  (no task, no coroutine, no future): parse the head (httptools), the token to a user (a dict),
  a lease count, the head filtered (stcs.relay.wire.filter_headers) and sent with a small body
  in one write over a pooled keep-alive connection, the answer parsed (httptools) and relayed in
  one write, stcs's metrics (`stcs.metrics.Metrics.observe_request`) and one request line
  through stcs's structlog configuration (UUID mode: user ids hidden).  No edge limits, no
  timeouts, no back-pressure, no errors handled: a measuring device, never a server.
bare: essentials without the metrics and the request line (what those two cost, timed).

Instructions per request were counted as `scripts/bench` counts stcs's (valgrind callgrind, 300
keep-alive heartbeats one at a time); figures in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httptools
import structlog
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stcs import log as stcs_log
from stcs.metrics import Metrics
from stcs.relay.wire import (
    REQUEST_DROP_FRAMING,
    RESPONSE_DROP_FRAMING,
    filter_headers,
    response_head,
)

UPSTREAM, PORT, MODE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ACCOUNTED = MODE == "essentials"  # metrics and a request line
stcs_log.configure("info", json=True, user_ids_are_secret=True)
log = structlog.get_logger("stcs.relay")
metrics = Metrics()
leases: dict[str, int] = {}
pool: list[Upstream] = []


class PipeUp(asyncio.Protocol):
    def __init__(self, down: PipeDown) -> None:
        self.down = down

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.down.transport.is_closing():
            self.down.transport.write(data)


class PipeDown(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.up: PipeUp | None = None
        self.pending: list[bytes] = []
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.up = await loop.create_connection(lambda: PipeUp(self), "127.0.0.1", UPSTREAM)
        self.up.transport.writelines(self.pending)

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.transport.close()


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.down: Essentials | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        down, self.down = self.down, None
        pool.append(self)
        if down is not None:
            down.answer(self.parser.get_status_code(), self.headers, b"".join(self.body))


class Essentials(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.peer = transport.get_extra_info("peername")[0]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.token = b"00000000-0000-4000-8000-000000000000"
        self.body: list[bytes] = []
        self.started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() == b"x-chroma-token":
            self.token = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.user = self.token.decode("latin-1").lower()
        leases[self.user] = leases.get(self.user, 0) + 1
        self.method = self.parser.get_method()
        body = b"".join(self.body)
        parts = [b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (self.method, self.url, UPSTREAM)]
        parts.extend(
            b"%s: %s\r\n" % pair for pair in filter_headers(self.headers, REQUEST_DROP_FRAMING)
        )
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        up = pool.pop()
        up.down = self
        up.transport.write(b"".join(parts) + body)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        leases[self.user] -= 1
        duration = time.monotonic() - self.started
        method = self.method.decode("latin-1")
        if ACCOUNTED:
            metrics.observe_request(method, status, duration)
            log.info(
                "request",
                method=method,
                path=self.url.partition(b"?")[0].decode("latin-1"),
                status=status,
                duration_ms=round(duration * 1000, 2),
                client=self.peer,
                user_id=self.user,
                cold_start=False,
                upstream_port=UPSTREAM,
            )
        relayed = filter_headers(headers, RESPONSE_DROP_FRAMING)
        relayed.append((b"Content-Length", b"%d" % len(body)))
        if not self.transport.is_closing():
            self.transport.write(response_head(status, b"OK", relayed, False) + body)


async def main() -> None:
    loop = asyncio.get_running_loop()
    if MODE != "pipe":
        for _ in range(64):
            _, up = await loop.create_connection(Upstream, "127.0.0.1", UPSTREAM)
            pool.append(up)
    server = await loop.create_server(PipeDown if MODE == "pipe" else Essentials, "127.0.0.1", PORT)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
