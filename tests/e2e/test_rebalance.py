"""``stcs cluster rebalance`` and ``cleanup`` with real nodes (issue 21 item 3): users move with
their data, blocklist entry and limits; a failed or interrupted run leaves users serving on
their source; the transfer endpoints refuse what would write outside a user's directory or
over a copy that is served."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import chromadb
import pytest
import requests
from chromadb.config import Settings

from stcs.config import Settings as StcsSettings
from stcs.rebalance import RebalanceOptions, RebalanceReport, rebalance
from stcs.ring import Ring
from tests.harness import ADMIN, StcsServer, cli, stcs_cli

LIST = "/api/v2/tenants/default_tenant/databases/default_database/collections"
KEY = {"x-api-key": ADMIN}


def node_name(node: StcsServer) -> str:
    return f"127.0.0.1:{node.port}"


def start_nodes(
    stcs: Callable[..., StcsServer], tmp_path: Path, lists: list[int], *extra: str
) -> list[StcsServer]:
    """Nodes ``0..len(lists)-1``; node ``i``'s clusterNodes is the first ``lists[i]`` nodes
    (itself included), set by a reload once every port is known."""
    configs = [tmp_path / f"n{i}.yml" for i in range(len(lists))]
    for c in configs:
        c.write_text("logLevel: info\n")
    nodes = [
        stcs("--config", str(c), "--adminAPIKey", ADMIN, *extra, db=tmp_path / c.stem, name=c.stem)
        for c in configs
    ]
    names = [node_name(n) for n in nodes]
    for c, node, me, k in zip(configs, nodes, names, lists, strict=True):
        c.write_text(f"logLevel: info\nclusterNodes: {','.join(names[:k])}\nclusterSelf: {me}\n")
        os.kill(node.pid, signal.SIGHUP)
        node.wait_event("settings reloaded")
    return nodes


def client(node: StcsServer, user: str) -> chromadb.api.ClientAPI:
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=node.port,
        headers={"X-Chroma-Token": user},
        settings=Settings(anonymized_telemetry=False),
    )


def rows(i: int, n: int) -> Sequence[float]:
    return [float(i), float(n - i), 1.0, 0.5]


def fill(node: StcsServer, user: str, n: int) -> None:
    col = client(node, user).get_or_create_collection("docs")
    col.upsert(
        ids=[f"{user[:8]}-{i}" for i in range(n)],
        embeddings=[rows(i, n) for i in range(n)],
        documents=[f"doc {i} of {user}" for i in range(n)],
    )


def look(node: StcsServer, user: str) -> tuple[int, list[str]]:
    col = client(node, user).get_collection("docs")
    # No two records at the same distance (the nearest point of the line the rows lie on is
    # never half-way between two of them): equal answers do not depend on how ties break.
    nearest: list[Sequence[float]] = [[3.3, 0.9, 1.0, 0.5]]
    hits = col.query(query_embeddings=nearest, n_results=3)
    return col.count(), hits["ids"][0]


def get(node: StcsServer, user: str) -> requests.Response:
    return requests.get(f"{node.url}{LIST}", headers={"X-Chroma-Token": user}, timeout=60)


class TwoToThree(NamedTuple):
    """A change from two nodes to three: ``a`` and ``b`` the old list, ``c`` started with the
    new one; names, nodes by name and both rings."""

    a: StcsServer
    b: StcsServer
    c: StcsServer
    old: list[str]
    new: list[str]
    by_name: dict[str, StcsServer]
    ring_old: Ring
    ring_new: Ring


def two_to_three(stcs: Callable[..., StcsServer], tmp_path: Path) -> TwoToThree:
    a, b, c = start_nodes(stcs, tmp_path, [2, 2, 3])
    old, new = [node_name(a), node_name(b)], [node_name(a), node_name(b), node_name(c)]
    by_name = {node_name(n): n for n in (a, b, c)}
    return TwoToThree(a, b, c, old, new, by_name, Ring.of(old), Ring.of(new))


def users_for(
    ring_old: Ring, ring_new: Ring, moving: int, staying: int
) -> tuple[list[str], list[str]]:
    ids = [str(uuid.UUID(int=i * 7919 + 11)) for i in range(2000)]
    move = [u for u in ids if ring_old.owner(u) != ring_new.owner(u)][:moving]
    stay = [u for u in ids if ring_old.owner(u) == ring_new.owner(u)][:staying]
    return move, stay


def router_file(tmp_path: Path, nodes: list[StcsServer]) -> Path:
    path = tmp_path / "router.conf"
    args = [a for n in nodes for a in ("--node", node_name(n))]
    stcs_cli(
        "render", "nginx-cluster", "--listen", "127.0.0.1:9", *args, "-o", str(path), check=True
    )
    return path


def cli_rebalance(tmp_path: Path, old: list[str], new: list[str], router: Path, *more: str):  # type: ignore[no-untyped-def]
    return stcs_cli(
        "cluster",
        "rebalance",
        "--from",
        ",".join(old),
        "--to",
        ",".join(new),
        "--router-config",
        str(router),
        "--reload-command",
        f"echo reloaded >> {tmp_path / 'reloads.log'}",
        "--state",
        str(tmp_path / "state.json"),
        "--yes",
        "--adminAPIKey",
        ADMIN,
        *more,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_rebalance_two_to_three_moves_users_with_their_data_then_cleanup(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    a, b, c, old, new, by_name, ring_old, ring_new = two_to_three(stcs, tmp_path)
    move, stay = users_for(ring_old, ring_new, 3, 2)
    before = {}
    for i, user in enumerate(move + stay):
        home = by_name[ring_old.owner(user)]
        fill(home, user, 40 + i)
        before[user] = look(home, user)
    blocked, limited = move[0], move[1]
    requests.post(
        f"{by_name[ring_old.owner(blocked)].url}/admin/users/{blocked}/block",
        headers=KEY,
        timeout=30,
    ).raise_for_status()
    requests.put(
        f"{by_name[ring_old.owner(limited)].url}/admin/users/{limited}/limits",
        json={"userMaxCollections": 7},
        headers=KEY,
        timeout=30,
    ).raise_for_status()
    router = router_file(tmp_path, [a, b])

    done = cli_rebalance(tmp_path, old, new, router)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"moved {len(move)} users" in done.stdout

    for user in move:
        target, source = by_name[ring_new.owner(user)], by_name[ring_old.owner(user)]
        assert target is c
        if user != blocked:
            assert look(target, user) == before[user]  # count and nearest ids equal
        gone = get(source, user)
        if user == blocked:
            assert gone.status_code == 403  # still blocked there too (checked first)
        else:
            assert gone.status_code == 503 and "moved" in gone.json()["message"], gone.text
    assert get(c, blocked).status_code == 403  # the block moved along
    limits = requests.get(f"{c.url}/admin/users/{limited}/limits", headers=KEY, timeout=30).json()
    assert limits["overrides"] == {"userMaxCollections": 7}
    for user in stay:
        assert look(by_name[ring_old.owner(user)], user) == before[user]
    for node in (a, b, c):
        view = requests.get(f"{node.url}/admin/cluster", headers=KEY, timeout=30).json()
        assert (view["nodes"], view["nodesFrom"]) == (new, "rebalance")
    assert f"server {node_name(c)} max_fails=0;" in router.read_text()
    assert f"server {node_name(c)}" not in (tmp_path / "router.conf.prev").read_text()
    assert (tmp_path / "reloads.log").read_text() == "reloaded\n"
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"

    # A rerun of a finished change changes nothing.
    again = cli_rebalance(tmp_path, old, new, router)
    assert again.returncode == 0 and "done" in again.stdout

    # Cleanup removes the old copies (their new node serves them), nothing else.
    dry = stcs_cli(
        "cluster", "cleanup", "--nodes", ",".join(new), "--dry-run", "--adminAPIKey", ADMIN
    )
    assert dry.returncode == 0 and dry.stdout.count("would remove") == len(move)
    assert all((by_name[ring_old.owner(u)].db / u).is_dir() for u in move)
    clean = stcs_cli("cluster", "cleanup", "--nodes", ",".join(new), "--adminAPIKey", ADMIN)
    assert clean.returncode == 0 and clean.stdout.count("removed") == len(move), clean.stdout
    for user in move:
        assert not (by_name[ring_old.owner(user)].db / user).exists()
        assert (c.db / user).is_dir()
    for user in stay:
        assert (by_name[ring_old.owner(user)].db / user).is_dir()
    # The source no longer knows the user: the ring (the new list) gives it to c.
    assert get(by_name[ring_old.owner(move[1])], move[1]).status_code == 503


def run_rebalance(
    tmp_path: Path,
    old: list[str],
    new: list[str],
    router: Path,
    on_step: Callable[[str], None] | None = None,
) -> RebalanceReport:
    """`rebalance` in this process (the CLI's state file and reload command), ``on_step``
    called after each step."""
    return rebalance(
        old,
        new,
        ADMIN,
        StcsSettings(),
        RebalanceOptions(
            router,
            f"echo reloaded >> {tmp_path / 'reloads.log'}",
            tmp_path / "state.json",
            progress=False,
            on_step=on_step,
        ),
        io.StringIO(),
    )


@pytest.mark.slow
def test_a_failed_copy_leaves_users_on_their_source_and_an_interrupted_run_resumes(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    a, b, c, old, new, by_name, ring_old, ring_new = two_to_three(stcs, tmp_path)
    move, stay = users_for(ring_old, ring_new, 4, 1)
    move, late, fresh = move[:2], move[2], move[3]
    for user in move:
        fill(by_name[ring_old.owner(user)], user, 30)
    router = router_file(tmp_path, [a, b])
    rendered = router.read_text()

    # The target already serves one of them (a copy made by a misrouted client): it is never
    # overwritten, the run fails and switches nothing.
    fill(c, move[0], 1)
    failed = cli_rebalance(tmp_path, old, new, router)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "nothing switched" in failed.stdout
    assert router.read_text() == rendered and not (tmp_path / "reloads.log").exists()
    for user in move:
        assert look(by_name[ring_old.owner(user)], user)[0] == 30  # still served on its source
    state = json.loads((tmp_path / "state.json").read_text())
    assert move[0] in state["failures"], state
    # A failed run leaves no change under way: a new user is created where the ring says, and
    # the next run moves them too (its plan is asked again).
    fill(by_name[ring_old.owner(late)], late, 3)

    # The operator resolves it (the stray copy is to be replaced: marked arriving), then a run
    # in-process stops after pass 1: the users keep serving on their source; a rerun completes.
    requests.put(
        f"{c.url}/admin/users/{move[0]}/placement",
        json={"state": "arriving"},
        headers=KEY,
        timeout=30,
    ).raise_for_status()

    class Interrupted(Exception):
        pass

    def stop(step: str) -> None:
        if step == "pass1":
            raise Interrupted

    with pytest.raises(Interrupted):
        run_rebalance(tmp_path, old, new, router, stop)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == "hold"
    for user in move:
        fill(by_name[ring_old.owner(user)], user, 35)  # 5 records more, after pass 1
    # While the change is under way a never-seen user whom it moves is created nowhere: on
    # their old node they would miss the move, and after the switch the router would send
    # them to an empty database (before: 200 and a directory on the old node).
    refused = get(by_name[ring_old.owner(fresh)], fresh)
    assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
    assert not (by_name[ring_old.owner(fresh)].db / fresh).exists()
    assert get(by_name[ring_new.owner(stay[0])], stay[0]).status_code == 200  # not moved: served

    # Interrupted once the users are held (Ctrl-C): released at once, not after the holds'
    # 600 s TTL (before: held, their requests waiting until it ran out); served on the source.
    def stop_held(step: str) -> None:
        if step == "hold":
            raise Interrupted

    with pytest.raises(Interrupted):
        run_rebalance(tmp_path, old, new, router, stop_held)
    for user in move:
        source = by_name[ring_old.owner(user)]
        held = requests.get(f"{source.url}/admin/instances", headers=KEY, timeout=30).json()
        assert user not in held.get("held", []), held
        assert look(source, user)[0] == 35
    resumed = cli_rebalance(tmp_path, old, new, router)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for user in move:
        assert look(c, user)[0] == 35  # pass 2 carried the writes made after pass 1
    assert look(c, late)[0] == 3
    assert get(c, fresh).status_code == 200  # the change is done: created on their node


def test_transfer_endpoints_refuse_hostile_paths_and_overwriting_a_served_user(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    (node,) = start_nodes(stcs, tmp_path, [1], "--maxBodySize", "4096")
    home, arriving = str(uuid.uuid4()), str(uuid.uuid4())
    fill(node, home, 5)
    base = f"{node.url}/admin/users"
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("big.bin")
        info.size = 100_000  # over maxBodySize: imports are bounded by free disk space instead
        t.addfile(info, io.BytesIO(b"z" * 100_000))
    body = tar.getvalue()

    # Import into a user served here: 409, nothing written.
    refused = requests.post(f"{base}/{home}/import", data=body, headers=KEY, timeout=30)
    assert refused.status_code == 409, refused.text
    assert not (node.db / home / "big.bin").exists()

    requests.put(
        f"{base}/{arriving}/placement", json={"state": "arriving"}, headers=KEY, timeout=30
    ).raise_for_status()
    empty = requests.get(f"{base}/{arriving}/manifest", headers=KEY, timeout=30).json()
    assert empty["files"] == [] and empty["placement"] == "arriving"
    ok = requests.post(f"{base}/{arriving}/import", data=body, headers=KEY, timeout=30)
    assert ok.status_code == 200 and ok.json()["bytes"] == 100_000, ok.text
    # Without the admin key the same body is refused before it is read.
    assert requests.post(f"{base}/{arriving}/import", data=body, timeout=30).status_code == 403

    # Path traversal in each endpoint: 400, nothing read or written outside.
    (tmp_path / "outside").write_text("secret")
    (node.db / home / "peek").symlink_to(tmp_path / "outside")
    for path in ("../../outside", "/etc/passwd", "peek"):
        resp = requests.post(
            f"{base}/{home}/export", json={"paths": [path]}, headers=KEY, timeout=30
        )
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
    listed = requests.get(f"{base}/{home}/manifest", headers=KEY, timeout=30).json()["files"]
    assert "peek" not in [f["path"] for f in listed] and listed
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("../" + home + "/evil")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    resp = requests.post(f"{base}/{arriving}/import", data=evil.getvalue(), headers=KEY, timeout=30)
    assert resp.status_code == 400, resp.text
    assert not (node.db / home / "evil").exists()
    resp = requests.post(
        f"{base}/{arriving}/prune",
        json={"paths": ["../" + home + "/chroma.sqlite3"]},
        headers=KEY,
        timeout=30,
    )
    assert resp.status_code == 400
    assert (node.db / home / "chroma.sqlite3").exists()
    assert (
        requests.post(
            f"{base}/{home}/prune", json={"paths": ["x"]}, headers=KEY, timeout=30
        ).status_code
        == 409
    )
    # The old copy of a user not marked moved is never removed.
    assert requests.delete(f"{base}/{home}/data", headers=KEY, timeout=30).status_code == 409

    # A maintenance hold (backup, rebalance) survives a placement mark.
    requests.post(f"{base}/{home}/hold?ttl=60", headers=KEY, timeout=60).raise_for_status()
    requests.put(
        f"{base}/{home}/placement", json={"state": "moved", "to": "x:1"}, headers=KEY, timeout=60
    ).raise_for_status()
    held = requests.get(f"{node.url}/admin/instances", headers=KEY, timeout=30).json()["held"]
    assert home in held


def _write_one(node: StcsServer, user: str, rid: str) -> bool:
    """An add of ``rid`` on ``node`` directly; whether it was acknowledged."""
    try:
        client(node, user).get_collection("docs").add(ids=[rid], embeddings=[rows(1, 2)])
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_a_closed_source_stays_closed_whatever_else_holds_or_releases_the_user(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Pass 2 counts only if the source takes no write after it.  Before: the source was
    closed by a maintenance hold, which another tool's release (``stcs backup`` ends its own
    hold with ``DELETE …/hold``, and holds are one per user) or its 600 s TTL ended: the source
    took and acknowledged a write.  Here the run's last check saw the hold gone and failed
    (exit 1); a hold taken again by the renewal between users (every 60 s of a long pass 2)
    hid the gap, and the switch went ahead without the write (found in review).  Now the
    source is closed by its ``moved`` mark: refused, and the run completes."""
    a, b, c, old, new, by_name, ring_old, ring_new = two_to_three(stcs, tmp_path)
    (user,), _ = users_for(ring_old, ring_new, 1, 0)
    source = by_name[ring_old.owner(user)]
    fill(source, user, 20)
    router = router_file(tmp_path, [a, b])
    acknowledged: list[bool] = []

    def meanwhile(step: str) -> None:
        if step == "hold":  # the source is closed for pass 2: a backup ends its own hold...
            requests.delete(f"{source.url}/admin/users/{user}/hold", headers=KEY, timeout=30)
            acknowledged.append(_write_one(source, user, "late-write"))  # ...and a client writes

    report = run_rebalance(tmp_path, old, new, router, meanwhile)
    assert report.exit_code == 0
    ids = client(c, user).get_collection("docs").get()["ids"]
    # No acknowledged write is missing on the user's new node.
    assert acknowledged == [False], "the closed source acknowledged a write"
    assert "late-write" not in ids and len(ids) == 20


@pytest.mark.slow
def test_a_killed_run_keeps_sources_closed_until_run_again_or_aborted(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    a, b, _, old, new, by_name, ring_old, ring_new = two_to_three(stcs, tmp_path)
    move, _ = users_for(ring_old, ring_new, 2, 0)
    for user in move:
        fill(by_name[ring_old.owner(user)], user, 10)
    router = router_file(tmp_path, [a, b])
    rendered = router.read_text()
    # The run is killed outright (kill -9) once the sources are closed: nothing cleans up.
    _killed_after_closing(old, new, router, tmp_path / "state.json")
    for user in move:  # closed, not serving a copy that would not be moved
        assert get(by_name[ring_old.owner(user)], user).status_code == 503
    aborted = cli_rebalance(tmp_path, old, new, router, "--abort")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    for user in move:
        assert look(by_name[ring_old.owner(user)], user)[0] == 10  # served by its source again
    assert router.read_text() == rendered and not (tmp_path / "state.json").exists()
    view = requests.get(f"{a.url}/admin/cluster", headers=KEY, timeout=30).json()
    assert view["next"] == [] and view["nodes"] == old


def _killed_after_closing(old: list[str], new: list[str], router: Path, state: Path) -> None:
    """A run of ``old`` -> ``new`` killed outright (``os._exit``) once its sources are closed."""
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import io, os\n"
            "from pathlib import Path\n"
            "from stcs.config import Settings\n"
            "from stcs.rebalance import RebalanceOptions, rebalance\n"
            "def die(step):\n"
            "    if step == 'hold': os._exit(9)\n"
            f"rebalance({old!r}, {new!r}, {ADMIN!r}, Settings(), RebalanceOptions("
            f"Path({str(router)!r}), 'true', Path({str(state)!r}), "
            "progress=False, on_step=die), io.StringIO())\n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 9, killed.stderr


@pytest.mark.slow
def test_a_run_left_unfinished_blocks_every_other_run_until_finished_or_aborted(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Found in review: run X (a,b -> a,b,c) killed once its sources were closed; run Y
    (a,b -> a,b,d) from another state file skipped X's users (a ``moved`` entry is not data),
    exited 0, and its router then sent such a user to d, which created an empty database
    (200 []) while the data sat on a, refused."""
    a, b, c, d = start_nodes(stcs, tmp_path, [2, 2, 3, 4])
    old = [node_name(a), node_name(b)]
    to_c, to_d = [*old, node_name(c)], [*old, node_name(d)]
    by_name = {node_name(n): n for n in (a, b, c, d)}
    ring_old, ring_c, ring_d = Ring.of(old), Ring.of(to_c), Ring.of(to_d)
    ids = (str(uuid.UUID(int=i * 7919 + 11)) for i in range(4000))
    user = next(
        u for u in ids if ring_c.owner(u) == node_name(c) and ring_d.owner(u) == node_name(d)
    )
    source = by_name[ring_old.owner(user)]
    fill(source, user, 12)
    router = router_file(tmp_path, [a, b])
    _killed_after_closing(old, to_c, router, tmp_path / "x.json")
    assert get(source, user).status_code == 503  # closed: takes no write the move would miss

    refused = stcs_cli(
        "cluster", "rebalance", "--from", ",".join(old), "--to", ",".join(to_d),
        "--router-config", str(router), "--reload-command", "true",
        "--state", str(tmp_path / "y.json"), "--yes", "--adminAPIKey", ADMIN,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "did not finish" in refused.stderr and user in refused.stderr
    assert not (d.db / user).exists()  # nothing switched, nothing created

    # X undone (its state file lost: the nodes tell what to undo), then Y moves the user.
    (tmp_path / "x.json").unlink()
    undone = stcs_cli(
        "cluster", "rebalance", "--from", ",".join(old), "--to", ",".join(to_c),
        "--router-config", str(router), "--reload-command", "true",
        "--state", str(tmp_path / "x.json"), "--abort", "--adminAPIKey", ADMIN,
    )  # fmt: skip
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert look(source, user)[0] == 12
    report = run_rebalance(tmp_path, old, to_d, router)
    assert report.exit_code == 0 and user in report.moved
    assert look(d, user)[0] == 12


@pytest.mark.slow
def test_abort_refuses_once_the_router_may_route_the_new_list(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Found in review: the run died right after its reload applied the new router (before it
    recorded the switch); ``--abort`` was accepted, opened the sources and set every node back
    to the old list while the router sent the moving users to their targets, still
    ``arriving``: 503 with no way out.  Now the run records that it touches the router before
    it does; ``--abort`` refuses, and running the command again finishes the move."""
    a, b, c, old, new, by_name, ring_old, ring_new = two_to_three(stcs, tmp_path)
    (user,), _ = users_for(ring_old, ring_new, 1, 0)
    fill(by_name[ring_old.owner(user)], user, 8)
    router = router_file(tmp_path, [a, b])
    died = stcs_cli(
        "cluster", "rebalance", "--from", ",".join(old), "--to", ",".join(new),
        "--router-config", str(router), "--reload-command", "kill -9 $PPID",
        "--state", str(tmp_path / "state.json"), "--yes", "--adminAPIKey", ADMIN,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert died.returncode != 0
    assert f"server {node_name(c)}" in router.read_text()  # the router has the new list
    aborted = cli_rebalance(tmp_path, old, new, router, "--abort")
    assert aborted.returncode == 2 and "run the same command again" in aborted.stderr
    finished = cli_rebalance(tmp_path, old, new, router)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert look(c, user)[0] == 8
    assert f"server {node_name(c)}" not in (tmp_path / "router.conf.prev").read_text()


def test_restore_and_backup_all_leave_out_a_user_this_node_marks_moved(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Found in review: ``stcs restore`` of a user the node marks ``moved`` reported success,
    was never served, and ``stcs cluster cleanup`` later removed it: the restore was lost."""
    (node,) = start_nodes(stcs, tmp_path, [1])
    user = str(uuid.UUID(int=42))
    fill(node, user, 5)
    archive = tmp_path / "u.tar.gz"
    assert cli("backup", user, str(archive), server=node).returncode == 0
    requests.put(
        f"{node.url}/admin/users/{user}/placement",
        json={"state": "moved", "to": "127.0.0.1:9"},
        headers=KEY,
        timeout=60,
    ).raise_for_status()
    done = cli("restore", user, str(archive), "--force", server=node)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "marked moved" in done.stderr
    # A nightly `backup --all` leaves the stale copy out (restored, it came back as served).
    every = cli("backup", "--all", str(tmp_path / "set"), server=node)
    assert every.returncode == 0, every.stdout + every.stderr
    assert f"skipped {user}: marked moved" in every.stderr
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert user not in manifest["users"]
