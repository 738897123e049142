"""`stcs.ring`: nginx's ketama ring (tests/deploy/test_ring_nginx.py checks it against nginx)."""

from __future__ import annotations

import zlib

import pytest

from stcs.ring import Ring, _split_server, key_hash, moves, server_points

NODES = ["10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000"]
USERS = [f"user-{i}" for i in range(4000)]


def test_server_name_split_as_nginx_splits_it() -> None:
    assert _split_server("10.0.0.11:8000") == (b"10.0.0.11", b"8000")
    assert _split_server("[::1]:8000") == (b"[::1]", b"8000")
    assert _split_server("node-a.internal") == (b"node-a.internal", b"")
    assert _split_server("unix:/run/stcs.sock") == (b"/run/stcs.sock", b"")


def test_first_point_is_crc32_of_host_nul_port_and_four_zero_bytes() -> None:
    points = server_points("10.0.0.11:8000")
    assert len(points) == 160
    assert points[0] == zlib.crc32(b"10.0.0.11\x008000\x00\x00\x00\x00")
    assert points[1] == zlib.crc32(b"10.0.0.11\x008000" + points[0].to_bytes(4, "little"))
    assert len(server_points("10.0.0.11:8000", weight=3)) == 480


def test_key_past_the_last_point_wraps_to_the_first() -> None:
    ring = Ring.of(NODES)
    top = max(max(server_points(n)) for n in NODES)
    first = min(NODES, key=lambda n: min(server_points(n)))
    beyond = next(u for u in (f"k{i}" for i in range(10**6)) if key_hash(u) > top)
    assert ring.owner(beyond) == first


def test_adding_a_node_moves_only_users_to_it_about_a_quarter() -> None:
    before = Ring.of(NODES).owners(USERS)
    moved = moves(before, [*NODES, "10.0.0.14:8000"])
    assert {to for _, to in moved.values()} == {"10.0.0.14:8000"}
    assert 0.15 < len(moved) / len(USERS) < 0.35, len(moved)


def test_removing_a_node_moves_only_its_users() -> None:
    before = Ring.of(NODES).owners(USERS)
    moved = moves(before, NODES[:2])
    assert set(moved) == {u for u, n in before.items() if n == NODES[2]}


def test_same_ring_moves_nobody_and_order_of_servers_does_not_matter() -> None:
    before = Ring.of(NODES).owners(USERS)
    assert moves(before, list(reversed(NODES))) == {}


@pytest.mark.parametrize("servers", [[], ["a:1", "a:1"]])
def test_bad_server_lists_are_refused(servers: list[str]) -> None:
    with pytest.raises(ValueError):
        Ring.of(servers)


def test_plan_reports_duplicates_and_misplaced_users_and_moves_the_rest() -> None:
    from stcs.cluster import compute_plan

    old = NODES
    ring = Ring.of(old)
    found: dict[str, list[dict[str, object]]] = {n: [] for n in old}
    for u in USERS[:300]:
        found[ring.owner(u)].append({"userId": u, "diskBytes": 10})
    stray = USERS[300]
    wrong = next(n for n in old if n != ring.owner(stray))
    found[wrong].append({"userId": stray, "diskBytes": 1})
    found[NODES[0]].append({"userId": USERS[0], "diskBytes": 5})  # a second copy somewhere
    old_copy = USERS[301]
    found[NODES[0]].append({"userId": old_copy, "diskBytes": 5, "placement": "moved"})
    plan = compute_plan(old, [*old, "10.0.0.14:8000"], found)
    assert USERS[0] in plan.duplicates and USERS[0] not in plan.moves
    assert plan.misplaced[stray] == (wrong, ring.owner(stray))
    assert all(to == "10.0.0.14:8000" or u == stray for u, (_, to) in plan.moves.items())
    assert plan.bytes_moved == sum(plan.sizes[u] for u in plan.moves)
    assert old_copy not in plan.placement and old_copy not in plan.duplicates
