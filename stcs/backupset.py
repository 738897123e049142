"""``stcs backup --all DIR`` / ``stcs restore --all DIR``: every user of a ``dbPath``, one at a
time, into a *backup set*: a private directory of per-user archives and a manifest.

::

    DIR/                         0700
      manifest.json              0600, see below
      <userId>.tar.gz            0600, one per user: `stcs.backup.backup`'s archive

``manifest.json``::

    {"format": 1, "stcsVersion": "0.x", "dbPath": "...", "startedAt": ISO, "finishedAt": ISO
     or null, "complete": bool,
     "users": {userId: {"archive": "<userId>.tar.gz", "bytes": n, "sha256": hex, "files": n,
                        "dataBytes": n, "holdMs": n, "at": ISO}},
     "blocked": [userId, ...], "limitOverrides": {userId: {key: value}}}

``bytes`` and ``sha256`` are those of the archive file; ``dataBytes`` what it holds
uncompressed; ``holdMs`` how long the user's requests waited.  Times are ISO 8601 UTC.

Consistency: each user is held on their own (`stcs.backup.held`: through the running server's
admin API, or by holding the ``dbPath`` lock when none runs) for the copy of their directory
only; the others keep being served.  The set as a whole is not one instant: user A is copied
as of A's hold, user B as of B's.

Restartable: the manifest is rewritten (atomically, 0600) after each user; a re-run skips a
user whose archive in DIR has the manifest's size and SHA-256, and copies the others again.
An archive gets its name only once complete (`stcs.localfiles.publish`) and its manifest entry
only after that, so a run that died half-way leaves at worst an archive without an entry
(copied again) or a stray ``.*.partial`` file (removed), never an entry for a partial archive.

A restore refuses a set whose manifest is not ``complete``, and verifies every archive's size
and SHA-256 against the manifest before it changes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stcs import __version__
from stcs.auth import Blocklist, validate_user_id
from stcs.backup import (
    AdminClient,
    Bar,
    OperationError,
    backup,
    progress_bar,
    restore,
)
from stcs.config import Settings
from stcs.datadir import DbPathLock
from stcs.errors import InvalidUserIdError, LockHeldError
from stcs.layout import STATE_DIR, Layout
from stcs.localfiles import private_partial, publish
from stcs.placement import marks_on_disk

MANIFEST = "manifest.json"
FORMAT = 1
ARCHIVE_SUFFIX = ".tar.gz"
_HASH_CHUNK = 1 << 20  # bytes read at a time for SHA-256


@dataclass
class UserResult:
    """One user of a run: ``skipped`` (its archive already matched), else what was copied."""

    user_id: str
    skipped: bool
    files: int = 0
    data_bytes: int = 0
    archive_bytes: int = 0
    held_s: float = 0.0


@dataclass
class SetReport:
    """A whole run: per-user results in order, seconds in all."""

    users: list[UserResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> list[UserResult]:
        return [u for u in self.users if not u.skipped]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``.  Raises OSError."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or check that an existing one is a directory of this uid
    that group and others cannot use: the archives in it are every tenant's whole database, and
    in UUID mode their names and the manifest are tokens.  Raises OperationError."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise OperationError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OperationError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise OperationError(f"{path} is owned by uid {st.st_uid}, not by you ({os.geteuid()})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise OperationError(
            f"{path} has mode {mode:04o}: group or others could read every tenant's data "
            f"from it. Fix: chmod 700 {path}"
        )


@contextlib.contextmanager
def _only_writer(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on ``out_dir`` itself for the block: two runs into one
    DIR would race on the manifest and remove each other's partial archives.  Raises
    OperationError when another run holds it."""
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OperationError(f"another stcs backup --all is writing {out_dir}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _users(db_dir: Path) -> list[str]:
    """The user ids with a directory in ``db_dir`` (stcs's own ``.stcs`` and anything that is
    not a valid id skipped), sorted."""
    try:
        entries = list(os.scandir(db_dir))
    except FileNotFoundError:
        raise OperationError(f"dbPath {db_dir} does not exist") from None
    users = []
    for entry in entries:
        if entry.name == STATE_DIR or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            users.append(validate_user_id(entry.name))
        except InvalidUserIdError:
            continue
    return sorted(users)


def _write_manifest(out_dir: Path, doc: dict[str, Any]) -> None:
    """Replace ``out_dir/manifest.json`` at once (0600; a reader sees the old or the new)."""
    final = out_dir / MANIFEST
    partial, raw = private_partial(final)
    with raw:
        raw.write(json.dumps(doc, indent=1, sort_keys=True).encode())
        raw.flush()
        os.fsync(raw.fileno())
    publish(partial, final, replace=True)


def read_manifest(in_dir: Path) -> dict[str, Any]:
    """``in_dir/manifest.json`` parsed and its shape checked.  Raises OperationError."""
    path = in_dir / MANIFEST
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise OperationError(f"no {MANIFEST} in {in_dir}: not made by stcs backup --all") from None
    except (OSError, ValueError) as exc:
        raise OperationError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise OperationError(f"{path}: not an stcs backup manifest (format {FORMAT})")
    users = doc.get("users")
    if not isinstance(users, dict):
        raise OperationError(f"{path}: no users")
    for user_id, entry in users.items():
        try:
            validate_user_id(user_id)
        except InvalidUserIdError:
            raise OperationError(f"{path}: {user_id!r} is not a valid user id") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("archive"), str)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise OperationError(f"{path}: bad entry for {user_id!r}")
        name = entry["archive"]
        if Path(name).name != name or name.startswith("."):  # no way out of DIR
            raise OperationError(f"{path}: archive name {name!r} is not a file in {in_dir}")
    return doc


