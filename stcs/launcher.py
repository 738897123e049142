"""How a chroma server is started and stopped (mechanism only; `supervisor` decides when).

A child is ``chroma run --host 127.0.0.1 --path <dbPath>/<userId> --port <port>``, run by
default through the *lean launcher*: a ``python -S -c`` bootstrap that calls chroma's Rust CLI
(``chromadb_rust_bindings.cli``) without importing the ``chromadb`` package (~80 ms to the first
heartbeat and ~38 MB, against ~0.8 s and ~110 MB for the ``chroma`` console script; see
docs/benchmarks.md).
``chromaCommand`` names another executable; the same bootstrap then ``exec``s it.

The bootstrap sets ``PR_SET_PDEATHSIG`` (prctl(2)) on itself, so the child gets SIGTERM when
stcs dies, then checks ``getppid()`` to close the race with a parent that died before that.  The
signal fires when the *thread* that forked the child ends, so children are spawned from the
event-loop thread, never from an executor.

Per child, under ``<dbPath>/.stcs/`` (`stcs.layout`; the ``dbPath`` lock and leftover children
of an earlier run are `stcs.datadir`'s): ``locks/<userId>.lock`` (held for the life of
that user's child, and inherited by it, so even an orphaned child keeps its directory locked;
removed when the child is released: `datadir.unlock_file`) and ``logs/<userId>.log`` (the
child's output, truncated at each start; never an unread pipe; ``logs/<user ref>.log`` in UUID
mode, where the user id is a token: see `stcs.log.user_ref`; removed by the housekeeping once
older than ``childLogRetention``).

Files and directories stcs creates are private to its uid: directories 0700, files 0600
(`datadir.private_dir`; ``stcs serve`` also runs with umask 077).  A child runs in its data
directory and is given ``--path .``: its command line (world-readable in ``/proc``) names no user
id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
import structlog

from stcs.chroma_api import heartbeat
from stcs.datadir import lock_file, private_dir, unlock_file
from stcs.errors import DirectoryLockedError, StartFailedError, UnknownUserError
from stcs.layout import Layout
from stcs.log import user_ref
from stcs.ports import PortHold
from stcs.sockdiag import listener_uids
from stcs.upstream import UpstreamPool

log = structlog.get_logger("stcs.launcher")

READY_PROBE_TIMEOUT_S = 1.0  # one heartbeat of the readiness poll
LOG_PRUNE_MAX_S = 60.0  # child logs are looked at for removal this often at most
# What a child's output file is called (`ChromaLauncher.log_path`: a user id or `user_ref`, then
# `rotate_log`'s ".1"): nothing else in the logs directory is ever removed.
_CHILD_LOG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\.log(\.1)?$")
LOG_TAIL_BYTES = 2000

# argv: [python, -S, -c, BOOTSTRAP, <stcs pid>, <site dir>, <port hold fd | -1>,
#        <gate fd | -1>, ("--exec", program, ...args) | chroma CLI args]
# Run with ``python -S``: no site processing (.pth files, editable-install finders: ~15 ms);
# the one directory chroma's extension lives in is put on sys.path instead.
# The port hold (`stcs.ports`) is closed as late as can be: right before chroma (or the
# chromaCommand) starts and binds the port, so that another process has only chroma's own
# start-up to take it in.  stcs's own copy of the hold must be gone by then too, and stcs
# closes it only when the spawn's ``await`` returns — under a burst of starts 75-250 ms later,
# after chroma had tried to bind ("Address ... is not available", exit 0: 20-25 % of the first
# attempts of 200 users starting 40 at a time failed so, a user whose three attempts all did got
# 503).  So the child first reads the *gate*, a pipe whose write end stcs closes together with
# its copy of the hold: at its end of file, the hold is the child's alone.
BOOTSTRAP = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)  # stcs died before prctl took effect
sys.path.insert(0, sys.argv[2])
hold, gate = int(sys.argv[3]), int(sys.argv[4])
args = sys.argv[5:]
def release():
    if gate >= 0:
        while os.read(gate, 64):  # until stcs has closed its end (and its copy of the hold)
            pass
        os.close(gate)
    if hold >= 0:
        os.close(hold)
if args[0] == "--exec":
    release()
    os.execvp(args[1], args[1:])
import chromadb_rust_bindings
release()
chromadb_rust_bindings.cli(["chroma", *args])
"""


