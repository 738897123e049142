"""Per-user quotas and rate limits (stcs.quotas), seen by the unmodified chromadb client through
a real `stcs serve` and real chroma children; the token bucket and the route table also alone."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import chromadb.errors
import pytest
import requests

from stcs.config import load_settings
from stcs.metrics import Metrics
from stcs.quotas import Quotas, classify
from tests.harness import (
    ROOT,
    StcsServer,
    cli,
    client_for,
    new_token,
    scrape,
    slow_create,
    until_in_flight,
    vectors,
)

ADMIN = "ops-admin-key-7"  # the key tests.test_ops.cli and scrape send
HDR = {"x-api-key": ADMIN}
HEARTBEAT = "/api/v2/heartbeat"
C = "/api/v2/tenants/default_tenant/databases/default_database/collections"
MB = 2**20


def limits_of(server: StcsServer, user: str) -> dict[str, Any]:
    resp = requests.get(f"{server.url}/admin/users/{user}/limits", headers=HDR, timeout=10)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def put_limits(server: StcsServer, user: str, doc: Any) -> requests.Response:
    return requests.put(
        f"{server.url}/admin/users/{user}/limits", json=doc, headers=HDR, timeout=10
    )


def wait_disk(server: StcsServer, user: str, ok: Callable[[int], bool]) -> int:
    """Poll the admin API until the user's measured size satisfies ``ok``; return it."""
    deadline = time.monotonic() + 10
    while True:
        used = limits_of(server, user)["usage"]["diskBytes"]
        if used is not None and ok(used):
            return int(used)
        assert time.monotonic() < deadline, f"disk usage stuck at {used}"
        time.sleep(0.05)


# -- the whole path, real client ---------------------------------------------------------------


def test_over_disk_quota_adds_raise_quota_error_reads_and_deletes_work_across_restart(
    stcs: Callable[..., StcsServer],
) -> None:
    args = ("--userMaxDiskMB", "1", "--adminAPIKey", ADMIN)
    server = stcs(*args)
    token, other = new_token(), new_token()
    client = client_for(server, token)
    col = client.create_collection("docs")
    batches = 0
    with pytest.raises(chromadb.errors.QuotaError) as refused:
        while batches < 50:  # ~0.2 MB a batch: the limit is met long before
            col.add(
                ids=[f"{batches}-{i}" for i in range(100)],
                embeddings=vectors(100, seed=batches),
            )
            batches += 1
    assert "userMaxDiskMB is 1 MB" in str(refused.value)
    assert str(refused.value).startswith("Quota exceeded")  # what the JS client keys on
    assert batches >= 2
    used = limits_of(server, token)["usage"]["diskBytes"]
    overshoot = used - MB
    print(f"refused after {batches} batches; {used} bytes, {overshoot} past the limit")
    assert used >= MB
    # Reads still work, and so does another user's writing.
    assert col.count() == batches * 100
    assert col.query(query_embeddings=vectors(1, seed=0), n_results=1)["ids"][0] == ["0-0"]
    client_for(server, other).create_collection("docs").add(ids=["a"], embeddings=vectors(1, 1))
    with pytest.raises(chromadb.errors.QuotaError):
        client.create_collection("more")

    # The quota holds from the first request after a restart (measured before serving).
    server.stop()
    server = stcs(*args, db=server.db)
    client = client_for(server, token)
    col = client.get_collection("docs")
    with pytest.raises(chromadb.errors.QuotaError):
        col.upsert(ids=["x"], embeddings=vectors(1, seed=99))
    with pytest.raises(chromadb.errors.QuotaError):
        col.update(ids=["0-0"], embeddings=vectors(1, seed=98))

    # Deleting brings the user back under; then writes work again.
    col.delete(ids=[f"0-{i}" for i in range(50)])
    assert col.count() == batches * 100 - 50
    client.delete_collection("docs")
    wait_disk(server, token, lambda n: n < MB)
    client.create_collection("again").add(ids=["b"], embeddings=vectors(1, seed=5))
    samples = scrape(server)
    assert samples[("stcs_quota_rejections_total", (("limit", "disk"),))] >= 2
    assert samples[("stcs_user_disk_bytes_gcount", ())] == 2  # two users measured


