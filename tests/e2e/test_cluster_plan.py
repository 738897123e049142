"""``stcs cluster plan``: asks real nodes for their users and says who moves where."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

from stcs.ring import Ring
from tests.harness import ADMIN, StcsServer, cli

USERS = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(40)]


def test_plan_lists_the_users_the_new_ring_moves_with_their_sizes(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    nodes = [stcs("--adminAPIKey", ADMIN, db=tmp_path / f"n{i}", name=f"n{i}") for i in range(3)]
    names = [f"127.0.0.1:{n.port}" for n in nodes]
    old = Ring.of(names)
    for user in USERS:  # each user's directory on the node the current ring gives it
        node = nodes[names.index(old.owner(user))]
        r = requests.put(f"{node.url}/admin/users/{user}", headers={"x-api-key": ADMIN}, timeout=10)
        assert r.status_code == 200, r.text
        (node.db / user / "chroma.sqlite3").write_bytes(b"x" * 1000)
    new = [*names, "127.0.0.1:1"]  # the new node need not run for a plan

    done = cli("cluster", "plan", "--from", ",".join(names), "--to", ",".join(new), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)

    after = Ring.of(new)
    expected = {u: (old.owner(u), after.owner(u)) for u in USERS if after.owner(u) != old.owner(u)}
    assert {m["userId"]: (m["from"], m["to"]) for m in plan["moves"]} == expected
    assert 0 < plan["moving"] < len(USERS) and plan["users"] == len(USERS)
    assert plan["bytesMoved"] == 1000 * len(expected)
    assert plan["duplicates"] == {} and plan["misplaced"] == {}

    text = cli("cluster", "plan", "--from", ",".join(names), "--to", ",".join(new))
    assert text.returncode == 0 and f"{len(expected)} move" in text.stdout, text.stdout


def test_plan_fails_naming_a_node_that_does_not_answer(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    node = stcs("--adminAPIKey", ADMIN, db=tmp_path / "n0")
    done = cli(
        "cluster",
        "plan",
        "--from",
        f"127.0.0.1:{node.port},127.0.0.1:1",
        "--to",
        f"127.0.0.1:{node.port}",
    )
    assert done.returncode == 1 and "127.0.0.1:1" in done.stderr, done.stderr