@functools.cache
def _chroma_site_dir() -> str:
    """The directory holding the ``chromadb_rust_bindings`` package (found without loading
    its 20 MB extension into stcs)."""
    spec = importlib.util.find_spec("chromadb_rust_bindings")
    if spec is None or not spec.submodule_search_locations:
        raise StartFailedError("chromadb is not installed (no chromadb_rust_bindings)")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


# Variables a chroma child inherits from stcs (everything else is dropped: stcs's own settings
# such as ADMIN_API_KEY and AUTH_SERVER_APIKEY, other services' secrets, CHROMA_* overrides).
# RUST_LOG stays: README documents it as the way to change the children's log level.
CHILD_ENV_ALLOWED = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "RUST_LOG"})
CHILD_ENV_PREFIXES = ("LC_",)


def child_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a chroma child: an allowlist of ``base`` (`CHILD_ENV_ALLOWED`,
    ``LC_*``), telemetry off (``ANONYMIZED_TELEMETRY=False``), ``RUST_LOG=warn`` unless set.

    An allowlist, not a denylist (docs/security.md): a child is untrusted code reading
    ``/proc/self/environ``; no key, token or stcs setting may reach it.  The lean launcher
    needs nothing more (it puts chroma's site directory on ``sys.path`` itself).
    """
    env = {
        k: v for k, v in base.items() if k in CHILD_ENV_ALLOWED or k.startswith(CHILD_ENV_PREFIXES)
    }
    env["ANONYMIZED_TELEMETRY"] = "False"
    # chroma logs ~500 bytes per request at its default level: to an unbounded file and at a
    # CPU cost. Warnings only, unless the operator asks for more with RUST_LOG.
    env.setdefault("RUST_LOG", "warn")
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(eq=False)
class Child:
    """One chroma server *incarnation* (a process on a port).  ``started_at`` is wall-clock
    seconds, ``start_ms`` the time from spawn to the first good heartbeat.

    It holds its user's directory lock until `release` (called once the process is reaped and
    forgotten) and its port until then *and* until no request lease refers to it any more
    (``leases``: `lease`/`unlease`, through `supervisor.Instance`, whose requests in flight
    they are: the one count of them): until both, no other child can
    be given the port, so a request bound to this incarnation can never reach another user's
    server.  As an
    upstream `Target`, it is unreachable from the moment its process has exited.
    """

    user_id: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path
    started_at: float
    start_ms: float = 0.0
    leases: int = 0
    _lock_fd: int | None = field(default=None, repr=False)
    _lock_path: Path | None = field(default=None, repr=False)
    _release_port: Callable[[], None] | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def reachable(self) -> bool:
        return not self._released and self.process.returncode is None

    async def wait(self) -> int:
        """Wait for the process to exit and be reaped; the exit status, ``-N`` for signal N."""
        return await self.process.wait()

    def release(self) -> None:
        """Give back the directory lock, and the port once no lease refers to it (idempotent).

        Raises RuntimeError if the process has not been reaped: its lock and port stay held.
        """
        if self.process.returncode is None:
            raise RuntimeError(f"child {self.pid} is still running")
        self._released = True
        if self._lock_fd is not None:
            if self._lock_path is not None:  # removed: it exists only while a child may run
                unlock_file(self._lock_fd, self._lock_path)
            else:
                os.close(self._lock_fd)
            self._lock_fd = None
        if not self.leases:
            self._give_back_port()

    def lease(self) -> None:
        """One request lease more (`Supervisor.acquire`): the port stays this child's."""
        self.leases += 1

    def unlease(self) -> None:
        """One request lease less; the last one out of a released child frees the port."""
        self.leases -= 1
        if not self.leases and self._released:
            self._give_back_port()

    def _give_back_port(self) -> None:
        if self._release_port is not None:
            self._release_port()
            self._release_port = None


def port_owned_by(child_pid: int, port: int) -> bool:
    """Whether every socket listening on ``port`` belongs to stcs's uid or the child's: a
    listener of any other uid is another local user's process squatting the port (the kernel's
    answer, `sockdiag.listener_uids`, ~0.1 ms).  Processes of stcs's own uid are trusted
    (docs/security.md).  True when the kernel cannot tell (no ``sock_diag``: logged)."""
    try:
        uids = listener_uids(port, reaching="127.0.0.1")  # where stcs connects to the child
    except OSError as exc:
        log.warning("cannot check who listens on an instance port", port=port, error=str(exc))
        return True
    allowed = {os.geteuid()}
    with contextlib.suppress(psutil.Error):
        allowed.add(psutil.Process(child_pid).uids().effective)
    return bool(uids) and all(uid in allowed for uid in uids)


