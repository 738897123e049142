"""The test harness shared by the test modules (one place, not imported from other test modules):
a real chromadb client for a server, explicit embeddings, a slow request held in flight, a
process waited out, the echo upstream, the admin key and a metrics scrape, the stcs CLI."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import chromadb
import psutil
import requests
from chromadb.config import Settings
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StcsServer

DIM = 384


def client_for(server: StcsServer, token: str | None, transport: str = "x-chroma-token") -> Any:
    """An unmodified chromadb.HttpClient with ``token`` sent by ``transport``."""
    if transport == "bearer":
        settings = Settings(
            chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
            chroma_client_auth_credentials=token,
            anonymized_telemetry=False,
        )
        return chromadb.HttpClient(host="127.0.0.1", port=server.port, settings=settings)
    headers = {"X-Chroma-Token": token} if token is not None else {}
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=server.port,
        headers=headers,
        settings=Settings(anonymized_telemetry=False),
    )


def vectors(n: int, seed: int) -> list[Sequence[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(DIM)] for _ in range(n)]


COLLECTIONS = "/api/v2/tenants/default_tenant/databases/default_database/collections"


async def slow_create(
    session: aiohttp.ClientSession, server: StcsServer, token: str, name: str, seconds: float
) -> aiohttp.ClientResponse:
    """Create a collection with a body trickled over ``seconds``: a request held in flight."""
    head = f'{{"name": "{name}"'.encode()
    # Over the proxy's small-body threshold (64 KiB): streamed to chroma as it arrives, so the
    # request is in flight *at chroma* while it trickles.
    pad_chunks, pad = 10, 8000
    body_len = len(head) + pad_chunks * pad + 1

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(pad_chunks):
            await asyncio.sleep(seconds / pad_chunks)
            yield b" " * pad
        yield b"}"

    return await session.post(
        f"{server.url}{COLLECTIONS}",
        data=body(),
        headers={
            "X-Chroma-Token": token,
            "Content-Type": "application/json",
            "Content-Length": str(body_len),
        },
    )


async def until_in_flight(
    session: aiohttp.ClientSession, server: StcsServer, user: str, count: int = 1
) -> None:
    """Poll ``/admin/instances`` (the server runs with ``--adminAPIKey ADMIN``) until ``user``'s
    instance holds ``count`` requests in flight: a bounded wait instead of a fixed sleep."""
    deadline = time.monotonic() + 20
    while True:
        async with session.get(f"{server.url}/admin/instances", headers=HDR) as resp:
            listed = await resp.json()
        if any(i["userId"] == user and i["inFlight"] >= count for i in listed["instances"]):
            return
        assert time.monotonic() < deadline, f"never {count} in flight for {user}: {listed}"
        await asyncio.sleep(0.02)


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is gone (reaped or zombie); fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"pid {pid} still alive after {timeout} s")
    return time.monotonic() - start


ECHO = Path(__file__).parent / "upstreams" / "echo.py"


ADMIN = "ops-admin-key-7"


HDR = {"x-api-key": ADMIN}


def scrape(server: StcsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def stcs_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python -m stcs ARGS`` as a subprocess, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "stcs", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def cli(
    *args: str, server: StcsServer | None = None, db: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``stcs ARGS`` with the server's settings (port, dbPath, the admin key `ADMIN`)."""
    extra: list[str] = ["--adminAPIKey", ADMIN]
    if server is not None:
        extra += ["--port", str(server.port), "--db", str(server.db)]
    elif db is not None:
        extra += ["--db", str(db)]
    return stcs_cli(*args, *extra, timeout=timeout)
