"""What a client with no user costs stcs: its log lines, and bodies sent to stcs's own paths.

Hostile clients bind 127.0.0.2 as their source address; the bystander uses 127.0.0.1, so the
per-address log budget can be told apart from a global one.  Raw sockets against a real
``stcs serve`` (docs/security.md, "Log flooding" and "Bodies on stcs's own paths").
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from stcs import log as stcs_log
from tests.e2e.test_relay import ADMIN, MB, closed_by_peer, head, read_response
from tests.harness import ECHO, AuthServer, StcsServer

ATTACKER = "127.0.0.2"
PATH_16K = "/api/v2/collections/" + "a" * 15_000  # within maxHeaderSize (16 KiB) with the head


def _attacker_socket(server: StcsServer, source: str = ATTACKER) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _flood(
    server: StcsServer,
    seconds: float,
    max_requests: int,
    request: Callable[[int], bytes] | None = None,
) -> tuple[int, float]:
    """Pipelined unauthenticated requests from `ATTACKER`, 200 per connection, answers read
    and discarded; (requests sent, seconds).  ``request(i)``: the i-th request; by default
    16 KB paths, with no token, then a bad one."""
    shapes = [
        f"GET {PATH_16K} HTTP/1.1\r\nHost: stcs\r\n\r\n".encode(),
        f"GET {PATH_16K} HTTP/1.1\r\nHost: stcs\r\nX-Chroma-Token: not-a-uuid\r\n\r\n".encode(),
    ]
    make = request or (lambda i: shapes[i % 2])
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds and sent < max_requests:
        sock = _attacker_socket(server)

        def drain(sock: socket.socket = sock) -> None:
            try:
                while sock.recv(1 << 20):
                    pass
            except OSError:
                pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            for _ in range(200):
                sock.sendall(make(sent))
                sent += 1
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(10)
        sock.close()
    return sent, time.monotonic() - started


def _lines_from(server: StcsServer, client: str) -> list[dict[str, Any]]:
    return [e for e in server.log_lines() if e.get("client") == client]


def test_a_flood_of_refused_requests_with_16kb_paths_costs_little_log(
    stcs: Callable[..., StcsServer],
) -> None:
    """Unauthenticated pipelined requests with 16 KB paths (before: 15.3 KB of log per
    request, 4,500 lines/s): at most 1.5 KB of log per request, a bounded number of lines per
    second from the attacker's address, and a bystander's refusal is still logged."""
    server = stcs()
    before = server.log_path.stat().st_size
    sent, elapsed = _flood(server, seconds=2.0, max_requests=20_000)
    assert sent >= 1_000, sent  # the attack did run
    # A bystander from another address: its refusal is logged, whatever the attacker spent.
    response = _bystander_refusal(server)
    assert response == 401
    server.wait_event("request", where=lambda e: e.get("client") == "127.0.0.1")
    grown = server.log_path.stat().st_size - before
    per_request = grown / sent
    attacker_lines = _lines_from(server, ATTACKER)
    per_second = len(attacker_lines) / elapsed
    print(
        f"{sent} requests in {elapsed:.1f} s: {per_request:.0f} B of log per request, "
        f"{len(attacker_lines)} lines from the attacker ({per_second:.1f}/s)"
    )
    assert per_request <= 1500, per_request
    # Default budget: a burst of 20 lines, then 5 a second (generous margin for a slow run).
    assert len(attacker_lines) <= 20 + 5 * (elapsed + 2) + 5, len(attacker_lines)
    for line in attacker_lines:
        assert len(json.dumps(line)) <= 1500, line
        if "path" in line:
            assert len(line["path"]) <= stcs_log.CLIENT_VALUE_MAX + 16
            assert line["path_len"] == len(PATH_16K)


def _bystander_refusal(server: StcsServer) -> int:
    with _attacker_socket(server, "127.0.0.1") as sock:
        sock.sendall(head("GET", "/api/v2/heartbeat", "not-a-uuid"))
        return read_response(sock)[0]


def test_every_refused_request_is_logged_or_counted_in_the_summary(
    stcs: Callable[..., StcsServer],
) -> None:
    """Nothing vanishes: the lines not written are counted, by address and status, in a
    ``requests not logged`` line at the end of each interval that had any."""
    server = stcs("--logRefusalsPerSecond", "2", "--logRefusalsSummaryInterval", "1000")
    sent, _ = _flood(server, seconds=1.0, max_requests=2_000)
    server.wait_event("requests not logged", timeout=15)
    time.sleep(1.5)  # the last interval's summary
    summaries = server.events("requests not logged")
    logged = Counter(e["status"] for e in _lines_from(server, ATTACKER) if e["event"] == "request")
    counted: Counter[int] = Counter()
    for summary in summaries:
        assert summary["level"] == "warning"
        assert "request_id" not in summary  # not the context of the refusal that started it
        for status, n in summary["clients"][ATTACKER].items():
            counted[int(status)] += n
    assert set(logged) | set(counted) == {401}
    assert logged[401] + counted[401] == sent, (logged, counted, sent)
    assert logged[401] <= 8 + 2 * 4 + 5  # burst 8, 2 a second


def test_random_bad_tokens_against_an_auth_server_write_a_bounded_number_of_lines(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """Auth-server mode: each distinct bad token is one lookup (before: one ``token
    rejected`` line each, on top of the request line).  Lines per second from the attack stay
    within the address's budget."""
    server = stcs("--auth", auth_server.url)
    before = len(server.log_lines())

    def request(i: int) -> bytes:
        return head("GET", "/api/v2/heartbeat", None, f"X-Chroma-Token: bad-{i}-{os.getpid()}")

    sent, elapsed = _flood(server, seconds=2.0, max_requests=3_000, request=request)
    assert sum(auth_server.calls.values()) >= 100  # lookups did happen
    time.sleep(0.5)
    lines = server.log_lines()[before:]
    print(f"{sent} requests, {sum(auth_server.calls.values())} lookups, {len(lines)} lines")
    assert len(lines) <= 20 + 5 * (elapsed + 2) + 5, Counter(e["event"] for e in lines)


