"""A cluster node never creates or serves a user it does not own (issue 21 item 1): two real
stcs nodes, the ring set by a reload (``clusterNodes`` is reloadable)."""

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


def get(node: StcsServer, token: str) -> requests.Response:
    return requests.get(f"{node.url}{LIST}", headers={"X-Chroma-Token": token}, timeout=60)


def owned(ring: Ring, node: str, n: int) -> list[str]:
    ids = (str(uuid.UUID(int=i * 104729 + 3)) for i in range(10_000))
    return [u for u in ids if ring.owner(u) == node][:n]


def test_nodes_refuse_users_they_do_not_own_are_moving_or_moved_away(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    configs = [tmp_path / "a.yml", tmp_path / "b.yml"]
    for c in configs:
        c.write_text("logLevel: info\n")
    a, b = (
        stcs("--config", str(c), "--adminAPIKey", ADMIN, db=tmp_path / c.stem, name=c.stem)
        for c in configs
    )
    names = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    ring = Ring.of(names)
    u_a, u_a2 = owned(ring, names[0], 2)
    (u_b,) = owned(ring, names[1], 1)

    # Before: no ring configured, B creates an empty database for A's user (the bug).
    before = get(b, u_a2)
    assert before.status_code == 200 and before.json() == []
    assert (b.db / u_a2).is_dir()

    for c, node, me in zip(configs, (a, b), names, strict=True):
        c.write_text(f"logLevel: info\nclusterNodes: {','.join(names)}\nclusterSelf: {me}\n")
        os.kill(node.pid, signal.SIGHUP)
        node.wait_event("settings reloaded")
    assert requests.get(f"{a.url}/admin/cluster", headers=KEY, timeout=10).json()["nodes"] == names

    # Never seen and owned by A: B refuses, chroma-shaped, with Retry-After; creates nothing.
    refused = get(b, u_a)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "InternalError"
    assert int(refused.headers["Retry-After"]) >= 1
    assert not (b.db / u_a).exists()
    assert get(a, u_a).status_code == 200  # its owner serves it
    # A user with data on B stays served there (the directory is the proof), ring or not.
    assert get(b, u_a2).status_code == 200

    # Moved away from A (to B) while its chroma runs: stopped, then refused; the copy stays.
    mark = requests.put(
        f"{a.url}/admin/users/{u_a}/placement",
        json={"state": "moved", "to": names[1]},
        headers=KEY,
        timeout=60,
    )
    assert mark.status_code == 200 and mark.json()["stopped"] is True, mark.text
    gone = get(a, u_a)
    assert gone.status_code == 503 and "moved" in gone.json()["message"]
    assert (a.db / u_a).is_dir()
    listed = requests.get(f"{a.url}/admin/users", headers=KEY, timeout=10).json()["users"]
    assert {u["userId"]: u["placement"] for u in listed}[u_a] == "moved"

    # Arriving on B: refused until the copy is in, then served.
    requests.put(
        f"{b.url}/admin/users/{u_b}/placement", json={"state": "arriving"}, headers=KEY, timeout=60
    ).raise_for_status()
    assert get(b, u_b).status_code == 503
    assert not (b.db / u_b).exists()
    requests.put(
        f"{b.url}/admin/users/{u_b}/placement", json={"state": "home"}, headers=KEY, timeout=60
    ).raise_for_status()
    assert get(b, u_b).status_code == 200

    # The marks survive a restart of A.
    assert a.stop() == 0
    a2 = stcs("--config", str(configs[0]), "--adminAPIKey", ADMIN, db=a.db, name="a2")
    assert get(a2, u_a).status_code == 503
    assert requests.get(f"{a2.url}/admin/cluster", headers=KEY, timeout=10).json()["moved"] == {
        u_a: names[1]
    }
