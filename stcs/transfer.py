"""One user's data directory as files to copy between cluster nodes (issue 21 item 3).

The node side of ``stcs cluster rebalance`` (`stcs.cluster`): the operator's machine pulls a
user's files from the source node's admin API and pushes them to the target's, so no node
trusts another and nothing needs SSH or a shared disk.  Four operations on
``<dbPath>/<userId>/`` (`stcs.admin` maps them to routes and checks the placement marks):

* `manifest`: every regular file (relative POSIX path, size in bytes, mtime in ns).
* `ExportStream`: the named files as an uncompressed PAX tar, streamed in 1 MiB pieces; each
  member carries the file's mtime (ns) in the pax header ``STCS.mtime_ns``, read by an
  ``fstat`` *before* the file is read, so a write during the read leaves the source newer than
  the recorded mtime and the next pass copies the file again.
* `import_tar`: extract such a tar (regular files and directories only) into the user's
  directory: each file written to a temporary name in its directory, fsynced, renamed over
  the old one, its mtime set from ``STCS.mtime_ns``; directories 0700, files 0600.
* `prune`: delete named files, then the directories left empty.

Paths are untrusted even from the admin-key holder's tools (a bug there must not write outside
the user's directory): `check_relpath` refuses absolute paths, ``..``, ``.``, empty components
and NUL; every file is reached component by component from a directory fd with
``O_NOFOLLOW`` (`open_beneath`), so a symlink planted anywhere in the user's directory is never
followed, whatever it points to (the rule of ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``,
done by hand: Python has no ``openat2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import secrets
import stat
import tarfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import structlog

from stcs.errors import BadAdminRequestError, InsufficientStorageError

log = structlog.get_logger("stcs.transfer")

CHUNK = 1 << 20  # bytes per read and per piece of the stream: memory stays bounded
PAX_MTIME = "STCS.mtime_ns"  # pax header: the file's mtime (ns) before it was read
FREE_MARGIN_BYTES = 64 << 20  # an import leaves at least this much free on dbPath's disk
MAX_PATH = 4096  # bytes of a relative path (PATH_MAX)
BLOCK = tarfile.BLOCKSIZE

# What walking to a member's place fails with when a symlink or a file is on the way, or a
# directory has the file's name.
_NOT_BENEATH = frozenset((errno.ELOOP, errno.ENOTDIR, errno.EISDIR))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_relpath(path: object) -> tuple[str, ...]:
    """The components of ``path``, a relative POSIX path inside a user's directory.

    Raises BadAdminRequestError for anything else: not a string, empty, absolute, over
    `MAX_PATH` bytes, NUL, or a component that is empty (``a//b``, a trailing ``/``), ``.``
    or ``..``.
    """
    if not isinstance(path, str) or not path:
        raise BadAdminRequestError("a path must be a non-empty string")
    if (
        path.startswith("/")
        or "\0" in path
        or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH
    ):
        raise BadAdminRequestError(f"{path!r}: not a relative path inside the user's directory")
    parts = tuple(path.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise BadAdminRequestError(f"{path!r}: not a relative path inside the user's directory")
    return parts


def check_paths(paths: object) -> list[tuple[str, ...]]:
    """``{"paths": [...]}``'s list, each `check_relpath`-checked.  Raises BadAdminRequestError."""
    if not isinstance(paths, list):
        raise BadAdminRequestError('expected {"paths": [relative path, ...]}')
    return [check_relpath(p) for p in paths]


def open_root(user_dir: str) -> int:
    """An fd of the user's directory itself (not followed if it is a symlink).  Raises
    FileNotFoundError when absent, OSError (ELOOP, ENOTDIR) for a symlink or a file."""
    return os.open(user_dir, _DIR_FLAGS)


def walk_dirs(root_fd: int, parts: Sequence[str], create: bool = False) -> int:
    """An fd of directory ``parts`` under ``root_fd``, reached one component at a time with
    ``O_NOFOLLOW`` (a symlink anywhere fails with ELOOP or ENOTDIR); ``create`` makes missing
    ones (0700).  The caller closes it.  Raises OSError."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root_fd: int, parts: Sequence[str]) -> int:
    """Open regular file ``parts`` under ``root_fd`` for reading, no symlink followed on the
    way or at the end.  Raises OSError (ELOOP for a symlink; EINVAL for what is not a regular
    file, checked on the open file)."""
    parent = walk_dirs(root_fd, parts[:-1])
    try:
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent
        )
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


# -- manifest ---------------------------------------------------------------------------------


def manifest(user_dir: str) -> list[dict[str, Any]] | None:
    """``[{"path", "size": bytes, "mtimeNs": int}]`` of every regular file under ``user_dir``,
    sorted by path; None when ``user_dir`` does not exist.  Symlinks and special files are
    skipped (logged), never followed.  Raises OSError (``user_dir`` a symlink or a file, or any
    directory that cannot be listed: a partial list would have the next copy prune the files
    it missed on the target)."""
    try:
        os.close(open_root(user_dir))
    except FileNotFoundError:
        return None
    files: list[dict[str, Any]] = []
    skipped: list[str] = []

    def fail(exc: OSError) -> None:
        raise exc

    for top, dirs, names in os.walk(user_dir, followlinks=False, onerror=fail):
        rel_top = os.path.relpath(top, user_dir)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISREG(st.st_mode):
                files.append({"path": rel, "size": st.st_size, "mtimeNs": st.st_mtime_ns})
            else:
                skipped.append(rel)
    if skipped:
        log.warning("manifest skipped what is not a regular file", count=len(skipped))
    return sorted(files, key=lambda f: f["path"])


# -- export -----------------------------------------------------------------------------------


class ExportStream:
    """The tar stream of ``paths`` (checked with `check_paths`) under ``user_dir``.

    `check` first (in a thread): every path must name a regular file reached without a
    symlink (BadAdminRequestError otherwise; a path gone since the manifest is left out).
    Then `pieces` (a generator to step in a thread: each step reads at most `CHUNK` bytes)
    yields the tar: per file a PAX header with `PAX_MTIME`, the file's bytes (as many as its
    ``fstat`` said: a file grown during the read is cut, one shrunk is padded with NULs — in
    both cases its mtime moved past the recorded one, so the next pass copies it again), the
    padding to 512 bytes; then the two zero blocks that end a tar.
    """

    def __init__(self, user_dir: str, paths: list[tuple[str, ...]]) -> None:
        self.user_dir = user_dir
        self.paths = paths
        self.files = 0
        self.bytes = 0

    def check(self) -> None:
        root = open_root(self.user_dir)
        try:
            for parts in self.paths:
                try:
                    os.close(open_beneath(root, parts))
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise BadAdminRequestError(
                        f"{'/'.join(parts)!r}: not a regular file inside the user's directory "
                        f"({exc.strerror})"
                    ) from None
        finally:
            os.close(root)

    def pieces(self) -> Generator[bytes, None, None]:
        root = open_root(self.user_dir)
        try:
            for parts in self.paths:
                try:
                    fd = open_beneath(root, parts)
                except OSError as exc:  # gone, or swapped for a symlink since `check`
                    log.warning("export skipped a file", reason=exc.strerror)
                    continue
                try:
                    yield from self._member(fd, "/".join(parts))
                finally:
                    os.close(fd)
            yield b"\0" * (2 * BLOCK)
        finally:
            os.close(root)

    def _member(self, fd: int, name: str) -> Iterator[bytes]:
        st = os.fstat(fd)  # before the read: see the class docstring
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mtime = st.st_mtime_ns // 1_000_000_000
        info.mode = 0o600
        info.pax_headers = {PAX_MTIME: str(st.st_mtime_ns)}
        yield info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
        left = st.st_size
        while left:
            data = os.read(fd, min(CHUNK, left))
            if not data:
                break
            left -= len(data)
            yield data
        if left:
            yield b"\0" * left
        yield b"\0" * (-st.st_size % BLOCK)
        self.files += 1
        self.bytes += st.st_size


# -- import -----------------------------------------------------------------------------------


class BodyReader(io.RawIOBase):
    """A blocking, readable file over an aiohttp request body (``content``: its
    ``StreamReader``), for `import_tar` running in a worker thread: each read waits for the
    event loop ``loop`` to hand over the next bytes (at most what the caller asked)."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._content = content
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        future = asyncio.run_coroutine_threadsafe(self._content.read(len(view)), self._loop)
        data: bytes = future.result()
        view[: len(data)] = data
        return len(data)


