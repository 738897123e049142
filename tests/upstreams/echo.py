"""A real HTTP upstream that speaks chroma's launch interface (`run --host H --path P --port N`)
and its heartbeat, and echoes what it received.  Started by stcs through `chromaCommand`, it
shows what stcs forwards to an instance; it never stands in for chroma's behaviour.

* ``GET /api/v2/heartbeat`` -> 200, as chroma.
* ``/echo/...`` (any method) -> JSON of the request's method, path, query, headers and the
  SHA-256 and length of the body exactly as received.
* ``GET /gzipped`` -> a gzip-compressed JSON body with ``Content-Encoding: gzip``.
* ``GET /hop`` -> a response carrying hop-by-hop headers.
* ``GET /slow?delay=D&chunks=N&interval=S`` -> after D seconds, N chunks S seconds apart.
* ``GET /big?size=N`` -> N bytes, streamed.
* ``GET /stop-listening`` -> closes the listening socket but stays alive: a "ready" instance
  that refuses new connections.
"""

import argparse
import asyncio
import gzip
import hashlib
import json
import time

from aiohttp import web


async def heartbeat(request: web.Request) -> web.Response:
    return web.json_response({"nanosecond heartbeat": 1})


async def echo(request: web.Request) -> web.Response:
    arrived = time.time()  # before the body is read: when the request reached us
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "raw_headers_hex": [[k.hex(), v.hex()] for k, v in request.raw_headers],
            "server_port": request.transport.get_extra_info("sockname")[1]
            if request.transport
            else None,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_len": len(body),
            "arrived": arrived,
        }
    )


async def gzipped(request: web.Request) -> web.Response:
    payload = gzip.compress(json.dumps({"compressed": True}).encode())
    return web.Response(
        body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def hop(request: web.Request) -> web.Response:
    return web.Response(
        text="ok",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "X-Kept": "yes",
        },
    )


async def slow(request: web.Request) -> web.StreamResponse:
    chunks = int(request.query.get("chunks", "6"))
    interval = float(request.query.get("interval", "0.5"))
    await asyncio.sleep(float(request.query.get("delay", "0")))  # before the status line
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for i in range(chunks):
        await response.write(f"chunk {i}\n".encode())
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def big(request: web.Request) -> web.StreamResponse:
    """``GET /big?size=N``: N bytes (``x``), streamed in 64 KiB writes with back-pressure."""
    size = int(request.query["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"x" * 65536
    while size > 0:
        await response.write(block[:size])
        size -= len(block)
    await response.write_eof()
    return response


async def stop_listening(request: web.Request) -> web.Response:
    for site in list(request.app["runner"].sites):
        await site.stop()
    return web.Response(text="closed", headers={"Connection": "close"})


async def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/api/v2/heartbeat", heartbeat)
    app.router.add_get("/gzipped", gzipped)
    app.router.add_get("/hop", hop)
    app.router.add_get("/stop-listening", stop_listening)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    runner = web.AppRunner(app, auto_decompress=False)
    app["runner"] = runner
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--host")
    parser.add_argument("--path")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
