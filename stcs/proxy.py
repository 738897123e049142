"""Stream one request to a chroma instance and its response back.

Bodies are streamed both ways, never read whole.  Hop-by-hop headers (RFC 9110 §7.6.1: those
named in ``Connection`` plus the fixed set below) are dropped in both directions, and so are the
client's credentials (``Authorization``, ``X-Chroma-Token``): chroma has no use for them and a
token must never leave stcs.  Compressed bodies pass through untouched (no decompression).
Redirects are not followed; there is no total timeout (a big query may run long), only a short
connect timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from stcs.errors import BodyTooLargeError, UpstreamError

log = structlog.get_logger("stcs.proxy")

# RFC 9110 §7.6.1 (and RFC 2616 §13.5.1's list, which proxies still honour).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Not forwarded upstream: credentials meant for stcs; Host (set for the upstream); Expect
# (aiohttp's server already answered 100-continue to the client).
REQUEST_DROP = HOP_BY_HOP | {"authorization", "x-chroma-token", "host", "expect"}
RESPONSE_DROP = HOP_BY_HOP
SMALL_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}  # web.Response sets it from the body

# Bodies up to this size (bytes) with a known length are read whole (the fast path): one write
# each way instead of a stream of chunks.  Larger ones, and chunked ones, are streamed.
SMALL_BODY = 64 * 1024

CONNECT_TIMEOUT_S = 2.0
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)


class UpstreamUnreachableError(Exception):
    """The connection to the instance could not be opened: the request never reached chroma,
    so retrying it on a fresh instance is safe."""


def new_upstream_session() -> aiohttp.ClientSession:
    """The one keep-alive `ClientSession` stcs uses for all instances."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=64, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=UPSTREAM_TIMEOUT,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
    )


def filter_headers(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without ``drop`` (lowercase names) and without those that the
    ``Connection`` header names (RFC 9110 §7.6.1)."""
    dropped = drop
    if "Connection" in headers:
        named = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
        dropped = drop | named
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in dropped])


def check_declared_size(request: web.Request, max_body_size: int) -> None:
    """Raise BodyTooLargeError when ``Content-Length`` exceeds ``max_body_size`` bytes."""
    length = request.content_length
    if length is not None and length > max_body_size:
        raise BodyTooLargeError(
            f"request body of {length} bytes exceeds the limit of {max_body_size} bytes"
        )


class _LimitedBody:
    """A chunked request body, streamed, refused once it passes ``limit`` bytes."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False

    async def chunks(self) -> AsyncIterator[bytes]:
        total = 0
        async for chunk in self._content.iter_any():
            total += len(chunk)
            if total > self._limit:
                self.exceeded = True
                raise BodyTooLargeError(f"request body exceeds the limit of {self._limit} bytes")
            yield chunk


async def forward(
    request: web.Request, port: int, session: aiohttp.ClientSession, max_body_size: int
) -> web.StreamResponse:
    """Forward ``request`` to the chroma instance on ``127.0.0.1:port``; stream the answer.

    Raises UpstreamUnreachableError (nothing was sent: safe to retry), BodyTooLargeError
    (a chunked body over ``max_body_size`` bytes, before any response) or UpstreamError
    (the instance failed mid-request, before any response was sent).  A failure after the
    response started aborts the client connection, so a truncated body is never seen as whole.
    """
    headers = filter_headers(request.headers, REQUEST_DROP)
    limited: _LimitedBody | None = None
    data: object = None
    if request.body_exists:
        length = request.content_length
        if length is None:
            limited = _LimitedBody(request.content, max_body_size)
            data = limited.chunks()
        elif length <= SMALL_BODY:
            # Fast path (most chroma calls): read it whole, so headers and body go upstream in
            # one write; chroma reads a body whole before it acts anyway.
            data = await request.read()
        else:
            data = request.content
    url = URL(f"http://127.0.0.1:{port}{request.raw_path}", encoded=True)
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
        )
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnreachableError(str(exc)) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, BodyTooLargeError) as exc:
        if limited is not None and limited.exceeded:
            raise BodyTooLargeError(
                f"request body exceeds the limit of {max_body_size} bytes"
            ) from None
        log.warning("upstream request failed", port=port, error=type(exc).__name__)
        raise UpstreamError("the user's chroma server failed during the request") from exc
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY and request.method != "HEAD":
        # Fast path: a small answer goes back in one write (status line, headers and body),
        # and an upstream that fails while sending it still gets a clean 502.
        try:
            body = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            upstream.close()
            log.warning("upstream failed mid-response", port=port, error=type(exc).__name__)
            raise UpstreamError("the user's chroma server failed during the request") from exc
        upstream.release()
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=filter_headers(upstream.headers, SMALL_RESPONSE_DROP),
            body=body,
        )
    complete = False
    try:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=filter_headers(upstream.headers, RESPONSE_DROP),
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The client went away mid-download: ordinary, not an error.  (Checked
                    # apart from upstream reads: aiohttp's ClientConnectionResetError is both a
                    # ConnectionError and a ClientError.)
                    log.debug("client disconnected mid-response", port=port)
                    return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Upstream died mid-body: the status line is gone already; abort the client's
            # connection so it sees a broken response, not a short one that looks complete.
            log.warning("upstream failed mid-response", port=port, error=type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        complete = True
        return response
    finally:
        # A connection with an unread body must not go back to the pool.
        if complete:
            upstream.release()
        else:
            upstream.close()
