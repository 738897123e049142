"""Token extraction and resolution against a real loopback auth server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog.testing
from multidict import CIMultiDict

from stcs.auth import (
    AuthServerHealth,
    AuthServerResolver,
    UuidResolver,
    extract_token,
    validate_user_id,
)
from stcs.errors import (
    AuthError,
    AuthUnavailableError,
    InvalidUserIdError,
    LookupsPerAddressError,
)
from tests.harness import AuthServer, free_port
from tests.tally import Tally


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def resolver(session: aiohttp.ClientSession, url: str, **kw: Any) -> AuthServerResolver:
    return AuthServerResolver(session, url, api_key="k", **kw)


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"X-Chroma-Token": "abc"}, "abc"),
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "bearer   abc  "}, "abc"),
        ({"X-Chroma-Token": "first", "Authorization": "Bearer second"}, "first"),
    ],
)
def test_extract_token(headers: dict[str, str], token: str) -> None:
    assert extract_token(CIMultiDict(headers)) == token


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer one two"},
        {"X-Chroma-Token": ""},
        {"X-Chroma-Token": "a\tb"},
        {"X-Chroma-Token": "x" * 5000},
    ],
)
def test_malformed_or_missing_token_is_auth_error(headers: dict[str, str]) -> None:
    with pytest.raises(AuthError):
        extract_token(CIMultiDict(headers))


async def test_uuid_mode_lowercases_and_refuses_non_uuids() -> None:
    r = UuidResolver()
    assert await r.resolve("3F2B8A4E-9C1D-4E5F-8A7B-6C5D4E3F2A1B") == (
        "3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1b"
    )
    for bad in (
        "3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1",
        "../../etc",
        "3f2b8a4e9c1d4e5f8a7b6c5d4e3f2a1b",
        "3f2b8a4e-9c1d-4e5f-8a7b-6c5d4e3f2a1b\n",
    ):
        with pytest.raises(AuthError):
            await r.resolve(bad)


@pytest.mark.parametrize("good", ["a", "user-1", "a.b@c.d", "x+y_z", "A" * 128, "9"])
def test_user_id_rule_accepts(good: str) -> None:
    assert validate_user_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "../x", "a/b", "a\\b", ".x", "-x", "A" * 129, "a\n", "a b", "é", 42, None],
)
def test_user_id_rule_refuses(bad: object) -> None:
    with pytest.raises(InvalidUserIdError):
        validate_user_id(bad)


async def test_concurrent_lookups_of_one_token_share_one_call(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"userId": "u1"})
    auth_server.delay = 0.2
    r = resolver(session, auth_server.url)
    results = await asyncio.gather(*(r.resolve("t") for _ in range(20)))
    assert results == ["u1"] * 20
    assert auth_server.calls["t"] == 1
    assert auth_server.api_keys == ["k"]


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"userId": "u1"})
    auth_server.delay = 0.3
    r = resolver(session, auth_server.url)
    first = asyncio.ensure_future(r.resolve("t"))
    second = asyncio.ensure_future(r.resolve("t"))
    await asyncio.sleep(0.1)
    first.cancel()
    assert await second == "u1"
    assert auth_server.calls["t"] == 1


async def test_positive_answers_are_cached_for_auth_cache_ttl(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"data": {"userId": "u2"}})
    r = resolver(session, auth_server.url, cache_ttl_ms=300)
    assert await r.resolve("t") == "u2"
    assert await r.resolve("t") == "u2"
    assert auth_server.calls["t"] == 1
    await asyncio.sleep(0.35)
    assert await r.resolve("t") == "u2"
    assert auth_server.calls["t"] == 2


async def test_zero_cache_ttl_asks_every_time(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"userId": "u"})
    r = resolver(session, auth_server.url, cache_ttl_ms=0)
    for _ in range(3):
        await r.resolve("t")
    assert auth_server.calls["t"] == 3


async def test_rejections_are_401_and_cached_briefly(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["bad"] = (403, {"message": "no"})
    r = resolver(session, auth_server.url)
    for _ in range(5):
        with pytest.raises(AuthError):
            await r.resolve("bad")
    assert auth_server.calls["bad"] == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"error": "boom"}),
        (502, "bad gateway"),
        (404, {"message": "wrong endpoint"}),
        (200, "not json"),
        (200, b"\xff\xfe"),
        (200, {"user": "x"}),
        (200, {"userId": 42}),
        (200, {"userId": None}),
        (200, {"data": {"userId": ["u"]}}),
        (200, ["userId"]),
    ],
)
async def test_unusable_answers_are_unavailable_and_never_cached(
    auth_server: AuthServer, session: aiohttp.ClientSession, status: int, body: object
) -> None:
    auth_server.answers["t"] = (status, body)
    r = resolver(session, auth_server.url)
    for _ in range(2):
        with pytest.raises(AuthUnavailableError):
            await r.resolve("t")
    assert auth_server.calls["t"] == 2


async def test_slow_auth_server_times_out_as_unavailable(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"userId": "u"})
    auth_server.delay = 1.0
    r = resolver(session, auth_server.url, timeout_ms=200)
    with pytest.raises(AuthUnavailableError, match="timed out"):
        await r.resolve("t")


async def test_unreachable_auth_server_is_unavailable(session: aiohttp.ClientSession) -> None:
    r = resolver(session, f"http://127.0.0.1:{free_port()}/check")
    with pytest.raises(AuthUnavailableError, match="unreachable"):
        await r.resolve("t")


async def test_unsafe_user_id_is_refused_and_not_cached(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.answers["t"] = (200, {"userId": "../etc"})
    r = resolver(session, auth_server.url)
    for _ in range(2):
        with pytest.raises(InvalidUserIdError):
            await r.resolve("t")
    assert auth_server.calls["t"] == 2


# -- a wrong authServerAPIKey is visible -------------------------------------------------------


def test_health_suspects_the_api_key_when_nearly_every_lookup_is_refused() -> None:
    now = [1000.0]
    health = AuthServerHealth("http://auth/validate", clock=lambda: now[0])
    for _ in range(AuthServerHealth.SUSPECT_MIN - 1):
        health.record(403)
    assert health.suspect_status() is None  # too few lookups to say
    with structlog.testing.capture_logs() as logs:
        health.record(403)
        for _ in range(30):  # the same minute: one warning, not one per lookup
            health.record(403)
        now[0] += AuthServerHealth.WARN_EVERY_S
        health.record(403)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2
    assert "authServerAPIKey" in warnings[0]["event"] and warnings[0]["auth_status"] == 403
    view = health.view()
    assert view["suspectApiKey"] and view["refused"] == view["lookups"] == AuthServerHealth.WINDOW
    health.record(200)  # one accepted token: the key works
    assert health.suspect_status() is None and health.view()["lastAcceptedAt"].endswith("Z")


def test_ordinary_bad_tokens_beside_good_ones_raise_no_suspicion() -> None:
    health = AuthServerHealth("http://auth/validate")
    for i in range(AuthServerHealth.WINDOW):
        health.record(200 if i % 10 == 0 else 401)
    assert health.suspect_status() is None
    assert health.view()["accepted"] == 5 and health.view()["refused"] == 45


async def test_lookups_record_each_answer_in_the_health(
    auth_server: AuthServer, session: aiohttp.ClientSession
) -> None:
    auth_server.api_key = "the-right-key"
    r = resolver(session, auth_server.url)  # sends api_key "k": the auth server says 403
    for i in range(AuthServerHealth.SUSPECT_MIN):
        with pytest.raises(AuthError):
            await r.resolve(f"token-{i}")
    assert r.health.suspect_status() == 403


class From:
    """A request's client as the resolver sees it: its address."""

    def __init__(self, address: str) -> None:
        self.address = address


