"""Coming from the Node.js server (README's section of that name): the old client snippet's
provider path, a database written by the chroma 0.5 the Node.js server ran, and ``/api/v1``
clients through a ``chromaCommand`` chroma 0.5.

chroma 0.5.23 comes from ``STCS_CHROMA05`` (a virtual environment, installed by scripts/test);
without it the tests that need it are skipped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chromadb
import pytest
import requests
from chromadb.config import Settings

from tests.harness import StcsServer, client_for, new_token, readme_block

CHROMA05 = Path(os.environ.get("STCS_CHROMA05", "/nonexistent"))
needs_chroma05 = pytest.mark.skipif(
    not (CHROMA05 / "bin" / "chroma").exists(), reason="set STCS_CHROMA05 (chromadb 0.5.23 venv)"
)
OLD_PROVIDER = "chromadb.auth.token.TokenAuthClientProvider"  # the Node.js server's README


def test_old_provider_path_fails_and_the_readme_one_works(stcs: Callable[..., StcsServer]) -> None:
    server = stcs()
    with pytest.raises(ModuleNotFoundError, match=r"chromadb\.auth\.token"):
        chromadb.HttpClient(
            host="127.0.0.1",
            port=server.port,
            settings=Settings(
                chroma_client_auth_provider=OLD_PROVIDER, chroma_client_auth_credentials="x"
            ),
        )
    snippet = readme_block("<!-- migrated client snippet", "python")
    token = new_token()
    namespace: dict[str, Any] = {"chromadb": chromadb, "Settings": Settings, "TOKEN": token}
    exec(snippet.replace("port=8000", f"port={server.port}"), namespace)
    namespace["client"].create_collection("docs")
    assert [c.name for c in client_for(server, token).list_collections()] == ["docs"]


def chroma05_python(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(CHROMA05 / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_chroma05
def test_a_database_written_by_chroma_05_is_served_as_it_is(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """The Node.js server's ``<dbPath>/<userId>`` (chroma 0.5.23's files), served by stcs's
    chroma 1.x: the documents read back, a query finds them, a write lands."""
    token = new_token()
    db = tmp_path / "db"
    db.mkdir(mode=0o700)
    out = chroma05_python(
        "import chromadb\n"
        f"c = chromadb.PersistentClient(path={str(db / token)!r})\n"
        "col = c.create_collection('docs')\n"
        "col.add(ids=['a', 'b'], embeddings=[[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]],"
        " documents=['hello', 'world'])\n"
        "print(chromadb.__version__, col.count())\n",
        tmp_path,
    )
    assert out.split()[-2:] == ["0.5.23", "2"]
    server = stcs(db=db)
    col = client_for(server, token).get_collection("docs")
    assert sorted(col.get()["documents"]) == ["hello", "world"]
    assert col.query(query_embeddings=[[0.1, 0.2, 0.3]], n_results=1)["ids"] == [["a"]]
    col.add(ids=["c"], embeddings=[[0.2, 0.2, 0.2]])
    assert col.count() == 3


@needs_chroma05
def test_api_v1_requests_reach_a_chroma_05_child(stcs: Callable[..., StcsServer]) -> None:
    """With ``chromaCommand`` naming a chroma 0.5.23, ``/api/v1`` requests go through stcs to
    the caller's own child (chroma 1.x answers them 404)."""
    server = stcs("--chromaCommand", str(CHROMA05 / "bin" / "chroma"))
    token, other = new_token(), new_token()
    v1 = f"{server.url}/api/v1"

    def call(method: str, path: str, who: str, json: Any = None) -> requests.Response:
        return requests.request(
            method, v1 + path, headers={"X-Chroma-Token": who}, json=json, timeout=60
        )

    assert call("GET", "/heartbeat", token).status_code == 200
    created = call("POST", "/collections", token, json={"name": "docs"})
    assert created.status_code == 200, created.text
    coll = created.json()["id"]
    body = {"ids": ["a"], "embeddings": [[0.1, 0.2, 0.3]], "documents": ["hello"]}
    assert call("POST", f"/collections/{coll}/add", token, json=body).status_code in (200, 201)
    assert call("GET", f"/collections/{coll}/count", token).json() == 1
    assert call("GET", "/collections", other).json() == []  # another user's own chroma
    assert "/api/v1/heartbeat" in {e["path"] for e in server.events("request")}