def test_rate_limit_is_a_token_bucket_per_user(stcs: Callable[..., StcsServer]) -> None:
    rate, burst = 10, 5
    server = stcs("--userRequestsPerSecond", str(rate), "--userRequestBurst", str(burst))
    token, other = new_token(), new_token()
    session = requests.Session()
    session.get(f"{server.url}{HEARTBEAT}", headers={"X-Chroma-Token": token})  # cold start
    time.sleep(burst / rate)  # the bucket is full again: no start inside the 1 s window
    statuses: list[int] = []
    retry_after = set()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        resp = session.get(f"{server.url}{HEARTBEAT}", headers={"X-Chroma-Token": token})
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.json()["error"] == "RateLimitError"
            retry_after.add(resp.headers["Retry-After"])
    elapsed = time.monotonic() - started
    ok = statuses.count(200)
    print(f"{len(statuses)} requests in {elapsed:.2f} s: {ok} answered, the rest 429")
    assert set(statuses) == {200, 429}
    assert burst + rate * 0.9 - 1 <= ok <= burst + rate * elapsed + 1
    assert retry_after == {"1"}
    # Another user has their own bucket; the client raises its RateLimitError.
    assert session.get(f"{server.url}{HEARTBEAT}", headers={"X-Chroma-Token": other}).ok
    with pytest.raises(chromadb.errors.RateLimitError):  # the client's own calls count too
        client = client_for(server, token)
        for _ in range(burst + 1):
            client.heartbeat()
    scrape_without_key(server)


def scrape_without_key(server: StcsServer) -> None:
    """No adminAPIKey in this test: /metrics is not served (rejections are counted there)."""
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 404


async def test_concurrency_limit_waits_briefly_then_429(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs(
        "--userMaxConcurrentRequests", "2", "--userConcurrencyTimeout", "1000",
        "--adminAPIKey", ADMIN,
    )  # fmt: skip
    token, other = new_token(), new_token()
    client_for(server, token).heartbeat()  # started, so the slow requests are the only wait
    url = f"{server.url}{HEARTBEAT}"
    async with aiohttp.ClientSession() as session:
        slow = [
            asyncio.create_task(slow_create(session, server, token, f"slow-{n}", 4))
            for n in range(2)
        ]
        await until_in_flight(session, server, token, 2)  # both hold a slot now
        started = time.monotonic()
        async with session.get(url, headers={"X-Chroma-Token": token}) as resp:
            waited = time.monotonic() - started
            assert resp.status == 429 and (await resp.json())["error"] == "RateLimitError"
            assert resp.headers["Retry-After"] == "1"
        # Not before userConcurrencyTimeout (1 s); the upper bound only rules out a hang.
        assert 0.95 <= waited < 5
        async with session.get(url, headers={"X-Chroma-Token": other}) as resp:
            assert resp.status == 200  # another user is not affected
        # One waiting within the timeout gets the first slot that frees: here by a client
        # that gives up (its connection closes mid-body).
        waiting = asyncio.create_task(session.get(url, headers={"X-Chroma-Token": token}))
        await asyncio.sleep(0.2)
        slow[0].cancel()
        resp = await waiting
        assert resp.status == 200
        resp.release()
        resp = await slow[1]
        assert resp.status == 200
        resp.release()
    assert limits_of(server, token)["usage"]["inFlight"] == 0
    assert scrape(server)[("stcs_quota_rejections_total", (("limit", "concurrency"),))] == 1


def test_override_raises_one_users_limit_only_and_survives_a_restart(
    stcs: Callable[..., StcsServer],
) -> None:
    args = ("--userMaxCollections", "1", "--userMaxRecordsPerCollection", "10")
    server = stcs(*args, "--adminAPIKey", ADMIN)
    alice, bob = new_token(), new_token()
    for token in (alice, bob):
        client = client_for(server, token)
        col = client.create_collection("one")
        with pytest.raises(chromadb.errors.QuotaError, match="userMaxCollections is 1"):
            client.create_collection("two")
        col.add(ids=[str(i) for i in range(10)], embeddings=vectors(10, seed=1))
        with pytest.raises(chromadb.errors.QuotaError, match="holds 10 records"):
            col.upsert(ids=["x"], embeddings=vectors(1, seed=2))
        col.update(ids=["1"], embeddings=vectors(1, seed=3))  # not a new record: no count check

    resp = put_limits(server, alice, {"userMaxCollections": 3})
    assert resp.status_code == 200
    assert resp.json()["limits"]["userMaxCollections"] == 3
    assert resp.json()["limits"]["userMaxRecordsPerCollection"] == 10  # the setting still applies
    client_for(server, alice).create_collection("two")
    with pytest.raises(chromadb.errors.QuotaError):
        client_for(server, bob).create_collection("two")

    server.stop()
    server = stcs(*args, "--adminAPIKey", ADMIN, db=server.db)
    assert limits_of(server, alice)["overrides"] == {"userMaxCollections": 3}
    client_for(server, alice).create_collection("three")
    with pytest.raises(chromadb.errors.QuotaError, match="has 3 collections"):
        client_for(server, alice).create_collection("four")
    with pytest.raises(chromadb.errors.QuotaError):
        client_for(server, bob).create_collection("two")
    listed = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10).json()
    assert listed["limitOverrides"] == {alice: {"userMaxCollections": 3}}
    entry = next(i for i in listed["instances"] if i["userId"] == alice)
    assert entry["limits"]["userMaxCollections"] == 3 and entry["usage"]["inFlight"] == 0

    assert put_limits(server, alice, {}).json()["overrides"] == {}  # back to the settings
    with pytest.raises(chromadb.errors.QuotaError):
        client_for(server, alice).create_collection("four")
    assert put_limits(server, alice, {"userMaxDisk": 1}).status_code == 400
    assert put_limits(server, alice, {"userMaxCollections": -1}).status_code == 400
    assert put_limits(server, alice, [1]).status_code == 400
    # Values past what a limit can mean, and documents nested past any parser's depth: 400,
    # and nothing saved (a 2**64 value used to be saved, then fail every request with 500).
    huge = put_limits(server, alice, {"userMaxCollections": 2**64})
    assert huge.status_code == 400 and "userMaxCollections" in huge.text
    deep = requests.put(
        f"{server.url}/admin/users/{alice}/limits",
        data="[" * 5000 + "]" * 5000,
        headers=HDR,
        timeout=10,
    )
    assert deep.status_code == 400, deep.text
    assert limits_of(server, alice)["overrides"] == {}
    assert client_for(server, alice).heartbeat()