async def test_a_lookup_is_cancelled_when_its_last_waiter_leaves(
    session: aiohttp.ClientSession, auth_server: AuthServer
) -> None:
    """Its lookup slot is freed at once: a lookup nobody waits for does not hold one of the
    ``authMaxConcurrentLookups`` for the auth server's whole answer."""
    auth_server.delay = 1.0
    auth_server.answers["valid"] = (200, {"userId": "u1"})
    r = resolver(session, auth_server.url, max_concurrent=1, recorder=(tally := Tally()))
    gone = [asyncio.ensure_future(r.resolve("bad")) for _ in range(2)]
    await asyncio.sleep(0.2)
    for waiter in gone:
        waiter.cancel()
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    auth_server.delay = 0.1
    assert await r.resolve("valid") == "u1"
    assert asyncio.get_running_loop().time() - started < 0.8  # not behind the 1 s lookup
    assert tally["auth_lookup", "abandoned"] == 1  # two waiters, one shared lookup


async def test_lookups_in_flight_are_bounded_per_client_address(
    session: aiohttp.ClientSession, auth_server: AuthServer
) -> None:
    auth_server.delay = 0.3
    auth_server.answers["valid"] = (200, {"userId": "u1"})
    r = resolver(session, auth_server.url, max_concurrent=8, max_per_address=2)
    attacker = From("127.0.0.2")
    first = [asyncio.ensure_future(r.resolve(f"bad-{i}", attacker)) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(LookupsPerAddressError) as caught:
        await r.resolve("bad-3", attacker)
    assert caught.value.retry_after_s == 1
    shared = asyncio.ensure_future(r.resolve("bad-0", attacker))  # joins a lookup: no new one
    assert await r.resolve("valid", From("127.0.0.1")) == "u1"  # another address
    for waiter in [*first, shared]:
        with pytest.raises(AuthError):
            await waiter
    with pytest.raises(AuthError):  # the address's lookups ended: it may look up again
        await r.resolve("bad-3", attacker)
    assert "bad-3" in auth_server.calls