def describe_exit(code: int) -> str:
    """``"exit code N"`` or ``"signal SIGX"`` (with gunicorn's hint for SIGKILL)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (perhaps out of memory?)" if -code == signal.SIGKILL else ""
    return f"signal {name}{hint}"


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log file as text ('' if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Launcher(Protocol):
    """What the supervisor needs of a launcher."""

    async def launch(self, user_id: str) -> Child: ...

    async def stop(self, child: Child) -> int: ...

    def rotate_log(self, child: Child) -> None: ...

    async def probe(self, child: Child, timeout_s: float) -> bool: ...

    def kill(self, child: Child) -> None: ...


class ChromaLauncher:
    """Start and stop chroma servers for users under ``db_dir``.

    ``command`` is ``chromaCommand`` split into argv (empty: the lean launcher).  Times in ms.  The
    heartbeat probes (`probe`: readiness, liveness, ``/admin-health``) go through ``pool``, stcs's
    one client to its children (`stcs.upstream.UpstreamPool`).  Per child it also lends the port
    (``port_range``, held between children by `stcs.ports.PortHold`) and bounds the output file
    (`rotate_log`): mechanism of one child, never a decision about when.  Raises ConfigError when
    ``port_range`` needs more open files than the hard limit allows.
    """

    def __init__(
        self,
        db_dir: Path,
        pool: UpstreamPool,
        *,
        command: Sequence[str] = (),
        start_timeout_ms: int = 20000,
        stop_timeout_ms: int = 10000,
        max_retries: int = 2,
        environ: Mapping[str, str] | None = None,
        logs_dir: Path | None = None,
        log_max_bytes: int = 10 * 1024 * 1024,
        user_ids_are_secret: bool = False,
        port_range: tuple[int, int] | None = None,
        create_dirs: bool = True,
        log_retention_ms: int = 0,
    ) -> None:
        self.db_dir = db_dir
        self._pool = pool
        self._command = list(command)
        self._start_timeout = start_timeout_ms / 1000
        self._stop_timeout = stop_timeout_ms / 1000
        self._max_retries = max_retries
        self._env = child_environment(os.environ if environ is None else environ)
        self._layout = Layout(db_dir)
        self._logs_dir = logs_dir or self._layout.logs_dir
        self._log_max_bytes = log_max_bytes
        self._user_ids_are_secret = user_ids_are_secret
        # childPortRange (inclusive; None: any free port), held while no child uses a port.
        # Raises ConfigError when the range needs more open files than the hard limit.
        self.ports = PortHold(port_range)
        self._log_retention = log_retention_ms / 1000  # childLogRetention; 0: for ever
        self._next_prune = 0.0  # monotonic s
        # autoCreateUsers: make a missing user directory (False: a missing one fails the start)
        self._create_dirs = create_dirs

    def log_path(self, user_id: str) -> Path:
        """Where ``user_id``'s chroma output goes: ``<logs>/<userId>.log``, or
        ``<logs>/<user ref>.log`` when user ids are secret (UUID mode)."""
        name = user_ref(user_id) if self._user_ids_are_secret else user_id
        return self._logs_dir / f"{name}.log"

    def argv(self, port: int, hold_fd: int = -1, gate_fd: int = -1) -> list[str]:
        """The child's full argv for ``port`` (``hold_fd``: the inherited socket holding it,
        closed by the child right before chroma binds, once ``gate_fd``, the read end of a
        pipe, reads end of file; -1: none).  It runs in its data directory (``cwd``) and is
        told ``--path .``: ``/proc/<pid>/cmdline`` is world-readable, and in UUID mode the
        directory name is the user's token."""
        run = ["run", "--host", "127.0.0.1", "--path", ".", "--port", str(port)]
        head = [
            *(sys.executable, "-S", "-c", BOOTSTRAP),
            *(str(os.getpid()), _chroma_site_dir(), str(hold_fd), str(gate_fd)),
        ]
        if self._command:
            return [*head, "--exec", *self._command, *run]
        return [*head, *run]

    async def launch(self, user_id: str) -> Child:
        """Start ``user_id``'s chroma server and wait until it answers its heartbeat.

        The user id must already be validated (`auth.validate_user_id`).  A child that exits
        before it is ready is retried on a new port, ``max_retries`` times.  Raises
        StartFailedError when the directory is locked by another process, the child keeps
        exiting, it is not ready within ``start_timeout_ms``, or the system refuses a step
        (an OSError: no fd left, no port, a data directory that cannot be made, ...).
        """
        try:
            return await self._launch(user_id)
        except OSError as exc:
            # Not str(exc): it names the file, and in UUID mode a path holds the token.
            log.error(
                "cannot start instance",
                user_id=user_id,
                error=exc.strerror or type(exc).__name__,
                errno=exc.errno,
            )
            raise StartFailedError(
                "the user's chroma server could not be started (system error); retry later"
            ) from None

    async def _launch(self, user_id: str) -> Child:
        data_dir = self._layout.user_dir(user_id)
        private_dir(self._layout.locks_dir)
        private_dir(self._logs_dir)
        try:
            lock_path = self._layout.user_lock(user_id)
            lock_fd = lock_file(lock_path)
        except BlockingIOError:
            log.error("data directory locked", user_id=user_id)
            raise DirectoryLockedError(
                "this user's database is in use by another process; retry later"
            ) from None
        try:
            if self._create_dirs:
                data_dir.mkdir(mode=0o700, exist_ok=True)
            elif not data_dir.is_dir():  # removed after the resolver looked (autoCreateUsers off)
                raise UnknownUserError("unknown user")  # not a failed start: no back-off
            log_path = self.log_path(user_id)
            for attempt in range(self._max_retries + 1):
                child = await self._spawn(user_id, data_dir, log_path, lock_fd)
                try:
                    code = await self._wait_ready(child)
                except BaseException:  # cancelled or timed out: never leave a child behind
                    if child.returncode is None:
                        await self.stop(child)
                    self._pool.forget(child)  # its probes' connection
                    self.ports.give_back(child.port)
                    raise
                if code is None:
                    child._lock_fd, child._lock_path, lock_fd = lock_fd, lock_path, -1
                    child._release_port = functools.partial(self.ports.give_back, child.port)
                    return child
                self._pool.forget(child)
                self.ports.give_back(child.port)
                log.warning(
                    "instance exited before ready",
                    user_id=user_id,
                    attempt=attempt + 1,
                    port=child.port,
                    exit=describe_exit(code),
                    log_tail=read_tail(log_path)[-500:],
                )
            raise StartFailedError("the user's chroma server failed to start")
        finally:
            if lock_fd >= 0:
                unlock_file(lock_fd, lock_path)

    async def _spawn(self, user_id: str, data_dir: Path, log_path: Path, lock_fd: int) -> Child:
        port, hold = self.ports.lend()
        gate_r = gate_w = -1
        try:
            gate_r, gate_w = os.pipe()  # the gate (`BOOTSTRAP`); both ends close-on-exec
            # Truncated at each start; append mode so that when rotate_log cuts the file back,
            # the child's next write lands at the new end instead of leaving a hole of zeros.
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            try:
                # Spawned from the event-loop thread (PR_SET_PDEATHSIG is per forking thread).
                process = await asyncio.create_subprocess_exec(
                    *self.argv(port, hold.fileno(), gate_r),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._env,
                    cwd=str(data_dir),
                    start_new_session=True,
                    pass_fds=(lock_fd, hold.fileno(), gate_r),
                )
            finally:
                os.close(out)
        except BaseException:
            hold.close()
            for fd in (gate_r, gate_w):
                if fd >= 0:
                    os.close(fd)
            self.ports.give_back(port)
            raise
        # The child has its own copy of the hold: ours goes first, then the gate opens and the
        # child closes its copy just before chroma binds.
        hold.close()
        os.close(gate_w)
        os.close(gate_r)
        return Child(
            user_id=user_id, port=port, process=process, log_path=log_path, started_at=time.time()
        )

    async def _wait_ready(self, child: Child) -> int | None:
        """Poll the heartbeat with backoff.  None when ready; the exit status if it exited.

        Raises StartFailedError on timeout (the caller stops the child).
        """
        started = time.monotonic()
        deadline = started + self._start_timeout
        # Refused connects cost ~0.1 ms: poll often (2 ms, growing by 1.25 up to 20 ms), or a
        # ~70 ms start waits for the next backed-off poll.
        delay = 0.002
        squatted = False
        exited = asyncio.ensure_future(child.process.wait())
        try:
            while True:
                if exited.done():
                    return exited.result()
                if await self.probe(child, READY_PROBE_TIMEOUT_S):
                    # Whoever answered must be the child: another local user's process may have
                    # bound the port between our check that it was free and the child's bind.
                    if port_owned_by(child.pid, child.port):
                        child.start_ms = round((time.monotonic() - started) * 1000, 1)
                        return None
                    # Never again on the connection that reached the squatter: the pool would
                    # hand it to the child's first request.
                    self._pool.forget(child)
                    if not squatted:
                        squatted = True
                        log.error(
                            "instance port answered by another process",
                            user_id=child.user_id,
                            pid=child.pid,
                            port=child.port,
                        )
                now = time.monotonic()
                if now >= deadline:
                    break
                await asyncio.wait({exited}, timeout=min(delay, deadline - now))
                delay = min(delay * 1.25, 0.02)
        finally:
            if not exited.done():
                exited.cancel()
        log.error(
            "instance not ready in time",
            user_id=child.user_id,
            pid=child.pid,
            timeout_ms=int(self._start_timeout * 1000),
            log_tail=read_tail(child.log_path)[-500:],
        )
        raise StartFailedError("the user's chroma server did not become ready in time")

    def housekeeping(self, active: frozenset[str]) -> None:
        """Periodic chores (`Supervisor.housekeeping`, never on a request's path): hold again
        the ports of ``childPortRange`` let go by others (`PortHold.refill`).  ``active``: the
        users with an instance."""
        self.ports.refill()
        if self._log_retention and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + min(LOG_PRUNE_MAX_S, self._log_retention / 2)
            self.prune_logs(active)

    def prune_logs(self, active: frozenset[str], now: float | None = None) -> int:
        """Remove the children's output files (``<name>.log`` and ``<name>.log.1``, nothing
        else) last written more than ``childLogRetention`` before ``now`` (wall-clock s), except
        those of the ``active`` users.  Returns how many were removed; nothing with no
        retention.  Blocking (one stat per file, ~2 µs): the housekeeping's, never a request's.
        """
        if not self._log_retention:
            return 0
        now = time.time() if now is None else now
        keep: set[str] = set()
        for user_id in active:  # a user's file may be old (RUST_LOG=warn writes little)
            name = self.log_path(user_id).name
            keep.update((name, f"{name}.1"))
        removed = 0
        try:
            entries = os.scandir(self._logs_dir)
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                if entry.name in keep or not _CHILD_LOG_RE.match(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_mtime > self._log_retention:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            log.info(
                "child logs removed",
                count=removed,
                retention_ms=int(self._log_retention * 1000),
            )
        return removed

    def rotate_log(self, child: Child) -> None:
        """Bound a child's output file: past ``log_max_bytes``, its last half moves to
        ``<userId>.log.1`` (replacing it) and the file starts again empty."""
        path = child.log_path
        try:
            size = path.stat().st_size
            if size <= self._log_max_bytes:
                return
            with path.open("rb") as fh:
                fh.seek(size - self._log_max_bytes // 2)
                tail = fh.read()
            path.with_name(path.name + ".1").write_bytes(tail)
            os.truncate(path, 0)
        except OSError as exc:
            log.warning("cannot rotate instance log", path=str(path), error=str(exc))

    async def probe(self, child: Child, timeout_s: float) -> bool:
        """Whether ``child`` answers chroma's heartbeat (``GET /api/v2/heartbeat`` → 200)
        within ``timeout_s`` seconds (`chroma_api.heartbeat`, on a pooled connection of this
        incarnation).  Never raises.  The one probe of a child: readiness (`launch`), liveness
        (`Supervisor._check_liveness`) and ``/admin-health``."""
        return await heartbeat(self._pool, child, timeout_s)

    def kill(self, child: Child) -> None:
        """SIGKILL the child's process group at once (a wedged child: SIGTERM may never be
        acted on, e.g. a stopped process).  Reaping is left to whoever awaits `Child.wait`."""
        if child.returncode is None:
            _signal_group(child.pid, signal.SIGKILL)

    async def stop(self, child: Child) -> int:
        """Stop a child: SIGTERM to its process group, wait ``stop_timeout_ms``, then SIGKILL.

        Returns the exit status.  Logs a warning when SIGKILL was needed.
        """
        if child.returncode is None:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                return await asyncio.wait_for(child.wait(), self._stop_timeout or 0.001)
            except asyncio.TimeoutError:
                log.warning(
                    "instance survived SIGTERM, killing",
                    user_id=child.user_id,
                    pid=child.pid,
                    stop_timeout_ms=int(self._stop_timeout * 1000),
                )
                _signal_group(child.pid, signal.SIGKILL)
        return await child.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the child's process group (it leads one: start_new_session), else the pid."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