# scripts/test installs the JS client into .cache/js when node and npm are present and points
# this at it; elsewhere set it to a node_modules directory holding `chromadb` to run the test.
JS_MODULES = os.environ.get("STCS_JS_CLIENT_MODULES", "")


@pytest.mark.skipif(
    not (JS_MODULES and shutil.which("node")), reason="set STCS_JS_CLIENT_MODULES (and node)"
)
def test_js_client_raises_its_quota_and_rate_limit_errors(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--userMaxCollections", "1", "--userRequestsPerSecond", "5")
    token = new_token()
    client_for(server, token).create_collection("first")
    time.sleep(1.2)  # the bucket is full again
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "js" / "quota_errors.mjs"), str(server.port), token,
         JS_MODULES],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["quota"] == "ChromaQuotaExceededError", result  # 422 + "Quota exceeded..."
    assert "userMaxCollections is 1" in result["quotaMessage"]
    assert result["rate"] == "ChromaRateLimitError", result  # 429


def test_status_shows_disk_usage_next_to_the_limit(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).create_collection("docs").add(ids=["a"], embeddings=vectors(1, 1))
    assert put_limits(server, token, {"userMaxDiskMB": 7}).status_code == 200
    wait_disk(server, token, lambda n: n > 0)
    done = cli("status", server=server)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[0].split(), done.stdout.splitlines()[1].split()
    assert "DISK" in header and row[0] == token
    assert any(cell.endswith("/7") for cell in row)


# -- policy alone (no server) ------------------------------------------------------------------


def test_routes_that_count_as_writes_and_deletes() -> None:
    coll = f"{C}/3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1b"
    assert classify("POST", C)[0] == "create"
    for action in ("add", "upsert", "update", "fork"):
        assert classify("POST", f"{coll}/{action}")[0] == action
    assert classify("POST", f"{coll}/delete")[0] == "delete"
    assert classify("DELETE", f"{C}/docs")[0] == "delete"
    assert classify("DELETE", "/api/v2/tenants/t/databases/d")[0] == "delete"
    for method, path in [
        ("GET", C),
        ("POST", f"{coll}/query"),
        ("POST", f"{coll}/get"),
        ("GET", f"{coll}/count"),
        ("PUT", f"{C}/docs"),
        ("GET", HEARTBEAT),
    ]:
        assert classify(method, path)[0] is None, (method, path)
    assert classify("POST", f"{coll}/add?x=1")[0] == "add"


async def test_token_bucket_refills_at_the_rate(tmp_path: Any) -> None:
    settings = load_settings(
        cli={"userRequestsPerSecond": "4", "userRequestBurst": "2"}, environ={}
    ).settings
    now = [100.0]
    quotas = Quotas(settings, tmp_path, Metrics(), clock=lambda: now[0])
    from stcs.errors import UserRateLimitError

    for _ in range(2):
        (await quotas.admit("u", "GET", HEARTBEAT)).done(200)
    with pytest.raises(UserRateLimitError) as refused:
        await quotas.admit("u", "GET", HEARTBEAT)
    assert refused.value.retry_after_s == 1
    await quotas.admit("v", "GET", HEARTBEAT)  # another user's bucket is full
    now[0] += 0.25  # one token back
    await quotas.admit("u", "GET", HEARTBEAT)
    with pytest.raises(UserRateLimitError):
        await quotas.admit("u", "GET", HEARTBEAT)
    now[0] += 10  # never more than the burst
    for _ in range(2):
        await quotas.admit("u", "GET", HEARTBEAT)
    with pytest.raises(UserRateLimitError):
        await quotas.admit("u", "GET", HEARTBEAT)
