"""``autoCreateUsers: false`` in a cluster (issue 21): the router asks *any* node's ``GET
/auth``, and a user's directory is on one node only.  Two real stcs nodes."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

from stcs.ring import Ring
from tests.harness import ADMIN, StcsServer

LIST = "/api/v2/tenants/default_tenant/databases/default_database/collections"
KEY = {"x-api-key": ADMIN}


def owned(ring: Ring, node: str, n: int) -> list[str]:
    ids = (str(uuid.UUID(int=i * 7919 + 11)) for i in range(10_000))
    return [u for u in ids if ring.owner(u) == node][:n]


def test_auth_answers_for_users_of_other_nodes_and_misrouted_users_are_not_unknown(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    configs = [tmp_path / "a.yml", tmp_path / "b.yml"]
    for c in configs:
        c.write_text("autoCreateUsers: false\n")
    a, b = (
        stcs("--config", str(c), "--adminAPIKey", ADMIN, db=tmp_path / c.stem, name=c.stem)
        for c in configs
    )
    names = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    for c, node, me in zip(configs, (a, b), names, strict=True):
        c.write_text(
            f"autoCreateUsers: false\nclusterNodes: {','.join(names)}\nclusterSelf: {me}\n"
        )
        os.kill(node.pid, signal.SIGHUP)
        node.wait_event("settings reloaded")
    ring = Ring.of(names)
    (user,) = owned(ring, names[1], 1)
    (stranger,) = owned(ring, names[1], 2)[1:]
    # Added on a node the ring does not give them to: refused, nothing created (before: a
    # directory no router would ever send the user to, or one that would miss a move).
    elsewhere = requests.put(f"{a.url}/admin/users/{user}", headers=KEY, timeout=30)
    assert elsewhere.status_code == 409, elsewhere.text
    assert not (a.db / user).exists()
    added = requests.put(f"{b.url}/admin/users/{user}", headers=KEY, timeout=30)
    assert added.status_code in (200, 201), added.text

    # The router may ask A to authenticate B's user: 204 with the id (before: 401 "unknown user",
    # so a user living on B was refused whenever nginx's auth_request went to A).
    auth = requests.get(f"{a.url}/auth", headers={"X-Chroma-Token": user}, timeout=30)
    assert auth.status_code == 204, auth.text
    assert auth.headers["X-Stcs-User-Id"] == user
    # B, which holds the data, serves the user.
    served = requests.get(f"{b.url}{LIST}", headers={"X-Chroma-Token": user}, timeout=60)
    assert served.status_code == 200, served.text

    # Misrouted to A (a router with another node list): 503 + Retry-After, not 401 (which a
    # client takes for a bad token); nothing created.
    misrouted = requests.get(f"{a.url}{LIST}", headers={"X-Chroma-Token": user}, timeout=60)
    assert misrouted.status_code == 503, misrouted.text
    assert misrouted.json()["error"] == "InternalError"
    assert int(misrouted.headers["Retry-After"]) >= 1
    assert not (a.db / user).exists()

    # A user nobody added, at the node the ring gives them to: 401 as on a single node, and
    # nothing created (random ids cannot fill the disk or take instance slots).
    unknown = requests.get(f"{b.url}{LIST}", headers={"X-Chroma-Token": stranger}, timeout=60)
    assert unknown.status_code == 401, unknown.text
    assert not (b.db / stranger).exists()
