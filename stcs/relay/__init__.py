"""The data plane: stcs's own HTTP/1.1 listener, relaying requests to the users' chroma servers.

In the shape of uvicorn's ``httptools_impl``:

- `protocol`: `ClientConnection`, one `asyncio.Protocol` per client connection (transport,
  httptools callbacks, pipelining, timers, lingering close), and the `Listener` its
  connections share;
- `flow`: `FlowControl`, back-pressure both ways (reading paused, backlog, writable, send timer);
- `head`: `Request` as parsed, and the checks its head alone decides (pure functions);
- `cycle`: `RequestCycle`, one request's typed log fields, held answer and body, and its run
  (request id, in-flight count, one log line and the metrics);
- `handler`: `Handler`, what a request is answered with (health, readiness, auth, control
  plane, proxy, forward, relayed answer), and `Relay`, the listener of a serving stcs;
- `limits`: `Limits`, the edge limits read once from the settings; `wire`: the HTTP bytes.

``httptools.HttpRequestParser`` (llhttp, strict: CL+TE, duplicate Content-Length, bad chunks
and obs-fold are parse errors) on the client side, `stcs.upstream` (``HttpResponseParser``) on
the chroma side.  Per request it does only what it must: parse the head, resolve the token (a
cache hit is a dict lookup), take a lease on the user's instance incarnation, relay head and
body with back-pressure both ways, write one log line and the metrics.

Header bytes pass through unchanged (never decoded and re-encoded); hop-by-hop headers (RFC 9110
§7.6.1) and the client's credentials are dropped.  Requests are served one at a time per
connection, pipelined ones in order (reading pauses while one is served).

Control-plane paths (``/admin-health``, ``/admin/*``, ``/metrics``, other methods on
``/health`` and ``/auth``) are relayed over a private unix socket to the aiohttp application
(`stcs.app`), unchanged; ``GET /health`` and ``GET /auth`` are answered here (``/auth`` is on
nginx's ``auth_request`` path, once per request in cluster mode).  A body is never asked for
or read for a control path that would refuse it (no admin key, or a route that takes none).

Log lines carry client-chosen values clipped (`stcs.log.clip_client_values`); the lines of
requests refused before a user is known are limited per client address (`Listener.refusals`).

The edge is bounded by settings (docs in README): ``headersTimeout`` (head, 408),
``bodyTimeout`` (pause in a body, 408, lease released), ``keepAliveTimeout``,
``maxHeaderSize`` and ``maxHeadersCount`` (431), ``maxConnections`` (503), ``maxBodySize``
(413).  Every refusal is chroma's JSON error shape; after a framing error the connection closes.
"""

from stcs.relay.handler import Handler, Relay
from stcs.relay.limits import Limits
from stcs.relay.protocol import ClientConnection, Listener
from stcs.relay.wire import (
    client_address,
    error_response,
    extract_token,
    filter_headers,
    json_response,
    next_request_id,
)

__all__ = [
    "ClientConnection",
    "Handler",
    "Limits",
    "Listener",
    "Relay",
    "client_address",
    "error_response",
    "extract_token",
    "filter_headers",
    "json_response",
    "next_request_id",
]
