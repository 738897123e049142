"""Scale-out: nginx routes each user (by the user id from /auth) to the one node holding them."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import chromadb
import pytest
import requests
from chromadb.config import Settings

from tests.deploy import frontends
from tests.harness import AuthServer, StcsServer, free_port

pytestmark = pytest.mark.skipif(not frontends.have("nginx"), reason="nginx not installed")

ADMIN = "cluster-admin-key"
LIST = "/api/v2/tenants/default_tenant/databases/default_database/collections"


@pytest.fixture
def cluster(
    stcs: Callable[..., StcsServer], auth_server: AuthServer, tmp_path: Path
) -> Iterator[tuple[list[StcsServer], frontends.FrontServer]]:
    nodes = [
        stcs(
            "--auth",
            auth_server.url,
            "--adminAPIKey",
            ADMIN,
            "--addressNewUsersPerMinute",  # every user comes through the one router
            "0",
            db=tmp_path / f"node{i}",
            name=f"node{i}",
        )
        for i in range(3)
    ]
    root = tmp_path / "router"
    root.mkdir()
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--maxBodySize", str(2**20)]
    for node in nodes:
        args += ["--node", f"127.0.0.1:{node.port}"]
    site = frontends.render("nginx-cluster", root / "cluster.conf", *args)
    router = frontends.start("nginx", frontends.nginx_main(root, site), port, None)
    yield nodes, router
    router.stop()


def client(router: frontends.FrontServer, token: str) -> chromadb.api.ClientAPI:
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=router.port,
        headers={"X-Chroma-Token": token},
        settings=Settings(anonymized_telemetry=False),
    )


def users_on(node: StcsServer) -> set[str]:
    body = requests.get(f"{node.url}/admin-health", headers={"x-api-key": ADMIN}, timeout=10).json()
    return {i["userId"] for i in body["instances"]}


@pytest.mark.slow
def test_each_user_lands_on_one_node_and_only_its_users_fail_when_it_stops(
    cluster: tuple[list[StcsServer], frontends.FrontServer], auth_server: AuthServer
) -> None:
    nodes, router = cluster
    users = {f"user-{u:02d}": (f"tok-{u}-a", f"tok-{u}-b") for u in range(30)}
    for user, tokens in users.items():
        for token in tokens:
            auth_server.answers[token] = (200, {"userId": user})

    for user, tokens in users.items():
        for n, token in enumerate(tokens):
            col = client(router, token).get_or_create_collection("mine")
            row: Sequence[float] = [float(n), 1.0, 2.0]
            col.add(ids=[f"{user}-{n}"], embeddings=[row])

    placement = {
        user: [i for i, node in enumerate(nodes) if user in users_on(node)] for user in users
    }
    assert all(len(where) == 1 for where in placement.values()), placement
    spread = Counter(where[0] for where in placement.values())
    assert len(spread) == 3, spread  # the hash uses every node
    for user, tokens in users.items():  # isolation: exactly the user's own two writes
        ids = client(router, tokens[1]).get_collection("mine").get()["ids"]
        assert sorted(ids) == [f"{user}-0", f"{user}-1"]

    down = 1
    assert nodes[down].stop(signal.SIGTERM) == 0
    for user, tokens in users.items():
        resp = requests.get(
            f"http://127.0.0.1:{router.port}{LIST}",
            headers={"X-Chroma-Token": tokens[0]},
            timeout=30,
        )
        if placement[user] == [down]:
            assert resp.status_code in (502, 503), (user, resp.status_code)
        else:
            assert resp.status_code == 200, (user, resp.status_code, resp.text)
            assert [c["name"] for c in resp.json()] == ["mine"]


def test_auth_errors_through_the_router_are_chroma_errors(
    cluster: tuple[list[StcsServer], frontends.FrontServer], auth_server: AuthServer
) -> None:
    _, router = cluster
    resp = requests.get(
        f"http://127.0.0.1:{router.port}{LIST}",
        headers={"X-Chroma-Token": "nobody-knows-me"},
        timeout=10,
    )
    assert resp.status_code == 401 and resp.json()["error"] == "AuthError"
    auth_server.stop()
    resp = requests.get(
        f"http://127.0.0.1:{router.port}{LIST}", headers={"X-Chroma-Token": "any"}, timeout=30
    )
    assert resp.status_code == 503 and resp.json()["error"] == "InternalError"


def test_the_router_keeps_the_client_contract(
    cluster: tuple[list[StcsServer], frontends.FrontServer], auth_server: AuthServer
) -> None:
    """Every refusal through the router is chroma's JSON (the Python client raises the matching
    exception), admin endpoints and metrics are not reachable there, and /health says what it
    checks."""
    import chromadb.errors

    nodes, router = cluster
    base = f"http://127.0.0.1:{router.port}"
    auth_server.answers["tok-blocked"] = (200, {"userId": "blocked-user"})
    for node in nodes:  # blocked on every node: whichever answers /auth refuses
        requests.post(
            f"{node.url}/admin/users/blocked-user/block", headers={"x-api-key": ADMIN}, timeout=10
        ).raise_for_status()
    blocked = requests.get(f"{base}{LIST}", headers={"X-Chroma-Token": "tok-blocked"}, timeout=10)
    assert blocked.status_code == 403, blocked.text
    assert blocked.json()["error"] == "AuthorizationError"
    with pytest.raises(chromadb.errors.AuthorizationError):
        client(router, "tok-blocked").list_collections()

    for path in ("/admin-health", "/metrics", "/admin/instances", "/admin/users", "/admin/x"):
        resp = requests.get(f"{base}{path}", headers={"x-api-key": ADMIN}, timeout=10)
        assert resp.status_code == 404, (path, resp.status_code, resp.text[:100])
        assert resp.json()["error"] == "NotFoundError", path

    health = requests.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and "checks" in health.json(), health.text

    auth_server.answers["tok-big"] = (200, {"userId": "big-user"})
    big = requests.post(
        f"{base}{LIST}", headers={"X-Chroma-Token": "tok-big"}, data=b"x" * (2 * 2**20), timeout=60
    )
    assert big.status_code == 413 and big.json()["error"] == "InvalidArgumentError", big.text[:200]

    auth_server.answers["tok-down"] = (200, {"userId": "down-user"})
    owner = next(  # the node the router sends down-user to: stop it
        n
        for n in nodes
        if requests.get(f"{base}{LIST}", headers={"X-Chroma-Token": "tok-down"}, timeout=30).ok
        and "down-user" in users_on(n)
    )
    assert owner.stop(signal.SIGTERM) == 0
    down = requests.get(f"{base}{LIST}", headers={"X-Chroma-Token": "tok-down"}, timeout=30)
    assert down.status_code == 502 and down.json()["error"] == "InternalError", down.text[:200]
