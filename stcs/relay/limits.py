"""The edge limits of the data plane, read once from the settings, units converted once."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from stcs.config import Networks, Settings


@dataclass(frozen=True)
class Limits:
    """What one client connection may cost (docs: README's settings table).

    Timeouts are kept twice: in seconds (``*_s``, for the loop's timers) and in the
    milliseconds the operator wrote (``*_ms``, for messages and log lines).  Sizes are bytes.
    """

    head_timeout_s: float  # headersTimeout: the request head must arrive within it (408)
    body_timeout_s: float  # bodyTimeout: longest pause inside a request body (408)
    send_timeout_s: float  # sendTimeout: longest the client may leave our answer unread (abort)
    keepalive_timeout_s: float  # keepAliveTimeout: idle between requests, then close
    headers_timeout_ms: int
    body_timeout_ms: int
    send_timeout_ms: int
    max_header_size: int  # maxHeaderSize: request line and header lines (431)
    max_headers_count: int  # maxHeadersCount: header lines (431)
    max_body_size: int  # maxBodySize: a request body (413)
    max_connections: int  # maxConnections: open client connections (503)
    trusted: Networks = ()  # trustedProxies: whose X-Forwarded-For names the client
    log_refusals_per_second: int = 0  # logRefusalsPerSecond (`stcs.log.RefusalLog`)
    log_refusals_interval_s: float = 60.0  # logRefusalsSummaryInterval

    @functools.cached_property
    def timer_step_s(self) -> float:
        """How far ahead a connection's timer handle is armed at most (seconds): the shortest
        of the head, body and keep-alive timeouts, so that each of them, set after another,
        finds the handle armed no later than itself (`ClientConnection._set_timer`)."""
        return min(self.head_timeout_s, self.body_timeout_s, self.keepalive_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            head_timeout_s=settings.headers_timeout / 1000,
            body_timeout_s=settings.body_timeout / 1000,
            send_timeout_s=settings.send_timeout / 1000,
            keepalive_timeout_s=settings.keep_alive_timeout / 1000,
            headers_timeout_ms=settings.headers_timeout,
            body_timeout_ms=settings.body_timeout,
            send_timeout_ms=settings.send_timeout,
            max_header_size=settings.max_header_size,
            max_headers_count=settings.max_headers_count,
            max_body_size=settings.max_body_size,
            max_connections=settings.max_connections,
            trusted=settings.trusted_networks,
            log_refusals_per_second=settings.log_refusals_per_second,
            log_refusals_interval_s=settings.log_refusals_summary_interval / 1000,
        )
