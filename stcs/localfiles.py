"""Local files: whose files stcs believes, and who may read what stcs writes.

A local user who is not stcs is an attacker (docs/security.md, "Who is trusted"; issue 19).
Three rules live here:

* **Files stcs reads to decide** (``config.yml``) are believed only when nobody but the invoking
  user or root could have written them: the file owned by one of them and writable by neither
  group nor others, and every directory on its path (as given and as resolved) owned by one of
  them and not writable by group or others unless sticky.  OpenSSH's ``StrictModes`` /
  ``secure_path`` rule, with the sticky exception of systemd-tmpfiles: in a sticky directory
  (``/tmp``) only an entry's owner can rename or remove it, and that owner was checked.
* **``dbPath`` is private**: in UUID mode a user's directory name is their token, so a dbPath
  that group or others can read or enter is a list of credentials.  `check_private_db_path`
  refuses one unless the operator said otherwise (``allowSharedDbPath``).
* **Files stcs writes for itself are private**: the CLI runs with umask 077 (`PRIVATE_UMASK`);
  an archive is created 0600 with ``O_EXCL`` under a temporary name (`private_partial`).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO

from stcs.errors import ConfigError

# Everything the CLI creates — dbPath, .stcs, user directories, locks, logs, archives, chroma's
# own files (children inherit it) — is 0700/0600 whatever the shell's umask.
PRIVATE_UMASK = 0o077


class UntrustedFileError(ConfigError):
    """A file stcs would read its settings from could have been written by another user."""


class SharedDbPathError(ConfigError):
    """``dbPath`` can be read or entered by other users (and ``allowSharedDbPath`` is off)."""


def _trusted_uids() -> frozenset[int]:
    return frozenset({os.geteuid(), 0})


def _owner_problem(st: os.stat_result, path: Path) -> str | None:
    if st.st_uid in _trusted_uids():
        return None
    return f"{path} is owned by uid {st.st_uid} (neither you, uid {os.geteuid()}, nor root)"


def _write_problem(st: os.stat_result, path: Path, fix: str) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    who = [name for bit, name in ((0o020, "group"), (0o002, "others")) if mode & bit]
    if not who:
        return None
    return f"{path} is writable by {' and '.join(who)} (mode {mode:04o}); fix: {fix}"


def _chain_problem(path: Path) -> str | None:
    """The first reason another user could have put or changed ``path`` (absolute): every
    component from ``/`` down, looked at without following it (`os.lstat`)."""
    for entry in (*reversed(path.parents), path):
        st = os.lstat(entry)
        problem = _owner_problem(st, entry)
        if problem:
            return problem
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; where it points is checked apart
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            continue  # sticky: only the (checked) owner of the next entry can swap it
        problem = _write_problem(st, entry, f"chmod go-w {entry}")
        if problem:
            return problem
    return None


def read_trusted_text(path: Path, what: str = "config file") -> str:
    """The text of ``path`` (UTF-8) if only the invoking user or root could have written it.

    Checks the path as given (made absolute, symlinks not followed) and as resolved, then the
    opened file itself (`os.fstat`).  Raises UntrustedFileError naming the file and why, or
    ConfigError when it cannot be read.
    """
    given = Path(os.path.abspath(path))
    try:
        for candidate in dict.fromkeys((given, given.resolve())):
            problem = _chain_problem(candidate)
            if problem:
                raise UntrustedFileError(f"{what} {path} is not trusted: {problem}")
        with open(given, encoding="utf-8") as handle:
            st = os.fstat(handle.fileno())
            problem = _owner_problem(st, given) or _write_problem(st, given, f"chmod go-w {given}")
            if problem:  # changed between the check and the open
                raise UntrustedFileError(f"{what} {path} is not trusted: {problem}")
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def check_private_db_path(db_dir: Path, *, owner_too: bool = True) -> None:
    """Refuse a ``dbPath`` that others can use: group or other permission bits set, or (with
    ``owner_too``) owned by another uid than this process's.  A missing one is fine: it will be
    created 0700.

    Raises SharedDbPathError naming the path, what is wrong and the command that fixes it.
    """
    try:
        st = os.stat(db_dir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"dbPath {db_dir}: {exc.strerror}") from None
    unless = "or set allowSharedDbPath: true if other users are meant to reach it"
    if owner_too and st.st_uid != os.geteuid():
        raise SharedDbPathError(
            f"dbPath {db_dir} is owned by uid {st.st_uid}, not by stcs's uid {os.geteuid()}: "
            f"its owner can read every tenant's data. Fix: chown -R {os.geteuid()} {db_dir} "
            f"&& chmod 700 {db_dir}, {unless}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SharedDbPathError(
            f"dbPath {db_dir} has mode {mode:04o}: group or others can list or enter it, and "
            f"in UUID mode its directory names are tokens. Fix: chmod 700 {db_dir}, {unless}"
        )


def private_partial(final: Path) -> tuple[Path, IO[bytes]]:
    """A new file beside ``final`` for its content, created 0600 with ``O_EXCL`` under a name
    nobody could have prepared (`tempfile.mkstemp`): never readable by others, whatever the
    umask or the directory.  Returns (its path, the open binary file).  Raises OSError.
    """
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    return Path(name), os.fdopen(fd, "wb")


def publish(partial: Path, final: Path, *, replace: bool) -> None:
    """Give ``partial`` its final name at once.  Without ``replace`` an existing ``final`` is
    kept and FileExistsError raised (`os.link`: no check-then-rename race, except on a file
    system without hard links); ``partial`` is gone either way.  Raises OSError.
    """
    if not replace:
        try:
            os.link(partial, final)
        except FileExistsError:
            partial.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                partial.unlink(missing_ok=True)
                raise
            if final.exists():
                partial.unlink(missing_ok=True)
                raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        else:
            partial.unlink()
            return
    os.replace(partial, final)