def test_client_chosen_values_are_clipped_and_escaped(stcs: Callable[..., StcsServer]) -> None:
    """A client-chosen ``X-Forwarded-For`` (believed from a trusted proxy) of 10 KB with a tab
    and Latin-1 bytes is logged clipped, with its length, and escaped."""
    server = stcs("--trustedProxies", "127.0.0.1")
    forwarded = "1.2.3.4\t\xe9\x85" + "b" * 10_000
    with _attacker_socket(server, "127.0.0.1") as sock:
        sock.sendall(head("GET", "/health", None, f"X-Forwarded-For: {forwarded}"))
        assert read_response(sock)[0] == 200
    line = server.wait_event("request", where=lambda e: "client_len" in e)[0]
    assert line["client_len"] == len(forwarded)
    assert line["client"].startswith("1.2.3.4\\t\\xe9\\x85bbb")
    assert len(line["client"]) <= stcs_log.CLIENT_VALUE_MAX + 16


# -- item 5: bodies on stcs's own paths -----------------------------------------------------


@pytest.fixture
def own(stcs: Callable[..., StcsServer]) -> StcsServer:
    return stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--adminAPIKey", ADMIN["x-api-key"])


OWN_BODY_CASES = {
    "post-health-cl": ("POST", "/health", [f"Content-Length: {100 * MB}"]),
    "post-health-expect": (
        "POST",
        "/health",
        [f"Content-Length: {100 * MB}", "Expect: 100-continue"],
    ),
    "post-health-chunked": ("POST", "/health", ["Transfer-Encoding: chunked"]),
    "post-auth-cl": ("POST", "/auth", [f"Content-Length: {100 * MB}"]),
    "post-auth-expect": ("POST", "/auth", [f"Content-Length: {100 * MB}", "Expect: 100-continue"]),
    "post-auth-chunked": ("POST", "/auth", ["Transfer-Encoding: chunked", "Expect: 100-continue"]),
    "get-health-small": ("GET", "/health", ["Content-Length: 1000"]),
    "admin-health-keyed": (
        "POST",
        "/admin-health",
        [f"Content-Length: {100 * MB}", "Expect: 100-continue", f"x-api-key: {ADMIN['x-api-key']}"],
    ),
    "metrics-keyed": (
        "GET",
        "/metrics",
        ["Transfer-Encoding: chunked", f"x-api-key: {ADMIN['x-api-key']}"],
    ),
    "admin-instances-keyed": (
        "GET",
        "/admin/instances",
        [f"Content-Length: {MB}", "Expect: 100-continue", f"x-api-key: {ADMIN['x-api-key']}"],
    ),
}


@pytest.mark.parametrize("case", OWN_BODY_CASES)
def test_own_paths_refuse_a_body_before_reading_it(own: StcsServer, case: str) -> None:
    """Before: ``100 Continue``, the body read and relayed to the control plane, then 405.
    Now the answer comes before any body byte is sent: 413 in chroma's shape, no ``100
    Continue``, the connection closed, nothing relayed."""
    method, path, extra = OWN_BODY_CASES[case]
    with _attacker_socket(own) as sock:
        sock.sendall(head(method, path, None, *extra))  # the head only: no body byte is sent
        status, _, body = read_response(sock, timeout=5)
        assert status == 413, (status, body)
        assert json.loads(body)["error"] == "InvalidArgumentError"
        assert closed_by_peer(sock)
    line = own.wait_event("request", where=lambda e: e.get("path") == path)[-1]
    assert line["status"] == 413


def test_own_paths_without_a_body_still_answer(own: StcsServer) -> None:
    """The refusal is for bodies only: ``GET /health`` with ``Content-Length: 0`` and a keyed
    ``PUT …/limits`` with its JSON body are served as before."""
    with _attacker_socket(own) as sock:
        sock.sendall(head("GET", "/health", None, "Content-Length: 0"))
        assert read_response(sock)[0] == 200
        sock.sendall(
            head(
                "PUT",
                "/admin/users/u1/limits",
                None,
                "Content-Length: 2",
                f"x-api-key: {ADMIN['x-api-key']}",
            )
            + b"{}"
        )
        assert read_response(sock)[0] == 200
