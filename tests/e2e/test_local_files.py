"""A local user on the stcs host (uid 65534, "nobody") reads nothing stcs writes and steers
nothing through files it planted (issue 19, items 1, 2, 3 and 7).

The attacker runs as uid 65534 through ``setpriv``; the directories a scenario needs it to reach
are made traversable (0711) so that the attacked file's or directory's own mode is what stops it.
Real ``stcs`` processes throughout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stcs.config import load_settings
from stcs.errors import ConfigError
from tests.harness import (
    ROOT,
    StcsServer,
    client_for,
    free_port,
    new_token,
    start_stcs,
    stcs_cli,
    vectors,
)

ADMIN = "local-admin-key-Hk27"
NOBODY = 65534
SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
# An interpreter uid 65534 can run (the venv's lives under /root): the system's.
NOBODY_PYTHON = shutil.which("python3", path="/usr/bin:/bin")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or NOBODY_PYTHON is None,
    reason="needs root, setpriv and a system python3 to act as another local user",
)

# What a local user does with a token it found: ask stcs for that tenant's collections.
READ_TENANT = """
import sys, urllib.request
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(
    url + "/api/v2/tenants/default_tenant/databases/default_database/collections",
    headers={"X-Chroma-Token": token},
)
print(urllib.request.urlopen(req, timeout=30).read().decode())
"""


def as_nobody(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``cmd`` run as uid/gid 65534 with no supplementary groups (the local attacker)."""
    return subprocess.run(
        [str(SETPRIV), "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def with_umask(umask: int, *args: str) -> list[str]:
    """``python -m stcs ARGS`` started from a shell whose umask is ``umask``."""
    return ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", sys.executable, "-m", "stcs", *args]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory under /tmp that uid 65534 can traverse (0711) but not list."""
    path = Path(tempfile.mkdtemp(prefix="stcs-local-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path}: {oct(mode)}")
    return found


def seed_user(server: StcsServer, token: str) -> None:
    col = client_for(server, token).create_collection("diary")
    col.add(ids=["d1"], embeddings=vectors(1, 7), documents=["the secret of tenant one"])


# -- item 1: dbPath is private whatever created it ------------------------------------------


@pytest.mark.slow
def test_restore_under_umask_022_leaves_nothing_a_local_user_can_list_or_read(
    stcs: Callable[..., StcsServer], tmp_path: Path, shared: Path
) -> None:
    """Seen before: ``umask 022; stcs restore`` on a new node made dbPath 0755; uid 65534
    listed the user directories (tokens, in UUID mode) and read the tenant's documents
    through stcs.  Now every directory and file any subcommand creates is 0700/0600."""
    token = new_token()
    origin = stcs("--adminAPIKey", ADMIN)
    seed_user(origin, token)
    archive = tmp_path / "user.tar.gz"
    base = ["--port", str(origin.port), "--adminAPIKey", ADMIN, "--db", str(origin.db)]
    done = stcs_cli("backup", token, str(archive), "--no-progress", *base)
    assert done.returncode == 0, done.stderr

    db = shared / "db"  # a new node: dbPath does not exist yet
    done = subprocess.run(
        with_umask(0o022, "restore", token, str(archive), "--no-progress", "--db", str(db)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        with_umask(0o022, "users", "add", new_token(), "--db", str(db)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert loose_modes(db) == []

    server = start_stcs(tmp_path, db=db, name="restored")
    try:
        listing = as_nobody("ls", "-a", str(db))
        assert listing.returncode != 0 and token not in listing.stdout, listing.stdout
        stolen = as_nobody(str(NOBODY_PYTHON), "-c", READ_TENANT, server.url, token)
        assert "diary" in stolen.stdout  # the token alone still opens the tenant...
        for name in listing.stdout.split():  # ...but the local user has no token to try
            got = as_nobody(str(NOBODY_PYTHON), "-c", READ_TENANT, server.url, name)
            assert "diary" not in got.stdout
    finally:
        server.stop()
    assert loose_modes(db) == []  # chroma's own files too, after serving


@pytest.mark.slow
def test_serve_refuses_a_db_path_group_or_others_can_enter(tmp_path: Path, shared: Path) -> None:
    """An existing dbPath others can read or enter (an older stcs's restore, ``mkdir`` under
    umask 022, ``install -d -m 0750``) is refused with exit 2 naming it and the fix, unless
    ``allowSharedDbPath`` says the operator means it."""
    token = new_token()
    db = shared / "db"
    (db / token).mkdir(parents=True, mode=0o700)
    db.chmod(0o755)
    assert token in as_nobody("ls", str(db)).stdout  # what a shared dbPath gives away
    for mode in (0o755, 0o750, 0o701):
        db.chmod(mode)
        server = start_stcs(tmp_path, db=db, wait=False, name=f"shared-{mode:o}")
        try:
            code = server.proc.wait(30)
        finally:
            server.stop()
        text = server.log_path.read_text()
        assert code == 2, text
        assert str(db) in text and f"chmod 700 {db}" in text, text
        assert "allowSharedDbPath" in text
    db.chmod(0o755)
    server = start_stcs(tmp_path, "--allowSharedDbPath", "true", db=db, name="allowed")
    try:
        client_for(server, token).heartbeat()
    finally:
        server.stop()
    assert stat.S_IMODE(db.stat().st_mode) == 0o755  # the operator's choice is left alone

    theirs = shared / "theirs"  # 0700 but not stcs's: its owner reads everything
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    server = start_stcs(tmp_path, db=theirs, wait=False, name="theirs")
    try:
        assert server.proc.wait(30) == 2
    finally:
        server.stop()
    assert f"owned by uid {NOBODY}" in server.log_path.read_text()


def test_rendered_deployment_files_are_0644_whatever_the_umask(tmp_path: Path) -> None:
    """A rendered nginx/Apache/systemd file holds no secret and is read by other programs
    (the web server's workers, ``systemctl cat``, config management): written 0644."""
    out = tmp_path / "stcs.service"
    done = subprocess.run(
        with_umask(0o077, "render", "systemd", "-o", str(out)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# -- item 2: backup archives are private ----------------------------------------------------


def test_backup_archive_and_its_partial_file_are_never_readable_by_others(
    stcs: Callable[..., StcsServer], shared: Path
) -> None:
    """Seen before: ``stcs backup`` wrote -rw-r--r--; uid 65534 extracted the tenant's
    chroma.sqlite3.  Now the archive is 0600 from its first byte (a temporary name made with
    O_EXCL, renamed when complete), under any umask, and when it replaces an old archive."""
    token = new_token()
    server = stcs("--adminAPIKey", ADMIN)
    seed_user(server, token)
    col = client_for(server, token).get_collection("diary")
    col.add(ids=[f"x{i}" for i in range(2000)], embeddings=vectors(2000, 3))
    out_dir = shared / "backups"
    out_dir.mkdir()
    out_dir.chmod(0o755)  # the worst case: the local user can list it
    archive = out_dir / "user.tar.gz"
    args = ["--port", str(server.port), "--adminAPIKey", ADMIN, "--db", str(server.db)]

    seen_loose: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every entry of the directory while the backup runs
        while not stop.is_set():
            for entry in out_dir.iterdir():
                try:
                    mode = stat.S_IMODE(entry.lstat().st_mode)
                except FileNotFoundError:
                    continue
                if mode & 0o077:
                    seen_loose.append(f"{entry.name}: {oct(mode)}")
            time.sleep(0.001)

    def backup(*extra: str) -> None:
        done = subprocess.run(
            with_umask(0o022, "backup", token, str(archive), "--no-progress", *extra, *args),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        backup()
    finally:
        stop.set()
        watcher.join(5)
    assert seen_loose == []
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    archive.chmod(0o644)  # an older archive, as the old code left it, is replaced by a 0600 one
    backup("--force")
    assert [p.name for p in out_dir.iterdir()] == ["user.tar.gz"]  # no partial file left
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    extracted = as_nobody("sh", "-c", f"tar -xzOf {archive} data/chroma.sqlite3 | head -c 15")
    assert "Permission denied" in extracted.stderr and "SQLite" not in extracted.stdout
    mine = subprocess.run(
        ["tar", "-xzOf", str(archive), "data/chroma.sqlite3"], capture_output=True
    )
    assert mine.stdout.startswith(b"SQLite format 3")  # what the local user no longer gets


def test_restore_makes_the_restored_files_private_whatever_the_archive_says(
    tmp_path: Path, shared: Path
) -> None:
    """An archive made by hand or by another tool may carry 0755/0644 modes; a restore keeps
    none of the group and other bits."""
    src = tmp_path / "src" / "data"
    (src / "sub").mkdir(parents=True)
    (src / "chroma.sqlite3").write_bytes(b"SQLite format 3\0")
    for path in (src, src / "sub"):
        path.chmod(0o755)
    (src / "chroma.sqlite3").chmod(0o644)
    archive = tmp_path / "loose.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(src.parent), "data"], check=True)
    db = shared / "db"
    done = stcs_cli("restore", new_token(), str(archive), "--no-progress", "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert loose_modes(db) == []


# -- item 3: a planted ./config.yml is not trusted ------------------------------------------

LISTENER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[2], int(sys.argv[1])))
srv.listen()
print("listening", flush=True)
srv.settimeout(20)
try:
    conn, _ = srv.accept()
except OSError:
    sys.exit(0)
with conn:
    conn.settimeout(5)
    print(repr(conn.recv(65536)), flush=True)
"""


def nobody_listening(port: int, address: str = "127.0.0.1") -> subprocess.Popen[str]:
    """uid 65534 listening on ``address:port``, once it says so; it prints what the first
    connection sends it (or exits after 20 s without one)."""
    listener = subprocess.Popen(
        [
            str(SETPRIV),
            "--reuid",
            str(NOBODY),
            "--regid",
            str(NOBODY),
            "--clear-groups",
            str(NOBODY_PYTHON),
            "-c",
            LISTENER,
            str(port),
            address,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    return listener


def test_a_config_file_planted_by_another_user_is_refused(shared: Path) -> None:
    """Seen before: uid 65534 wrote ``appPort: N`` into a shared directory and listened on N;
    ``ADMIN_API_KEY=... stcs status`` run by root from there sent it the admin key.  Now a
    config file owned by another user is refused: exit 2 naming the file and why."""
    work = shared / "work"
    work.mkdir()
    work.chmod(0o1777)  # a shared directory, as /tmp
    port = free_port()
    planted = as_nobody(
        str(NOBODY_PYTHON), "-c", f"open('{work}/config.yml', 'w').write('appPort: {port}\\n')"
    )
    assert planted.returncode == 0, planted.stderr
    listener = nobody_listening(port)
    try:
        env = {**os.environ, "ADMIN_API_KEY": ADMIN}
        for args in (("status",), ("backup", new_token(), "out.tar.gz"), ("check-config",)):
            done = stcs_cli(*args, cwd=work, env=env, timeout=60)
            assert done.returncode == 2, (args, done.stdout, done.stderr)
            assert f"{work}/config.yml" in done.stderr and f"uid {NOBODY}" in done.stderr
    finally:
        listener.kill()
        heard = listener.communicate(timeout=10)[0]
    assert ADMIN not in heard, heard


def test_the_admin_key_goes_only_to_a_listener_of_the_db_path_owner_or_root(
    tmp_path: Path,
) -> None:
    """Seen before: with no stcs running, uid 65534 listened on appPort, and root's
    ``ADMIN_API_KEY=... stcs status`` (its own, trusted config) sent it the admin key.  Now the
    local admin commands ask the kernel who listens on the port (`stcs.sockdiag`) and send the
    key only to the owner of dbPath or root: otherwise exit 1 naming the uid, nothing sent."""
    port = free_port()
    db = tmp_path / "db"
    db.mkdir(mode=0o700)
    listener = nobody_listening(port)
    try:
        env = {**os.environ, "ADMIN_API_KEY": ADMIN}
        for args in (("status",), ("users", "block", new_token())):
            done = stcs_cli(*args, "--port", str(port), "--db", str(db), env=env, timeout=60)
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            assert f"uid {NOBODY}" in done.stderr, done.stderr
    finally:
        listener.kill()
        heard = listener.communicate(timeout=10)[0]
    assert ADMIN not in heard, heard


def test_a_listener_beside_stcs_on_another_loopback_address_blocks_no_admin_command(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Found in review: uid 65534 listening on ``127.0.0.2:appPort`` (stcs on 127.0.0.1) made
    every local admin command refuse (the check counted listeners on any address), so a local
    user could stop the nightly backup.  Only listeners a connection to 127.0.0.1 reaches count."""
    server = stcs("--adminAPIKey", ADMIN, db=tmp_path / "db")
    squatter = nobody_listening(server.port, "127.0.0.2")
    try:
        env = {**os.environ, "ADMIN_API_KEY": ADMIN}
        done = stcs_cli("status", "--port", str(server.port), "--db", str(server.db), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        squatter.kill()
        squatter.wait(10)


def test_config_files_are_trusted_only_as_openssh_trusts_its_own(shared: Path) -> None:
    """Owned by the invoking user or root and writable by neither group nor others, in
    directories only such owners can change (a sticky directory such as /tmp counts)."""
    for name, mode in (("sticky", 0o1777), ("open", 0o777), ("group", 0o775), ("own", 0o755)):
        d = shared / name
        d.mkdir()
        d.chmod(mode)
        (d / "config.yml").write_text("appName: trusted\n")
        (d / "config.yml").chmod(0o644)

    def load(path: Path) -> str:
        try:
            return load_settings(config_path=path, environ={}).settings.app_name
        except ConfigError as exc:
            return f"refused: {exc}"

    assert load(shared / "own" / "config.yml") == "trusted"
    assert load(shared / "sticky" / "config.yml") == "trusted"
    for name in ("open", "group"):
        got = load(shared / name / "config.yml")
        assert got.startswith("refused") and f"{shared / name} is writable by" in got, got
    loose = shared / "own" / "config.yml"
    for mode, why in ((0o664, "writable by group"), (0o646, "writable by others")):
        loose.chmod(mode)
        got = load(loose)
        assert got.startswith("refused") and why in got and f"chmod go-w {loose}" in got, got
    loose.chmod(0o644)
    os.chown(loose, NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}" in load(loose)
    os.chown(loose, 0, 0)
    # A symlink planted in a sticky directory, to a file root owns: the link's owner counts.
    link = shared / "sticky" / "link.yml"
    done = as_nobody("ln", "-s", str(loose), str(link))
    assert done.returncode == 0, done.stderr
    assert f"owned by uid {NOBODY}" in load(link)
    # The default ./config.yml is held to the same rule.
    planted = shared / "sticky" / "config.yml"
    os.chown(planted, NOBODY, NOBODY)
    cwd = os.getcwd()
    os.chdir(planted.parent)
    try:
        with pytest.raises(ConfigError, match=f"uid {NOBODY}"):
            load_settings(environ={})
    finally:
        os.chdir(cwd)


# -- item 7: tokens stay off command lines --------------------------------------------------


def test_backup_takes_the_user_from_standard_input_and_ps_never_shows_it(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """``stcs backup --user-file - ARCHIVE`` (token on stdin) works, and no sample of its
    ``/proc/<pid>/cmdline`` taken while it runs, by root or by uid 65534, holds the token."""
    token = new_token()
    server = stcs("--adminAPIKey", ADMIN)
    seed_user(server, token)
    archive = tmp_path / "b.tar.gz"
    env = {**os.environ, "ADMIN_API_KEY": ADMIN}
    where = ["--port", str(server.port), "--db", str(server.db)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stcs", "backup", "--user-file", "-", str(archive), *where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = as_nobody("cat", f"/proc/{proc.pid}/cmdline")  # what `ps` shows another user
    assert seen.returncode == 0 and "backup" in seen.stdout, seen.stderr
    samples: list[bytes] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(Path(f"/proc/{proc.pid}/cmdline").read_bytes())
            except OSError:
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(f"{token.upper()}\n", timeout=120)  # no bar: not a terminal
    stop.set()
    sampler.join(5)
    assert proc.returncode == 0, err
    assert f"backed up {token}" in out.lower()
    assert token not in seen.stdout
    assert samples and not [s for s in samples if token.encode() in s.lower()]
    listed = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True)
    assert "data/chroma.sqlite3" in listed.stdout


@pytest.mark.slow
def test_every_command_taking_a_user_id_reads_it_from_a_file(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    token = new_token()
    server = stcs("--adminAPIKey", ADMIN)
    seed_user(server, token)
    secret = tmp_path / "user.token"
    secret.write_text(f"{token}\n")
    base = ["--port", str(server.port), "--adminAPIKey", ADMIN, "--db", str(server.db)]
    archive = str(tmp_path / "a.tar.gz")
    for args in (
        ("backup", "--user-file", str(secret), archive, "--no-progress"),
        ("restore", "--user-file", str(secret), archive, "--force", "--no-progress"),
        ("users", "add", "--user-file", str(secret)),
    ):
        done = stcs_cli(*args, *base)
        assert done.returncode == 0, (args, done.stderr)
        assert token in done.stdout
    ref = stcs_cli("user-ref", "--user-file", "-", stdin_text=f"{token}\n")
    assert ref.returncode == 0 and ref.stdout.strip() == stcs_cli("user-ref", token).stdout.strip()
    both = stcs_cli("backup", "--user-file", str(secret), token, archive, *base)
    assert both.returncode == 2 and "--user-file" in both.stderr
    neither = stcs_cli("users", "add", *base)
    assert neither.returncode == 2
    empty = tmp_path / "empty"
    empty.write_text("\n")
    done = stcs_cli("backup", "--user-file", str(empty), archive, *base)
    assert done.returncode == 2 and str(empty) in done.stderr


def test_the_readme_uses_the_user_file_form(tmp_path: Path) -> None:
    """The README's command-line example keeps the token off command lines."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- command-line example") :]
    block = block[: block.index("```\n", block.index("```bash") + 7)]
    for line in block.splitlines():
        if (
            line.startswith(".venv/bin/stcs ")
            and any(verb in line for verb in ("backup", "restore", "users ", "user-ref"))
            and "--all" not in line
        ):
            assert "--user-file" in line, line
