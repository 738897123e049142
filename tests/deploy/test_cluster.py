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
            db=tmp_path / f"node{i}",
            name=f"node{i}",
        )
        for i in range(3)
    ]
    root = tmp_path / "router"
    root.mkdir()
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}"]
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
