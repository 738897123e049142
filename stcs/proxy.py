"""Stream one request to a chroma instance and its response back.

Bodies are streamed both ways; only those up to `SMALL_BODY` with a known length are read whole
(one write instead of a stream of chunks).  Hop-by-hop headers (RFC 9110 §7.6.1: those
named in ``Connection`` plus the fixed set below) are dropped in both directions, and so are the
client's credentials (``Authorization``, ``X-Chroma-Token``): chroma has no use for them and a
token must never leave stcs.  Compressed bodies pass through untouched (no decompression).
Redirects are not followed; there is no total timeout (a big query may run long), only a short
connect timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import aiohttp
import structlog
from aiohttp import web

from stcs.errors import BodyTooLargeError, UpstreamError
from stcs.upstream import UpstreamFailedError, UpstreamPool

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
# Framing headers are set by the upstream client from the body it actually sends.
UPSTREAM_REQUEST_DROP = REQUEST_DROP | {"content-length"}
RESPONSE_DROP = HOP_BY_HOP
SMALL_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}  # web.Response sets it from the body

# Bodies up to this size (bytes) with a known length are read whole (the fast path): one write
# each way instead of a stream of chunks.  Larger ones, and chunked ones, are streamed.
SMALL_BODY = 64 * 1024


def filter_headers(pairs: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """``pairs`` without ``drop`` (lowercase names) and without those that a ``Connection``
    header names (RFC 9110 §7.6.1)."""
    pairs = list(pairs)
    dropped = drop
    named = [v for k, v in pairs if k.lower() == "connection"]
    if named:
        dropped = drop | {t.strip().lower() for v in named for t in v.split(",")}
    return [(k, v) for k, v in pairs if k.lower() not in dropped]


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
    request: web.Request, port: int, pool: UpstreamPool, max_body_size: int
) -> web.StreamResponse:
    """Forward ``request`` to the chroma instance on ``127.0.0.1:port``; stream the answer.

    Raises UnreachableError (nothing was sent: safe to retry), BodyTooLargeError
    (a chunked body over ``max_body_size`` bytes, before any response) or UpstreamError
    (the instance failed mid-request, before any response was sent).  A failure after the
    response started aborts the client connection, so a truncated body is never seen as whole.
    """
    headers = filter_headers(request.headers.items(), UPSTREAM_REQUEST_DROP)
    limited: _LimitedBody | None = None
    body: bytes | AsyncIterator[bytes] | None = None
    length = request.content_length
    if request.body_exists:
        if length is None:
            limited = _LimitedBody(request.content, max_body_size)
            body = limited.chunks()
        elif length <= SMALL_BODY:
            # Fast path (most chroma calls): read it whole, so headers and body go upstream in
            # one write; chroma reads a body whole before it acts anyway.
            body = await request.read()
        else:
            body = request.content.iter_any()
    try:
        upstream = await pool.request(port, request.method, request.raw_path, headers, body, length)
    except (UpstreamFailedError, BodyTooLargeError, ConnectionError, aiohttp.ClientError) as exc:
        if limited is not None and limited.exceeded:
            raise BodyTooLargeError(
                f"request body exceeds the limit of {max_body_size} bytes"
            ) from None
        log.warning("upstream request failed", port=port, error=type(exc).__name__)
        raise UpstreamError("the user's chroma server failed during the request") from exc
    try:
        size = upstream.content_length
        if size is not None and size <= SMALL_BODY and request.method != "HEAD":
            # Fast path: a small answer goes back in one write (status line, headers and
            # body), and an upstream that fails while sending it still gets a clean 502.
            try:
                data = await upstream.read()
            except UpstreamFailedError as exc:
                log.warning("upstream failed mid-response", port=port, error=str(exc))
                raise UpstreamError("the user's chroma server failed during the request") from exc
            return web.Response(
                status=upstream.status,
                reason=upstream.reason,
                headers=filter_headers(upstream.headers, SMALL_RESPONSE_DROP),
                body=data,
            )
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=filter_headers(upstream.headers, RESPONSE_DROP),
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.chunks():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client went away mid-download: ordinary, not an error.  (aiohttp's
            # ClientConnectionResetError, raised by writes to a gone client, is one.)
            log.debug("client disconnected mid-response", port=port)
        except UpstreamFailedError as exc:
            # Upstream died mid-body: the status line is gone already; abort the client's
            # connection so it sees a broken response, not a short one that looks complete.
            log.warning("upstream failed mid-response", port=port, error=str(exc))
            if request.transport is not None:
                request.transport.abort()
        return response
    finally:
        upstream.release()  # back to the pool only after a complete response
