"""Back up and restore one user's chroma directory, consistent while stcs runs; `stcs status`.

With a server running on ``dbPath`` the user is *held* through the admin API (``POST
/admin/users/{userId}/hold``): the user's chroma stops after its requests in flight, new
requests for that user wait (up to ``queueTimeout``) instead of failing, and the hold ends when
the copy is done (or after a TTL, should this process die).  Without a server, the ``dbPath``
lock is taken so none can start during the copy.  Either way the user's directory lock
(``.stcs/locks/<userId>.lock``) is held while files are read or replaced: no chroma can have
them open.

Archives are gzip tarballs holding ``data/...`` (the directory's contents), so they restore
under any user id.  A backup is written 0600 to a new temporary file beside ``OUT`` and renamed
when complete (`stcs.localfiles.private_partial`: an archive holds a tenant's whole database);
a restore extracts beside the user's directory, with no group or other permission whatever the
archive says, and swaps it in, so a failure never leaves half a database.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from stcs.auth import normalize_user_id
from stcs.config import Settings
from stcs.datadir import DbPathLock, user_dir_locked
from stcs.errors import InvalidUserIdError, LockHeldError, StcsError
from stcs.layout import Layout
from stcs.localfiles import private_partial, publish
from stcs.placement import marks_on_disk
from stcs.sockdiag import listener_uids

ARCHIVE_ROOT = "data"
HOLD_TTL_S = 3600  # a hold this process forgot to release ends by itself


class OperationError(StcsError):
    """The operation was refused or failed; the message says why.  Nothing was changed."""


@dataclass(frozen=True)
class Report:
    """What a backup or restore did: files, bytes, seconds in all, seconds the user was held
    (their requests waited; it includes stopping their chroma)."""

    files: int
    bytes: int
    seconds: float
    held_s: float = 0.0


class AdminClient:
    """Talks to the running stcs on this machine with ``adminAPIKey``.

    Before the key is first sent, the kernel is asked who listens on ``appPort``
    (`stcs.sockdiag`): only a socket of the owner of ``dbPath`` (the user stcs runs as) or of
    root (a systemd socket) gets it.  When no stcs runs, any local user may listen on that port
    and would otherwise receive the key (docs/security.md)."""

    # The local port whose listener is checked (None: not checked, e.g. a cluster node's
    # address, `stcs.cluster.NodeAdmin`), and the owner expected.
    _local_port: int | None = None
    _db_dir: Path | None = None

    def __init__(self, settings: Settings) -> None:
        scheme = "https" if settings.app_tls else "http"
        self.base = f"{scheme}://127.0.0.1:{settings.app_port}"
        self._key = settings.admin_api_key
        self._local_port = settings.app_port
        self._db_dir = settings.db_dir
        self._context: ssl.SSLContext | None = None
        if settings.app_tls:
            # Our own server on loopback, verified against its own certificate (which names
            # the public host, not 127.0.0.1).
            self._context = ssl.create_default_context(cafile=settings.ssl_cert_file)
            self._context.check_hostname = False

    def request(
        self, method: str, path: str, timeout: float = 600, body: Any = None
    ) -> dict[str, Any]:
        """Call an admin endpoint (``body``: sent as JSON unless None); the JSON answer.
        Raises OperationError."""
        if not self._key:
            raise OperationError("this needs adminAPIKey set (the running server's admin API)")
        if self._local_port is not None:
            self._check_listener(self._local_port)
        headers = {"x-api-key": self._key}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = f"{self.base}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._context) as resp:
                answer: dict[str, Any] = json.loads(resp.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", exc.reason)
            except ValueError:
                message = exc.reason
            raise OperationError(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise OperationError(f"no stcs answers at {self.base}: {exc}") from None

    def _check_listener(self, port: int) -> None:
        """Raise OperationError unless a socket listens on ``port`` and every one belongs to
        the owner of ``dbPath`` or to root (before each call: ~0.1 ms).  Without ``sock_diag``
        a warning, and the key is sent as before."""
        try:
            uids = listener_uids(port, reaching="127.0.0.1")  # where the key is sent
        except OSError as exc:
            print(f"warning: cannot tell who listens on port {port} ({exc})", file=sys.stderr)
            self._local_port = None
            return
        try:
            owner = self._db_dir.stat().st_uid if self._db_dir is not None else os.getuid()
        except FileNotFoundError:
            owner = os.getuid()
        if not uids:
            raise OperationError(f"no stcs answers at {self.base}: nothing listens on port {port}")
        foreign = sorted({uid for uid in uids if uid not in (owner, 0)})
        if foreign:
            raise OperationError(
                f"port {port} is listened on by uid {foreign[0]}, not by the owner of dbPath "
                f"(uid {owner}) or root: not sending it the admin key (is stcs running?)"
            )


def _normalized(settings: Settings, user_id: str) -> str:
    """``user_id`` as the server's resolver gives it (a UUID means its lowercase form in UUID
    mode).  Raises OperationError for an id unusable as a directory name."""
    try:
        return normalize_user_id(user_id, uuid_mode=settings.user_ids_are_secret)
    except InvalidUserIdError:
        raise OperationError(f"{user_id!r} is not a valid user id") from None


def _user_dir(settings: Settings, user_id: str) -> Path:
    return settings.db_dir / _normalized(settings, user_id)


@contextlib.contextmanager
def held(settings: Settings, user_id: str) -> Iterator[str]:
    """Hold ``user_id`` for the block: via the running server, or by holding ``dbPath``.

    Yields "server" or "offline".  Raises OperationError.
    """
    settings.db_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    db_lock = DbPathLock(settings.db_dir)
    try:
        db_lock.acquire()
        mode = "offline"
    except LockHeldError:
        mode = "server"
    client = AdminClient(settings)
    if mode == "server":
        client.request("POST", f"/admin/users/{user_id}/hold?ttl={HOLD_TTL_S}")
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(user_dir_locked(Layout(settings.db_dir), user_id))
            except BlockingIOError:
                raise OperationError(f"{user_id}'s database is open by a chroma process") from None
            yield mode
    finally:
        if mode == "server":
            client.request("DELETE", f"/admin/users/{user_id}/hold")
        else:
            db_lock.release()


if TYPE_CHECKING:
    from tqdm import tqdm

Bar: TypeAlias = "tqdm[NoReturn]"  # a string: tqdm is generic only to type checkers


def progress_bar(total: int, desc: str, progress: bool | None) -> Bar:
    """A byte progress bar on stderr; ``progress`` None shows it only on a terminal."""
    # Imported here: every subcommand imports this module (through `stcs.cluster`), and only
    # backup and restore draw a bar (setup.sh's check-config may run on a bare python3).
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=None if progress is None else not progress,
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def backup(
    settings: Settings,
    user_id: str,
    out: Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    bar: Bar | None = None,
) -> Report:
    """Write ``user_id``'s directory to the gzip tarball ``out`` (mode 0600; never readable by
    others, not even while partial).

    Raises OperationError: unknown user, ``out`` exists without ``force``, hold refused,
    ``out``'s directory not writable.  ``progress`` None shows a bar on a terminal; ``bar``:
    count into this one instead (its total grows by this user's bytes; left open).
    """
    user_id = _normalized(settings, user_id)
    src = _user_dir(settings, user_id)
    if not src.is_dir():
        raise OperationError(f"no data for {user_id} in {settings.db_dir}")
    if out.exists() and not force:
        raise OperationError(f"{out} exists (use --force to replace it)")
    started = hold_began = time.monotonic()  # the hold's POST (the chroma's stop) included
    with held(settings, user_id):
        sizes = {f: f.stat().st_size for f in _files(src)}
        total = sum(sizes.values())
        try:
            partial, raw = private_partial(out)
        except OSError as exc:
            raise OperationError(f"cannot write beside {out}: {exc.strerror}") from None
        own_bar = bar is None
        bar = progress_bar(total, f"backup {user_id}", progress) if own_bar else _grown(bar, total)
        try:
            with raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                tar.add(src, arcname=ARCHIVE_ROOT, recursive=False)
                dirs_added: set[Path] = set()
                for path, size in sizes.items():
                    rel = path.relative_to(src)
                    for parent in reversed(rel.parents[:-1]):
                        if parent not in dirs_added:
                            dirs_added.add(parent)
                            name = f"{ARCHIVE_ROOT}/{parent.as_posix()}"
                            tar.add(src / parent, arcname=name, recursive=False)
                    tar.add(path, arcname=f"{ARCHIVE_ROOT}/{rel.as_posix()}")
                    bar.update(size)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            if own_bar:
                bar.close()
    held_s = time.monotonic() - hold_began  # to the end of the hold's DELETE
    try:
        publish(partial, out, replace=force)
    except FileExistsError:
        raise OperationError(f"{out} exists (use --force to replace it)") from None
    return Report(files=len(sizes), bytes=total, seconds=time.monotonic() - started, held_s=held_s)


def _grown(bar: Bar | None, by: int) -> Bar:
    """The shared ``bar``, its total grown by ``by`` bytes."""
    assert bar is not None
    bar.total = (bar.total or 0) + by
    bar.refresh()
    return bar


def _check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Members under ``data/``, regular files and directories only, no way out of it."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if (
            not parts
            or parts[0] != ARCHIVE_ROOT
            or ".." in parts
            or m.name.startswith("/")
            or not (m.isfile() or m.isdir())
        ):
            raise OperationError(f"not an stcs backup: unexpected member {m.name!r}")
    return members


def _private(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """``member`` with its group and other permission bits cleared: a tenant's files are
    stcs's alone, whatever umask or tool made the archive."""
    private = copy.copy(member)
    private.mode &= 0o700
    return private


def _refuse_moving(settings: Settings, user_id: str) -> None:
    """Raise OperationError when this node marks ``user_id`` ``moved`` or ``arriving`` (a
    cluster move, `stcs.placement`): restored here, the data would never be served, and
    ``stcs cluster cleanup`` (moved) or the move's copy (arriving) would replace it."""
    try:
        mark = marks_on_disk(Layout(settings.db_dir)).get(user_id)
    except (OSError, ValueError) as exc:
        raise OperationError(f"cannot read this node's cluster marks: {exc}") from None
    if mark is not None:
        raise OperationError(
            f"{user_id} is marked {mark} on this node (a cluster move): restore it on the node "
            "that serves it, or mark it home here first (PUT /admin/users/{userId}/placement)"
        )


def restore(
    settings: Settings,
    user_id: str,
    src: Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    bar: Bar | None = None,
) -> Report:
    """Replace ``user_id``'s directory with the backup ``src``.

    Refuses (OperationError, nothing changed) when the user already has data and ``force`` is
    not given, or when ``src`` is not an stcs backup.  ``bar``: as for `backup`.
    """
    user_id = _normalized(settings, user_id)
    dest = _user_dir(settings, user_id)
    _refuse_moving(settings, user_id)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise OperationError(f"{user_id} already has data in {dest} (use --force to replace it)")
    try:
        with tarfile.open(src, "r:gz") as tar:
            members = _check_members(tar)
    except (OSError, tarfile.TarError) as exc:
        raise OperationError(f"cannot read {src}: {exc}") from None
    started = time.monotonic()
    total = sum(m.size for m in members if m.isfile())
    staging = Layout(settings.db_dir).restore_staging(user_id, os.getpid())
    trash = Layout(settings.db_dir).restore_trash(user_id, os.getpid())
    hold_began = time.monotonic()
    with held(settings, user_id):
        shutil.rmtree(staging, ignore_errors=True)
        own_bar = bar is None
        bar = progress_bar(total, f"restore {user_id}", progress) if own_bar else _grown(bar, total)
        try:
            with tarfile.open(src, "r:gz") as tar:
                for member in map(_private, members):  # already checked by _check_members
                    if sys.version_info >= (3, 12):
                        tar.extract(member, staging, filter="data")
                    else:
                        tar.extract(member, staging)
                    bar.update(member.size if member.isfile() else 0)
            if dest.exists():
                dest.replace(trash)
            (staging / ARCHIVE_ROOT).replace(dest)
        except BaseException:
            if trash.exists() and not dest.exists():
                trash.replace(dest)  # put the original back
            raise
        finally:
            if own_bar:
                bar.close()
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
    return Report(
        files=sum(1 for m in members if m.isfile()),
        bytes=total,
        seconds=time.monotonic() - started,
        held_s=time.monotonic() - hold_began,
    )


def status(settings: Settings) -> list[dict[str, Any]]:
    """The running server's instances (``GET /admin/instances``).  Raises OperationError."""
    instances: list[dict[str, Any]] = AdminClient(settings).request(
        "GET", "/admin/instances", timeout=30
    )["instances"]
    return instances