def _matches(path: Path, entry: dict[str, Any]) -> str | None:
    """None when ``path`` has the size and SHA-256 ``entry`` records, else why not."""
    try:
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{size} bytes, the manifest says {entry.get('bytes')}"
        digest = sha256_of(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if digest != entry.get("sha256"):
        return f"sha256 {digest}, the manifest says {entry.get('sha256')}"
    return None


# -- state: blocklist and limit overrides ----------------------------------------------------


@dataclass(frozen=True)
class _State:
    blocked: list[str]
    overrides: dict[str, dict[str, int]]


@contextlib.contextmanager
def _offline(db_dir: Path) -> Iterator[bool]:
    """Hold the ``dbPath`` lock for the block if no server does; yields True then, False when a
    server runs (and its admin API is the way to its state)."""
    db_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = DbPathLock(db_dir)
    try:
        lock.acquire()
    except LockHeldError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _read_state(settings: Settings) -> _State:
    """The blocklist and limit overrides: from the running server (what it enforces now), or
    from ``<dbPath>/.stcs`` under the ``dbPath`` lock."""
    from stcs.quotas import Overrides

    with _offline(settings.db_dir) as offline:
        if not offline:
            doc = AdminClient(settings).request("GET", "/admin/instances", timeout=60)
            return _State(list(doc.get("blocked", [])), dict(doc.get("limitOverrides", {})))
        layout = Layout(settings.db_dir)
        return _State(Blocklist(layout.blocklist).users, Overrides(layout.limits).users)


def _apply_state(settings: Settings, state: _State) -> None:
    """Add the set's blocks and overrides to ``dbPath``'s (users not named keep theirs): via
    the running server's admin API, or in ``<dbPath>/.stcs`` under the ``dbPath`` lock."""
    from stcs.quotas import Overrides

    with _offline(settings.db_dir) as offline:
        if not offline:
            client = AdminClient(settings)
            for user_id in state.blocked:
                client.request("POST", f"/admin/users/{user_id}/block")
            for user_id, doc in state.overrides.items():
                client.request("PUT", f"/admin/users/{user_id}/limits", body=doc)
            return
        layout = Layout(settings.db_dir)
        layout.state_dir.mkdir(mode=0o700, exist_ok=True)
        blocklist = Blocklist(layout.blocklist)
        for user_id in state.blocked:
            blocklist.set(user_id, True)
        overrides = Overrides(layout.limits)
        for user_id, doc in state.overrides.items():
            overrides.set(user_id, doc)


def _state_of(doc: dict[str, Any]) -> _State:
    """The manifest's ``blocked`` and ``limitOverrides``, checked as the admin API checks them
    (they name directories and go into ``.stcs``).  Raises OperationError."""
    from stcs.quotas import check_overrides

    try:
        blocked = [validate_user_id(u) for u in doc.get("blocked") or []]
        overrides: dict[str, dict[str, int]] = {}
        for user_id, limits in (doc.get("limitOverrides") or {}).items():
            checked = check_overrides(limits)
            overrides[validate_user_id(user_id)] = {
                k: v for k, v in checked.items() if v is not None
            }
    except (InvalidUserIdError, ValueError, TypeError, AttributeError) as exc:
        raise OperationError(f"{MANIFEST}: bad blocked or limitOverrides: {exc}") from None
    return _State(blocked, overrides)


# -- backup and restore ----------------------------------------------------------------------


def backup_all(
    settings: Settings,
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    on_user: Any = None,
) -> SetReport:
    """Back up every user of ``dbPath`` into the backup set ``out_dir`` (see the module).

    ``force``: copy every user again, even those whose archive matches the manifest.
    ``on_user``: called with each `UserResult` as it is done.  Raises OperationError (then the
    manifest is left ``complete: false`` and a re-run resumes).
    """
    started = time.monotonic()
    private_dir(out_dir)
    with _only_writer(out_dir):
        return _backup_all(settings, out_dir, force, progress, on_user, started)


def _backup_all(
    settings: Settings,
    out_dir: Path,
    force: bool,
    progress: bool | None,
    on_user: Any,
    started: float,
) -> SetReport:
    users = _users(settings.db_dir)
    # A cluster node's copies that are not its users' data: moved away (stale, kept until
    # `stcs cluster cleanup`) or arriving (partial).  Restored, they would come back as served.
    try:
        marks = marks_on_disk(Layout(settings.db_dir))
    except (OSError, ValueError) as exc:
        raise OperationError(f"cannot read this node's cluster marks: {exc}") from None
    for user_id in [u for u in users if u in marks]:
        print(f"skipped {user_id}: marked {marks[user_id]} (a cluster move)", file=sys.stderr)
        users.remove(user_id)
    try:
        previous = read_manifest(out_dir)["users"]
    except OperationError:
        previous = {}
    for stray in out_dir.glob(".*.partial"):  # a run that died mid-archive
        stray.unlink(missing_ok=True)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "stcsVersion": __version__,
        "dbPath": str(settings.db_dir),
        "startedAt": _now(),
        "finishedAt": None,
        "complete": False,
        "users": {u: previous[u] for u in users if u in previous},
        "blocked": [],
        "limitOverrides": {},
    }
    report = SetReport()
    bar: Bar = progress_bar(0, "backup --all", progress)
    try:
        for n, user_id in enumerate(users, 1):
            bar.set_description(f"backup {n}/{len(users)}")
            entry = doc["users"].get(user_id)
            archive = out_dir / f"{user_id}{ARCHIVE_SUFFIX}"
            if (
                entry is not None
                and not force
                and _matches(out_dir / entry["archive"], entry) is None
            ):
                result = UserResult(user_id, skipped=True)
            else:
                done = backup(settings, user_id, archive, force=True, bar=bar)
                size = archive.stat().st_size
                doc["users"][user_id] = {
                    "archive": archive.name,
                    "bytes": size,
                    "sha256": sha256_of(archive),
                    "files": done.files,
                    "dataBytes": done.bytes,
                    "holdMs": round(done.held_s * 1000),
                    "at": _now(),
                }
                _write_manifest(out_dir, doc)
                result = UserResult(user_id, False, done.files, done.bytes, size, done.held_s)
            report.users.append(result)
            if on_user is not None:
                on_user(result)
    finally:
        bar.close()
    state = _read_state(settings)
    doc.update(
        blocked=state.blocked,
        limitOverrides=state.overrides,
        finishedAt=_now(),
        complete=True,
    )
    _write_manifest(out_dir, doc)
    # Archives of users who are gone since a previous run are no part of this set.
    kept = {e["archive"] for e in doc["users"].values()} | {MANIFEST}
    for path in out_dir.glob(f"*{ARCHIVE_SUFFIX}"):
        if path.name not in kept:
            path.unlink(missing_ok=True)
    report.seconds = time.monotonic() - started
    return report