@dataclass
class ImportReport:
    """What `import_tar` wrote: files and their bytes."""

    files: int = 0
    bytes: int = 0


def free_bytes(fd: int) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``fd``."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def check_free(fd: int, wanted: int) -> None:
    """Raise InsufficientStorageError unless ``wanted`` bytes plus `FREE_MARGIN_BYTES` fit."""
    free = free_bytes(fd)
    if free < wanted + FREE_MARGIN_BYTES:
        raise InsufficientStorageError(
            f"not enough disk space: {wanted / 2**20:.1f} MB to write, {free / 2**20:.1f} MB "
            f"free, and {FREE_MARGIN_BYTES >> 20} MB must stay free"
        )


def _mtime_ns(member: tarfile.TarInfo) -> int:
    raw = member.pax_headers.get(PAX_MTIME)
    if raw is None:
        return int(member.mtime * 1_000_000_000)
    try:
        value = int(raw)
    except ValueError:
        raise BadAdminRequestError(f"{member.name!r}: bad {PAX_MTIME} {raw!r}") from None
    if not 0 <= value < MTIME_NS_MAX:
        raise BadAdminRequestError(f"{member.name!r}: bad {PAX_MTIME} {raw!r}")
    return value


MTIME_NS_MAX = 1 << 62  # year 2116: beyond it the kernel's file times overflow (500 before)
HEADER_MAX_BYTES = 1 << 20  # a pax or GNU long-name header: a path and an mtime need far less


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header whose extended headers (pax, GNU long names) ``tarfile`` may read:
    `HEADER_MAX_BYTES` at most.  ``tarfile`` reads such a header whole into memory, so one
    claiming 2^40 bytes would take the node's memory (found in review)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        )
        if self.type in extended and self.size > HEADER_MAX_BYTES:
            raise BadAdminRequestError(
                f"an extended tar header of {self.size} bytes (at most {HEADER_MAX_BYTES})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def import_tar(user_dir: str, stream: io.RawIOBase) -> ImportReport:
    """Extract the tar read from ``stream`` into ``user_dir`` (created 0700 if missing; its
    parent must exist).  Blocking: run it in a thread.

    Raises BadAdminRequestError (not a tar, cut short, a member that is not a regular file or a
    directory, or whose path escapes: `check_relpath`; nothing is written for that member, the
    ones before it stay), InsufficientStorageError (a member larger than the free space less
    `FREE_MARGIN_BYTES`), OSError.
    """
    report = ImportReport()
    with contextlib.suppress(FileExistsError):
        os.mkdir(user_dir, 0o700)
    root = open_root(user_dir)
    try:
        buffered = io.BufferedReader(stream, CHUNK)
        with tarfile.open(
            fileobj=buffered, mode="r|", errorlevel=2, tarinfo=_BoundedTarInfo
        ) as tar:
            for member in tar:
                parts = check_relpath(member.name)
                if not (member.isdir() or member.isreg()) or member.issparse():
                    raise BadAdminRequestError(
                        f"{member.name!r}: only regular files and directories are imported"
                    )
                try:
                    if member.isdir():
                        os.close(walk_dirs(root, parts, create=True))
                        continue
                    source = tar.extractfile(member)
                    assert source is not None  # a regular member always has one
                    _write_member(root, parts, member, source)
                except OSError as exc:
                    if exc.errno not in _NOT_BENEATH:
                        raise
                    raise BadAdminRequestError(
                        f"{member.name!r}: not a path inside the user's directory "
                        f"({exc.strerror}: a symlink or a file on the way)"
                    ) from None
                report.files += 1
                report.bytes += member.size
    except (tarfile.TarError, EOFError) as exc:
        raise BadAdminRequestError(f"not a complete tar stream: {exc}") from None
    finally:
        os.close(root)
    return report


def _write_member(
    root: int, parts: tuple[str, ...], member: tarfile.TarInfo, source: IO[bytes]
) -> None:
    mtime = _mtime_ns(member)
    parent = walk_dirs(root, parts[:-1], create=True)
    name = parts[-1]
    # Of a fixed length whatever ``name``'s (a name of 236-255 bytes plus a suffix was too
    # long: that user could not be moved).
    tmp = f".stcs-import.{secrets.token_hex(8)}"
    try:
        check_free(parent, member.size)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            os.fchmod(fd, 0o600)
            while chunk := source.read(CHUNK):
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(tmp, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
        # Over whatever had the name (a symlink is replaced, never followed); a directory
        # there fails (EISDIR) and is reported.
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        tmp = ""
        os.fsync(parent)
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
        os.close(parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- prune ------------------------------------------------------------------------------------


def prune(user_dir: str, paths: list[tuple[str, ...]]) -> int:
    """Delete the files ``paths`` (checked with `check_paths`) under ``user_dir`` (a symlink
    there is removed itself, never followed; a name already gone is skipped), then every
    directory left empty below ``user_dir``.  Returns how many files were removed.  Raises
    BadAdminRequestError for a path that names a directory, OSError."""
    removed = 0
    try:
        root = open_root(user_dir)
    except FileNotFoundError:
        return 0
    try:
        for parts in paths:
            try:
                parent = walk_dirs(root, parts[:-1])
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise BadAdminRequestError(
                    f"{'/'.join(parts)!r}: not inside the user's directory ({exc.strerror})"
                ) from None
            try:
                os.unlink(parts[-1], dir_fd=parent)
                removed += 1
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError):
                raise BadAdminRequestError(f"{'/'.join(parts)!r} is a directory") from None
            finally:
                os.close(parent)
        _remove_empty_dirs(root)
    finally:
        os.close(root)
    return removed


def _remove_empty_dirs(dir_fd: int) -> bool:
    """Remove the empty directories below ``dir_fd`` (depth first, no symlink followed);
    whether ``dir_fd`` itself is empty afterwards."""
    empty = True
    with os.scandir(dir_fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if not is_dir:
            empty = False
            continue
        child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            child_empty = _remove_empty_dirs(child)
        finally:
            os.close(child)
        if child_empty:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            empty = False
    return empty
