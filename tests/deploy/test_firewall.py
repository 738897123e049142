"""Children reachable only by stcs (defence in depth): ``childPortRange`` and the nftables
rule of ``stcs render nftables``, applied in a private network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.harness import StcsServer, client_for, new_token, stcs_cli

ADMIN = "fw-admin-key-3"


def test_children_listen_in_child_port_range(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--childPortRange", "23100-23119", "--adminAPIKey", ADMIN)
    for _ in range(3):
        client_for(server, new_token()).heartbeat()
    listed = requests.get(f"{server.url}/admin/instances", headers={"x-api-key": ADMIN}).json()
    ports = [i["port"] for i in listed["instances"]]
    assert len(ports) == 3 and all(23100 <= p <= 23119 for p in ports), ports


NAMESPACE_SCRIPT = """\
set -e
ip link set lo up
{load}
{python} -c '
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen(8); time.sleep(5)' &
sleep 0.5
try() {{ if "$@" bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; then echo connected;
         else echo refused; fi; }}
echo "stcs uid: $(try env)"
echo "uid 65534: $(try setpriv --reuid 65534 --regid 65534 --clear-groups)"
kill %1
"""


def run_in_namespace(rules: Path | None, port: int) -> dict[str, str]:
    script = NAMESPACE_SCRIPT.format(
        load=f"nft -f {rules}" if rules else "", python=sys.executable, port=port
    )
    out = subprocess.run(
        ["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)


@pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("nft", "unshare", "setpriv", "ip", "bash")),
    reason="needs root, nft, unshare, setpriv, ip and bash",
)
def test_rendered_nftables_rule_lets_only_the_stcs_uid_reach_the_children(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespaces here: {probe.stderr.decode().strip()}")
    rules = tmp_path / "stcs.nft"
    args = ["--childPortRange", "20000-20010", "--user", str(os.geteuid()), "-o", str(rules)]
    rendered = stcs_cli("render", "nftables", *args)
    assert rendered.returncode == 0, rendered.stderr
    os.chmod(tmp_path, 0o755)  # the listener script runs as root; nothing else needs the file
    # Without the rule any local uid reaches a child's port; with it only stcs's uid does.
    assert run_in_namespace(None, 20005) == {"stcs uid": "connected", "uid 65534": "connected"}
    assert run_in_namespace(rules, 20005) == {"stcs uid": "connected", "uid 65534": "refused"}
    # Ports outside the range are not affected.
    assert run_in_namespace(rules, 20011) == {"stcs uid": "connected", "uid 65534": "connected"}


def test_render_nftables_needs_a_child_port_range() -> None:
    out = stcs_cli("render", "nftables")
    assert out.returncode == 2 and "childPortRange" in out.stderr
