"""`stcs.ring` picks the same server as a real nginx's ``hash $arg_u consistent`` for 12,000
user ids, with 3 and with 4 servers (and the 4-server ring moves only the ids the new server
takes)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from stcs.ring import Ring
from tests.deploy import frontends
from tests.harness import free_port

pytestmark = pytest.mark.skipif(not frontends.have("nginx"), reason="nginx not installed")

N_USERS = 12_000
BATCH = 500  # requests pipelined on one connection


def user_ids() -> list[str]:
    """Ids of the shapes user ids take: UUIDs, e-mail addresses, opaque strings."""
    import uuid

    out = [str(uuid.UUID(int=(i * 2654435761) % (1 << 128))) for i in range(N_USERS // 3)]
    out += [f"user{i}@example.org" for i in range(N_USERS // 3)]
    out += [f"u-{i:x}.{i % 7}+t" for i in range(N_USERS - len(out))]
    return out


def ring_site(root: Path, listen: int, servers: list[str], backends: list[int]) -> Path:
    """An nginx site: ``/?u=ID`` goes through ``hash $arg_u consistent`` to one of ``servers``,
    each a tiny nginx server answering its own name."""
    upstream = "\n".join(f"        server {s} max_fails=0;" for s in servers)
    answer = "\n".join(
        f"    server {{ listen 127.0.0.1:{p}; location / {{ return 200 '127.0.0.1:{p}'; }} }}"
        for p in backends
    )
    site = root / "ring.conf"
    site.write_text(f"""
    upstream ring {{
        hash $arg_u consistent;
{upstream}
        keepalive 8;
    }}
{answer}
    server {{
        listen 127.0.0.1:{listen};
        keepalive_requests 1000000;
        location = /health {{ return 200 'ok'; }}
        location / {{
            proxy_pass http://ring;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }}
    }}
""")
    return site


def ask_nginx(port: int, ids: list[str], deadline: float) -> dict[str, str]:
    """The server nginx picked for each id, over pipelined keep-alive requests."""
    picked: dict[str, str] = {}
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"".join(f"GET /?u={u} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for u in batch)
            )
            buf = b""
            answers: list[str] = []
            while len(answers) < len(batch):
                assert time.monotonic() < deadline, "nginx too slow"
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buf[:head_end].decode()
                    assert head.startswith("HTTP/1.1 200"), head
                    length = int(
                        next(
                            line.split(":", 1)[1]
                            for line in head.split("\r\n")
                            if line.lower().startswith("content-length:")
                        )
                    )
                    if len(buf) >= head_end + 4 + length:
                        answers.append(buf[head_end + 4 : head_end + 4 + length].decode())
                        buf = buf[head_end + 4 + length :]
                        continue
                chunk = sock.recv(65536)
                assert chunk, "nginx closed the connection"
                buf += chunk
        picked.update(zip(batch, answers, strict=True))
    return picked


@pytest.mark.parametrize("n_servers", [3, 4])
def test_ring_owner_is_the_server_nginx_picks(tmp_path: Path, n_servers: int) -> None:
    backends = [free_port() for _ in range(n_servers)]
    servers = [f"127.0.0.1:{p}" for p in backends]
    listen = free_port()
    site = ring_site(tmp_path, listen, servers, backends)
    nginx = frontends.start("nginx", frontends.nginx_main(tmp_path, site), listen, None)
    try:
        ids = user_ids()
        began = time.monotonic()
        picked = ask_nginx(listen, ids, began + 120)
    finally:
        nginx.stop()
    ring = Ring.of(servers)
    wrong = {u: (picked[u], ring.owner(u)) for u in ids if picked[u] != ring.owner(u)}
    assert len(picked) == N_USERS
    assert not wrong, f"{len(wrong)} of {N_USERS} differ, e.g. {list(wrong.items())[:5]}"
    assert set(picked.values()) == set(servers)  # every server gets some
