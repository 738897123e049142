"""stcs behind real nginx and Apache (HTTP and TLS), with the configurations `stcs render` makes."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import chromadb
import pytest
import requests
from chromadb.config import Settings

from tests.deploy import frontends
from tests.harness import (
    ECHO,
    StcsServer,
    free_port,
    new_token,
    self_signed_cert,
    user_dirs,
    vectors,
)

pytestmark = pytest.mark.skipif(
    not (frontends.have("nginx") and frontends.have("apache")),
    reason="nginx and apache2 are installed by scripts/test (Debian packages)",
)

COMBOS = [("nginx", False), ("nginx", True), ("apache", False), ("apache", True)]
IDS = ["nginx-http", "nginx-tls", "apache-http", "apache-tls"]


@dataclass
class Fronted:
    stcs: StcsServer
    front: frontends.FrontServer
    tls: bool
    cert: Path | None

    @property
    def port(self) -> int:
        return self.front.tls_port if self.tls else self.front.port  # type: ignore[return-value]

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> str | bool:
        return str(self.cert) if self.cert else True

    def client(self, token: str) -> chromadb.api.ClientAPI:
        settings = Settings(
            anonymized_telemetry=False,
            chroma_server_ssl_verify=str(self.cert) if self.cert else None,
        )
        return chromadb.HttpClient(
            host="127.0.0.1",
            port=self.port,
            ssl=self.tls,
            headers={"X-Chroma-Token": token},
            settings=settings,
        )


@pytest.fixture
def fronted(stcs: Callable[..., StcsServer], tmp_path: Path) -> Iterator[Callable[..., Fronted]]:
    started: list[frontends.FrontServer] = []

    def make(kind: str, tls: bool, *stcs_args: str) -> Fronted:
        server = stcs(*stcs_args, db=tmp_path / f"db-{len(started)}")
        root = tmp_path / f"{kind}-{len(started)}"
        root.mkdir()
        port, tls_port = free_port(), (free_port() if tls else None)
        cert = key = None
        args = ["--appPort", str(server.port), "--listen", f"127.0.0.1:{port}"]
        if tls:
            cert, key = self_signed_cert(root)
            args += [
                "--tls-listen",
                f"127.0.0.1:{tls_port}",
                "--sslCertFile",
                str(cert),
                "--sslCertKeyFile",
                str(key),
            ]
        site = frontends.render(f"{kind}-tls" if tls else kind, root / "site.conf", *args)
        if kind == "nginx":
            main = frontends.nginx_main(root, site)
        else:
            listens = [f"127.0.0.1:{port}"] + ([f"127.0.0.1:{tls_port} https"] if tls else [])
            main = frontends.apache_main(root, site, listens)
        front = frontends.start(kind, main, port, tls_port, ca=cert)
        started.append(front)
        return Fronted(server, front, tls, cert)

    yield make
    for front in started:
        front.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "tls"), COMBOS, ids=IDS)
def test_full_cycle_and_30_mb_through_front_server(
    fronted: Callable[..., Fronted], kind: str, tls: bool
) -> None:
    f = fronted(kind, tls)
    token = new_token()
    client = f.client(token)
    col = client.create_collection("fronted")
    emb = vectors(1000, 3)
    col.add(
        ids=[f"i{n}" for n in range(1000)],
        embeddings=emb,
        documents=[f"doc {n}" for n in range(1000)],
        metadatas=[{"even": n % 2 == 0} for n in range(1000)],
    )
    hits = col.query(query_embeddings=[emb[10]], n_results=3, where={"even": True})
    assert hits["ids"][0][0] == "i10"
    assert col.get(ids=["i11"], include=["documents"])["documents"] == ["doc 11"]
    col.delete(ids=["i0", "i1"])
    assert col.count() == 998
    big = client.create_collection("big")
    big.add(
        ids=[str(n) for n in range(1000)],
        embeddings=vectors(1000, 4),
        documents=["x" * 30_000 for _ in range(1000)],
    )  # > 30 MB request
    assert big.count() == 1000
    assert sorted(c.name for c in client.list_collections()) == ["big", "fronted"]
    assert user_dirs(f.stcs.db) == [token]


@pytest.mark.parametrize(("kind", "tls"), COMBOS, ids=IDS)
def test_slow_response_is_streamed_not_buffered(
    fronted: Callable[..., Fronted], kind: str, tls: bool
) -> None:
    f = fronted(kind, tls, "--chromaCommand", f"{sys.executable} {ECHO}")
    started = time.monotonic()
    arrivals = []
    with requests.get(
        f"{f.base}/slow?chunks=6&interval=0.5",
        stream=True,
        verify=f.verify,
        headers={"X-Chroma-Token": new_token()},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals] == [f"chunk {i}".encode() for i in range(6)]
    assert arrivals[-1][0] >= 2.5
    assert arrivals[0][0] < arrivals[-1][0] - 2.0  # the first chunk came long before the last


@pytest.mark.parametrize(("kind", "tls"), COMBOS, ids=IDS)
def test_request_body_is_streamed_not_buffered(
    fronted: Callable[..., Fronted], kind: str, tls: bool
) -> None:
    f = fronted(kind, tls, "--chromaCommand", f"{sys.executable} {ECHO}")
    token = new_token()
    requests.get(
        f"{f.base}/echo/warm", headers={"X-Chroma-Token": token}, verify=f.verify, timeout=30
    )  # the instance is running: no cold start in the timing below

    conn = (
        http.client.HTTPSConnection(
            "127.0.0.1", f.port, context=ssl.create_default_context(cafile=str(f.cert))
        )
        if f.tls
        else http.client.HTTPConnection("127.0.0.1", f.port)
    )
    started = time.time()
    conn.putrequest("PUT", "/echo/upload")
    conn.putheader("X-Chroma-Token", token)
    conn.putheader("Content-Length", "72000")  # over stcs's 64 KiB read-whole threshold
    conn.endheaders()
    for _ in range(6):  # 6 x 12000 bytes over 3 s
        conn.send(b"x" * 12000)
        time.sleep(0.5)
    resp = conn.getresponse()
    finished = time.time()
    seen = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and seen["body_len"] == 72000
    assert finished - started >= 2.5
    assert seen["arrived"] - started < 1.0, "the front server held the body back"


@pytest.mark.slow
def test_response_slower_than_the_servers_default_timeout_is_not_cut(
    fronted: Callable[..., Fronted],
) -> None:
    """First byte after 65 s: nginx's and Apache's defaults (60 s) would cut it; ours is 600 s.
    Both servers are checked at once."""
    fronts = [
        fronted(kind, False, "--chromaCommand", f"{sys.executable} {ECHO}")
        for kind in ("nginx", "apache")
    ]

    def slow(f: Fronted) -> tuple[int, bytes, float]:
        started = time.monotonic()
        resp = requests.get(
            f"{f.base}/slow?delay=65&chunks=2&interval=0.1",
            headers={"X-Chroma-Token": new_token()},
            timeout=120,
        )
        return resp.status_code, resp.content, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(slow, fronts))
    for status, body, took in results:
        assert status == 200 and body == b"chunk 0\nchunk 1\n"
        assert took >= 65


@pytest.mark.parametrize("kind", ["nginx", "apache"])
def test_plain_http_redirects_to_https(fronted: Callable[..., Fronted], kind: str) -> None:
    f = fronted(kind, True)
    resp = requests.post(
        f"http://127.0.0.1:{f.front.port}/api/v2/heartbeat?x=1", allow_redirects=False, timeout=10
    )
    assert resp.status_code == 308
    location = resp.headers["Location"]
    assert location.startswith("https://")
    assert location.endswith(f":{f.front.tls_port}/api/v2/heartbeat?x=1")


@pytest.mark.parametrize("kind", ["nginx", "nginx-tls", "nginx-cluster", "apache", "apache-tls"])
def test_rendered_configuration_passes_the_servers_own_check(kind: str, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    site = frontends.render(
        kind,
        tmp_path / "site.conf",
        "--listen",
        "127.0.0.1:18080",
        "--tls-listen",
        "127.0.0.1:18443",
        "--sslCertFile",
        str(cert),
        "--sslCertKeyFile",
        str(key),
        "--node",
        "127.0.0.1:18001",
        "--node",
        "127.0.0.1:18002",
    )
    if kind.startswith("nginx"):
        main = frontends.nginx_main(tmp_path, site)
    else:
        listens = ["127.0.0.1:18080"] + (["127.0.0.1:18443 https"] if "tls" in kind else [])
        main = frontends.apache_main(tmp_path, site, listens)
    done = frontends.config_test(kind.split("-")[0], main)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_rendered_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    stcs_bin = Path(sys.executable).parent / "stcs"
    unit = frontends.render(
        "systemd",
        tmp_path / "stcs.service",
        "--user",
        "root",
        "--stcs-bin",
        str(stcs_bin),
        "--working-dir",
        str(tmp_path),
        "--config-path",
        str(tmp_path / "config.yml"),
    )
    text = unit.read_text()
    socket_unit = tmp_path / "stcs.socket"  # written beside the service
    assert "ListenStream=127.0.0.1:8000" in socket_unit.read_text()
    for line in (
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={tmp_path}/chromadb",
    ):
        assert line in text
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit), str(socket_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if str(tmp_path) in line or "stcs.service" in line or "stcs.socket" in line
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
