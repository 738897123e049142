"""Proxying: bodies streamed byte for byte, limits, headers, own endpoints."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from chromadb.errors import InvalidArgumentError
from yarl import URL

from stcs.upstream import UpstreamPool
from tests.harness import ECHO, StcsServer, client_for, new_token, user_dirs, vectors

MB = 1024 * 1024


@pytest.fixture
def echo_server(stcs: Callable[..., StcsServer]) -> StcsServer:
    """stcs whose instances are the echo upstream (see tests/upstreams/echo.py)."""
    return stcs(
        "--chromaCommand",
        f"{sys.executable} {ECHO}",
        "--maxBodySize",
        str(8 * MB),
        "--adminAPIKey",
        "admin-key-42",
    )


@pytest.mark.slow
def test_30_mb_add_passes_through(stcs: Callable[..., StcsServer]) -> None:
    server = stcs()
    col = client_for(server, new_token()).create_collection("big")
    n = 1000
    docs = [f"{i:06d}" + "x" * 30_000 for i in range(n)]  # 1000 x 30 kB + embeddings > 30 MB
    col.add(ids=[str(i) for i in range(n)], embeddings=vectors(n, 9), documents=docs)
    assert col.count() == n
    got = col.get(ids=["999"], include=["documents"])
    assert got["documents"] == [docs[999]]


def test_body_over_max_body_size_is_413_and_creates_nothing(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--maxBodySize", str(1 * MB))
    token = new_token()
    resp = requests.post(
        f"{server.url}/api/v2/tenants/default_tenant/databases/default_database/collections",
        data=b"{" + b" " * (2 * MB) + b"}",
        headers={"X-Chroma-Token": token},
        timeout=30,
    )
    assert resp.status_code == 413
    assert resp.json()["error"] == "InvalidArgumentError"
    assert user_dirs(server.db) == []


def test_client_add_over_max_body_size_raises_invalid_argument(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--maxBodySize", str(1 * MB))
    col = client_for(server, new_token()).create_collection("small")
    with pytest.raises(InvalidArgumentError, match="exceeds the limit"):
        col.add(ids=["a"], embeddings=vectors(1, 1), documents=["y" * (2 * MB)])
    assert col.count() == 0


async def test_chunked_body_over_limit_is_413(echo_server: StcsServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield os.urandom(MB)

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{echo_server.url}/echo/upload",
            data=body(),
            headers={"X-Chroma-Token": new_token()},
        ) as resp,
    ):
        assert resp.status == 413
        assert (await resp.json())["error"] == "InvalidArgumentError"


async def upstream_view(
    server: StcsServer, method: str, path: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    url = URL(f"{server.url}{path}", encoded=True)  # sent exactly as written
    async with aiohttp.ClientSession() as session, session.request(method, url, **kw) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_body_reaches_the_instance_byte_for_byte(
    echo_server: StcsServer, chunked: bool
) -> None:
    payload = os.urandom(5 * MB)

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 256 * 1024):
            yield payload[i : i + 256 * 1024]

    status, seen = await upstream_view(
        echo_server,
        "PUT",
        "/echo/blob",
        data=stream() if chunked else payload,
        headers={"X-Chroma-Token": new_token()},
    )
    assert status == 200
    assert seen["body_len"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_credentials_and_hop_by_hop_headers_are_not_forwarded(
    echo_server: StcsServer,
) -> None:
    token = new_token()
    status, seen = await upstream_view(
        echo_server,
        "GET",
        "/echo/h",
        headers={
            "X-Chroma-Token": token,
            "Authorization": f"Bearer {token}",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "X-Custom": "kept",
            "Accept-Encoding": "gzip",
        },
    )
    assert status == 200
    names = {k.lower(): v for k, v in seen["headers"]}
    for dropped in (
        "x-chroma-token",
        "authorization",
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
    ):
        assert dropped not in names
    assert token not in json.dumps(seen)
    assert names["x-custom"] == "kept"
    assert names["accept-encoding"] == "gzip"


async def test_path_and_query_pass_unchanged(echo_server: StcsServer) -> None:
    path = "/echo/a%2Fb/%C3%A9?where=%7B%22k%22%3A1%7D&x=1&x=2"
    status, seen = await upstream_view(
        echo_server, "DELETE", path, headers={"X-Chroma-Token": new_token()}
    )
    assert status == 200
    assert seen["path"] == path and seen["method"] == "DELETE"


async def test_gzip_passes_untouched_both_ways(echo_server: StcsServer) -> None:
    token = new_token()
    compressed = gzip.compress(b'{"hello": "world"}' * 1000)
    status, seen = await upstream_view(
        echo_server,
        "POST",
        "/echo/gz",
        data=compressed,
        headers={"X-Chroma-Token": token, "Content-Encoding": "gzip"},
    )
    assert status == 200
    assert seen["body_sha256"] == hashlib.sha256(compressed).hexdigest()
    assert ["Content-Encoding", "gzip"] in seen["headers"]

    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(f"{echo_server.url}/gzipped", headers={"X-Chroma-Token": token}) as resp,
    ):
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(raw)) == {"compressed": True}


async def test_hop_by_hop_response_headers_are_dropped(echo_server: StcsServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{echo_server.url}/hop", headers={"X-Chroma-Token": new_token()}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Kept"] == "yes"
        assert "X-Drop-Me" not in resp.headers
        assert "Keep-Alive" not in resp.headers


def test_admin_health_needs_the_key(echo_server: StcsServer, stcs: Callable[..., Any]) -> None:
    url = f"{echo_server.url}/admin-health"
    assert requests.get(url, timeout=10).status_code == 403
    wrong = requests.get(url, headers={"x-api-key": "nope"}, timeout=10)
    assert wrong.status_code == 403 and wrong.json()["error"] == "AuthorizationError"
    no_key_server = stcs(db=echo_server.db.parent / "db2")
    assert requests.get(f"{no_key_server.url}/admin-health", timeout=10).status_code == 404


def test_admin_health_lists_instances_and_memory(echo_server: StcsServer) -> None:
    tokens = [new_token(), new_token()]
    for token in tokens:
        requests.get(f"{echo_server.url}/echo/x", headers={"X-Chroma-Token": token}, timeout=30)
    body = requests.get(
        f"{echo_server.url}/admin-health", headers={"x-api-key": "admin-key-42"}, timeout=10
    ).json()
    assert body["status"] == "ok"
    by_user = {i["userId"]: i for i in body["instances"]}
    assert set(by_user) == set(tokens)
    pids = {c.pid for c in echo_server.children()}
    for inst in by_user.values():
        assert inst["pid"] in pids and inst["ready"] is True and inst["status"] == "healthy"
        assert inst["requests"] == 1 and inst["memKb"] > 1000 and inst["port"] > 0
        assert inst["startedAt"].endswith("+00:00")
    memory = body["memory"]
    assert memory["kbInstanceUse"] == sum(i["memKb"] for i in body["instances"])
    assert memory["kbTotal"] > memory["kbAvailable"] > 0
    assert memory["nMaxInstancesEstimate"] >= 2


async def test_unreachable_ready_instance_is_replaced_and_the_request_retried(
    echo_server: StcsServer,
) -> None:
    token = new_token()
    headers = {"X-Chroma-Token": token}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{echo_server.url}/stop-listening", headers=headers) as resp:
            assert resp.status == 200
        [stale] = echo_server.children()
        # The instance is alive and "ready" but refuses connections: stcs must stop it, start a
        # fresh one and retry the request there (it never reached the first one).
        async with session.post(
            f"{echo_server.url}/echo/after", data=b"payload", headers=headers
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["body_len"] == 7
    [fresh] = echo_server.children()
    assert fresh.pid != stale.pid
    assert [e["reason"] for e in echo_server.wait_event("instance stopped")] == ["unreachable"]


async def test_a_port_stays_reserved_until_its_child_is_released(tmp_path: Path) -> None:
    from stcs.launcher import ChromaLauncher

    with contextlib.closing(UpstreamPool()) as pool:
        launcher = ChromaLauncher(tmp_path / "db", pool)
        child = await launcher.launch("port-owner")
        assert child.port in launcher.ports.lent
        child.process.kill()
        await child.wait()
        assert child.port in launcher.ports.lent  # dead and reaped, but not yet released
        lock = tmp_path / "db/.stcs/locks/port-owner.lock"
        fd = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # and its directory is still locked
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        child.release()
        assert child.port not in launcher.ports.lent
        assert not lock.exists()  # released and removed: a lock file exists only while in use
