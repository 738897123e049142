"""Per-user quotas alone (stcs.quotas): the token bucket and the route table.  Through a real
`stcs serve` and chroma children: tests/e2e/test_quotas.py."""

from __future__ import annotations

from typing import Any

import pytest

from stcs.chroma_api import WRITES, classify
from stcs.config import load_settings
from stcs.quotas import Quotas
from stcs.recorder import NULL_RECORDER
from stcs.upstream import UpstreamPool

HEARTBEAT = "/api/v2/heartbeat"


C = "/api/v2/tenants/default_tenant/databases/default_database/collections"


def test_routes_that_count_as_writes_and_deletes() -> None:
    """Every route of chroma 1.5's /openapi.json that can store data is a write."""
    coll = f"{C}/3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1b"
    assert classify("POST", C)[0] == "create"
    for action in ("add", "upsert", "fork"):
        assert classify("POST", f"{coll}/{action}")[0] == action
    for method, path in [
        ("POST", f"{coll}/update"),
        ("PUT", coll),  # modify: name, metadata, configuration
        ("PUT", f"{C}/docs"),
        ("POST", "/api/v2/tenants"),
        ("PATCH", "/api/v2/tenants/t1"),
        ("POST", "/api/v2/tenants/t1/databases"),
        ("POST", f"{coll}/functions/attach"),
        ("POST", f"{coll}/attached_functions/f/detach"),
        ("POST", "/api/v2/some-route-of-a-later-chroma"),
    ]:
        assert classify(method, path)[0] == "write", (method, path)
    for method, path in [
        ("POST", f"{coll}/delete"),
        ("DELETE", f"{C}/docs"),
        ("DELETE", "/api/v2/tenants/t/databases/d"),
        ("POST", "/api/v2/reset"),
    ]:
        assert classify(method, path)[0] == "delete", (method, path)
    for method, path in [
        ("GET", C),
        ("POST", f"{coll}/query"),
        ("POST", f"{coll}/get"),
        ("POST", f"{coll}/search"),
        ("GET", f"{coll}/count"),
        ("GET", f"{coll}/indexing_status"),
        ("HEAD", HEARTBEAT),
        ("GET", HEARTBEAT),
    ]:
        assert classify(method, path)[0] is None, (method, path)
    assert classify("POST", f"{coll}/add?x=1")[0] == "add"


async def test_token_bucket_refills_at_the_rate(tmp_path: Any) -> None:
    settings = load_settings(
        cli={"userRequestsPerSecond": "4", "userRequestBurst": "2"}, environ={}
    ).settings
    now = [100.0]
    quotas = Quotas(settings, tmp_path, UpstreamPool(), NULL_RECORDER, clock=lambda: now[0])
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


async def test_admit_now_answers_as_admit_does_or_leaves_it_to_admit(tmp_path: Any) -> None:
    """`Quotas.admit_now` (the relay's callback path) gives what `admit` gives when that takes
    no step with an effect, and None (take the task path) for everything else: a rate or a
    concurrency limit, or a write under a route limit."""
    coll = f"{C}/3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1b"
    requests = [
        ("GET", HEARTBEAT), ("POST", f"{coll}/query"), ("POST", f"{coll}/add"),
        ("POST", f"{coll}/delete"), ("POST", C), ("PUT", coll),
    ]  # fmt: skip
    cases = {
        "no limit": {},
        "route limits": {"userMaxDiskMB": "100", "userMaxCollections": "1"},
        "a rate": {"userRequestsPerSecond": "100"},
        "a concurrency": {"userMaxConcurrentRequests": "4"},
    }
    for name, cli in cases.items():
        settings = load_settings(cli=cli, environ={}).settings
        quotas = Quotas(settings, tmp_path, UpstreamPool(), NULL_RECORDER)
        for method, path in requests:
            now = quotas.admit_now("u", method.encode(), path.encode())
            kind = classify(method, path)[0]
            if name in ("a rate", "a concurrency") or (name == "route limits" and kind in WRITES):
                assert now is None, (name, method, path)
                continue
            assert now is not None, (name, method, path)
            admitted = await quotas.admit("u", method, path)
            assert (now._kind, now._slots) == (admitted._kind, admitted._slots), (name, path)
            assert now.wants_body is admitted.wants_body is False
            now.done(200)
            admitted.done(200)
        assert quotas.usage("u")["inFlight"] == 0
