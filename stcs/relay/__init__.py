"""The data plane: stcs's own HTTP/1.1 listener, relaying requests to the users' chroma servers.

The modules, in the shape of uvicorn's ``httptools_impl``: `stcs.relay.protocol` (the
`asyncio.Protocol` per client connection).
"""

from stcs.relay.protocol import (
    ClientConnection,
    Relay,
    client_address,
    error_response,
    extract_token,
    filter_headers,
    json_response,
    next_request_id,
)

__all__ = [
    "ClientConnection",
    "Relay",
    "client_address",
    "error_response",
    "extract_token",
    "filter_headers",
    "json_response",
    "next_request_id",
]
