"""``stcs users block|unblock|hold|release|stop|limits``: the admin API from the command line,
against a real ``stcs serve`` (issue 23 item 3)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import requests

from stcs.log import user_ref
from tests.harness import (
    ADMIN,
    HDR,
    StcsServer,
    cli,
    client_for,
    free_port,
    new_token,
    stcs_cli,
    wait_gone,
)


def _heartbeat(server: StcsServer, token: str) -> int:
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30
    )
    return resp.status_code


def test_block_and_unblock_from_the_command_line_with_the_token_off_it(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    token_file = tmp_path / "user.token"
    token_file.write_text(token.upper() + "\n")  # a UUID in upper case means its lowercase form
    done = cli("users", "block", "--user-file", str(token_file), server=server)
    assert done.returncode == 0, done.stderr
    # UUID mode: the output names the user by reference, never by token (it may reach a log).
    assert token not in done.stdout and user_ref(token) in done.stdout
    wait_gone(child.pid, 5)  # blocking stops the user's chroma
    assert _heartbeat(server, token) == 403
    assert json.loads((server.db / ".stcs" / "blocked.json").read_text()) == [token]
    done = cli("users", "unblock", "--user-file", str(token_file), server=server)
    assert done.returncode == 0, done.stderr
    assert _heartbeat(server, token) == 200


async def test_hold_makes_requests_wait_until_release(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    done = await asyncio.to_thread(cli, "users", "hold", token, "--hold-ttl", "60", server=server)
    assert done.returncode == 0, done.stderr
    assert not child.is_running()  # held: its chroma stopped after the requests in flight
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.ensure_future(
            session.get(f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token})
        )
        await asyncio.sleep(0.5)
        assert not waiting.done()  # waits, does not fail
        async with session.get(f"{server.url}/admin/instances", headers=HDR) as resp:
            assert (await resp.json())["held"] == [token]
        done = await asyncio.to_thread(cli, "users", "release", token, server=server)
        assert done.returncode == 0, done.stderr
        resp = await asyncio.wait_for(waiting, 20)
        assert resp.status == 200


def test_stop_stops_the_users_chroma_and_says_when_none_runs(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    done = cli("users", "stop", token, server=server)
    assert done.returncode == 0, done.stderr
    wait_gone(child.pid, 5)
    again = cli("users", "stop", token, server=server)
    assert again.returncode == 1 and "no instance" in again.stderr
    assert _heartbeat(server, token) == 200  # stop is not block: the next request starts it


def test_limits_show_set_and_clear_a_users_overrides(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN, "--userMaxCollections", "5")
    token = new_token()
    shown = cli("users", "limits", token, server=server)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["userMaxCollections", "5", "setting"] in rows
    done = cli(
        "users",
        "limits",
        token,
        "--set",
        "userMaxCollections=1",
        "--set",
        "userMaxDiskMB=7",
        server=server,
    )
    assert done.returncode == 0, done.stderr
    url = f"{server.url}/admin/users/{token}/limits"
    doc = requests.get(url, headers=HDR, timeout=10).json()
    assert doc["overrides"] == {"userMaxCollections": 1, "userMaxDiskMB": 7}
    # --set changes the keys it names and keeps the others; --unset drops one.
    cli("users", "limits", token, "--set", "userMaxCollections=2", server=server)
    cli("users", "limits", token, "--unset", "userMaxDiskMB", server=server)
    doc = requests.get(url, headers=HDR, timeout=10).json()
    assert doc["overrides"] == {"userMaxCollections": 2}
    client = client_for(server, token)
    client.create_collection("one")
    client.create_collection("two")
    refused = requests.post(
        f"{server.url}/api/v2/tenants/default_tenant/databases/default_database/collections",
        headers={"X-Chroma-Token": token},
        json={"name": "three"},
        timeout=30,
    )
    assert refused.status_code == 422  # the override is what the data plane enforces
    bad = cli("users", "limits", token, "--set", "noSuchLimit=1", server=server)
    assert bad.returncode == 1 and "noSuchLimit" in bad.stderr
    malformed = cli("users", "limits", token, "--set", "userMaxDiskMB", server=server)
    assert malformed.returncode == 2
    cleared = cli("users", "limits", token, "--clear", server=server)
    assert cleared.returncode == 0, cleared.stderr
    assert requests.get(url, headers=HDR, timeout=10).json()["overrides"] == {}


def test_admin_verbs_fail_as_the_other_subcommands_do(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    wrong_key = stcs_cli(
        "users", "block", token, "--port", str(server.port), "--adminAPIKey", "nope"
    )
    assert wrong_key.returncode == 1 and "403" in wrong_key.stderr
    no_key = stcs_cli("users", "block", token, "--port", str(server.port), "--adminAPIKey", "")
    assert no_key.returncode == 1 and "adminAPIKey" in no_key.stderr
    nobody = stcs_cli("users", "hold", token, "--port", str(free_port()), "--adminAPIKey", ADMIN)
    assert nobody.returncode == 1 and "no stcs answers" in nobody.stderr
    assert cli("users", "block", "../etc", server=server).returncode == 2
    assert cli("users", "block", server=server).returncode == 2  # no user id at all
    assert _heartbeat(server, token) == 200  # nothing was blocked
