"""Fair share under hostile clients (issue 18, items 1 and 3), end to end: a real ``stcs
serve``, real chroma children, a real loopback auth server, attackers on raw sockets bound to
127.0.0.2 and victims on 127.0.0.1.

* Instance slots: requests nobody waits for (sent, then the connection closed unread) take no
  instance slot and no queue place from other users.
* Token lookups: bad tokens, kept-alive or fire-and-forget, do not starve a valid token's
  lookup from another address.

The attacks are scaled down from the issue's figures to run in seconds; each test says how.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.harness import AuthServer, StcsServer, new_token

pytestmark = pytest.mark.timeout(180)

ATTACKER = "127.0.0.2"


def attacker_socket(server: StcsServer) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((ATTACKER, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    return sock


def request_bytes(path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: stcs\r\nX-Chroma-Token: {token}\r\n\r\n".encode()


@contextlib.contextmanager
def attack(step: Callable[[], None], interval: float, duration: float) -> Iterator[list[int]]:
    """Run ``step`` every ``interval`` s in a thread, for at most ``duration`` s (or until the
    block ends); yields the list that counts the steps made."""
    made: list[int] = []
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + duration
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                step()
            made.append(1)
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(10)


def timed_get(url: str, token: str, timeout: float = 25) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = requests.get(url, headers={"X-Chroma-Token": token}, timeout=timeout).status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic() - started


# -- 1. instance slots -------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [1.0, 4.0], ids=["1-per-s", "1-per-4-s"])
def test_closed_requests_take_no_instance_slot_from_other_users(
    stcs: Callable[..., StcsServer], interval: float
) -> None:
    """The issue's attack (UUID mode, defaults, ``dbMaxInstances`` 3, ``queueTimeout`` 15 s): a
    client at 127.0.0.2 sends a heartbeat with a fresh UUID and closes without reading, every
    ``interval`` s.  Users at 127.0.0.1 — two new, one returning whose instance was stopped —
    each get their first (cold) and second answer 200 within 5 s.

    Before: all three cold requests 503 after 15 s (the attacker's closed requests held the
    three slots and the queue).  The attack runs for the whole test (~40 s at most)."""
    server = stcs(
        "--dbMaxInstances", "3", "--queueTimeout", "15000", "--adminAPIKey", "admin-key-42"
    )
    heartbeat = f"{server.url}/api/v2/heartbeat"
    returning = new_token()
    assert timed_get(heartbeat, returning)[0] == 200
    stopped = requests.delete(
        f"{server.url}/admin/instances/{returning}", headers={"x-api-key": "admin-key-42"}
    )
    assert stopped.status_code == 200, stopped.text

    def hit_and_run() -> None:
        with attacker_socket(server) as sock:
            sock.sendall(request_bytes("/api/v2/heartbeat", str(uuid.uuid4())))

    results: dict[str, list[tuple[int, float]]] = {}

    def victim(name: str, token: str) -> None:
        results[name] = [timed_get(heartbeat, token), timed_get(heartbeat, token)]

    with attack(hit_and_run, interval, duration=60) as made:
        time.sleep(3 * interval + 1.5)  # the attacker has had the time to take all 3 slots
        victims = [
            threading.Thread(target=victim, args=(name, token))
            for name, token in (("new-1", new_token()), ("returning", returning))
        ]
        victims.append(threading.Thread(target=victim, args=("new-2", new_token())))
        for thread in victims:
            thread.start()
            time.sleep(1.0)
        for thread in victims:
            thread.join(60)
    print(f"attack requests: {len(made)}; victims (status, seconds): {results}")
    for name, answers in results.items():
        for status, seconds in answers:
            assert status == 200, (name, answers)
            assert seconds < 5.0, (name, answers)


def test_a_half_closed_client_whose_start_queues_still_gets_its_answer(
    stcs: Callable[..., StcsServer],
) -> None:
    """A half-close (``shutdown(SHUT_WR)``) is not a hang-up, even when the request's start must
    queue: the client is sent an interim ``100 Continue`` (how stcs tells it from a closed
    socket), then its answer once a slot frees (here: the other user's instance, evictable
    after ``min(30 s, dbTTL)`` = 3 s)."""
    server = stcs("--dbMaxInstances", "1", "--dbTTL", "3000", "--queueTimeout", "15000")
    assert timed_get(f"{server.url}/api/v2/heartbeat", new_token())[0] == 200  # the one slot
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(request_bytes("/api/v2/heartbeat", new_token()))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), data[:200]
    assert b"nanosecond heartbeat" in data


# -- 3. token lookups --------------------------------------------------------------------------


def auth_stcs(stcs: Callable[..., StcsServer], auth_server: AuthServer, *extra: str) -> Any:
    return stcs(
        "--auth",
        auth_server.url,
        "--authMaxConcurrentLookups",
        "8",
        "--maxConnections",
        "2000",
        *extra,
        env={"AUTH_MAX_LOOKUPS_PER_ADDRESS": "2"},  # the environment: today's stcs ignores it
    )


def resolve_time(server: StcsServer, token: str) -> tuple[int, float]:
    """``GET /auth`` (authentication only, no instance) from 127.0.0.1: (status, seconds)."""
    return timed_get(f"{server.url}/auth", token, timeout=15)


def test_kept_alive_bad_tokens_do_not_starve_a_valid_token(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """250 keep-alive connections from 127.0.0.2 sending random bad tokens as fast as they are
    answered (at most once a second each), against an auth server answering in 200 ms: a
    never-seen valid token from 127.0.0.1 resolves in ≤ 1 s; a cached one stays instant.

    Scaled from the issue (1,000 connections, ``authMaxConcurrentLookups`` 32 and the default
    ``authMaxLookupsPerAddress`` 8): a quarter of each, so the attacker still keeps ~30
    lookups queued per slot (6 s of queue at 200 ms, more than ``authTimeout``'s 5 s).
    Before: the valid token waited 5 s and got 503."""
    auth_server.delay = 0.2
    cached = "cached-token"
    auth_server.answers[cached] = (200, {"userId": "cached-user"})
    server = auth_stcs(stcs, auth_server)
    assert resolve_time(server, cached)[0] == 204
    stop = threading.Event()

    def keep_asking(sock: socket.socket) -> None:
        # Each connection asks again once answered, at most once a second: 250 lookups/s, six
        # times what the 8 slots answer (40/s).  Answered at once (429), unpaced threads would
        # spin and starve this process (the auth server's thread included) of the GIL: a
        # request flood, not the lookup starvation under test.
        with sock:
            while not stop.wait(0.0):
                sent = time.monotonic()
                try:
                    sock.sendall(request_bytes("/auth", uuid.uuid4().hex))
                    data = b""
                    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                except OSError:
                    return
                stop.wait(max(0.0, 1.0 - (time.monotonic() - sent)))

    socks = [attacker_socket(server) for _ in range(250)]
    threads = [threading.Thread(target=keep_asking, args=(s,), daemon=True) for s in socks]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)  # the queue of lookups builds up
        outcomes = []
        for i in range(3):
            token = f"valid-{i}"
            auth_server.answers[token] = (200, {"userId": f"user-{i}"})
            outcomes.append(resolve_time(server, token))
            time.sleep(0.5)
        cached_outcome = resolve_time(server, cached)
    finally:
        stop.set()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
    print(f"valid tokens (status, seconds): {outcomes}; cached: {cached_outcome}")
    for status, seconds in outcomes:
        assert status == 204, outcomes
        assert seconds <= 1.0, outcomes
    assert cached_outcome[0] == 204 and cached_outcome[1] < 0.5, cached_outcome


def test_fire_and_forget_bad_tokens_do_not_starve_a_valid_token(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """~60 connections a second from 127.0.0.2, each sending one random bad token and closing
    unread, for 8 s, against an auth server answering in 200 ms: a never-seen valid token from
    127.0.0.1 resolves in ≤ 1 s.

    Scaled from the issue (~220/s against 32 lookup slots, i.e. 1.4 times what the slots can
    answer): ~60/s against 8 slots (40 lookups/s, 2 per address) is the same ratio.  Before:
    2.3-3.9 s (the queue of closed clients' lookups)."""
    auth_server.delay = 0.2
    server = auth_stcs(stcs, auth_server)

    def send_and_close() -> None:
        for _ in range(6):  # six per step, a step every 0.1 s
            with attacker_socket(server) as sock:
                sock.sendall(request_bytes("/auth", uuid.uuid4().hex))

    with attack(send_and_close, 0.1, duration=10):
        time.sleep(4)
        outcomes = []
        for i in range(3):
            token = f"valid-{i}"
            auth_server.answers[token] = (200, {"userId": f"user-{i}"})
            outcomes.append(resolve_time(server, token))
            time.sleep(0.5)
    print(f"valid tokens (status, seconds): {outcomes}")
    for status, seconds in outcomes:
        assert status == 204, outcomes
        assert seconds <= 1.0, outcomes
