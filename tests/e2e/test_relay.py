"""The data plane at the byte level: raw sockets against a real ``stcs serve``.

Framing and smuggling shapes, pipelining across users, the edge limits (head and body timeouts,
head size, header count, connections), header bytes passed through unchanged, 100-continue
ordering and back-pressure.  The instances are the echo upstream (tests/upstreams/echo.py), which
reports exactly what reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import socket
import struct
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ECHO, AuthServer, StcsServer, new_token

MB = 1024 * 1024
ADMIN = {"x-api-key": "admin-key-42"}


@pytest.fixture(params=["callbacks", "tasks"])
def relay(request: pytest.FixtureRequest, stcs: Callable[..., StcsServer]) -> StcsServer:
    """An stcs with echo children.  Each test runs twice: with a request the relay can serve
    in its callbacks served there (``relayFastPath``, the default), and with every request in a
    task: the hostile shapes below meet both paths."""
    return stcs(
        "--relayFastPath",
        "true" if request.param == "callbacks" else "false",
        "--chromaCommand",
        f"{sys.executable} {ECHO}",
        "--maxBodySize",
        str(8 * MB),
        "--adminAPIKey",
        "admin-key-42",
        "--headersTimeout",
        "1000",
        "--bodyTimeout",
        "1000",
        "--keepAliveTimeout",
        "2000",
        "--maxConnections",
        "60",
        "--dbMaxInstances",
        "2",
        "--queueTimeout",
        "1000",
    )


def connect(server: StcsServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


# Bytes received past the response read_response returned (a pipelined next answer).
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length or close-delimited framing); (status, headers, body).
    Bytes after it are kept for the next call on the same socket."""
    sock.settimeout(timeout)
    data = _LEFTOVER.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100 or status == 204:
        _LEFTOVER[sock] = rest
        return status, headers, b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        _LEFTOVER[sock] = rest[length:]
        return status, headers, rest[:length]
    while chunk := sock.recv(65536):
        rest += chunk
    return status, headers, rest


def closed_by_peer(sock: socket.socket, timeout: float = 5) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout``; leftover bytes ignored."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def proxied_requests(server: StcsServer) -> list[dict[str, Any]]:
    return [e for e in server.events("request") if e.get("upstream_port")]


