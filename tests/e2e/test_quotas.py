"""Per-user quotas and rate limits (stcs.quotas), seen by the unmodified chromadb client through
a real `stcs serve` and real chroma children; the token bucket and the route table also alone."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import chromadb.errors
import pytest
import requests
from chromadb.config import Settings

from stcs.quotas import data_size
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


# -- hostile: every route, every concurrency (issue 18, items 2 and 7) -------------------------


def collections_on_disk(server: StcsServer, user: str) -> int:
    """Collections in every tenant and database of ``user``'s chroma (its ``chroma.sqlite3``,
    read after the server stopped)."""
    con = sqlite3.connect(f"file:{server.db / user / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT COUNT(*) FROM collections").fetchone()[0])
    finally:
        con.close()


def tenant_client(server: StcsServer, token: str, tenant: str, database: str) -> Any:
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=server.port,
        headers={"X-Chroma-Token": token},
        tenant=tenant,
        database=database,
        settings=Settings(anonymized_telemetry=False),
    )


def test_collections_are_counted_across_every_tenant_and_database_of_a_user(
    stcs: Callable[..., StcsServer],
) -> None:
    """Before: `userMaxCollections` 2 was counted per database, so new tenants and databases
    each held 2 more (here 18 collections)."""
    server = stcs("--userMaxCollections", "2")
    token = new_token()
    api = requests.Session()
    api.headers["X-Chroma-Token"] = token
    base = f"{server.url}/api/v2"
    made, refused = 0, 0
    for t in range(3):
        tenant = f"tenant-{t}"
        assert api.post(f"{base}/tenants", json={"name": tenant}, timeout=30).ok
        for d in range(3):
            database = f"db-{d}"
            url = f"{base}/tenants/{tenant}/databases"
            assert api.post(url, json={"name": database}, timeout=30).ok
            client = tenant_client(server, token, tenant, database)
            for c in range(2):
                try:
                    client.create_collection(f"col-{c}")
                    made += 1
                except chromadb.errors.QuotaError as exc:
                    assert "userMaxCollections is 2" in str(exc)
                    refused += 1
    # At the limit, get_or_create of an existing collection still works; a body that is not
    # an object is chroma's to refuse (4xx), never stcs's 500.
    assert tenant_client(server, token, "tenant-0", "db-0").get_or_create_collection("col-0")
    odd = api.post(f"{base}/tenants/tenant-0/databases/db-0/collections", data=b"[1]", timeout=30)
    assert 400 <= odd.status_code < 500, odd.text
    server.stop()
    on_disk = collections_on_disk(server, token)
    print(f"collections made {made}, refused {refused}, on disk {on_disk}")
    assert made == on_disk == 2 and refused == 16


def test_modify_tenant_and_database_creation_are_writes_under_the_disk_quota(
    stcs: Callable[..., StcsServer],
) -> None:
    """Before: `PUT .../collections/{id}` (modify) was not a write: 8 modifies with 2 MB of
    metadata each passed a 1 MB quota; tenant and database creation passed over it too."""
    server = stcs("--userMaxDiskMB", "1", "--adminAPIKey", ADMIN)
    token = new_token()
    client = client_for(server, token)
    col = client.create_collection("docs")
    passed = 0
    for n in range(8):
        try:
            col.modify(metadata={"blob": f"{n}-" + "x" * (2 * MB)})
            passed += 1
        except chromadb.errors.QuotaError as exc:
            assert "userMaxDiskMB is 1 MB" in str(exc)
    api = requests.Session()
    api.headers["X-Chroma-Token"] = token
    base = f"{server.url}/api/v2"
    tenant = api.post(f"{base}/tenants", json={"name": "more-tenant"}, timeout=30)
    database = api.post(
        f"{base}/tenants/default_tenant/databases", json={"name": "more-db"}, timeout=30
    )
    used = data_size(server.db / token)
    print(
        f"modifies passed {passed} of 8; {used / MB:.1f} MB; tenant {tenant.status_code}, "
        f"database {database.status_code}"
    )
    assert passed == 1 and used <= 3 * MB  # the limit plus one request's 2 MB
    for resp in (tenant, database):
        assert resp.status_code == 422 and resp.json()["error"] == "QuotaError", resp.text
    # Reads and deletes still work over the quota.
    assert client.get_collection("docs").metadata["blob"].startswith("0-")
    client.delete_collection("docs")


def test_concurrent_adds_never_cross_the_record_limit(stcs: Callable[..., StcsServer]) -> None:
    """Before: each add was checked against the count before any of them landed: 8 concurrent
    adds of 3,000 records (bodies over the relay's 64 KiB prefetch) under a 10,000 limit made
    24,000 records."""
    server = stcs("--userMaxRecordsPerCollection", "10000")
    token = new_token()
    client_for(server, token).create_collection("docs")
    clients = [client_for(server, token).get_collection("docs") for _ in range(8)]
    rng = random.Random(7)
    batch = 3000

    def add(n: int) -> str:
        ids = [f"{n}-{i}" for i in range(batch)]
        embeddings = [[rng.random(), rng.random()] for _ in range(batch)]
        try:
            clients[n].add(ids=ids, embeddings=embeddings)
            return "ok"
        except chromadb.errors.QuotaError:
            return "quota"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(add, range(8)))
    count = clients[0].count()
    print(f"8 concurrent adds of {batch}: {outcomes.count('ok')} passed, {count} records")
    assert count <= 10000
    assert outcomes.count("ok") == 3 and count == 9000
    # A small batch that fits still passes; one that would cross the limit does not.
    clients[0].add(ids=[f"s-{i}" for i in range(1000)], embeddings=[[0.5, 0.5]] * 1000)
    with pytest.raises(chromadb.errors.QuotaError, match="holds 10000 records"):
        clients[0].add(ids=["one-more"], embeddings=[[0.5, 0.5]])
    # An upsert of records already there adds none: it passes at the limit.
    clients[0].upsert(ids=["s-1", "s-2"], embeddings=[[0.1, 0.1]] * 2)
    assert clients[0].count() == 10000


@pytest.mark.slow
def test_concurrent_large_adds_overshoot_the_disk_quota_by_one_request_at_most(
    stcs: Callable[..., StcsServer],
) -> None:
    """Before: 10 concurrent ~2 MB adds all passed a 1 MB quota checked against a cached size
    (about 10 times one add's growth on disk)."""
    server = stcs("--userMaxDiskMB", "1", "--adminAPIKey", ADMIN)
    token, probe = new_token(), new_token()
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghij") for _ in range(8)) for _ in range(5000)]

    def documents(n: int) -> list[str]:
        return [" ".join(rng.choice(words) for _ in range(11_000)) for _ in range(n)]

    # What one such add costs on disk, for another user alone.
    probe_col = client_for(server, probe).create_collection("docs")
    probe_col.add(ids=[str(i) for i in range(20)], embeddings=vectors(20, 1),
                  documents=documents(20))  # fmt: skip
    one_add = wait_disk(server, probe, lambda n: n > MB)
    bodies = [documents(20) for _ in range(10)]
    client_for(server, token).create_collection("docs")
    clients = [client_for(server, token).get_collection("docs") for _ in range(10)]

    def add(n: int) -> str:
        try:
            clients[n].add(ids=[f"{n}-{i}" for i in range(20)], embeddings=vectors(20, n),
                           documents=bodies[n])  # fmt: skip
            return "ok"
        except chromadb.errors.QuotaError:
            return "quota"

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(add, range(10)))
    server.stop()
    used = data_size(server.db / token)
    print(
        f"10 concurrent adds: {outcomes.count('ok')} passed; {used / MB:.1f} MB on disk "
        f"(one add alone: {one_add / MB:.1f} MB)"
    )
    assert outcomes.count("ok") == 1
    assert used <= MB + one_add * 1.2


def test_a_client_starts_and_writes_under_a_low_rate_limit(
    stcs: Callable[..., StcsServer],
) -> None:
    """Before: with `userRequestsPerSecond` 2 (burst defaulting to the rate), the client's
    constructor (3 requests) raised RateLimitError."""
    server = stcs("--userRequestsPerSecond", "2")
    token = new_token()
    client = client_for(server, token)  # identity, tenant, database
    col = client.get_or_create_collection("docs")  # 1
    col.add(ids=["a"], embeddings=vectors(1, 1))  # pre-flight checks, add
    server.wait_event("request", where=lambda e: e.get("status") == 201)
    starts = [e for e in server.events("request") if e.get("user_id")]
    print(f"a client's start-up and first add: {len(starts)} requests")
    assert len(starts) == 6


# -- policy alone (no server) ------------------------------------------------------------------