def restore_all(
    settings: Settings,
    in_dir: Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    on_user: Any = None,
) -> SetReport:
    """Restore every user of the backup set ``in_dir`` into ``dbPath``, then add the set's
    blocklist and limit overrides.  Each user is held on their own while their directory is
    replaced, as `stcs.backup.restore` does.

    Refuses (OperationError, nothing changed): an incomplete set, an archive whose size or
    SHA-256 is not the manifest's, a user who has data already without ``force``.
    """
    started = time.monotonic()
    doc = read_manifest(in_dir)
    state = _state_of(doc)  # checked before anything changes
    if doc.get("complete") is not True:
        raise OperationError(
            f"{in_dir}: the backup did not finish (re-run stcs backup --all {in_dir} first); "
            "nothing was restored"
        )
    entries: dict[str, dict[str, Any]] = doc["users"]
    for _user_id, entry in sorted(entries.items()):
        problem = _matches(in_dir / entry["archive"], entry)
        if problem is not None:
            raise OperationError(
                f"{in_dir / entry['archive']}: {problem}: the archive was changed or damaged "
                "since the backup; nothing was restored"
            )
    if not force:
        taken = [
            u
            for u in entries
            if (settings.db_dir / u).is_dir() and any((settings.db_dir / u).iterdir())
        ]
        if taken:
            raise OperationError(
                f"{len(taken)} of the set's users already have data in {settings.db_dir} "
                "(use --force to replace it); nothing was restored"
            )
    report = SetReport()
    bar: Bar = progress_bar(0, "restore --all", progress)
    try:
        for n, (user_id, entry) in enumerate(sorted(entries.items()), 1):
            bar.set_description(f"restore {n}/{len(entries)}")
            done = restore(settings, user_id, in_dir / entry["archive"], force=force, bar=bar)
            result = UserResult(user_id, False, done.files, done.bytes, entry["bytes"], done.held_s)
            report.users.append(result)
            if on_user is not None:
                on_user(result)
    finally:
        bar.close()
    _apply_state(settings, state)
    report.seconds = time.monotonic() - started
    return report
