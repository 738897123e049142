"""When chroma servers run: the registry of user id -> `Instance` and its policies.

* Single-flight starts: every request for a user whose server is starting awaits that one start.
* In-flight counting: `Supervisor.acquire` leases an instance for the life of one request
  (`Instance.lease` / `unlease`, counted once, on its child); an instance with a request in
  flight is never stopped by policy, however long the request runs.
* Idle cull: an instance idle (nothing in flight) for ``dbTTL`` ms is stopped.
* Capacity: at most ``dbMaxInstances`` children, and none started while less than
  ``dbMinFreeMemoryMB`` is available.  When full, the least recently used instance idle for at
  least ``min(30 s, dbTTL)`` is evicted (an *unclaimed* one at once, below); otherwise the start
  waits in the start queue until ``queueTimeout`` ms after the request arrived, then fails with
  CapacityTimeoutError (and a retry-after).
* Fair queue (issue 18): the queue is served round-robin between client addresses, FIFO within
  one (`fairness.StartQueue`): however many places one address holds, each other address's
  start waits for at most one of its grants.  Starts are single-flight: one user, one place.
* Nothing for nobody: a start's waiters are counted; when the last one leaves (its client closed
  the connection) before the child is spawned, the start is abandoned (its queue place freed,
  nothing spawned).  A start that has spawned finishes, but an instance nobody came for, or whose
  last request's client had hung up (half-closed mid-request), is *unclaimed*: evictable at once.
  Queued starts whose clients have half-closed ask them (`Requester.check_gone`) whether they
  are still there, and yield their turn to starts someone surely waits for.
* New users per address: starting a user with no data directory yet takes a token from the
  client address's bucket (``addressNewUsersPerMinute``); an empty bucket is
  NewUsersRateLimitError (429, retry-after) before anything is created.
* Cluster ownership: before a start, ``admit_start`` (`stcs.placement`) may refuse a user this
  node does not own (NotOwnerError) or one being moved (UserMovingError); nothing is created.
* Crashes: a child that exits on its own leaves the registry at once (exit code or signal
  logged); the next request starts it again.
* Back-off (gunicorn's ``WORKER_BOOT_ERROR`` lesson): a failed start (one that spawned), or a
  crash of the child's own (an exit code or a fault signal; not SIGKILL/SIGTERM from outside,
  an operator or the OOM killer) within ``BACKOFF_STABLE_S`` of becoming ready, makes that
  user's next start wait 1 s, doubling per failure up to 60 s; meanwhile their requests fail
  at once with StartBackoffError (seconds left as its retry-after), nothing is spawned.  An
  instance that stays up ``BACKOFF_STABLE_S`` (or an admin hold's release) clears it.
  The table of back-offs is `holds.Backoffs`, the holds' `holds.Holds`, both on the injected
  clock.
* Memory (``userMaxMemoryMB``, `stcs.memory.MemoryWatch`): an instance whose process tree uses
  more than its user's limit (PSS) is stopped (reason ``memory``) and the user backs off as
  after a crash; meanwhile their requests fail with MemoryLimitError, which names the limit.
* Liveness: an instance with requests in flight whose heartbeat has not answered for
  ``dbLivenessTimeout`` ms is wedged: it is killed (SIGKILL), so its requests fail instead
  of hanging for ever.  Idle instances are not probed (they cost nothing while wedged).

How a child is started and stopped is the `launcher.Launcher` passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from stcs.errors import (
    CapacityTimeoutError,
    DirectoryLockedError,
    MemoryLimitError,
    NewUsersRateLimitError,
    RequestError,
    ShuttingDownError,
    StartBackoffError,
    StartFailedError,
)
from stcs.fairness import AddressBuckets, Client, QueuePlace, StartQueue
from stcs.holds import BACKOFF_STABLE_S, Backoffs, Holds
from stcs.launcher import Child, Launcher, describe_exit
from stcs.memory import available_memory as _available_memory
from stcs.recorder import NULL_RECORDER, Recorder
from stcs.snapshot import InstanceView, Phase, Snapshot

log = structlog.get_logger("stcs.supervisor")

EVICT_MIN_IDLE_S = 30.0  # an instance must be idle this long (or dbTTL if less) to be evicted
QUEUE_POLL_S = 0.1  # queued starts re-check eviction candidates and free memory this often
LOG_ROTATE_S = 1.0  # how often the children's output files are checked against their bound
HOUSEKEEPING_S = 2.0  # how often the launcher's housekeeping runs (port hold, old child logs)
MB = 1024 * 1024
# Deaths that come from outside (an operator's kill, the OOM killer, a shutdown): an occasional
# one is not a crash loop, and the next request restarts the instance at once.
EXTERNAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class Requester(Client, Protocol):
    """The client a request is for, as the supervisor's fairness rules need it (the relay's
    client connection).

    ``eof``: the client half-closed after its request — it may have hung up, or may be waiting
    for the answer with its sending side shut (TCP cannot tell which until something is sent).
    ``address``: the client address (behind a trusted proxy, from ``X-Forwarded-For``).
    ``check_gone()``: find out whether a half-closed client is still there (the relay sends an
    interim ``100 Continue`` and looks for the reset); if it is gone, its request is cancelled
    (soon, not within the call).
    """

    eof: bool

    def check_gone(self) -> None: ...


@dataclass(eq=False)
class Instance:
    """One user's chroma server as the supervisor tracks it.

    ``last_active`` is monotonic seconds (policy), ``last_active_wall`` wall-clock seconds
    (display); ``requests`` counts requests served since the start.
    """

    user_id: str
    phase: Phase = Phase.STARTING
    child: Child | None = None
    requests: int = 0
    last_active: float = field(default_factory=time.monotonic)
    last_active_wall: float = field(default_factory=time.time)
    ready_at: float = 0.0  # the supervisor's clock when the instance became ready
    alive_at: float = 0.0  # monotonic s: last good heartbeat, or last seen with nothing in flight
    has_slot: bool = False
    spawning: bool = False  # the start has a slot and is launching: it is let finish
    unclaimed: bool = False  # nobody came for it, or its last client hung up: evict at once
    address: str | None = None  # client address of the request that began the start
    # Requests awaiting the start (None: a caller with no client, e.g. a test); the start is
    # abandoned when the last one leaves before the spawn.
    waiting: list[Requester | None] = field(default_factory=list)
    started: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing in flight
    stop_task: asyncio.Future[None] | None = None
    start_task: asyncio.Task[None] | None = None
    stop_error: RequestError | None = None  # why policy stopped it, for its requests in flight

    @property
    def in_flight(self) -> int:
        """Requests holding a lease on this instance: its child's count (`Child.leases`, the
        one owner of that fact: it also keeps the port while a lease lives)."""
        child = self.child
        return child.leases if child is not None else 0

    def lease(self) -> Child:
        """One request lease more on the ready instance's child (`Supervisor.acquire`, in the
        same step as its phase check: the cull never sees it idle meanwhile)."""
        child = self.child
        assert child is not None
        child.lease()
        self.requests += 1
        self.drained.clear()
        return child

    def unlease(self, child: Child, now: float, hung_up: bool | None) -> None:
        """The request leasing ``child`` ended at ``now`` (the supervisor's clock, s).
        ``hung_up``: its client half-closed mid-request (None: a caller with no client)."""
        child.unlease()
        self.last_active = now
        self.last_active_wall = time.time()
        if hung_up is not None:
            # A client that hung up mid-request is not between two requests: its instance is
            # not kept from others for min(30 s, dbTTL).
            self.unclaimed = hung_up
        if not child.leases:
            self.drained.set()

    def idle_for(self, now: float) -> float:
        """Seconds since the last request ended (0 while one is in flight)."""
        return 0.0 if self.in_flight else now - self.last_active


@dataclass(frozen=True)
class Lease:
    """A request's lease on a ready instance (from `Supervisor.acquire`), bound to one child
    incarnation: ``child`` (port and process) is what the request may talk to, and its port is
    not handed to another child while this lease lives."""

    instance: Instance
    child: Child
    cold_start: bool

    @property
    def port(self) -> int:
        return self.child.port


class _LeaseContext:
    """The async context manager of `Supervisor.acquire` (a class, not a generator: it is on
    every request's path).  The lease is taken (`Instance.lease`) inside ``ready`` and given
    back on exit by ``end`` (`Supervisor.end_lease`)."""

    __slots__ = ("_check", "_end", "_lease", "_ready", "_requester", "_user_id")

    def __init__(
        self,
        ready: Callable[
            [str, Callable[[], None] | None, Requester | None],
            Awaitable[tuple[Instance, Child, bool]],
        ],
        end: Callable[[Lease, Requester | None], None],
        user_id: str,
        check: Callable[[], None] | None,
        requester: Requester | None,
    ) -> None:
        self._ready = ready
        self._end = end
        self._user_id = user_id
        self._check = check
        self._requester = requester
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        inst, child, cold = await self._ready(self._user_id, self._check, self._requester)
        self._lease = Lease(instance=inst, child=child, cold_start=cold)
        return self._lease

    async def __aexit__(self, *exc: object) -> None:
        assert self._lease is not None
        self._end(self._lease, self._requester)


def available_memory() -> int:
    """Bytes of memory available to new processes: the host's, bounded by stcs's own cgroup
    limit when it has one (`stcs.memory.ContainerMemory`)."""
    return _available_memory()


class Supervisor:
    """Owns every chroma child of one stcs process.  Times in ms, memory in MB (2^20 bytes)."""

    def __init__(
        self,
        launcher: Launcher,
        *,
        ttl_ms: int,
        max_instances: int,
        queue_timeout_ms: int,
        min_free_memory_mb: int = 0,
        memory: Callable[[], int] = available_memory,
        recorder: Recorder = NULL_RECORDER,
        on_instance_gone: Callable[[Child], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        liveness_timeout_ms: int = 0,
        housekeeping: Callable[[frozenset[str]], None] | None = None,
        new_users_per_minute: int = 0,
        is_new_user: Callable[[str], bool] = lambda _user_id: False,
        admit_start: Callable[[str], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.ttl = ttl_ms / 1000
        self.max_instances = max_instances
        self.queue_timeout = queue_timeout_ms / 1000
        self.min_free_bytes = min_free_memory_mb * MB
        self.evict_min_idle = min(EVICT_MIN_IDLE_S, self.ttl)
        self._memory = memory
        self.registry: dict[str, Instance] = {}
        self._slots_used = 0
        self._queue = StartQueue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._culler: asyncio.Task[None] | None = None
        self._rotator: asyncio.Task[None] | None = None
        # Monotonic seconds for every policy decision (idle, eviction, queue deadline, back-off,
        # liveness, hold TTLs); tests inject their own and drive the cull with `tick`.
        self._clock = clock
        self._holds = Holds(clock)  # admin stop, block, backup; `tick` ends those with a TTL
        self._backoffs = Backoffs(clock)  # users whose starts failed: no start for a while
        self.recorder = recorder  # what happened, for metrics (`stcs.metrics.Metrics`)
        self._on_instance_gone = on_instance_gone  # called with a forgotten child
        self.liveness_timeout = liveness_timeout_ms / 1000  # 0: no liveness probes
        self._liveness: asyncio.Task[None] | None = None
        self._closed = False  # close() began: no new start, no new lease
        # The launcher's periodic chores (`launcher.ChromaLauncher.housekeeping`), given the
        # users with an instance (starting, ready or stopping): never on a request's path.
        self._housekeeping = housekeeping
        # addressNewUsersPerMinute: a bucket per client address of never-seen users' starts.
        self._is_new_user = is_new_user
        # Whether this node may start the user at all (`stcs.placement.Placement.admit_start`,
        # a cluster's ownership rule): asked before each start, never for a running instance.
        self._admit_start = admit_start
        self._new_users = (
            AddressBuckets(new_users_per_minute / 60, new_users_per_minute, clock)
            if new_users_per_minute > 0
            else None
        )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the idle cull, the log rotation and the liveness probe (call from the running
        event loop)."""
        self._culler = asyncio.create_task(self._cull_idle(), name="stcs-culler")
        self._rotator = asyncio.create_task(self._rotate_logs(), name="stcs-log-rotation")
        if self.liveness_timeout > 0:
            self._liveness = asyncio.create_task(self._check_liveness(), name="stcs-liveness")

    async def close(self) -> None:
        """Refuse new work, cancel pending starts and stop every child concurrently."""
        self._closed = True
        self._holds.drop_ttls()
        self._wake_queue()
        for task in (self._culler, self._rotator, self._liveness):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        starting = [
            i.start_task
            for i in self.registry.values()
            if i.start_task and i.phase is Phase.STARTING
        ]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        stops = [self._stop(i, "shutdown") for i in list(self.registry.values()) if i.child]
        if stops:
            log.info("stopping all instances", count=len(stops))
        await asyncio.gather(*stops, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------------

    def acquire(
        self,
        user_id: str,
        check: Callable[[], None] | None = None,
        requester: Requester | None = None,
    ) -> _LeaseContext:
        """``async with supervisor.acquire(user_id) as lease``: lease ``user_id``'s ready
        instance for one request, starting it if needed.  ``requester`` is the request's
        client (its address for the per-address rules; whether it hung up).

        ``check`` (the caller's admission rule, e.g. the blocklist) is called before each
        attempt — first, and again after every wait (a hold, a start, a stop) — and whatever it
        raises ends the acquire: a request that waited through a block never starts the
        user's instance.  Raises that, StartFailedError (StartBackoffError while the user's
        starts back off), NewUsersRateLimitError, CapacityTimeoutError or ShuttingDownError
        on entry.
        """
        return _LeaseContext(self._ready_instance, self.end_lease, user_id, check, requester)

    def ready_instance(self, user_id: str) -> Instance | None:
        """``user_id``'s ready instance when `acquire` would lease it with no wait (not
        closing, no hold, the instance ready: it has a child); else None.  Takes nothing."""
        if self._closed or self._holds.waiting_on(user_id) is not None:
            return None
        inst = self.registry.get(user_id)
        if inst is None or inst.phase is not Phase.READY:
            return None
        return inst

    @staticmethod
    def lease_ready(inst: Instance) -> Lease:
        """What `acquire` gives when it need not wait, taken now on ``inst`` (from
        `ready_instance`, with nothing run since).  The caller gives it back with `end_lease`,
        whatever happens (a request served in callbacks, `stcs.relay.handler`: the same lease,
        without the context manager)."""
        return Lease(instance=inst, child=inst.lease(), cold_start=False)

    def end_lease(self, lease: Lease, requester: Requester | None) -> None:
        """Give back ``lease`` (`acquire`'s exit, `lease_ready`'s caller): the instance's last
        activity is now; ``requester`` hung up mid-request or not (its ``eof``)."""
        lease.instance.unlease(
            lease.child, self._clock(), requester.eof if requester is not None else None
        )

    async def _ready_instance(
        self,
        user_id: str,
        check: Callable[[], None] | None = None,
        requester: Requester | None = None,
    ) -> tuple[Instance, Child, bool]:
        """``user_id``'s ready instance, leased (`Instance.lease`), its child and whether the
        request waited for a start (raises as `acquire`)."""
        deadline = self._clock() + self.queue_timeout  # the queue wait counts from arrival
        cold = False
        while True:
            if self._closed:
                raise ShuttingDownError("server is shutting down")
            if check is not None:
                check()
            hold = self._holds.waiting_on(user_id)
            if hold is not None:  # held (admin stop, backup): wait, bounded like the queue
                remaining = deadline - self._clock()
                try:
                    await asyncio.wait_for(hold.wait(), max(0.0, remaining))
                except asyncio.TimeoutError:
                    raise CapacityTimeoutError(
                        "this user's database is held for maintenance; retry later",
                        retry_after_s=5,
                    ) from None
                continue
            inst = self.registry.get(user_id)
            if inst is None:
                if self._admit_start is not None:
                    self._admit_start(user_id)
                self._check_backoff(user_id)
                address = requester.address if requester is not None else None
                if self._new_users is not None and self._is_new_user(user_id):
                    self._take_new_user(user_id, address)
                inst = Instance(user_id, last_active=self._clock(), address=address)
                self.registry[user_id] = inst
                inst.start_task = self._spawn_task(self._start(inst, deadline))
            if inst.phase is Phase.READY:
                # Leased synchronously with the phase check: no await between them, so the
                # cull can never see this instance idle while the request is being handed in.
                return inst, inst.lease(), cold
            cold = True
            if inst.phase is Phase.STARTING:
                await self._await_start(inst, requester)
            else:
                await inst.stopped.wait()

    async def _await_start(self, inst: Instance, requester: Requester | None) -> None:
        """Wait for ``inst``'s start as one of its waiters; the last waiter to leave before
        the spawn abandons the start."""
        waiting = inst.waiting
        waiting.append(requester)
        try:
            await asyncio.shield(inst.started)
        finally:
            waiting.remove(requester)
            if not waiting and inst.phase is Phase.STARTING and not inst.spawning:
                self._abandon(inst)

    def _abandon(self, inst: Instance) -> None:
        """Nobody waits for ``inst``'s start any more and it has not spawned: cancel it (its
        queue place is freed); a new request for the user begins a new start."""
        if self.registry.get(inst.user_id) is inst:
            del self.registry[inst.user_id]
        if inst.start_task is not None:
            inst.start_task.cancel()
        self.recorder.instance_start("abandoned")
        log.info("start abandoned", user_id=inst.user_id, reason="nobody waits")

    def _take_new_user(self, user_id: str, address: str | None) -> None:
        """Charge a never-seen user's start to ``address``'s bucket.  Raises
        NewUsersRateLimitError when it is empty."""
        assert self._new_users is not None
        wait = self._new_users.take(address)
        if wait > 0:
            self.recorder.new_user_refusal()
            log.info("new user refused", user_id=user_id, client=address, reason="rate")
            raise NewUsersRateLimitError(
                "too many new users from this address; retry later",
                retry_after_s=math.ceil(wait),
            )

    def _live(self, inst: Instance) -> bool:
        """Whether a client surely waits for ``inst``'s start (one that has not half-closed,
        or a caller with no client)."""
        return any(r is None or not r.eof for r in inst.waiting)

    def _ask_half_closed(self, inst: Instance) -> None:
        for requester in inst.waiting:
            if requester is not None and requester.eof:
                requester.check_gone()

    def mark_unreachable(self, inst: Instance) -> None:
        """The proxy could not connect to ``inst``: stop it so the next acquire starts anew."""
        if inst.phase is Phase.READY:
            log.warning(
                "instance unreachable",
                user_id=inst.user_id,
                pid=inst.child.pid if inst.child else None,
            )
            self._stop_soon(inst, "unreachable")

    # -- starting ---------------------------------------------------------------------------

    async def _start(self, inst: Instance, deadline: float) -> None:
        try:
            await self._reserve_slot(inst, deadline)
            if self._admit_start is not None:
                # Again after the wait for a slot (up to queueTimeout): a move may have been
                # announced or marked meanwhile.  No await from here to the directory's mkdir
                # in the launcher, so nothing can change between this check and it.
                self._admit_start(inst.user_id)
            inst.spawning = True
            child = await self.launcher.launch(inst.user_id)
        except BaseException as exc:
            self._finalize(inst)
            if not isinstance(exc, (asyncio.CancelledError, ShuttingDownError)):
                self.recorder.instance_start("failed")
            if isinstance(exc, StartFailedError) and not isinstance(exc, DirectoryLockedError):
                self._failed(inst.user_id, "start failed")
            # Waiters re-raise this; a cancelled start (shutdown) is reported as such to them.
            failure = (
                exc if isinstance(exc, Exception) else ShuttingDownError("server is shutting down")
            )
            inst.started.set_exception(failure)
            inst.started.exception()  # mark retrieved: with no waiter it is not an error
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        inst.child = child
        inst.phase = Phase.READY
        inst.ready_at = self._clock()
        inst.alive_at = self._clock()
        inst.last_active = self._clock()
        inst.last_active_wall = time.time()
        if not inst.waiting:
            inst.unclaimed = True  # every client left while it started: evictable at once
            log.info("instance unclaimed", user_id=inst.user_id, pid=child.pid)
        inst.started.set_result(None)
        self.recorder.instance_start("ok", child.start_ms / 1000)
        log.info(
            "instance started",
            user_id=inst.user_id,
            pid=child.pid,
            port=child.port,
            start_ms=child.start_ms,
            slots_used=self._slots_used,
        )
        self._spawn_task(self._watch(inst, child))

    async def _reserve_slot(self, inst: Instance, deadline: float) -> None:
        """Take an instance slot: evict an idle instance or queue if none is free (the start
        queue: round-robin between client addresses, starts someone surely waits for first).
        While queued, half-closed clients waiting for this start are asked whether they are
        still there (`Requester.check_gone`).

        Raises CapacityTimeoutError at ``deadline`` (monotonic s), ShuttingDownError on close.
        """
        place: QueuePlace | None = None
        queued_at = 0.0
        try:
            while True:
                if self._closed:
                    raise ShuttingDownError("server is shutting down")
                at_head = not self._queue or self._queue.head() is place
                full = self._slots_used >= self.max_instances
                low_memory = self._memory() < self.min_free_bytes
                if at_head and not full and not low_memory:
                    self._slots_used += 1
                    inst.has_slot = True
                    if place is not None:
                        self._queue.granted(place)
                        place = None
                        self._wake_queue()  # the next in turn looks again
                        self.recorder.queue_wait(time.monotonic() - queued_at)
                    return
                if at_head:
                    victim = self._pick_victim()
                    if victim is not None:
                        await self._stop(victim, "evicted")
                        continue
                if place is None:
                    place = QueuePlace(inst.address, lambda: self._live(inst))
                    self._queue.add(place)
                    queued_at = time.monotonic()
                    if low_memory and not full:
                        self.recorder.memory_floor_wait()
                    log.info(
                        "start queued",
                        user_id=inst.user_id,
                        queue_length=len(self._queue),
                        reason="memory" if low_memory and not full else "max instances",
                    )
                self._ask_half_closed(inst)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self.recorder.queue_timeout()
                    retry_after = max(1, math.ceil(min(self.evict_min_idle, self.queue_timeout)))
                    log.warning(
                        "start queue timed out",
                        user_id=inst.user_id,
                        queue_timeout_ms=int(self.queue_timeout * 1000),
                        slots_used=self._slots_used,
                        available_mb=self._memory() // MB,
                    )
                    raise CapacityTimeoutError(
                        "all chroma instance slots are busy; retry later",
                        retry_after_s=retry_after,
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(place.event.wait(), min(remaining, QUEUE_POLL_S))
                place.event.clear()
        finally:
            if place is not None:
                self._queue.remove(place)
                self._wake_queue()

    def _pick_victim(self) -> Instance | None:
        """An unclaimed idle instance (nobody came for it, or its last client hung up), else
        the least recently used ready instance idle for at least ``min(30 s, dbTTL)``."""
        now = self._clock()
        idle = [
            i
            for i in self.registry.values()
            if i.phase is Phase.READY
            and i.in_flight == 0
            and (i.unclaimed or now - i.last_active >= self.evict_min_idle)
        ]
        return min(idle, key=lambda i: (not i.unclaimed, i.last_active), default=None)

    def _wake_queue(self) -> None:
        self._queue.wake_all()

    # -- stopping ---------------------------------------------------------------------------

    async def _watch(self, inst: Instance, child: Child) -> None:
        # Tasks inherit the spawning request's log context; this one outlives that request.
        structlog.contextvars.clear_contextvars()
        code = await child.wait()
        if inst.phase is not Phase.STOPPING:
            self.recorder.instance_stop("crashed")
            log.info(
                "instance stopped",
                user_id=inst.user_id,
                pid=child.pid,
                reason="crashed",
                exit=describe_exit(code),
                requests=inst.requests,
            )
            log.error(
                "instance crashed",
                user_id=inst.user_id,
                pid=child.pid,
                port=child.port,
                exit=describe_exit(code),
                requests_in_flight=inst.in_flight,
            )
            if self._clock() - inst.ready_at >= BACKOFF_STABLE_S:
                self._backoffs.clear(inst.user_id)
            elif -code not in EXTERNAL_SIGNALS:
                self._failed(inst.user_id, "crashed soon after start")
            self._finalize(inst)

    # -- back-off ---------------------------------------------------------------------------

    def _check_backoff(self, user_id: str) -> None:
        """Raise StartBackoffError (``retry_after_s``: whole seconds left) while
        ``user_id``'s starts back off (MemoryLimitError after a memory stop)."""
        in_force = self._backoffs.left(user_id)
        if in_force is None:
            return
        left, backoff = in_force
        self.recorder.backoff_refusal()
        if backoff.over_memory:
            raise MemoryLimitError(
                f"{backoff.over_memory}; retry in {math.ceil(left)} s",
                retry_after_s=math.ceil(left),
            )
        raise StartBackoffError(
            "this user's chroma server failed to start recently; retry later",
            retry_after_s=math.ceil(left),
        )

    def _failed(self, user_id: str, reason: str, over_memory: str = "") -> None:
        """Record a failed start (or early crash, or memory stop: ``over_memory`` says what
        its requests are told) of ``user_id``: back off 1 s, 2 s, 4 s, ... up to
        `holds.BACKOFF_MAX_S`."""
        backoff = self._backoffs.fail(user_id, over_memory)
        self.recorder.start_backoff()
        log.warning(
            "start backing off",
            user_id=user_id,
            reason=reason,
            failures=backoff.failures,
            backoff_ms=int(backoff.delay * 1000),
        )

    def _ready_since(self, user_id: str) -> float | None:
        """When ``user_id``'s instance became ready (the supervisor's clock), None if none is."""
        inst = self.registry.get(user_id)
        return inst.ready_at if inst is not None and inst.phase is Phase.READY else None

    def _stop_soon(self, inst: Instance, reason: str) -> asyncio.Future[None]:
        """Begin stopping ``inst`` (idempotent).  The phase turns STOPPING *now*, in the same
        step as the decision, so no request can be handed the instance after it."""
        if inst.stop_task is None:
            inst.phase = Phase.STOPPING
            inst.stop_task = self._spawn_task(self._do_stop(inst, reason))
        return inst.stop_task

    async def _stop(self, inst: Instance, reason: str) -> None:
        """Stop ``inst`` and wait for it (concurrent callers share one stop)."""
        await asyncio.shield(self._stop_soon(inst, reason))

    async def _do_stop(self, inst: Instance, reason: str) -> None:
        structlog.contextvars.clear_contextvars()  # not the log context of whoever asked
        child = inst.child
        try:
            if child is not None:
                started = time.monotonic()
                code = await self.launcher.stop(child)
                self.recorder.instance_stop(reason)
                log.info(
                    "instance stopped",
                    user_id=inst.user_id,
                    pid=child.pid,
                    reason=reason,
                    exit=describe_exit(code),
                    requests=inst.requests,
                    stop_ms=round((time.monotonic() - started) * 1000, 1),
                )
        finally:
            if reason == "memory":
                # From the end of the stop (a SIGTERM'd chroma finishes its requests in flight
                # first), as a crash's counts from the exit: else a slow stop eats the back-off.
                self._backoffs.run_from_now(inst.user_id)
            self._finalize(inst)

    def _finalize(self, inst: Instance) -> None:
        """Forget ``inst`` (idempotent): registry entry, slot, then the child's port and
        directory lock, and wake whoever waits on it."""
        if self.registry.get(inst.user_id) is inst:
            del self.registry[inst.user_id]
        if inst.child is not None:
            if self._on_instance_gone is not None:
                self._on_instance_gone(inst.child)
            try:
                inst.child.release()
            except RuntimeError:
                log.error(
                    "instance not reaped, keeping its port and lock",
                    user_id=inst.user_id,
                    pid=inst.child.pid,
                )
        if inst.has_slot:
            inst.has_slot = False
            self._slots_used -= 1
        inst.phase = Phase.STOPPING
        inst.stopped.set()
        self._wake_queue()

    async def _cull_idle(self) -> None:
        interval = min(1.0, max(0.05, self.ttl / 10))
        while True:
            await asyncio.sleep(interval)
            self.tick(self._clock())

    def tick(self, now: float) -> list[Instance]:
        """One pass of the time-driven policy at ``now`` (the supervisor's clock, seconds):
        end maintenance holds past their TTL, settle back-offs that are over, and begin
        stopping (reason ``idle``) every ready instance with nothing in flight since ``dbTTL``.
        Returns the instances it culled.  Called by the cull loop (every ``dbTTL``/10, at most
        1 s); tests call it with their own clock.  (Liveness is probed by its own loop: it
        waits on the children's answers.)"""
        self._expire_holds(now)
        if self._backoffs:
            self._backoffs.settle(now, self._ready_since)
        culled = []
        for inst in list(self.registry.values()):
            if (
                inst.phase is Phase.READY
                and inst.in_flight == 0
                and now - inst.last_active >= self.ttl
            ):
                self._stop_soon(inst, "idle")
                culled.append(inst)
        return culled

    async def _rotate_logs(self) -> None:
        """Bound every running child's output file, every `LOG_ROTATE_S` seconds; run the
        housekeeping every `HOUSEKEEPING_S`."""
        last_chores = time.monotonic()
        while True:
            await asyncio.sleep(LOG_ROTATE_S)
            for inst in list(self.registry.values()):
                if inst.child is not None and inst.phase is Phase.READY:
                    self.launcher.rotate_log(inst.child)
            if time.monotonic() - last_chores >= HOUSEKEEPING_S:
                last_chores = time.monotonic()
                self.housekeeping()

    def housekeeping(self) -> None:
        """Run the launcher's chores once (`HOUSEKEEPING_S`): hold the child ports let go,
        remove child logs past their retention.  Never raises (a failure is logged)."""
        if self._housekeeping is None:
            return
        try:
            self._housekeeping(frozenset(self.registry))
        except Exception as exc:  # a chore failing must not end the rotation loop
            log.error("housekeeping failed", error=str(exc), error_type=type(exc).__name__)

    async def _check_liveness(self) -> None:
        """Probe the heartbeat of every ready instance with requests in flight, each tick
        (at most 1 s, a quarter of ``dbLivenessTimeout``); kill one silent for the timeout."""
        structlog.contextvars.clear_contextvars()
        interval = min(1.0, max(0.05, self.liveness_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            watched: list[tuple[Instance, Child]] = []
            for inst in list(self.registry.values()):
                if inst.phase is not Phase.READY or inst.child is None:
                    continue
                if inst.in_flight == 0:
                    inst.alive_at = now  # the clock starts when a request comes in
                else:
                    watched.append((inst, inst.child))
            if not watched:
                continue
            answers = await asyncio.gather(
                *(self.launcher.probe(child, interval) for _, child in watched)
            )
            now = self._clock()
            for (inst, child), alive in zip(watched, answers, strict=True):
                if alive:
                    inst.alive_at = now
                elif (
                    now - inst.alive_at >= self.liveness_timeout
                    and inst.phase is Phase.READY
                    and inst.child is child
                ):
                    self._kill_wedged(inst, child, now)

    def _kill_wedged(self, inst: Instance, child: Child, now: float) -> None:
        log.error(
            "instance wedged",
            user_id=inst.user_id,
            pid=child.pid,
            port=child.port,
            requests_in_flight=inst.in_flight,
            silent_ms=int((now - inst.alive_at) * 1000),
            liveness_timeout_ms=int(self.liveness_timeout * 1000),
        )
        self.launcher.kill(child)
        if self._clock() - inst.ready_at < BACKOFF_STABLE_S:
            self._failed(inst.user_id, "wedged soon after start")
        self._stop_soon(inst, "wedged")

    def stop_for_memory(
        self, user_id: str, pid: int, pss_bytes: int, rss_bytes: int, limit_mb: int
    ) -> bool:
        """``user_id``'s ready instance, still the process ``pid``, used ``pss_bytes`` (PSS of
        its process tree) over its ``userMaxMemoryMB`` of ``limit_mb``: stop it (reason
        ``memory``; its requests in flight and the user's next ones get MemoryLimitError) and
        back off as after a crash.  Returns whether it was stopped (False: gone meanwhile)."""
        inst = self.registry.get(user_id)
        child = inst.child if inst is not None else None
        if inst is None or inst.phase is not Phase.READY or child is None or child.pid != pid:
            return False
        message = (
            f"userMaxMemoryMB is {limit_mb} MB and this user's chroma server used "
            f"{pss_bytes / MB:.0f} MB; it was stopped"
        )
        log.warning(
            "instance over memory limit",
            user_id=user_id,
            pid=pid,
            pss_mb=round(pss_bytes / MB, 1),
            rss_mb=round(rss_bytes / MB, 1),
            limit_mb=limit_mb,
            requests_in_flight=inst.in_flight,
        )
        inst.stop_error = MemoryLimitError(message)
        self._failed(user_id, "memory", over_memory=message)
        self._stop_soon(inst, "memory")
        return True

    def ready_pids(self) -> list[tuple[str, int]]:
        """``(user id, pid)`` of every ready instance (what `stcs.memory.MemoryWatch` samples)."""
        return [
            (inst.user_id, inst.child.pid)
            for inst in self.registry.values()
            if inst.phase is Phase.READY and inst.child is not None
        ]

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- holds (admin stop, backup, restore) -------------------------------------------------

    async def hold(
        self, user_id: str, drain_timeout_s: float = 300.0, ttl_s: float | None = None
    ) -> bool:
        """Hold ``user_id``: new requests wait (up to their ``queueTimeout``); the requests in
        flight finish (at most ``drain_timeout_s``), then the instance is stopped (reason
        ``admin``).  Returns whether an instance was stopped.  Release with `release_hold`;
        with ``ttl_s`` (a maintenance hold) it also ends by itself that many seconds from now.

        Raises TimeoutError (the hold is released) when in-flight requests outlast the drain.
        """
        self._holds.hold(user_id, ttl_s)
        inst = self.registry.get(user_id)
        if inst is None:
            return False
        if inst.phase is Phase.STARTING:
            with contextlib.suppress(Exception):
                await asyncio.shield(inst.started)
        if inst.phase is Phase.READY and inst.in_flight:
            log.info("waiting for requests in flight", user_id=user_id, count=inst.in_flight)
            try:
                await asyncio.wait_for(inst.drained.wait(), drain_timeout_s)
            except asyncio.TimeoutError:
                self.release_hold(user_id)
                raise TimeoutError(f"requests still in flight after {drain_timeout_s} s") from None
        await self._stop(inst, "admin")
        return True

    async def stop_instance(self, user_id: str, drain_timeout_s: float = 300.0) -> bool:
        """Stop ``user_id``'s instance once its requests in flight end (at most
        ``drain_timeout_s``; new ones wait meanwhile, then start it again).  A maintenance hold
        in force stays in force.  Returns whether an instance was stopped.

        Raises TimeoutError when in-flight requests outlast the drain (nothing is stopped).
        """
        try:
            return await self.hold(user_id, drain_timeout_s)
        finally:
            if not self.has_maintenance_hold(user_id):
                self.release_hold(user_id)

    def release_hold(self, user_id: str) -> None:
        """End a hold: waiting requests go on (and start the instance again).  Also ends the
        user's start back-off: the maintenance (a restore) may have fixed what failed."""
        self._backoffs.clear(user_id)
        self._holds.release(user_id)

    def has_maintenance_hold(self, user_id: str) -> bool:
        """Whether ``user_id`` is under a hold with a TTL (`hold` with ``ttl_s``)."""
        return self._holds.has_ttl(user_id)

    def _expire_holds(self, now: float) -> None:
        for user_id, ttl_s in self._holds.expired(now):
            self.release_hold(user_id)
            log.warning("hold expired", user_id=user_id, ttl_s=ttl_s)

    # -- introspection ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The registry, holds, back-offs and capacity as they are now (a copy)."""
        now = self._clock()
        instances = []
        for inst in self.registry.values():
            child = inst.child
            instances.append(
                InstanceView(
                    user_id=inst.user_id,
                    phase=inst.phase,
                    pid=child.pid if child else None,
                    port=child.port if child else None,
                    started_at=child.started_at if child else None,
                    log_path=child.log_path if child else None,
                    last_active=inst.last_active_wall,
                    idle_for_s=inst.idle_for(now),
                    requests=inst.requests,
                    in_flight=inst.in_flight,
                )
            )
        return Snapshot(
            instances=tuple(instances),
            held=self._holds.users(),
            slots_used=self._slots_used,
            max_instances=self.max_instances,
            queue_length=len(self._queue),
            min_free_bytes=self.min_free_bytes,
        )

    def has_instance(self, user_id: str) -> bool:
        """Whether ``user_id`` has an instance (starting, ready or stopping)."""
        return user_id in self.registry

    async def probe(self, user_id: str, pid: int, timeout_s: float) -> bool | None:
        """Whether ``user_id``'s ready instance, still the process ``pid`` (as a snapshot saw
        it), answers its heartbeat within ``timeout_s`` (`Launcher.probe`); None when that
        process is no longer ``user_id``'s ready instance."""
        inst = self.registry.get(user_id)
        child = inst.child if inst is not None else None
        if inst is None or inst.phase is not Phase.READY or child is None or child.pid != pid:
            return None
        return await self.launcher.probe(child, timeout_s)
