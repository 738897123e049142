"""``stcs backup --all DIR`` / ``stcs restore --all DIR`` against a real server (issue 23
item 4): one user held at a time while the others serve, ``.stcs`` state along, a manifest
whose sizes and checksums a restore verifies, restartable, private files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import requests

from stcs import __version__
from stcs.log import user_ref
from tests.harness import ADMIN, HDR, StcsServer, cli, client_for, new_token, user_dirs

N_VECTORS = 300


def _fill(server: StcsServer, token: str, seed: int) -> None:
    col = client_for(server, token).create_collection(f"col{seed}")
    col.add(
        ids=[f"v{i}" for i in range(N_VECTORS)],
        embeddings=[[(seed * 7 + i) % 97 / 97.0] * 32 for i in range(N_VECTORS)],
    )


def _counts(server: StcsServer, tokens: list[str]) -> dict[str, int]:
    out = {}
    for seed, token in enumerate(tokens):
        out[token] = client_for(server, token).get_collection(f"col{seed}").count()
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _holds_never_overlap(server: StcsServer) -> list[str]:
    """The users held, in order, checking from the server's log that each hold was released
    before the next began."""
    order, current = [], None
    for line in server.log_lines():
        if line.get("event") == "user held":
            assert current is None, f"{line['user_id']} held while {current} was"
            current = line["user_id"]
            order.append(current)
        elif line.get("event") == "hold released":
            current = None
    assert current is None
    return order


def test_backup_all_holds_one_user_at_a_time_and_resumes(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    tokens = [new_token() for _ in range(4)]
    for seed, token in enumerate(tokens):
        _fill(server, token, seed)
    writer = tokens[0]
    writes_ok, writes_failed = [], []
    stop = threading.Event()

    def write() -> None:  # the first user keeps writing through the backup (and its hold)
        col = client_for(server, writer).get_collection("col0")
        n = 0
        while not stop.is_set() and n < 5000:
            try:
                col.add(ids=[f"w{n}"], embeddings=[[0.25] * 32])
                writes_ok.append(n)
            except Exception as exc:  # recorded; asserted empty below
                writes_failed.append(repr(exc))
            n += 1

    thread = threading.Thread(target=write)
    thread.start()
    out = tmp_path / "nightly"
    try:
        done = cli("backup", "--all", str(out), "--no-progress", server=server)
    finally:
        stop.set()
        thread.join(60)
    assert done.returncode == 0, done.stderr
    assert writes_failed == [] and len(writes_ok) > 0
    # Each user held once, never two at once (UUID mode: the log names users by reference).
    assert sorted(_holds_never_overlap(server)) == sorted(user_ref(t) for t in tokens)
    # Private: DIR 0700, every file in it 0600.
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stcsVersion"] == __version__ and manifest["complete"] is True
    assert manifest["finishedAt"]
    assert sorted(manifest["users"]) == sorted(tokens)
    for entry in manifest["users"].values():
        archive = out / entry["archive"]
        assert archive.stat().st_size == entry["bytes"]
        assert _sha256(archive) == entry["sha256"]
        assert entry["holdMs"] >= 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(e["archive"] for e in manifest["users"].values())]
    )

    # Restartable: a re-run skips what matches; a damaged (e.g. truncated) archive is redone.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    victim = out / manifest["users"][tokens[2]]["archive"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    again = cli("backup", "--all", str(out), "--no-progress", server=server)
    assert again.returncode == 0, again.stderr
    assert "3 skipped" in again.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert [n for n in mtimes if n != "manifest.json" and after[n] != mtimes[n]] == [victim.name]
    redone = json.loads((out / "manifest.json").read_text())["users"][tokens[2]]
    assert victim.stat().st_size == redone["bytes"] and _sha256(victim) == redone["sha256"]
    assert client_for(server, writer).get_collection("col0").count() >= N_VECTORS


def test_restore_all_offline_and_online_with_state_and_refuses_tampering(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    tokens = [new_token() for _ in range(3)]
    for seed, token in enumerate(tokens):
        _fill(server, token, seed)
    blocked, limited = tokens[1], tokens[2]
    url = server.url
    assert requests.post(f"{url}/admin/users/{blocked}/block", headers=HDR, timeout=30).ok
    assert requests.put(
        f"{url}/admin/users/{limited}/limits", headers=HDR, json={"userMaxDiskMB": 9}, timeout=30
    ).ok
    out = tmp_path / "set"
    done = cli("backup", "--all", str(out), "--no-progress", server=server)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocked"] == [blocked]
    assert manifest["limitOverrides"] == {limited: {"userMaxDiskMB": 9}}
    requests.delete(f"{url}/admin/users/{blocked}/block", headers=HDR, timeout=30)
    expected = _counts(server, tokens)

    # A tampered archive (same size, one byte changed) is refused; nothing is restored.
    tampered = tmp_path / "tampered"
    tampered.mkdir(mode=0o700)
    for p in out.iterdir():
        (tampered / p.name).write_bytes(p.read_bytes())
    name = manifest["users"][tokens[0]]["archive"]
    data = bytearray((tampered / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / name).write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    refused = cli("restore", "--all", str(tampered), "--no-progress", db=fresh)
    assert refused.returncode == 1
    assert "sha256" in refused.stderr and "nothing was restored" in refused.stderr
    assert not fresh.exists() or user_dirs(fresh) == []

    # Offline: into a new dbPath with no server on it.
    done = cli("restore", "--all", str(out), "--no-progress", db=fresh)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    offline = stcs("--adminAPIKey", ADMIN, db=fresh, name="offline")
    _check_restored(offline, tokens, expected, blocked, limited)

    # Online: into a new dbPath a server is running on.
    live_db = tmp_path / "live"
    live = stcs("--adminAPIKey", ADMIN, db=live_db, name="live")
    done = cli("restore", "--all", str(out), "--no-progress", server=live)
    assert done.returncode == 0, done.stderr
    _check_restored(live, tokens, expected, blocked, limited)
    # Again without --force: the users have data now, so it is refused and nothing changes.
    again = cli("restore", "--all", str(out), "--no-progress", server=live)
    assert again.returncode == 1 and "--force" in again.stderr


def _check_restored(
    server: StcsServer, tokens: list[str], expected: dict[str, int], blocked: str, limited: str
) -> None:
    refused = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": blocked}, timeout=30
    )
    assert refused.status_code == 403  # the blocklist came along
    doc = requests.get(f"{server.url}/admin/users/{limited}/limits", headers=HDR, timeout=30)
    assert doc.json()["overrides"] == {"userMaxDiskMB": 9}
    requests.delete(f"{server.url}/admin/users/{blocked}/block", headers=HDR, timeout=30)
    assert _counts(server, tokens) == expected
