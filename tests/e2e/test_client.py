"""The unmodified chromadb.HttpClient against a real `stcs serve` and real chroma children."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chromadb
import pytest
import requests
from chromadb.api.async_fastapi import AsyncFastAPI
from chromadb.config import Settings
from chromadb.errors import ChromaAuthError, InternalError, NotFoundError

from tests.harness import (
    ADMIN,
    HDR,
    AuthServer,
    StcsServer,
    client_for,
    new_token,
    readme_block,
    self_signed_cert,
    user_dirs,
    vectors,
)


@pytest.fixture
def server(stcs: Callable[..., StcsServer]) -> StcsServer:
    return stcs()


@pytest.mark.parametrize("transport", ["x-chroma-token", "bearer"])
def test_full_cycle_with_each_token_transport(server: StcsServer, transport: str) -> None:
    token = new_token()
    client = client_for(server, token, transport)
    col = client.create_collection("docs", metadata={"hnsw:space": "l2"})
    embeddings = vectors(1000, seed=1)
    ids = [f"id-{i}" for i in range(1000)]
    col.add(
        ids=ids,
        embeddings=embeddings,
        documents=[f"document number {i}" for i in range(1000)],
        metadatas=[{"parity": i % 2, "n": i} for i in range(1000)],
    )
    assert col.count() == 1000

    # The nearest neighbour of vector 42 among even-numbered items is 42 itself.
    hits = col.query(query_embeddings=[embeddings[42]], n_results=5, where={"parity": 0})
    assert hits["ids"][0][0] == "id-42"
    assert all(m["parity"] == 0 for m in hits["metadatas"][0])
    assert hits["distances"][0][0] == pytest.approx(0.0, abs=1e-4)

    got = col.get(ids=["id-7", "id-8"], include=["documents", "metadatas"])
    assert dict(zip(got["ids"], got["documents"], strict=False)) == {
        "id-7": "document number 7",
        "id-8": "document number 8",
    }

    col.delete(ids=[f"id-{i}" for i in range(100)])
    assert col.count() == 900
    assert col.get(ids=["id-5"])["ids"] == []

    client.create_collection("second")
    assert sorted(c.name for c in client.list_collections()) == ["docs", "second"]
    client.delete_collection("second")
    assert [c.name for c in client.list_collections()] == ["docs"]
    assert user_dirs(server.db) == [token]


def test_users_are_isolated_each_in_their_own_directory(server: StcsServer) -> None:
    alice, bob = new_token(), new_token()
    a = client_for(server, alice).create_collection("docs")
    b = client_for(server, bob, "bearer").create_collection("docs")
    a.add(ids=["alice-1"], embeddings=vectors(1, 2), documents=["alice's secret"])
    b.add(ids=["bob-1", "bob-2"], embeddings=vectors(2, 3), documents=["bob", "bob again"])

    assert client_for(server, alice).get_collection("docs").get()["ids"] == ["alice-1"]
    assert sorted(client_for(server, bob).get_collection("docs").get()["ids"]) == ["bob-1", "bob-2"]
    assert user_dirs(server.db) == sorted([alice, bob])
    for token in (alice, bob):
        assert (server.db / token / "chroma.sqlite3").is_file()


def test_uppercase_uuid_is_the_same_user(server: StcsServer) -> None:
    token = new_token()
    client_for(server, token.upper()).create_collection("shared")
    assert [c.name for c in client_for(server, token).list_collections()] == ["shared"]
    assert user_dirs(server.db) == [token]


@pytest.mark.parametrize("token", [None, "not-a-uuid", "", "3f2b8a4e9c1d4e5f8a7b6c5d4e3f2a1b"])
def test_missing_or_non_uuid_token_raises_chroma_auth_error(
    server: StcsServer, token: str | None
) -> None:
    with pytest.raises(ChromaAuthError):
        client_for(server, token).list_collections()
    assert user_dirs(server.db) == []


def test_auth_server_answers_userid_and_data_userid(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    auth_server.answers["tok-flat"] = (200, {"userId": "user-flat"})
    auth_server.answers["tok-nested"] = (200, {"data": {"userId": "user.nested@example.com"}})
    server = stcs("--auth", auth_server.url, "--authKey", "auth-key-1")
    client_for(server, "tok-flat").create_collection("flat")
    client_for(server, "tok-nested", "bearer").create_collection("nested")
    assert user_dirs(server.db) == ["user-flat", "user.nested@example.com"]
    assert set(auth_server.api_keys) == {"auth-key-1"}


def test_cached_token_does_not_call_the_auth_server_again(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    auth_server.answers["tok"] = (200, {"userId": "cached-user"})
    server = stcs("--auth", auth_server.url, "--authCacheTTL", "60000")
    client = client_for(server, "tok")  # the client itself makes several requests
    for i in range(5):
        client.get_or_create_collection(f"coll-{i}")
    assert auth_server.calls["tok"] == 1


def test_auth_server_rejection_raises_chroma_auth_error(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    auth_server.answers["revoked"] = (403, {"message": "revoked"})
    server = stcs("--auth", auth_server.url)
    for token in ("revoked", "unknown-token"):
        with pytest.raises(ChromaAuthError):
            client_for(server, token).list_collections()
    assert user_dirs(server.db) == []


def test_a_wrong_auth_server_api_key_is_named_in_a_warning_and_admin_health(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    """Every token refused because stcs's ``authServerAPIKey`` is wrong: the clients see 401 (as
    for bad tokens), and the operator sees one warning naming the key and ``/admin-health``'s
    ``authServer.suspectApiKey``."""
    auth_server.api_key = "the-auth-servers-key"
    auth_server.answers["good"] = (200, {"userId": "alice"})
    server = stcs("--auth", auth_server.url, "--authServerAPIKey", "a-stale-key",
                  "--adminAPIKey", ADMIN)  # fmt: skip
    for i in range(25):
        got = requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": f"t{i}"}, timeout=10
        )
        assert got.status_code == 401
    warnings = [e for e in server.log_lines() if "authServerAPIKey" in e.get("event", "")]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning", warnings
    assert "a-stale-key" not in server.log_path.read_text()  # named, never shown
    health = requests.get(f"{server.url}/admin-health", headers=HDR, timeout=10).json()
    assert health["authServer"]["suspectApiKey"] is True
    assert health["authServer"]["refused"] == 25 and health["authServer"]["accepted"] == 0


def test_auth_server_down_is_503_not_401(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    url = auth_server.url
    auth_server.stop()  # nothing listens there any more
    server = stcs("--auth", url, "--authTimeout", "2000")
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": "t"}, timeout=10
    )
    assert resp.status_code == 503
    assert resp.json()["error"] == "InternalError"
    with pytest.raises(InternalError):
        client_for(server, "t").list_collections()
    assert user_dirs(server.db) == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "x" * 200, ".hidden", "..", "a\nb", ""])
def test_unsafe_user_id_from_auth_server_is_refused(
    stcs: Callable[..., StcsServer], auth_server: AuthServer, bad: str, tmp_path: Path
) -> None:
    auth_server.answers["tok"] = (200, {"userId": bad})
    server = stcs("--auth", auth_server.url)
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": "tok"}, timeout=10
    )
    status = 502 if bad else 503  # an empty userId is "no user id" (malformed answer)
    assert resp.status_code == status
    assert resp.json()["error"] == "InternalError"
    assert user_dirs(server.db) == []
    assert not (tmp_path / "x").exists()


def test_chroma_errors_pass_through(server: StcsServer) -> None:
    client = client_for(server, new_token())
    with pytest.raises(NotFoundError):
        client.get_collection("does-not-exist")


def test_in_app_tls_with_a_verified_certificate(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = stcs("--enableSSL", "--sslCertFile", str(cert), "--sslCertKeyFile", str(key), ca=cert)
    settings = Settings(chroma_server_ssl_verify=str(cert), anonymized_telemetry=False)
    client = chromadb.HttpClient(
        host="127.0.0.1",
        port=server.port,
        ssl=True,
        headers={"X-Chroma-Token": (token := new_token())},
        settings=settings,
    )
    client.create_collection("over-tls").add(ids=["a"], embeddings=vectors(1, 4))
    assert client.get_collection("over-tls").count() == 1
    assert user_dirs(server.db) == [token]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5)  # TLS only


def test_log_file_receives_json_lines(stcs: Callable[..., StcsServer], tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "stcs.log"
    log_file.parent.mkdir()
    server = stcs("--logFile", str(log_file))
    client_for(server, new_token()).heartbeat()
    server.stop()
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert events[0] == "stcs starting" and "instance started" in events
    assert "request" in events and events[-1] == "stcs stopped"


def test_auth_endpoint_answers_204_with_the_user_id_and_starts_nothing(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    auth_server.answers["good"] = (200, {"userId": "auth-only-user"})
    server = stcs("--auth", auth_server.url)
    ok = requests.get(f"{server.url}/auth", headers={"Authorization": "Bearer good"}, timeout=10)
    assert ok.status_code == 204 and ok.headers["X-Stcs-User-Id"] == "auth-only-user"
    bad = requests.get(f"{server.url}/auth", headers={"X-Chroma-Token": "bad"}, timeout=10)
    assert bad.status_code == 401 and bad.json()["error"] == "AuthError"
    assert requests.get(f"{server.url}/auth", timeout=10).status_code == 401
    assert server.children() == [] and user_dirs(server.db) == []
    auth_server.stop()
    down = requests.get(f"{server.url}/auth", headers={"X-Chroma-Token": "other"}, timeout=10)
    assert down.status_code == 503 and down.json()["error"] == "InternalError"


@pytest.mark.parametrize(
    ("trusted", "forwarded", "logged"),
    [
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("127.0.0.0/8, 10.0.0.0/8", "203.0.113.9, 10.1.2.3", "203.0.113.9"),
        ("", "203.0.113.9", "127.0.0.1"),  # not trusted: a client cannot spoof its address
        ("10.0.0.0/8", "203.0.113.9", "127.0.0.1"),  # the peer is not a trusted proxy
    ],
)
def test_client_address_in_the_log_honours_trusted_proxies(
    stcs: Callable[..., StcsServer], trusted: str, forwarded: str, logged: str
) -> None:
    server = stcs("--trustedProxies", trusted) if trusted else stcs()
    requests.get(f"{server.url}/health", headers={"X-Forwarded-For": forwarded}, timeout=10)
    health = [e for e in server.events("request") if e["path"] == "/health"]
    assert health[-1]["client"] == logged


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_the_client(stcs: Callable[..., StcsServer], loop: str) -> None:
    server = stcs("--eventLoop", loop)
    assert server.events("stcs starting")[0]["event_loop"] == loop
    token = new_token()
    col = client_for(server, token).create_collection("docs")
    embeddings = vectors(300, seed=5)  # ~2 MB of JSON: the streamed request path
    col.add(ids=[f"id-{i}" for i in range(300)], embeddings=embeddings)
    assert col.query(query_embeddings=[embeddings[7]], n_results=1)["ids"] == [["id-7"]]
    assert col.count() == 300


# -- the README's other clients: async Python, JavaScript ---------------------------------------


def test_async_clients_in_one_event_loop_share_the_first_token(server: StcsServer) -> None:
    """chromadb's async client sends the first client's headers for every async client of one
    event loop (chroma#6869): the README warns about it. When chroma fixes it, this test fails
    and the warning in README.md's "From async Python code" can go."""
    alice, bob = new_token(), new_token()
    client_for(server, alice).create_collection("alices")

    async def bobs_view() -> list[str]:
        await chromadb.AsyncHttpClient(  # Alice's client, first in this loop
            host="127.0.0.1", port=server.port, headers={"X-Chroma-Token": alice}
        )
        second = await chromadb.AsyncHttpClient(
            host="127.0.0.1", port=server.port, headers={"X-Chroma-Token": bob}
        )
        try:
            return [c.name for c in await second.list_collections()]
        finally:  # the shared transports outlive their clients: close them with the loop
            while AsyncFastAPI._clients:
                await AsyncFastAPI._clients.popitem()[1].aclose()

    assert asyncio.run(bobs_view()) == ["alices"]  # Bob's client read Alice's database


def test_readme_async_multi_tenant_example_keeps_users_apart(server: StcsServer) -> None:
    """The README's async example, as written but for the port: each user sees only their own
    collections, from one event loop."""
    code = readme_block("<!-- async multi-tenant example", "python")
    assert code.count("port=8000") == 1
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("port=8000", f"port={server.port}"), "README.md", "exec"), namespace)
    alice, bob = new_token(), new_token()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(namespace["main"](alice, bob))
    assert out.getvalue().strip() == "[]"
    assert [c.name for c in client_for(server, alice).list_collections()] == ["docs"]
    assert client_for(server, bob).list_collections() == []
    assert sorted(user_dirs(server.db)) == sorted([alice, bob])


JS_MODULES = os.environ.get("STCS_JS_CLIENT_MODULES", "")


@pytest.mark.skipif(
    not (JS_MODULES and shutil.which("node")), reason="set STCS_JS_CLIENT_MODULES (and node)"
)
def test_readme_js_example_runs_with_the_js_client(server: StcsServer, tmp_path: Path) -> None:
    """The README's JavaScript snippet, as written but for the port and the token, run by node
    with the npm ``chromadb`` package: the document lands in that user's own chroma."""
    code = readme_block("<!-- JS example", "js")
    token = re.search(r'^const TOKEN = "([^"]+)";', code, flags=re.MULTILINE)
    assert token and code.count("port: 8000") == 1
    user = new_token()
    script_dir = tmp_path / "js"
    script_dir.mkdir()
    (script_dir / "node_modules").symlink_to(JS_MODULES)  # `import "chromadb"` resolves here
    script = script_dir / "example.mjs"
    script.write_text(code.replace("port: 8000", f"port: {server.port}").replace(token[1], user))
    done = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=120, cwd=script_dir
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"
    assert client_for(server, user).get_collection("docs").get()["documents"] == ["hello"]
