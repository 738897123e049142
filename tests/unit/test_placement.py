"""`stcs.placement`: which users a cluster node may start (issue 21 item 1)."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from pathlib import Path

import pytest

from stcs.config import Settings
from stcs.errors import NotOwnerError, UserMovingError
from stcs.layout import Layout
from stcs.placement import Placement
from stcs.ring import Ring

NODES = ["10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000"]
ME = NODES[0]


def make(tmp_path: Path, nodes: str = ",".join(NODES), me: str = ME) -> tuple[Placement, Layout]:
    settings = Settings(db_path=str(tmp_path), cluster_nodes=nodes, cluster_self=me)
    layout = Layout(tmp_path)
    return Placement(lambda: settings, layout), layout


def users_owned(by: str, n: int = 5) -> list[str]:
    ring = Ring.of(NODES)
    return [u for u in (f"user-{i}" for i in range(1000)) if ring.owner(u) == by][:n]


def test_outside_a_cluster_every_user_may_start(tmp_path: Path) -> None:
    placement, _ = make(tmp_path, nodes="", me="")
    for user in users_owned(NODES[1]):
        placement.admit_start(user)


def test_a_new_user_the_ring_places_elsewhere_is_refused_with_retry_after(tmp_path: Path) -> None:
    placement, _ = make(tmp_path)
    for user in users_owned(ME):
        placement.admit_start(user)
    for user in users_owned(NODES[1]):
        with pytest.raises(NotOwnerError) as refused:
            placement.admit_start(user)
        assert refused.value.retry_after_s and refused.value.retry_after_s >= 1
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_user_with_data_here_is_served_whatever_the_ring_says(tmp_path: Path) -> None:
    placement, layout = make(tmp_path)
    user = users_owned(NODES[2])[0]
    layout.user_dir(user).mkdir()
    placement.admit_start(user)


def test_arriving_and_moved_users_are_refused_and_the_marks_survive_a_restart(
    tmp_path: Path,
) -> None:
    placement, layout = make(tmp_path)
    arriving, moved = users_owned(ME, 2)
    layout.user_dir(moved).mkdir()  # the stale copy stays on disk
    placement.set_state(arriving, "arriving")
    placement.set_state(moved, "moved", NODES[1])
    again, _ = make(tmp_path)  # a restart reads the marks back
    for p in (placement, again):
        for user in (arriving, moved):
            with pytest.raises(UserMovingError):
                p.admit_start(user)
    assert json.loads(layout.cluster_state.read_text()) == {
        "arriving": [arriving],
        "moved": {moved: NODES[1]},
    }
    assert layout.cluster_state.stat().st_mode & 0o077 == 0
    again.set_state(arriving, "home")
    again.admit_start(arriving)
    assert again.view()["arriving"] == [] and again.view()["self"] == ME


def test_a_new_node_list_applies_without_a_restart(tmp_path: Path) -> None:
    current = [Settings(db_path=str(tmp_path), cluster_nodes=",".join(NODES), cluster_self=ME)]
    placement = Placement(lambda: current[0], Layout(tmp_path))
    user = users_owned(NODES[1])[0]
    with pytest.raises(NotOwnerError):
        placement.admit_start(user)
    current[0] = dataclasses.replace(current[0], cluster_nodes=ME)  # a one-node "cluster"
    placement.admit_start(user)


def test_cluster_settings_must_name_this_node_among_the_nodes(tmp_path: Path) -> None:
    from stcs.config import SETTINGS, validate
    from stcs.errors import ConfigError

    base = Settings(db_path=str(tmp_path))
    sources = {i.key: "test" for i in SETTINGS}
    for nodes, me in (("a:1,b:2", "c:3"), ("", "a:1"), ("a:1,a:1", "a:1"), ("a,b:2", "b:2")):
        with pytest.raises(ConfigError, match="cluster"):
            validate(dataclasses.replace(base, cluster_nodes=nodes, cluster_self=me), sources)
    validate(dataclasses.replace(base, cluster_nodes="a:1, b:2", cluster_self="b:2"), sources)


def test_a_node_list_set_by_a_rebalance_wins_until_the_config_changes(tmp_path: Path) -> None:
    """The newest change wins: ``PUT /admin/cluster``'s list (kept in cluster.json, across a
    restart) is used while ``clusterNodes`` is the one it replaced; a new ``clusterNodes``
    drops it."""
    current = [Settings(db_path=str(tmp_path), cluster_nodes=",".join(NODES), cluster_self=ME)]
    layout = Layout(tmp_path)
    placement = Placement(lambda: current[0], layout)
    four = [*NODES, "10.0.0.14:8000"]
    new_here = next(u for u in users_owned(ME, 200) if Ring.of(four).owner(u) != ME)
    placement.admit_start(new_here)  # owned by ME under the three-node ring
    placement.set_nodes(",".join(four))
    assert placement.view()["nodes"] == four and placement.view()["nodesFrom"] == "rebalance"
    with pytest.raises(NotOwnerError):
        placement.admit_start(new_here)  # the four-node ring gives it to another node

    restarted = Placement(lambda: current[0], layout)  # a restart keeps it
    assert restarted.nodes() == (",".join(four), "rebalance")
    edited = f"{ME},10.0.0.15:8000"  # the operator edits clusterNodes: the config wins
    current[0] = dataclasses.replace(current[0], cluster_nodes=edited)
    assert restarted.nodes() == (edited, "config")
    assert "nodes" not in json.loads(layout.cluster_state.read_text())  # dropped for good
    current[0] = dataclasses.replace(current[0], cluster_nodes=",".join(NODES))
    assert restarted.nodes() == (",".join(NODES), "config")


def test_a_run_time_node_list_is_refused_outside_a_cluster_or_when_malformed(
    tmp_path: Path,
) -> None:
    placement, _ = make(tmp_path, nodes="", me="")
    with pytest.raises(ValueError, match="not a cluster node"):
        placement.set_nodes(",".join(NODES))
    placement, _ = make(tmp_path)
    for bad in ("", "a,b", f"{ME},{ME}"):
        with pytest.raises(ValueError):
            placement.set_nodes(bad)
    # A node being removed takes a list without itself: it then admits no new user.
    placement.set_nodes(",".join(NODES[1:]))
    for user in users_owned(ME):
        with pytest.raises(NotOwnerError):
            placement.admit_start(user)


def test_during_a_change_a_new_user_is_created_only_where_both_rings_agree(
    tmp_path: Path,
) -> None:
    four = [*NODES, "10.0.0.14:8000"]
    placement, _ = make(tmp_path)
    old, new = Ring.of(NODES), Ring.of(four)
    mine = [u for u in (f"user-{i}" for i in range(2000)) if old.owner(u) == ME]
    leaving = [u for u in mine if new.owner(u) != ME][:3]
    staying = [u for u in mine if new.owner(u) == ME][:3]
    assert leaving and staying
    placement.set_nodes(",".join(NODES), ",".join(four))
    for user in leaving:  # created here, they would miss the move and be split at the switch
        with pytest.raises(NotOwnerError):
            placement.admit_start(user)
    for user in staying:
        placement.admit_start(user)
    assert placement.view()["next"] == four
    # Kept across a restart; cleared by a list without a next one (the switch, or a failure).
    again = Placement(lambda: placement._settings(), Layout(tmp_path))
    with pytest.raises(NotOwnerError):
        again.admit_start(leaving[0])
    again.set_nodes(",".join(NODES))
    again.admit_start(leaving[0])
    assert again.view()["next"] == []


def test_a_node_list_set_from_a_worker_thread_is_never_lost_to_a_reader(tmp_path: Path) -> None:
    """Found in review: `set_nodes` assigned its three fields one by one; a `nodes()` on the
    event loop between two of them took the config-changed path and dropped the list (4 of
    3,000 trials lost the switch or the announcement).  Now one tuple, replaced whole."""
    four = ",".join([*NODES, "10.0.0.14:8000"])
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    lost = 0
    try:
        for trial in range(300):
            placement, _ = make(tmp_path / str(trial))
            stop = threading.Event()

            def read(p: Placement = placement, done: threading.Event = stop) -> None:
                while not done.is_set():
                    p.nodes()

            reader = threading.Thread(target=read)
            reader.start()
            placement.set_nodes(four, four)
            stop.set()
            reader.join()
            lost += placement.nodes()[0] != four or placement.run_next != four
    finally:
        sys.setswitchinterval(old_interval)
    assert lost == 0
