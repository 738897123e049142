"""The ``dbPath`` as a whole, apart from any one child: its directories (private to stcs's uid),
the lock one serving stcs holds on it, the per-user directory locks, and the chroma servers an
earlier stcs left running there (stopped before serving).

The layout itself (which file is where) is `stcs.layout`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import structlog

from stcs.errors import LockHeldError
from stcs.layout import Layout

log = structlog.get_logger("stcs.datadir")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing one is left as it is.

    Returns ``path``.  Raises OSError.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


LOCK_TRIES = 10  # opens of a lock file unlinked under us before giving up (each is ~10 µs)


def lock_file(path: Path) -> int:
    """Open (creating) ``path`` and take an exclusive non-blocking `flock` on it; return the fd.

    Lock files are removed by whoever holds them when done (`unlock_file`), so that one file
    per user exists only while that user's chroma may run.  That opens the classic race of
    flock on a file that gets unlinked: we open ``path`` (inode A), the holder unlinks it and
    closes, our flock on A then succeeds — but A is no longer ``path``, and a third process can
    create a new ``path`` (inode B) and lock it too: two holders.  So after the flock succeeds
    we check that ``path`` still names the inode we locked (fstat against stat, as Debian's
    lockfile-progs and the ``flock(1)`` idiom do) and start again if not.  The holder unlinks
    only while it holds the lock, so once the check passes the file is ours until we unlock.

    Raises BlockingIOError when another open file description holds it (or, after
    `LOCK_TRIES` files unlinked under us, as if it did).  The fd is close-on-exec; closing it
    releases the lock.
    """
    for _ in range(LOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            try:
                named = os.stat(path)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # unlinked (or replaced) between our open and our flock: again
    raise BlockingIOError(f"lock file {path} keeps being replaced")


def unlock_file(fd: int, path: Path) -> None:
    """Remove the lock file ``path`` and release its lock ``fd`` (from `lock_file`), in that
    order: unlinked while still locked, so no one can lock the old inode and believe it is
    ``path`` (see `lock_file`).  A file that is no longer our inode is left alone."""
    try:
        held = os.fstat(fd)
        named = os.stat(path)
        if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            os.unlink(path)
    except OSError:
        pass  # already gone: nothing to remove
    finally:
        os.close(fd)


@contextlib.contextmanager
def user_dir_locked(layout: Layout, user_id: str) -> Iterator[None]:
    """Hold ``user_id``'s directory lock (``.stcs/locks/<userId>.lock``, `lock_file`) for the
    block: no chroma has the user's files open, and none starts, until it ends.  Raises
    BlockingIOError when a process holds it."""
    layout.locks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = layout.user_lock(user_id)
    fd = lock_file(path)
    try:
        yield
    finally:
        unlock_file(fd, path)


class DbPathLock:
    """The exclusive lock one serving stcs process holds on its ``dbPath``.

    ``acquire`` raises LockHeldError naming the lock file when another process holds it.
    """

    def __init__(self, db_dir: Path) -> None:
        self.path = Layout(db_dir).server_lock
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self.path.parent.parent)
        private_dir(self.path.parent)
        # stcs's own state directory is never meant to be shared: tighten one made by an older
        # stcs with the default umask (0755).
        os.chmod(self.path.parent, 0o700)
        try:
            self._fd = lock_file(self.path)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "unknown"
            raise LockHeldError(
                f"dbPath {self.path.parent.parent} is in use by another stcs process "
                f"(pid {holder}): lock {self.path} is held"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _path_arg(cmdline: Sequence[str]) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == "--path" and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("--path="):
            return arg.split("=", 1)[1]
    return None


def _orphan_dir(proc: psutil.Process, cmdline: Sequence[str]) -> Path | None:
    """The data directory a ``chroma run --path P`` process serves: ``P`` resolved against the
    process's working directory (children get ``--path .``).  None if unknowable."""
    path = _path_arg(cmdline)
    if path is None:
        return None
    try:
        base = Path(proc.cwd()) if not os.path.isabs(path) else Path("/")
        return (base / path).resolve()
    except (OSError, RuntimeError, psutil.Error):
        return None


def find_orphans(db_dir: Path) -> Iterator[psutil.Process]:
    """Chroma servers (``... run ... --path P``) whose ``P`` is a user directory of ``db_dir``:
    *directly* inside it (``<dbPath>/<userId>``) — not ``dbPath`` itself, nothing deeper, no
    sibling such as ``<dbPath>2``, no dot-directory (``.stcs``).

    Matched on the command line and working directory (psutil), never on a bare pid, and never
    this process.
    """
    root = db_dir.resolve()
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info["pid"] == me or "run" not in cmdline:
            continue
        target = _orphan_dir(proc, cmdline)
        if target is not None and target.parent == root and not target.name.startswith("."):
            yield proc


def stop_orphans(db_dir: Path, timeout_s: float) -> list[int]:
    """SIGTERM every orphan of ``db_dir``, SIGKILL those alive after ``timeout_s``.

    Returns the pids found.  Blocking (psutil.wait_procs): call before serving.
    """
    procs = list(find_orphans(db_dir))
    for proc in procs:
        target = _orphan_dir(proc, proc.info.get("cmdline") or [])
        # Named by the user id (hidden like every user_id in UUID mode), not by the command
        # line: an older stcs put the data directory, a token in UUID mode, on it.
        log.warning(
            "stopping leftover chroma server",
            pid=proc.pid,
            user_id=target.name if target is not None else None,
        )
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        log.warning("leftover chroma server survived SIGTERM, killing", pid=proc.pid)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` as stored (``st_size``; symlinks not followed, files
    that vanish meanwhile skipped): what copying the directory moves."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
