"""Every row of the README's error table through the sites `stcs render nginx` and `stcs render
apache` make, run by the real servers (issue 22 items 3 and 4), and the admin endpoints those
sites keep private.

Each row is produced one of two ways (`ROWS` maps the README's rows to the tests below, and
`test_every_row_of_the_readme_error_table_is_covered_through_both_front_servers` checks that it
covers the table):

* **The Python client** (``chromadb.HttpClient`` pointed at the front server) meets the error and
  raises the exception the README names, as it does talking to stcs directly.
* **Raw HTTP** through the front server, where the client cannot make the request: malformed
  framing, a transfer coding, a paused body (the client sends none of these); chroma dying
  mid-request (needs an upstream that answers slowly, `tests/upstreams/echo.py`, whose routes
  the client never calls); the admin API (the client has no admin calls).  The JSON body is
  asserted, with its ``Content-Type``, and the response is handed to the client's own error
  mapping (`BaseHTTPClient._raise_chroma_error`) to name the exception a client would raise.

Where the front server answers itself, the rendered site answers in chroma's shape (the
templates say why per case).  What differs from stcs's own answer, by design or by the server:

* **shutting down**: stcs stops accepting connections when its drain begins, so the front
  server meets a refused connection and answers its own 502 (``InternalError``, the exception
  stcs's 503 raises too); once stcs is gone, the same.
* **head too large**: nginx refuses a header line over its 8 KiB buffers itself (its 494,
  answered 431 as stcs would); Apache refuses one over ``LimitRequestFieldSize`` (8190 bytes)
  with 400, and so more than ``LimitRequestFields`` (100) header lines, which its
  ``ErrorDocument`` cannot change: ``InvalidArgumentError`` either way.  Heads within those
  limits reach stcs, which answers 431 itself.
* **a transfer coding other than chunked**: nginx answers 501 itself; Apache 400, both in
  chroma's shape (``InvalidArgumentError``).
* **a paused body**: nginx streams it to stcs, whose ``bodyTimeout`` (10 s; set short here)
  answers 408 before nginx's own (60 s).  Apache relays a request body before it reads the
  answer, so there its own body timeout answers (mod_reqtimeout, which Debian enables: 20 s;
  set to 2 s here), 408 in chroma's shape.
* **not run**: nginx's header timeout (60 s) closes the connection without an answer; the
  read timeouts of both (600 s, 504 in chroma's shape) are past a bounded test.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromadb
import httpx
import psutil
import pytest
import requests
from chromadb.api.base_http_client import BaseHTTPClient
from chromadb.config import Settings
from chromadb.errors import (
    AuthorizationError,
    ChromaAuthError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    QuotaError,
    RateLimitError,
)

from stcs.ring import Ring
from tests.deploy import frontends
from tests.harness import (
    ADMIN,
    ECHO,
    HDR,
    AuthServer,
    StcsServer,
    free_port,
    new_token,
    user_dirs,
    vectors,
)

pytestmark = pytest.mark.skipif(
    not (frontends.have("nginx") and frontends.have("apache")),
    reason="nginx and apache2 are installed by scripts/test (Debian packages)",
)

KINDS = ["nginx", "apache"]
MB = 1024 * 1024
README = Path(__file__).parents[2] / "README.md"
# Apache's own body timeout, short (mod_reqtimeout, which Debian enables: body=20 s by default).
APACHE_BODY_TIMEOUT = f"""LoadModule reqtimeout_module {frontends.MODULES}/mod_reqtimeout.so
RequestReadTimeout body=2"""
ADMIN_PATHS = ["/admin-health", "/metrics", "/admin/instances", "/admin/users/u1/limits"]


@dataclass
class Front:
    kind: str
    server: frontends.FrontServer
    stcs: StcsServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None, **headers: str) -> Any:
        """The unmodified Python client through this front server; its constructor already
        makes requests (tenant and database checks), so it may raise."""
        sent = {"X-Chroma-Token": token} if token is not None else {}
        return chromadb.HttpClient(
            host="127.0.0.1",
            port=self.port,
            headers={**sent, **headers},
            settings=Settings(anonymized_telemetry=False),
        )


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Callable[..., Front]]:
    """Factory: ``front(kind, stcs_server, *render_args)`` renders the HTTP site for that stcs
    and runs the real server with it."""
    started: list[frontends.FrontServer] = []

    def make(kind: str, server: StcsServer, *render_args: str, apache_extra: str = "") -> Front:
        root = tmp_path / f"{kind}-{len(started)}"
        root.mkdir()
        port = free_port()
        args = ["--appPort", str(server.port), "--listen", f"127.0.0.1:{port}", *render_args]
        site = frontends.render(kind, root / "site.conf", *args)
        if kind == "nginx":
            main = frontends.nginx_main(root, site)
        else:
            main = frontends.apache_main(root, site, [f"127.0.0.1:{port}"], apache_extra)
        running = frontends.start(kind, main, port, None)
        started.append(running)
        return Front(kind, running, server)

    yield make
    for running in started:
        running.stop()


# -- what a client sees -------------------------------------------------------------------------


def client_raises(status: int, body: bytes) -> BaseException | None:
    """The exception the Python client raises for this answer (chromadb's own mapping)."""
    resp = httpx.Response(status, content=body, request=httpx.Request("GET", "http://front/"))
    try:
        BaseHTTPClient._raise_chroma_error(resp)
    except BaseException as exc:  # whatever the client would raise
        return exc
    return None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def chroma(self, status: int, name: str, exc: type[BaseException]) -> dict[str, Any]:
        """Assert chroma's error shape: ``status``, JSON ``{"error": name, "message"}``
        labelled as JSON, and that the client raises ``exc``; return the body."""
        assert self.status == status, (self.status, self.body[:300])
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc: dict[str, Any] = json.loads(self.body)
        assert doc["error"] == name and isinstance(doc["message"], str), doc
        assert isinstance(client_raises(self.status, self.body), exc)
        return doc


def raw(port: int, data: bytes, *, pause_after: int | None = None, timeout: float = 20) -> Answer:
    """Send ``data`` on a fresh connection (``pause_after``: send that many bytes, then
    nothing more) and read one answer (Content-Length framed, or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data if pause_after is None else data[:pause_after])
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {got!r}"
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            body += chunk
        return Answer(int(lines[0].split()[1]), headers, body[:length] if length >= 0 else body)


def wait_in_flight(server: StcsServer) -> None:
    """Until an instance holds a request in flight (stcs runs with ``--adminAPIKey ADMIN``)."""
    deadline = time.monotonic() + 20
    while True:
        listed = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10).json()
        if any(i["inFlight"] >= 1 for i in listed["instances"]):
            return
        assert time.monotonic() < deadline, listed
        time.sleep(0.02)


def hold_the_only_connection(server: StcsServer) -> socket.socket:
    """The first connection to a starting stcs (``maxConnections`` 1, started with
    ``wait=False``): it takes the only slot, with no request sent.  (Waiting for ``/health``
    instead would leave that probe's connection counted for a while, then let it go.)"""
    deadline = time.monotonic() + 20
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            break
        except ConnectionRefusedError:
            assert server.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    answer = raw(server.port, b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.status == 503, answer  # the held connection has the slot
    return sock


def get(front: Front, path: str, **headers: str) -> Answer:
    resp = requests.get(f"{front.base}{path}", headers=headers, timeout=30)
    return Answer(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content)


def assert_refused_503_with_retry_after(f: Front) -> None:
    """A new user's request through ``f`` is refused 503 + ``Retry-After`` (≥ 1 s) in chroma's
    shape: the Python client raises `RateLimitError`."""
    with pytest.raises(RateLimitError):
        f.client(new_token()).heartbeat()
    answer = get(f, "/api/v2/heartbeat", **{"X-Chroma-Token": new_token()})
    answer.chroma(503, "RateLimitError", RateLimitError)
    assert int(answer.headers["retry-after"]) >= 1


# -- the rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_before_chroma_raise_the_same_exceptions_through_the_front_server(
    stcs: Callable[..., StcsServer],
    auth_server: AuthServer,
    front: Callable[..., Front],
    kind: str,
) -> None:
    """Token, auth server, user id, block, body size, head size, quota and rate rows, with the
    Python client through the front server."""
    good, blocked, quota, rated = (new_token() for _ in range(4))
    for token in (good, blocked, quota, rated):
        auth_server.answers[token] = (200, {"userId": f"user-{token[:8]}"})
    auth_server.answers["odd-id"] = (200, {"userId": "../escape"})
    auth_server.answers["auth-broken"] = (500, {"message": "boom"})
    server = stcs("--auth", auth_server.url, "--adminAPIKey", ADMIN,
                  "--maxBodySize", str(1 * MB), "--userMaxCollections", "1")  # fmt: skip
    f = front(kind, server)

    # no token / rejected token -> 401 ChromaAuthError
    for refused in (None, "not-a-known-token"):
        with pytest.raises(ChromaAuthError):
            f.client(refused).list_collections()
    # auth server 5xx -> 503 InternalError; unusable user id -> 502 InternalError
    for failing in ("auth-broken", "odd-id"):
        with pytest.raises(InternalError):
            f.client(failing).list_collections()

    client = f.client(good)
    col = client.create_collection("one")
    # body over maxBodySize -> 413 InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="exceeds the limit"):
        col.add(ids=["a"], embeddings=vectors(1, 1), documents=["y" * (2 * MB)])
    # head over the limits -> InvalidArgumentError (431 from nginx/stcs, 400 from Apache)
    with pytest.raises(InvalidArgumentError):
        f.client(good, **{"X-Pad": "p" * 20_000}).list_collections()
    with pytest.raises(InvalidArgumentError):  # 4 x 5000 bytes: within nginx's and Apache's
        f.client(good, **{f"X-Pad-{i}": "p" * 5000 for i in range(4)}).list_collections()
    assert col.count() == 0  # the refused add never reached chroma

    # a per-user quota -> 422 QuotaError
    over = f.client(quota)
    over.create_collection("first")
    with pytest.raises(QuotaError):
        over.create_collection("second")
    # per-user rate (an override for this user only) -> 429 RateLimitError
    limits = {"userRequestsPerSecond": 1, "userRequestBurst": 1}
    resp = requests.put(f"{server.url}/admin/users/user-{rated[:8]}/limits", json=limits,
                        headers=HDR, timeout=10)  # fmt: skip
    assert resp.status_code == 200, resp.text
    with pytest.raises(RateLimitError):
        f.client(rated).list_collections()
    # the user is blocked -> 403 AuthorizationError (blocked at stcs directly: the admin API is
    # not routed through the front server)
    resp = requests.post(f"{server.url}/admin/users/user-{blocked[:8]}/block", headers=HDR,
                         timeout=10)  # fmt: skip
    assert resp.status_code in (200, 204), resp.text
    with pytest.raises(AuthorizationError):
        f.client(blocked).list_collections()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fair_share_and_cluster_refusals_raise_the_same_exceptions(
    stcs: Callable[..., StcsServer],
    auth_server: AuthServer,
    front: Callable[..., Front],
    kind: str,
    tmp_path: Path,
) -> None:
    """New users per address, token lookups per address (both 429 `RateLimitError`) and a
    cluster node refusing a user the ring places elsewhere (503 `InternalError`), with the
    Python client through the front server (whose address is the one stcs counts)."""
    # addressNewUsersPerMinute 1: the second never-seen user from the front server's address
    news = stcs("--addressNewUsersPerMinute", "1", name="news", db=tmp_path / "db-news")
    f = front(kind, news)
    f.client(new_token()).list_collections()
    with pytest.raises(RateLimitError):
        f.client(new_token()).list_collections()

    # authMaxLookupsPerAddress 1, an auth server taking 1 s: a second token's lookup while the
    # first is in flight is refused at once
    slow = [new_token() for _ in range(2)]
    for token in slow:
        auth_server.answers[token] = (200, {"userId": f"user-{token[:8]}"})
    auth_server.delay = 1.0
    lookups = stcs("--auth", auth_server.url, "--authMaxLookupsPerAddress", "1",
                   name="lookups", db=tmp_path / "db-lookups")  # fmt: skip
    g = front(kind, lookups)
    first = threading.Thread(target=lambda: requests.get(
        f"http://127.0.0.1:{g.port}/api/v2/heartbeat", headers={"X-Chroma-Token": slow[0]},
        timeout=30))  # fmt: skip
    first.start()
    deadline = time.monotonic() + 10
    while auth_server.in_flight == 0:
        assert time.monotonic() < deadline, "the first lookup never began"
        time.sleep(0.01)
    with pytest.raises(RateLimitError):
        g.client(slow[1])
    first.join(30)
    auth_server.delay = 0.0

    # a cluster node: a never-seen user whom nginx's ring gives to the other node
    nodes = ["127.0.0.1:18001", "127.0.0.1:18002"]
    ring = Ring.of(nodes)
    elsewhere = next(t for t in iter(new_token, None) if ring.owner(t) == nodes[1])
    node = stcs("--clusterNodes", ",".join(nodes), "--clusterSelf", nodes[0], name="node",
                db=tmp_path / "db-node")  # fmt: skip
    with pytest.raises(InternalError):
        front(kind, node).client(elsewhere).list_collections()
    assert user_dirs(node.db) == []


@pytest.mark.parametrize("kind", KINDS)
def test_refused_framing_and_paused_bodies_answer_in_chromas_shape(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    """Rows the client cannot send, as raw HTTP through the front server."""
    server = stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--maxBodySize", str(MB),
                  "--bodyTimeout", "1500")  # fmt: skip
    f = front(kind, server, apache_extra=APACHE_BODY_TIMEOUT)
    token = new_token()
    auth = f"X-Chroma-Token: {token}\r\n".encode()

    # duplicate Content-Length (smuggling shape) -> 400 InvalidArgumentError
    dup = b"POST /echo/x HTTP/1.1\r\nHost: a\r\n" + auth
    dup += b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabc"
    raw(f.port, dup).chroma(400, "InvalidArgumentError", InvalidArgumentError)
    # a transfer coding other than chunked -> 501 (nginx) / 400 (Apache) InvalidArgumentError
    coded = b"POST /echo/x HTTP/1.1\r\nHost: a\r\n" + auth
    coded += b"Transfer-Encoding: gzip\r\n\r\nabc"
    status = 501 if kind == "nginx" else 400
    raw(f.port, coded).chroma(status, "InvalidArgumentError", InvalidArgumentError)
    # body over maxBodySize by its Content-Length, or chunked -> 413 InvalidArgumentError
    # (the whole body sent, as clients do: Apache relays a body before it reads the answer)
    big = b"POST /echo/x HTTP/1.1\r\nHost: a\r\n" + auth + b"Content-Length: 2000000\r\n\r\n"
    big += b"b" * 2_000_000
    doc = raw(f.port, big).chroma(413, "InvalidArgumentError", InvalidArgumentError)
    assert "exceeds the limit" in doc["message"], doc
    chunk = b"%x\r\n" % (256 * 1024) + b"c" * (256 * 1024) + b"\r\n"
    chunked = b"POST /echo/x HTTP/1.1\r\nHost: a\r\n" + auth
    chunked += b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 6 + b"0\r\n\r\n"
    raw(f.port, chunked).chroma(413, "InvalidArgumentError", InvalidArgumentError)
    # a head over maxHeaderSize in lines the front server takes -> stcs's 431
    wide = b"GET /echo/x HTTP/1.1\r\nHost: a\r\n" + auth
    wide += b"".join(b"X-W%d: %s\r\n" % (i, b"w" * 5000) for i in range(4)) + b"\r\n"
    raw(f.port, wide).chroma(431, "InvalidArgumentError", InvalidArgumentError)
    # over maxHeadersCount (100) -> stcs's 431 through nginx; Apache's own LimitRequestFields
    # (100) refuses it first with 400
    many = b"GET /echo/x HTTP/1.1\r\nHost: a\r\n" + auth
    many += b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"
    status = 431 if kind == "nginx" else 400
    raw(f.port, many).chroma(status, "InvalidArgumentError", InvalidArgumentError)
    # a body paused longer than bodyTimeout -> 408 InvalidArgumentError: stcs's through nginx;
    # Apache relays a body before it reads the answer, so there its own body timeout answers
    paused = b"PUT /echo/x HTTP/1.1\r\nHost: a\r\n" + auth + b"Content-Length: 100\r\n\r\n"
    paused += b"x" * 100
    raw(f.port, paused, pause_after=len(paused) - 50).chroma(
        408, "InvalidArgumentError", InvalidArgumentError
    )


@pytest.mark.parametrize("kind", KINDS)
def test_no_instance_slot_raises_rate_limit_error_with_retry_after(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    total_mb = psutil.virtual_memory().total // MB
    server = stcs("--dbMinFreeMemoryMB", str(total_mb * 2), "--queueTimeout", "1000")
    assert_refused_503_with_retry_after(front(kind, server))


@pytest.mark.parametrize("kind", KINDS)
def test_a_chroma_that_fails_to_start_raises_internal_error(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    server = stcs("--chromaCommand", f"{sys.executable} -c 'raise SystemExit(3)'",
                  "--dbMaxRetries", "0")  # fmt: skip
    f = front(kind, server)
    with pytest.raises(InternalError):
        f.client(new_token()).heartbeat()


@pytest.mark.parametrize("kind", KINDS)
def test_chroma_dying_mid_request_is_502_internal_error(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    server = stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--adminAPIKey", ADMIN)
    f = front(kind, server)
    token = new_token()
    assert get(f, "/echo/warm", **{"X-Chroma-Token": token}).status == 200
    [child] = server.children()
    answers: list[Answer] = []
    slow = threading.Thread(
        target=lambda: answers.append(get(f, "/slow?delay=5", **{"X-Chroma-Token": token}))
    )
    slow.start()
    wait_in_flight(server)  # the request is at the child, which answers after 5 s
    child.kill()
    slow.join(30)
    [answer] = answers
    answer.chroma(502, "InternalError", InternalError)


@pytest.mark.parametrize("kind", KINDS)
def test_shutting_down_and_down_raise_internal_error(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    server = stcs("--chromaCommand", f"{sys.executable} {ECHO}", "--adminAPIKey", ADMIN)
    f = front(kind, server)
    token = new_token()
    answers: list[Answer] = []
    slow = threading.Thread(
        target=lambda: answers.append(get(f, "/slow?delay=3", **{"X-Chroma-Token": token}))
    )
    slow.start()
    wait_in_flight(server)
    server.proc.send_signal(signal.SIGTERM)  # draining: the slow request is still in flight
    server.wait_event("shutting down")
    # nginx: 502 (connection refused); Apache: 503 (mod_proxy's "no backend")
    refused = 502 if kind == "nginx" else 503
    with pytest.raises(InternalError):
        f.client(new_token()).heartbeat()
    get(f, "/api/v2/heartbeat", **{"X-Chroma-Token": token}).chroma(
        refused, "InternalError", InternalError
    )
    slow.join(30)
    assert answers[0].status == 200  # the request in flight finished
    assert server.proc.wait(30) == 0
    with pytest.raises(InternalError):  # stcs gone: the front server's own 502
        f.client(new_token()).heartbeat()
    get(f, "/api/v2/heartbeat").chroma(refused, "InternalError", InternalError)


@pytest.mark.parametrize("kind", KINDS)
def test_more_than_max_connections_raises_rate_limit_error(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    server = stcs("--maxConnections", "1", "--headersTimeout", "60000", wait=False)
    # One connection straight to stcs holds the only slot: each one the front server opens is
    # one too many.
    with hold_the_only_connection(server):
        assert_refused_503_with_retry_after(front(kind, server))


# -- item 4: the admin endpoints ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_admin_endpoints_are_not_routed_by_default(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str
) -> None:
    """With the right key, from the front server's own host: 404 in chroma's shape, answered
    by the front server (stcs would answer 200), for every spelling that reaches them."""
    server = stcs("--adminAPIKey", ADMIN)
    assert requests.get(f"{server.url}/admin-health", headers=HDR, timeout=10).status_code == 200
    f = front(kind, server)
    seen_before = len(server.events("request"))
    spellings = [*ADMIN_PATHS, "//admin-health", "/%61dmin-health", "/api/../metrics",
                 "/metrics?x=1", "/admin/"]  # fmt: skip
    for path in spellings:
        answer = raw(f.port, f"GET {path} HTTP/1.1\r\nHost: a\r\nx-api-key: {ADMIN}\r\n"
                     "Connection: close\r\n\r\n".encode())  # fmt: skip
        answer.chroma(404, "NotFoundError", NotFoundError)
    assert server.events("request")[seen_before:] == []  # stcs never saw them
    # chroma's API still goes through
    assert get(f, "/health").status == 200


@pytest.mark.parametrize("kind", KINDS)
def test_admin_from_routes_the_admin_rows_for_that_network_only(
    stcs: Callable[..., StcsServer], front: Callable[..., Front], kind: str, tmp_path: Path
) -> None:
    """``--admin-from 127.0.0.0/8``: the admin rows of the table through the front server;
    ``--admin-from 10.0.0.0/8`` (not this client): still 404 from the front server."""
    server = stcs("--adminAPIKey", ADMIN)
    f = front(kind, server, "--admin-from", "127.0.0.0/8", "--admin-from", "::1")
    assert get(f, "/admin-health", **HDR).status == 200
    assert get(f, "/metrics", **HDR).status == 200
    # admin endpoint with a wrong key -> 403 AuthorizationError
    get(f, "/admin-health", **{"x-api-key": "wrong"}).chroma(
        403, "AuthorizationError", AuthorizationError
    )
    # admin call about a user with no instance -> 404 NotFoundError
    gone = requests.delete(f"{f.base}/admin/instances/{new_token()}", headers=HDR, timeout=10)
    Answer(gone.status_code, {k.lower(): v for k, v in gone.headers.items()}, gone.content).chroma(
        404, "NotFoundError", NotFoundError
    )
    # admin call with an unusable argument -> 400 InvalidArgumentError
    bad = requests.put(f"{f.base}/admin/users/u1/limits", data=b"[1]", headers=HDR, timeout=10)
    Answer(bad.status_code, {k.lower(): v for k, v in bad.headers.items()}, bad.content).chroma(
        400, "InvalidArgumentError", InvalidArgumentError
    )
    # admin data call the user's cluster mark forbids -> 409 InvalidArgumentError
    served = requests.post(
        f"{f.base}/admin/users/u1/prune", json={"paths": ["x"]}, headers=HDR, timeout=10
    )
    Answer(
        served.status_code, {k.lower(): v for k, v in served.headers.items()}, served.content
    ).chroma(409, "InvalidArgumentError", InvalidArgumentError)
    # an import larger than the free disk space -> 507 InternalError (a tar header announcing
    # 1 PB: refused before any of it is read)
    requests.put(
        f"{f.base}/admin/users/u2/placement", json={"state": "arriving"}, headers=HDR, timeout=30
    ).raise_for_status()
    header = tarfile.TarInfo("huge")
    header.size = 10**15
    full = requests.post(
        f"{f.base}/admin/users/u2/import", data=header.tobuf(), headers=HDR, timeout=30
    )
    Answer(full.status_code, {k.lower(): v for k, v in full.headers.items()}, full.content).chroma(
        507, "InternalError", InternalError
    )
    # admin endpoint while no adminAPIKey is set -> 404 NotFoundError (stcs's own)
    keyless = front(kind, stcs(db=tmp_path / "keyless"), "--admin-from", "127.0.0.1")
    get(keyless, "/admin-health", **HDR).chroma(404, "NotFoundError", NotFoundError)

    elsewhere = front(kind, server, "--admin-from", "10.0.0.0/8")
    for path in ADMIN_PATHS:
        get(elsewhere, path, **HDR).chroma(404, "NotFoundError", NotFoundError)


# -- the table is covered ---------------------------------------------------------------------

# The start of each README row's "case" -> the tests above that produce it through both servers.
ROWS = {
    "no token, or token rejected": "test_refusals_before_chroma_raise_the_same_exceptions",
    "auth server unreachable": "test_refusals_before_chroma_raise_the_same_exceptions",
    "auth server gave a user id": "test_refusals_before_chroma_raise_the_same_exceptions",
    "no instance slot": "test_no_instance_slot_raises_rate_limit_error_with_retry_after",
    "too many new users started": "test_fair_share_and_cluster_refusals_raise_the_same_exc",
    "too many token lookups in flight": "test_fair_share_and_cluster_refusals_raise_the_same",
    "cluster node:": "test_fair_share_and_cluster_refusals_raise_the_same_exceptions",
    "the user's chroma failed to start": "test_a_chroma_that_fails_to_start_raises_internal_",
    "the user's chroma died mid-request": "test_chroma_dying_mid_request_is_502_internal_error",
    "body over `maxBodySize`": "test_refused_framing_and_paused_bodies_answer_in_chromas_sh",
    "malformed or smuggling framing": "test_refused_framing_and_paused_bodies_answer_in_chroma",
    "head not received within": "test_refused_framing_and_paused_bodies_answer_in_chromas_sh",
    "head over `maxHeaderSize`": "test_refusals_before_chroma_raise_the_same_exceptions",
    "a transfer coding other than": "test_refused_framing_and_paused_bodies_answer_in_chroma",
    "more than `maxConnections`": "test_more_than_max_connections_raises_rate_limit_error",
    "the user is blocked": "test_refusals_before_chroma_raise_the_same_exceptions",
    "stcs is shutting down": "test_shutting_down_and_down_raise_internal_error",
    "admin endpoint with a wrong key": "test_admin_from_routes_the_admin_rows_for_that_network",
    "admin endpoint while no `adminAPIKey`": "test_admin_from_routes_the_admin_rows_for_that_n",
    "admin call with an unusable argument": "test_admin_from_routes_the_admin_rows_for_that_net",
    "admin data call the user's cluster mark": "test_admin_from_routes_the_admin_rows_for_that_n",
    "import (`POST /admin": "test_admin_from_routes_the_admin_rows_for_that_network",
    "a write over a per-user quota": "test_refusals_before_chroma_raise_the_same_exceptions",
    "over a user's request rate": "test_refusals_before_chroma_raise_the_same_exceptions",
}


def test_every_row_of_the_readme_error_table_is_covered_through_both_front_servers() -> None:
    table = README.read_text().split("| case | HTTP | client raises |", 1)[1].split("\n\n", 1)[0]
    cases = [row.split("|")[1].strip() for row in table.strip().splitlines()[1:]]
    uncovered = [c for c in cases if not any(c.startswith(start) for start in ROWS)]
    assert uncovered == []
    assert len(cases) == len(ROWS)
    names = {n for n in globals() if n.startswith("test_")}
    for test in ROWS.values():
        assert any(n.startswith(test) for n in names), test
