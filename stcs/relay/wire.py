"""The HTTP/1.1 bytes of the data plane: which headers are relayed, response heads, chroma's
JSON error answers, the client's address and token as the head gives them.  Pure functions.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from typing import Any

from stcs.answers import ErrorAnswer, answer_for
from stcs.auth import TOKEN_HEADER
from stcs.auth import extract_token as _extract_token
from stcs.config import Networks
from stcs.errors import RequestError

# RFC 9110 §7.6.1 (and RFC 2616 §13.5.1's list, which proxies still honour).
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
# Not relayed to chroma: the client's credentials (a token must never leave stcs), Host and the
# framing headers (set from the body actually sent), Expect (answered here).
REQUEST_DROP = HOP_BY_HOP | {b"authorization", b"x-chroma-token", b"host", b"expect"}
REQUEST_DROP_FRAMING = REQUEST_DROP | {b"content-length"}
RESPONSE_DROP = HOP_BY_HOP
RESPONSE_DROP_FRAMING = HOP_BY_HOP | {b"content-length"}
# To the control plane the credentials go on (the admin key may come as a Bearer token).
CONTROL_DROP = HOP_BY_HOP | {b"host", b"expect", b"content-length"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()  # this process's requests: unique across restarts


def next_request_id() -> str:
    """A request id unique within and across runs (a random per-process prefix and a counter;
    cheaper than a UUID on the hot path)."""
    return f"{_ID_PREFIX}{next(_REQUEST_IDS):08x}"


def response_head(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], close: bool
) -> bytes:
    """A response's status line and header lines (``Connection: close`` when ``close``)."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    parts.extend(b"%s: %s\r\n" % pair for pair in headers)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def json_response(status: int, reason: bytes, body: bytes, close: bool, extra: Any = ()) -> bytes:
    """A whole response with a JSON ``body``; ``extra`` is (name, value) str pairs."""
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
    return response_head(status, reason, headers, close) + body


# Reason phrases (RFC 9110 §15), fixed here: Python's HTTPStatus renames some across versions.
_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


def error_response(exc: RequestError, close: bool) -> bytes:
    """The whole response for ``exc`` as `stcs.answers` maps it: status, ``Retry-After``,
    chroma's JSON error body."""
    return answer_response(answer_for(exc), close)


def answer_response(answer: ErrorAnswer, close: bool) -> bytes:
    status = answer.status
    return json_response(status, _REASONS.get(status, b"Error"), answer.body, close, answer.headers)


def filter_headers(
    pairs: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``pairs`` without ``drop`` (lowercase names) and those a ``Connection`` header names
    (RFC 9110 §7.6.1)."""
    named = [v for k, v in pairs if len(k) == 10 and k.lower() == b"connection"]
    if named:
        drop = drop | {t.strip().lower() for v in named for t in v.split(b",")}
    return [(k, v) for k, v in pairs if k.lower() not in drop]


def client_address(peer: str | None, forwarded: list[bytes], trusted: Networks) -> str | None:
    """The client's address: the peer, or, when the peer is a trusted front proxy, the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    if not trusted or peer is None or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip().decode("latin-1") for v in forwarded for h in v.split(b",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def extract_token(headers: dict[bytes, bytes]) -> str:
    """The client's token from the lowercase-keyed ``headers``: ``X-Chroma-Token``, else
    ``Authorization: Bearer``.  Same rules as `stcs.auth.extract_token` (AuthError)."""
    view: dict[str, str] = {}
    raw = headers.get(b"x-chroma-token")
    if raw is not None:
        view[TOKEN_HEADER] = raw.decode("latin-1")
    auth = headers.get(b"authorization")
    if auth is not None:
        view["Authorization"] = auth.decode("latin-1")
    return _extract_token(view)