def head(method: str, target: str, token: str | None, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: stcs"]
    if token:
        lines.append(f"X-Chroma-Token: {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- framing and smuggling ----------------------------------------------------------------


def test_garbage_and_non_ascii_heads_get_400_without_traceback(relay: StcsServer) -> None:
    for raw in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
        b"G\xc3\x89T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\r\n\r\n",
    ):
        with connect(relay) as sock:
            sock.sendall(raw)
            status, _, _ = read_response(sock)
            assert status == 400
    with connect(relay) as sock:  # empty lines only (skipped, RFC 9112 §2.2): closed at the
        sock.sendall(b"\r\n\r\n\r\n")  # head timeout, no request
        assert closed_by_peer(sock)
    token = new_token()
    with connect(relay) as sock:  # a non-ASCII token value: refused as a token, no 500
        sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: s\r\nX-Chroma-Token: \xc3\xa9\r\n\r\n")
        assert read_response(sock)[0] == 401
    with connect(relay) as sock:  # a non-ASCII admin key
        sock.sendall(b"GET /admin/instances HTTP/1.1\r\nHost: s\r\nx-api-key: \xc3\xa9\r\n\r\n")
        assert read_response(sock)[0] == 403
    with connect(relay) as sock:  # escapes in path and query go to chroma as sent
        sock.sendall(head("GET", "/echo/a%20b?q=%0a%00", token))
        status, _, payload = read_response(sock)
        assert status == 200
        assert json.loads(payload)["path"] == "/echo/a%20b?q=%0a%00"
    with connect(relay) as sock:  # a raw byte >= 0x80 in the target: 400 (llhttp strict)
        sock.sendall(head("GET", "/echo/a\xe9", token))
        assert read_response(sock)[0] == 400
    assert "Traceback" not in relay.log_path.read_text()
    assert not [e for e in relay.events("request") if e["status"] >= 500]


# -- headers ------------------------------------------------------------------------------


def test_header_bytes_pass_through_unchanged(relay: StcsServer) -> None:
    token = new_token()
    odd = [
        (b"X-Utf8", "é✓".encode()),
        (b"X-Latin1", b"\xe9\xff"),
        (b"x-MiXeD-CaSe", b"  spaced  value"),
        (b"X-Empty", b""),
    ]
    extra = b"".join(b"%s: %s\r\n" % pair for pair in odd)
    request = (
        b"GET /echo/bytes HTTP/1.1\r\nHost: stcs\r\n"
        + f"Authorization: Bearer {token}\r\n".encode()
        + b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        + b"Proxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
        + extra
        + b"\r\n"
    )
    with connect(relay) as sock:
        sock.sendall(request)
        status, _, payload = read_response(sock)
    assert status == 200
    raw = [(bytes.fromhex(k), bytes.fromhex(v)) for k, v in json.loads(payload)["raw_headers_hex"]]
    for name, value in odd:
        # llhttp trims the optional whitespace around a value (RFC 9110 §5.5); the rest is as sent
        assert (name, value.strip(b" ")) in raw
    names = {k.lower() for k, _ in raw}
    for gone in (b"authorization", b"x-chroma-token", b"x-hop", b"keep-alive", b"te"):
        assert gone not in names
    assert b"proxy-authorization" not in names
    assert token.encode() not in payload


# -- pipelining ---------------------------------------------------------------------------


def test_pipelined_requests_of_two_users_are_answered_in_order_each_by_its_own_instance(
    relay: StcsServer,
) -> None:
    alice, bob = new_token(), new_token()
    batch = (
        head("GET", "/echo/alice-1", alice)
        + head("POST", "/echo/bob-1", bob, "Content-Length: 5")
        + b"hello"
        + head("GET", "/echo/alice-2", alice)
        + head("POST", "/echo/bob-2", bob, "Transfer-Encoding: chunked")
        + b"3\r\nabc\r\n0\r\n\r\n"
    )
    with connect(relay) as sock:
        sock.sendall(batch)
        answers = [json.loads(read_response(sock)[2]) for _ in range(4)]
    assert [a["path"] for a in answers] == [
        "/echo/alice-1",
        "/echo/bob-1",
        "/echo/alice-2",
        "/echo/bob-2",
    ]
    assert [a["body_len"] for a in answers] == [0, 5, 0, 3]
    alice_ports = {answers[0]["server_port"], answers[2]["server_port"]}
    bob_ports = {answers[1]["server_port"], answers[3]["server_port"]}
    assert len(alice_ports) == 1 and len(bob_ports) == 1 and alice_ports != bob_ports
    instances = requests.get(f"{relay.url}/admin/instances", headers=ADMIN, timeout=10).json()
    by_user = {i["userId"]: i["port"] for i in instances["instances"]}
    assert by_user[alice] in alice_ports and by_user[bob] in bob_ports


# -- timeouts and held resources ----------------------------------------------------------


def test_stalled_small_bodies_pin_no_instance_slot(relay: StcsServer) -> None:
    """dbMaxInstances 2: stalled bodies of many users hold no slot and create no directory."""
    stalled = []
    for _ in range(6):
        sock = connect(relay)
        sock.sendall(head("POST", "/echo/x", new_token(), "Content-Length: 100") + b"partial")
        stalled.append(sock)
    try:
        ok = requests.get(
            f"{relay.url}/echo/served", headers={"X-Chroma-Token": new_token()}, timeout=10
        )
        assert ok.status_code == 200
        for sock in stalled:
            status, _, payload = read_response(sock)
            assert status == 408, payload
    finally:
        for sock in stalled:
            sock.close()
    assert len([p for p in relay.db.iterdir() if p.name != ".stcs"]) == 1


def test_stalled_large_body_releases_its_lease_at_the_body_timeout(relay: StcsServer) -> None:
    token = new_token()
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/big", token, f"Content-Length: {MB}") + b"x" * 200_000)
        status, _, payload = read_response(sock)
        assert status == 408, payload
        assert closed_by_peer(sock)
    instances = requests.get(f"{relay.url}/admin/instances", headers=ADMIN, timeout=10).json()
    [inst] = instances["instances"]
    assert inst["inFlight"] == 0
    [line] = [e for e in relay.events("request") if e["path"] == "/echo/big"]
    assert line["status"] == 408


def test_client_leaving_mid_upload_is_499_not_502(relay: StcsServer) -> None:
    token = new_token()
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/gone", token, f"Content-Length: {MB}") + b"x" * 200_000)
        time.sleep(0.3)
    [line] = relay.wait_event("request", where=lambda e: e["path"] == "/echo/gone")
    assert line["status"] == 499
    assert not relay.events("upstream request failed")


# -- 100-continue -------------------------------------------------------------------------


def test_100_continue_only_after_auth_and_size_checks(relay: StcsServer) -> None:
    with connect(relay) as sock:  # no token: 401, never 100
        sock.sendall(head("POST", "/echo/x", None, "Content-Length: 5", "Expect: 100-continue"))
        assert read_response(sock)[0] == 401
    with connect(relay) as sock:  # too large: 413, never 100
        sock.sendall(
            head(
                "POST", "/echo/x", new_token(), f"Content-Length: {9 * MB}", "Expect: 100-continue"
            )
        )
        assert read_response(sock)[0] == 413
        assert closed_by_peer(sock)
    token = new_token()
    with connect(relay) as sock:  # good: 100 first, then the body, then the answer
        sock.sendall(head("POST", "/echo/x", token, "Content-Length: 5", "Expect: 100-continue"))
        status, _, _ = read_response(sock)
        assert status == 100
        sock.sendall(b"hello")
        status, _, payload = read_response(sock)
        assert status == 200 and json.loads(payload)["body_len"] == 5
        expect = [k for k, _ in json.loads(payload)["headers"] if k.lower() == "expect"]
        assert expect == []


# -- back-pressure ------------------------------------------------------------------------


def test_slow_reader_of_a_50_mb_answer_does_not_grow_stcs(relay: StcsServer) -> None:
    token = new_token()
    requests.get(f"{relay.url}/echo/warm", headers={"X-Chroma-Token": token}, timeout=10)
    rss_before = psutil.Process(relay.pid).memory_info().rss
    with connect(relay) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(head("GET", f"/big?size={50 * MB}", token))
        time.sleep(2)  # not reading: stcs must stop reading from the instance
        rss_stalled = psutil.Process(relay.pid).memory_info().rss
        received = 0
        sock.settimeout(10)
        while received < 50 * MB:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    assert received > 50 * MB  # head + body
    assert rss_stalled - rss_before < 8 * MB, (rss_before, rss_stalled)


# -- many hostile connections -------------------------------------------------------------


@pytest.mark.slow
def test_1000_hostile_connections_keep_rss_bounded_and_users_served(
    stcs: Callable[..., StcsServer],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--headersTimeout", "30000")
    token = new_token()
    assert requests.get(f"{server.url}/echo/w", headers={"X-Chroma-Token": token}).ok
    rss_before = psutil.Process(server.pid).memory_info().rss
    socks = []
    pad = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    try:
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.setblocking(False)
            kind = i % 3
            try:
                if kind == 0:  # an unfinished 1 MB head
                    sock.send(b"GET /echo/x HTTP/1.1\r\n")
                    for _ in range(128):
                        sock.send(pad)
                elif kind == 1:  # slowloris: a partial head, then nothing
                    sock.send(b"GET /echo/x HTTP/1.1\r\nX-A: ")
                else:  # a stalled body
                    sock.send(head("POST", "/echo/x", new_token(), "Content-Length: 1000") + b"x")
            except (BlockingIOError, ConnectionError):
                pass
            socks.append(sock)
        rss_during = psutil.Process(server.pid).memory_info().rss
        started = time.monotonic()
        ok = requests.get(f"{server.url}/echo/ok", headers={"X-Chroma-Token": token}, timeout=10)
        served_ms = (time.monotonic() - started) * 1000
        assert ok.status_code == 200
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        for sock in socks:
            sock.close()
    print(
        f"rss before {rss_before / MB:.1f} MB, with 1000 hostile connections "
        f"{rss_during / MB:.1f} MB; a user served in {served_ms:.1f} ms"
    )
    assert rss_during - rss_before < 120 * MB
    deadline = time.monotonic() + 10  # stcs closes its ends of the 1000 connections
    while (fds := psutil.Process(server.pid).num_fds()) >= 100:
        assert time.monotonic() < deadline, fds
        time.sleep(0.1)


# -- fuzzing request heads ----------------------------------------------------------------

_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH", b"OPTIONS"])
_FRAMING = st.sampled_from(
    [
        b"",
        b"Content-Length: 5\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Expect: 100-continue\r\nContent-Length: 5\r\n",
        b"Connection: close\r\n",
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    ]
)
_NAME = st.binary(min_size=1, max_size=12)
_VALUE = st.binary(max_size=40)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.one_of(_METHODS, st.binary(min_size=1, max_size=8)),
    target=st.one_of(
        st.sampled_from([b"/echo/f", b"/admin/instances", b"/health", b"/auth", b"*", b"//x"]),
        st.binary(max_size=30).map(lambda b: b"/echo/" + b),
    ),
    who=st.sampled_from(["alice", "bob", "none", "both"]),
    framing=_FRAMING,
    headers=st.lists(st.tuples(_NAME, _VALUE), max_size=4),
    body=st.binary(max_size=64),
)
def test_fuzzed_heads_never_500_and_never_cross_tenants(
    fuzz_server: dict[str, Any],
    method: bytes,
    target: bytes,
    who: str,
    framing: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    tokens = fuzz_server["tokens"]
    auth = b""
    if who in ("alice", "both"):
        auth += b"X-Chroma-Token: " + tokens["alice"].encode() + b"\r\n"
    if who in ("bob", "both"):
        auth += b"Authorization: Bearer " + tokens["bob"].encode() + b"\r\n"
    extra = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    raw = method + b" " + target + b" HTTP/1.1\r\nHost: s\r\n" + auth + framing + extra
    raw += b"\r\n" + body
    with socket.create_connection(("127.0.0.1", fuzz_server["server"].port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        answer = b""
        sock.settimeout(0.3)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert not answer.startswith(b"HTTP/1.1 500"), answer[:300]
    status_line, _, rest = answer.partition(b"\r\n")
    if status_line.startswith(b"HTTP/1.1 200") and b'"server_port"' in rest:
        seen = json.loads(rest.partition(b"\r\n\r\n")[2].split(b"HTTP/1.1 ")[0])
        owner = "alice" if who == "both" else who  # X-Chroma-Token wins over Authorization
        assert owner in ("alice", "bob"), (who, raw)
        assert seen["server_port"] == fuzz_server["ports"][owner], (who, raw)


@pytest.fixture
def fuzz_server(relay: StcsServer) -> Iterator[dict[str, Any]]:
    tokens = {"alice": new_token(), "bob": new_token()}
    ports = {}
    for name, token in tokens.items():
        seen = requests.get(f"{relay.url}/echo/warm", headers={"X-Chroma-Token": token}).json()
        ports[name] = seen["server_port"]
    fds_before = psutil.Process(relay.pid).num_fds()
    yield {"server": relay, "tokens": tokens, "ports": ports}
    deadline = time.monotonic() + 10
    while psutil.Process(relay.pid).num_fds() > fds_before + 2:
        assert time.monotonic() < deadline, (fds_before, psutil.Process(relay.pid).num_fds())
        time.sleep(0.1)
    log = relay.log_path.read_text()
    assert "Traceback" not in log
    assert not [e for e in relay.events("request") if e["status"] in (500, 502)]
    instances = requests.get(f"{relay.url}/admin/instances", headers=ADMIN, timeout=10).json()
    assert {i["userId"]: i["port"] for i in instances["instances"]} == {
        tokens[n]: p for n, p in ports.items()
    }


# -- lease integrity ----------------------------------------------------------------------


async def test_a_request_bound_to_a_dead_child_never_reaches_its_old_port(tmp_path: Path) -> None:
    """The lease is bound to the child incarnation: once that child has exited, nothing is
    sent to its port, whoever listens there now, and the port is not handed to another child
    of ours while a lease refers to it."""
    from stcs.launcher import ChromaLauncher
    from stcs.upstream import UnreachableError, UpstreamPool

    with contextlib.closing(UpstreamPool()) as probes:
        launcher = ChromaLauncher(tmp_path / "db", probes)
        child = await launcher.launch("victim")
        child.leases += 1  # a request holds a lease on this incarnation
        child.process.kill()
        await child.wait()
        child.release()  # the supervisor forgets it
        assert child.port in launcher.ports.lent  # still reserved while the lease lives
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", child.port))  # another tenant's server, say
        squatter.listen()
        squatter.setblocking(False)
        pool = UpstreamPool()
        with pytest.raises(UnreachableError):
            await pool.request(child, b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None)
        with pytest.raises(BlockingIOError):
            squatter.accept()  # nothing connected
        squatter.close()
        child.unlease()  # the request ends
        assert child.port not in launcher.ports.lent


# -- found by review: write back-pressure, send timeout, trailers, late refusals -----------


def test_a_client_that_stops_reading_loses_its_lease_at_the_send_timeout(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs(
        "--chromaCommand", f"{sys.executable} {ECHO}", "--adminAPIKey", "admin-key-42",
        "--sendTimeout", "1000",
    )  # fmt: skip
    token = new_token()
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head("GET", f"/big?size={50 * MB}", token))
        deadline = time.monotonic() + 15  # never reads; the answer alone would never end
        while True:
            listing = requests.get(f"{server.url}/admin/instances", headers=ADMIN, timeout=10)
            if [(i["requests"], i["inFlight"]) for i in listing.json()["instances"]] == [(1, 0)]:
                break  # leased once, released at the 1 s sendTimeout
            assert time.monotonic() < deadline, listing.text
            time.sleep(0.1)
    [line] = server.wait_event("request", where=lambda e: e["path"] == "/big")
    assert line["status"] == 499


def test_idle_connections_with_unread_answers_free_their_slots(relay: StcsServer) -> None:
    """maxConnections 60: connections whose answers are never read are aborted at the
    keep-alive/send timeouts, so new clients get in again."""
    token = new_token()
    socks = []
    try:
        for _ in range(60):
            sock = connect(relay)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.sendall(head("GET", "/big?size=60000", token) * 20)
            socks.append(sock)
        deadline = time.monotonic() + 10  # until all 60 count; they stay till the 30 s sendTimeout
        while requests.get(f"{relay.url}/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "never full"
            time.sleep(0.05)
        deadline = time.monotonic() + 40  # keepAliveTimeout 2 s + the send timeout (30 s)
        while requests.get(f"{relay.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "slots never freed"
            time.sleep(0.5)
    finally:
        for sock in socks:
            sock.close()


def test_a_non_utf8_admin_key_is_403_not_500(relay: StcsServer) -> None:
    for path in ("/metrics", "/admin/instances", "/admin-health"):
        with connect(relay) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: s\r\n".encode() + b"x-api-key: \xff\r\n\r\n"
            )
            assert read_response(sock)[0] == 403, path
    assert "Traceback" not in relay.log_path.read_text()


def test_an_admin_upload_without_the_key_is_refused_before_any_body_is_asked_for(
    relay: StcsServer,
) -> None:
    """No ``100 Continue`` (and no body read) for an admin request without the right key: the
    key is checked at the edge, as the token is for a proxied request."""
    for key in ("wrong", None):
        with connect(relay) as sock:
            extra = [f"Content-Length: {8 * MB}", "Expect: 100-continue"]
            if key is not None:
                extra.append(f"x-api-key: {key}")
            sock.sendall(head("PUT", "/admin/users/u1/limits", None, *extra))
            status, _, body = read_response(sock)
            assert status == 403 and b"AuthorizationError" in body, (key, status)
            assert closed_by_peer(sock)  # the announced body is never read
    with connect(relay) as sock:  # the right key: the body is asked for, then served
        sock.sendall(
            head(
                "PUT",
                "/admin/users/u1/limits",
                None,
                "Content-Length: 2",
                "Expect: 100-continue",
                f"x-api-key: {ADMIN['x-api-key']}",
            )
        )
        assert read_response(sock)[0] == 100
        sock.sendall(b"{}")
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["userId"] == "u1"


def _echo_with_alice(
    stcs: Callable[..., StcsServer], auth_server: AuthServer, *more: str
) -> StcsServer:
    """An stcs in auth-server mode (``alice-token`` is user ``alice``) with echo children."""
    auth_server.answers["alice-token"] = (200, {"userId": "alice"})
    return stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--auth", auth_server.url, *more)


def test_a_pipelined_request_logs_under_its_own_user_not_the_one_before(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """Log context is per request: behind a keep-alive front proxy, the next request on a
    connection is often another client's."""
    server = _echo_with_alice(stcs, auth_server, "--logLevel", "debug")  # "token rejected"
    with connect(server) as sock:
        sock.sendall(
            head("GET", "/echo/a", "alice-token") + head("GET", "/echo/b", "mallory-token")
        )
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 401
    rejected = server.wait_event("token rejected")
    assert rejected[0].get("user_id") is None, rejected


def test_a_connections_own_lines_after_a_request_carry_none_of_its_context(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """The lines a connection writes for itself after a request (a head refused or timed out,
    a client that stopped reading) carry neither that request's id nor its user: behind a
    keep-alive front proxy the next bytes are often another client's (found in review: the
    head timer of a request pipelined behind alice's was set from her request's task and the
    408 was logged under her request id and user id)."""
    server = _echo_with_alice(stcs, auth_server, "--headersTimeout", "500")
    with connect(server) as sock:
        # alice's request, and half of the next head in the same write: its head timer starts
        # when alice's answer is done.
        sock.sendall(head("GET", "/echo/a", "alice-token") + b"GET /echo/b HTTP/1.1\r\n")
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 408
    refused = server.wait_event("request refused")[0]
    assert refused.get("status") == 408, refused
    assert refused.get("user_id") is None and refused.get("request_id") is None, refused


def test_a_user_blocked_while_their_request_uploads_is_refused_and_not_restarted(
    relay: StcsServer,
) -> None:
    """The blocklist is checked again once the body is in and the instance leased: a request
    that passed the first check before the block does not reach chroma after it."""
    token = new_token()
    assert requests.get(f"{relay.url}/echo/x", headers={"X-Chroma-Token": token}).ok
    body = b'{"name": "after-the-block"}'
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/x", token, f"Content-Length: {len(body)}") + body[:-5])
        time.sleep(0.3)  # past the token and blocklist checks, waiting for its body
        blocked = requests.post(
            f"{relay.url}/admin/users/{token}/block", headers=ADMIN, timeout=30
        ).json()
        assert blocked["blocked"] and blocked["stopped"]
        sock.sendall(body[-5:])
        status, _, answer = read_response(sock)
    assert status == 403 and b"AuthorizationError" in answer
    assert all(e.get("method") != "POST" for e in proxied_requests(relay))
    assert relay.children() == []  # not started again for a blocked user


# -- requests served in the relay's callbacks (relayFastPath) ------------------------------


def reset_on_close(sock: socket.socket) -> None:
    """Closing ``sock`` sends a reset (SO_LINGER 0), as a client that is gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _in_callbacks(server: StcsServer) -> bool:
    return "false" not in psutil.Process(server.pid).cmdline()


def _callback_requests(server: StcsServer) -> int:
    text = requests.get(f"{server.url}/metrics", headers=ADMIN, timeout=10).text
    [value] = re.findall(r"^stcs_relay_callback_requests_total (\S+)$", text, flags=re.M)
    return int(float(value))


def _warm(server: StcsServer, token: str) -> None:
    """``token``'s instance ready, with an idle pooled connection to it."""
    resp = requests.get(f"{server.url}/echo/warm", headers={"X-Chroma-Token": token}, timeout=10)
    assert resp.status_code == 200


def _in_flight(server: StcsServer) -> int:
    listed = requests.get(f"{server.url}/admin/instances", headers=ADMIN, timeout=10).json()
    return sum(inst["inFlight"] for inst in listed["instances"])


@contextlib.contextmanager
def frozen(server: StcsServer) -> Iterator[None]:
    """stcs stopped (SIGSTOP) for the duration: what happens meanwhile is there to read, all
    at once, when it goes on."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def _nothing_held(server: StcsServer, path: str, statuses: tuple[int, ...] = (499,)) -> None:
    """``path``'s request logged once with its user (as its client left: 499, or
    ``statuses``), no request in flight on any instance, and none at shutdown."""
    [line] = server.wait_event("request", where=lambda e: e["path"] == path)
    assert line["status"] in statuses and line["user_id"], line
    assert _in_flight(server) == 0
    server.stop()
    [down] = server.events("shutting down")
    assert down["requests_in_flight"] == 0


def test_a_whole_request_to_a_ready_instance_is_served_in_callbacks_unless_turned_off(
    relay: StcsServer,
) -> None:
    token = new_token()
    _warm(relay, token)
    before = _callback_requests(relay)
    body = b'{"ids": ["a"]}'
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/one", token, f"Content-Length: {len(body)}") + body)
        status, _, payload = read_response(sock)
    assert status == 200
    echoed = json.loads(payload)
    assert echoed["path"] == "/echo/one" and echoed["body_len"] == len(body)
    assert _callback_requests(relay) - before == (1 if _in_callbacks(relay) else 0)
    [line] = relay.wait_event("request", where=lambda e: e["path"] == "/echo/one")
    assert line["status"] == 200 and line["user_id"] and line["upstream_port"]


def test_pipelined_requests_with_bodies_each_get_their_own_answer(relay: StcsServer) -> None:
    """Eight requests of one user in one write: each answer is its own request's (path and
    body hash), in order, whether served in callbacks (the next served from inside the
    upstream connection's callback that ended the one before) or in tasks."""
    token = new_token()
    _warm(relay, token)
    bodies = [f'{{"n": {i}, "pad": "{"x" * (i * 997)}"}}'.encode() for i in range(8)]
    wire = b"".join(
        head("POST", f"/echo/p{i}", token, f"Content-Length: {len(b)}") + b
        for i, b in enumerate(bodies)
    )
    with connect(relay) as sock:
        sock.sendall(wire)
        for i, body in enumerate(bodies):
            status, _, payload = read_response(sock)
            echoed = json.loads(payload)
            assert status == 200 and echoed["path"] == f"/echo/p{i}", (i, echoed["path"])
            assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert _in_flight(relay) == 0


def test_a_client_gone_before_its_answer_leaves_that_answer_to_no_other_request(
    relay: StcsServer,
) -> None:
    """The upstream connection of a request whose client left is closed, never pooled: the
    answer still to come on it would be read as the next request's."""
    token = new_token()
    _warm(relay, token)
    with connect(relay) as sock:
        sock.sendall(head("GET", "/slow?delay=1&chunks=1&interval=0", token))
        time.sleep(0.3)  # sent upstream, its answer 0.7 s away
        reset_on_close(sock)  # gone (a FIN alone is a half-close: the answer would still go)
    [line] = relay.wait_event("request", where=lambda e: e["path"] == "/slow")
    assert line["status"] == 499 and line["duration_ms"] < 900  # when it left, not at the answer
    for i in range(3):
        resp = requests.get(
            f"{relay.url}/echo/after-{i}", headers={"X-Chroma-Token": token}, timeout=10
        )
        assert resp.status_code == 200 and resp.json()["path"] == f"/echo/after-{i}"
    time.sleep(1.0)  # the slow answer came, to a closed connection
    resp = requests.get(f"{relay.url}/echo/later", headers={"X-Chroma-Token": token}, timeout=10)
    assert resp.json()["path"] == "/echo/later"
    assert _in_flight(relay) == 0


def test_a_body_in_pieces_is_served_whole_and_a_stalled_one_is_408_with_nothing_held(
    relay: StcsServer,
) -> None:
    """A ready user's body arriving in pieces: ``bodyTimeout`` (1 s here) is the longest pause
    between pieces, not the whole upload's time; a body that stops gets 408 and holds no
    lease and no in-flight count (stcs then shuts down at once)."""
    token = new_token()
    _warm(relay, token)
    body = bytes(range(256)) * 20
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/pieces", token, f"Content-Length: {len(body)}"))
        for piece in (body[:1000], body[1000:3000], body[3000:]):
            time.sleep(0.6)  # 1.8 s in all: each pause under the timeout
            sock.sendall(piece)
        status, _, payload = read_response(sock)
        assert status == 200, payload
        assert json.loads(payload)["body_sha256"] == hashlib.sha256(body).hexdigest()
        sock.sendall(head("POST", "/echo/stalled", token, "Content-Length: 100") + b"partial")
        started = time.monotonic()
        status, _, payload = read_response(sock)
        took = time.monotonic() - started
        assert status == 408 and 0.9 < took < 3, (status, took, payload)
        assert closed_by_peer(sock)
    _nothing_held(relay, "/echo/stalled", (408,))


def test_a_client_leaving_mid_body_of_a_ready_user_is_499_with_nothing_held(
    relay: StcsServer,
) -> None:
    token = new_token()
    _warm(relay, token)
    with connect(relay) as sock:
        sock.sendall(head("POST", "/echo/left", token, "Content-Length: 5000") + b"x" * 1000)
        time.sleep(0.3)
    _nothing_held(relay, "/echo/left")


def test_a_bad_token_with_a_body_still_coming_is_refused_at_once(relay: StcsServer) -> None:
    """No body is awaited for a request the task path refuses before reading it."""
    token = new_token()
    _warm(relay, token)
    for bad in ({"X-Chroma-Token": "not-a-uuid"}, {}):
        extra = [f"{k}: {v}" for k, v in bad.items()]
        with connect(relay) as sock:
            sock.sendall(
                head("POST", "/echo/refused", None, *extra, "Content-Length: 5000") + b"x" * 10
            )
            started = time.monotonic()
            status, _, _ = read_response(sock)
            assert status == 401 and time.monotonic() - started < 0.5


def test_a_client_gone_as_its_streamed_answer_begins_holds_nothing(relay: StcsServer) -> None:
    """The client's reset and the head of a streamed answer read in one go, the answer first:
    the task the answer is handed to is cancelled before it runs a step, and what the request
    held — lease, in-flight count, upstream connection — is given back all the same (found in
    review: the instance stayed pinned, in flight, for ever)."""
    token = new_token()
    _warm(relay, token)
    with connect(relay) as sock:
        sock.sendall(head("GET", "/slow?delay=1&chunks=3&interval=0.2", token))
        time.sleep(0.3)
        reset_on_close(sock)
        with frozen(relay):
            time.sleep(0.1)
            sock.close()  # the reset is there first; the answer's head comes at 1 s
            time.sleep(1.1)
    _nothing_held(relay, "/slow")


def test_a_client_gone_as_its_awaited_body_times_out_holds_nothing(
    stcs: Callable[..., StcsServer],
) -> None:
    """asyncio's loop runs the reads of an iteration before its due timers: the reset of a
    client whose body stalled, and its bodyTimeout, in one go — the task made at the timeout
    is cancelled before it runs a step, and the request still leaves no in-flight count (found
    in review)."""
    server = stcs(
        "--chromaCommand", f"{sys.executable} {ECHO}", "--adminAPIKey", "admin-key-42",
        "--eventLoop", "asyncio", "--bodyTimeout", "1000",
    )  # fmt: skip
    token = new_token()
    _warm(server, token)
    with connect(server) as sock:
        sock.sendall(head("POST", "/echo/stalled", token, "Content-Length: 100") + b"partial")
        time.sleep(0.3)
        reset_on_close(sock)
        with frozen(server):
            sock.close()
            time.sleep(1.2)  # past bodyTimeout
    _nothing_held(server, "/echo/stalled", (408, 499))  # whichever the loop took first
