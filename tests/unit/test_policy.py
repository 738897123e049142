"""The supervisor's policies, fast: a real launcher of tiny processes (``sleep``) in place of
chroma, an injected clock for the time-driven rules (`Supervisor.tick`), and the real
supervisor.  Single-flight starts, the FIFO queue and its deadline, LRU eviction, the memory
floor, holds against the queue deadline, shutdown, unreachable -> restart, the idle cull.

The same policies are tested end to end with real chroma children in test_supervision.py."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from stcs.errors import (
    CapacityTimeoutError,
    NewUsersRateLimitError,
    NotOwnerError,
    ShuttingDownError,
)
from stcs.launcher import Child
from stcs.snapshot import Phase
from stcs.supervisor import Supervisor
from tests.harness import ProcessLauncher
from tests.tally import Tally

pytestmark = pytest.mark.timeout(30)


class SleepLauncher(ProcessLauncher):
    """Starts ``sleep 3600`` per user (a real process, ~ms): what the supervisor decides is
    what is observed.  ``gate`` (when set) holds every launch until it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.stops: list[str] = []
        self.gate: asyncio.Event | None = None

    async def spawn(self, user_id: str) -> asyncio.subprocess.Process:
        self.launches[user_id] += 1
        if self.gate is not None:
            await self.gate.wait()
        return await asyncio.create_subprocess_exec("sleep", "3600")

    async def stop(self, child: Child) -> int:
        self.stops.append(child.user_id)
        return await super().stop(child)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def launcher() -> AsyncIterator[SleepLauncher]:
    launcher = SleepLauncher()
    yield launcher
    for child in launcher.children:
        if child.returncode is None:
            child.process.kill()
            await child.wait()


def supervisor(launcher: SleepLauncher, **kw: object) -> Supervisor:
    options: dict[str, object] = {
        "ttl_ms": 60_000,
        "max_instances": 10,
        "queue_timeout_ms": 300,
        "recorder": Tally(),
    }
    options.update(kw)
    return Supervisor(launcher, **options)  # type: ignore[arg-type]


def tally(sup: Supervisor) -> Tally:
    """The events ``sup`` reported (`supervisor` gives each one its own `Tally`)."""
    assert isinstance(sup.recorder, Tally)
    return sup.recorder


async def lease_once(sup: Supervisor, user: str) -> None:
    async with sup.acquire(user):
        pass


async def test_concurrent_requests_share_one_start(launcher: SleepLauncher) -> None:
    sup = supervisor(launcher)
    launcher.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(lease_once(sup, "u")) for _ in range(10)]
    await asyncio.sleep(0.05)
    launcher.gate.set()
    await asyncio.gather(*waiting)
    assert launcher.launches == {"u": 1}
    await sup.close()


async def test_full_capacity_queues_fifo_then_times_out_with_retry_after(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher, max_instances=1, queue_timeout_ms=300)
    async with sup.acquire("a"):  # a request in flight: "a" cannot be evicted
        started = time.monotonic()
        with pytest.raises(CapacityTimeoutError) as caught:
            await lease_once(sup, "b")
        waited = time.monotonic() - started
    assert 0.25 <= waited < 1.0
    assert caught.value.retry_after_s == 1
    assert launcher.launches == {"a": 1}
    await sup.close()


async def test_queued_starts_are_served_in_arrival_order(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=1, queue_timeout_ms=60_000, ttl_ms=1000, clock=clock)
    order: list[str] = []

    async def one(user: str) -> None:
        async with sup.acquire(user):
            order.append(user)

    async def time_passes() -> None:  # 0.5 s of the supervisor's clock every 10 ms
        while True:
            await asyncio.sleep(0.01)
            clock.now += 0.5

    async with sup.acquire("a"):
        queued = []
        for user in ("b", "c", "d"):
            queued.append(asyncio.ensure_future(one(user)))
            await asyncio.sleep(0.02)
    ticking = asyncio.ensure_future(time_passes())
    await asyncio.wait_for(asyncio.gather(*queued), 10)
    ticking.cancel()
    assert order == ["b", "c", "d"]
    assert launcher.stops == ["a", "b", "c"]  # each evicted for the next in line
    await sup.close()


async def test_the_least_recently_used_idle_instance_is_evicted(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=2, ttl_ms=10_000, clock=clock)  # evict after 10 s
    await lease_once(sup, "old")
    clock.now += 1
    await lease_once(sup, "recent")
    clock.now += 5
    assert sup._pick_victim() is None  # both idle 5-6 s: not yet evictable
    clock.now += 10
    await lease_once(sup, "new")
    assert launcher.stops == ["old"]
    assert set(sup.registry) == {"recent", "new"}
    await sup.close()


async def test_no_start_below_the_memory_floor(launcher: SleepLauncher) -> None:
    free = {"bytes": 100 * 2**20}
    sup = supervisor(launcher, min_free_memory_mb=500, memory=lambda: free["bytes"])
    with pytest.raises(CapacityTimeoutError):
        await lease_once(sup, "u")
    assert launcher.launches == {}
    assert tally(sup)["memory_floor_wait"] == 1
    free["bytes"] = 600 * 2**20
    await lease_once(sup, "u")
    assert launcher.launches == {"u": 1}
    await sup.close()


async def test_a_hold_makes_requests_wait_within_the_queue_deadline(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher, queue_timeout_ms=300)
    await lease_once(sup, "u")
    assert await sup.hold("u", drain_timeout_s=1) is True  # stopped for maintenance
    assert launcher.stops == ["u"]
    with pytest.raises(CapacityTimeoutError):  # held longer than the queue deadline
        await lease_once(sup, "u")
    waiting = asyncio.ensure_future(lease_once(sup, "u"))
    await asyncio.sleep(0.1)
    sup.release_hold("u")  # released within the deadline: the request goes on
    await waiting
    assert launcher.launches == {"u": 2}
    await sup.close()


async def test_shutdown_cancels_pending_starts_and_stops_every_child(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher)
    await lease_once(sup, "running")
    launcher.gate = asyncio.Event()  # the next start never completes by itself
    pending = asyncio.ensure_future(lease_once(sup, "starting"))
    await asyncio.sleep(0.05)
    await sup.close()
    with pytest.raises(ShuttingDownError):
        await pending
    assert launcher.stops == ["running"]
    assert all(child.returncode is not None for child in launcher.children)
    with pytest.raises(ShuttingDownError):
        await lease_once(sup, "late")


async def test_an_unreachable_instance_is_stopped_and_the_next_request_starts_anew(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher)
    async with sup.acquire("u") as lease:
        first = lease.child
        sup.mark_unreachable(lease.instance)
        assert lease.instance.phase is Phase.STOPPING  # no request is handed it any more
    async with sup.acquire("u") as lease:
        assert lease.child is not first
    assert launcher.launches == {"u": 2}
    assert launcher.stops == ["u"]
    await sup.close()


async def test_tick_culls_only_instances_idle_for_the_ttl(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, ttl_ms=1000, clock=clock)
    await lease_once(sup, "idle")
    async with sup.acquire("busy"):
        clock.now += 5  # a request in flight 5 x dbTTL is never cut off
        assert [i.user_id for i in sup.tick(clock.now)] == ["idle"]
        await asyncio.sleep(0.05)
        assert launcher.stops == ["idle"]
    assert sup.tick(clock.now) == []  # "busy" was active just now
    clock.now += 1
    assert [i.user_id for i in sup.tick(clock.now)] == ["busy"]
    await sup.close()


async def test_a_port_stays_held_while_a_lease_refers_to_its_child(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher)
    released: list[int] = []
    async with sup.acquire("u") as lease:
        child = lease.child
        child._release_port = lambda: released.append(child.port)
        child.process.kill()  # dies while the request is in flight
        await child.wait()
        await asyncio.sleep(0.05)  # the supervisor notices and forgets it
        assert "u" not in sup.registry
        assert released == []  # but its port is not handed out while the lease lives
    assert released == [child.port]
    await sup.close()


async def test_a_lease_is_counted_once_on_the_child_and_read_by_the_instance(
    launcher: SleepLauncher,
) -> None:
    clock = Clock()
    sup = supervisor(launcher, clock=clock)
    async with sup.acquire("u") as first, sup.acquire("u") as second:
        inst, child = first.instance, first.child
        assert second.child is child and child.leases == 2 and inst.in_flight == 2
        assert not inst.drained.is_set() and inst.idle_for(clock.now + 1e6) == 0
        clock.now += 7
    assert child.leases == 0 and inst.in_flight == 0 and inst.drained.is_set()
    assert inst.requests == 2 and inst.last_active == clock.now
    assert sup.tick(clock.now + 60) == [inst]  # idle since the last lease ended
    await sup.close()


async def test_a_maintenance_hold_ends_by_itself_at_its_ttl(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, queue_timeout_ms=10_000, clock=clock)
    await lease_once(sup, "u")
    await sup.hold("u", drain_timeout_s=1, ttl_s=60)
    assert sup.has_maintenance_hold("u") and sup.snapshot().held == ("u",)
    waiting = asyncio.ensure_future(lease_once(sup, "u"))  # waits for the hold to end
    clock.now += 59.9
    sup.tick(clock.now)
    await asyncio.sleep(0.05)
    assert not waiting.done() and sup.has_maintenance_hold("u")
    clock.now += 0.1
    sup.tick(clock.now)  # the TTL is over: the hold ends, the request starts "u" again
    await asyncio.wait_for(waiting, 5)
    assert not sup.has_maintenance_hold("u") and sup.snapshot().held == ()
    assert launcher.launches == {"u": 2}
    await sup.hold("u", drain_timeout_s=1, ttl_s=60)
    sup.release_hold("u")  # released early: its TTL is gone too
    assert not sup.has_maintenance_hold("u")
    clock.now += 120
    sup.tick(clock.now)  # nothing left to expire
    await sup.close()


async def test_a_snapshot_is_a_copy_of_instances_holds_and_capacity(
    launcher: SleepLauncher,
) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=3, clock=clock)
    await lease_once(sup, "a")
    clock.now += 5
    async with sup.acquire("b"):
        snap = sup.snapshot()
    assert [(v.user_id, v.phase, v.in_flight, v.requests) for v in snap.instances] == [
        ("a", Phase.READY, 0, 1),
        ("b", Phase.READY, 1, 1),
    ]
    a = snap.instances[0]
    assert a.idle_for_s == 5 and a.pid == launcher.children[0].pid and a.port == 40000
    assert (snap.slots_used, snap.max_instances, snap.queue_length) == (2, 3, 0)
    await sup.hold("a", drain_timeout_s=1, ttl_s=60)
    later = sup.snapshot()
    assert later.held == ("a",) and [v.user_id for v in later.instances] == ["b"]
    assert snap.held == () and len(snap.instances) == 2  # the earlier snapshot did not change
    assert snap.instances[1].in_flight == 1  # nor did its views when the lease ended
    sup.release_hold("a")
    await sup.close()


async def test_probe_asks_the_launcher_about_a_ready_instance_only(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher)
    assert await sup.probe("u", 1, 1.0) is None  # nothing runs
    await lease_once(sup, "u")
    pid = launcher.children[0].pid
    assert await sup.probe("u", pid, 1.0) is True
    assert await sup.probe("u", pid + 1, 1.0) is None  # not the process a snapshot saw
    launcher.children[0].process.kill()  # dies: forgotten by the supervisor's watch
    await launcher.children[0].wait()
    for _ in range(100):
        if not sup.has_instance("u"):
            break
        await asyncio.sleep(0.01)
    assert await sup.probe("u", pid, 1.0) is None
    await sup.close()


async def test_a_request_waiting_through_a_block_never_starts_the_instance(
    launcher: SleepLauncher,
) -> None:
    """The caller's check runs again after every wait inside acquire: a request waiting on a
    hold when its user is blocked is refused when the hold ends, and starts nothing."""
    sup = supervisor(launcher, queue_timeout_ms=10_000)
    await lease_once(sup, "u")
    blocked = False

    def not_blocked() -> None:
        if blocked:
            raise PermissionError("blocked")

    await sup.hold("u", drain_timeout_s=1)  # the instance is stopped; requests wait

    async def request() -> None:
        async with sup.acquire("u", not_blocked):
            pass

    waiting = asyncio.ensure_future(request())
    await asyncio.sleep(0.05)
    blocked = True
    sup.release_hold("u")
    with pytest.raises(PermissionError):
        await asyncio.wait_for(waiting, 5)
    assert launcher.launches == {"u": 1} and not sup.has_instance("u")
    await sup.close()


# -- fair share (issue 18): nothing for nobody, new users per address, round-robin queue --------


class Client:
    """A request's client as the supervisor sees it (`supervisor.Requester`): its address,
    whether it half-closed, and how often it was asked whether it is still there."""

    def __init__(self, address: str, eof: bool = False) -> None:
        self.address = address
        self.eof = eof
        self.asked = 0

    def check_gone(self) -> None:
        self.asked += 1


async def test_a_start_nobody_waits_for_any_more_is_abandoned_before_it_spawns(
    launcher: SleepLauncher,
) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=1, queue_timeout_ms=10_000, clock=clock)
    async with sup.acquire("a"):  # in flight: "b" must queue
        queued = asyncio.ensure_future(lease_once(sup, "b"))
        await asyncio.sleep(0.05)
        assert sup.snapshot().queue_length == 1
        queued.cancel()  # its client closed the connection
        await asyncio.sleep(0.05)
        assert sup.snapshot().queue_length == 0
        assert not sup.has_instance("b")
    clock.now += 31  # "a" is evictable
    await lease_once(sup, "c")  # nothing queued ahead of "c"
    assert "b" not in launcher.launches
    assert tally(sup)["instance_start", "abandoned"] == 1
    await sup.close()


async def test_an_instance_spawned_for_nobody_is_evicted_first(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=2, clock=clock)
    await lease_once(sup, "recent")
    launcher.gate = asyncio.Event()
    waiting = asyncio.ensure_future(lease_once(sup, "left"))
    await asyncio.sleep(0.05)  # spawning: let finish, not cancelled
    waiting.cancel()
    launcher.gate.set()
    await asyncio.sleep(0.1)
    assert sup.registry["left"].phase is Phase.READY
    assert sup.registry["left"].unclaimed
    await lease_once(sup, "new")  # "recent" (idle 0 s) is kept, "left" evicted at once
    assert launcher.stops == ["left"]
    assert set(sup.registry) == {"recent", "new"}
    await sup.close()


async def test_an_instance_whose_client_hung_up_mid_request_is_evicted_at_once(
    launcher: SleepLauncher,
) -> None:
    sup = supervisor(launcher, max_instances=1)
    async with sup.acquire("hung-up", requester=Client("127.0.0.2", eof=True)):
        pass
    await lease_once(sup, "next")  # not kept from "next" for min(30 s, dbTTL)
    assert launcher.stops == ["hung-up"]
    async with sup.acquire("next", requester=Client("127.0.0.1")):
        pass
    assert not sup.registry["next"].unclaimed
    await sup.close()


async def test_new_users_are_bounded_per_client_address(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(
        launcher, clock=clock, new_users_per_minute=2, is_new_user=lambda user: user != "old"
    )
    attacker, victim = Client("127.0.0.2"), Client("127.0.0.1")
    for user in ("n1", "n2"):
        async with sup.acquire(user, requester=attacker):
            pass
    with pytest.raises(NewUsersRateLimitError) as caught:
        async with sup.acquire("n3", requester=attacker):
            pass
    assert caught.value.retry_after_s == 30  # one token every 30 s
    assert "n3" not in launcher.launches
    async with sup.acquire("old", requester=attacker):  # a known user is no new user
        pass
    async with sup.acquire("v1", requester=victim):  # another address: its own bucket
        pass
    clock.now += 30
    async with sup.acquire("n3", requester=attacker):
        pass
    assert tally(sup)["new_user_refusal"] == 1
    await sup.close()


async def test_the_start_queue_takes_addresses_in_turn(launcher: SleepLauncher) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=1, queue_timeout_ms=60_000, ttl_ms=1000, clock=clock)
    order: list[str] = []

    async def one(user: str, client: Client) -> None:
        async with sup.acquire(user, requester=client):
            order.append(user)

    async def time_passes() -> None:
        while True:
            await asyncio.sleep(0.01)
            clock.now += 0.5

    busy, other = Client("127.0.0.2"), Client("127.0.0.1")
    async with sup.acquire("a"):
        queued = []
        for user, client in (("x1", busy), ("x2", busy), ("x3", busy), ("y1", other)):
            queued.append(asyncio.ensure_future(one(user, client)))
            await asyncio.sleep(0.02)
    ticking = asyncio.ensure_future(time_passes())
    await asyncio.wait_for(asyncio.gather(*queued), 10)
    ticking.cancel()
    assert order == ["x1", "y1", "x2", "x3"]  # FIFO would have been x1, x2, x3, y1
    await sup.close()


async def test_queued_half_closed_clients_are_asked_and_yield_to_waiting_ones(
    launcher: SleepLauncher,
) -> None:
    clock = Clock()
    sup = supervisor(launcher, max_instances=1, queue_timeout_ms=60_000, ttl_ms=1000, clock=clock)
    order: list[str] = []
    half_closed = Client("127.0.0.2", eof=True)

    async def one(user: str, client: Client) -> None:
        async with sup.acquire(user, requester=client):
            order.append(user)

    async with sup.acquire("a"):
        first = asyncio.ensure_future(one("maybe-gone", half_closed))
        await asyncio.sleep(0.25)  # queued: asked now and at each poll
        assert half_closed.asked >= 2
        second = asyncio.ensure_future(one("waited-for", Client("127.0.0.1")))
        await asyncio.sleep(0.05)
    clock.now += 1  # "a" is evictable
    await asyncio.wait_for(second, 5)
    assert order == ["waited-for"]
    first.cancel()  # the check found it gone: its request is cancelled, its start abandoned
    await asyncio.sleep(0.05)
    assert not sup.has_instance("maybe-gone")
    assert "maybe-gone" not in launcher.launches
    await sup.close()


async def test_a_start_that_waited_for_a_slot_is_admitted_again(launcher: SleepLauncher) -> None:
    """A never-seen user admitted, then queued for a slot while a rebalance announced a move
    (`stcs.placement`): refused when the slot comes, nothing launched (before: launched on the
    strength of the first check, and the user's data split between two nodes)."""
    refusing: list[bool] = [False]

    def admit_start(user: str) -> None:
        if refusing[0]:
            raise NotOwnerError("moving", retry_after_s=5)

    clock = Clock()
    sup = supervisor(
        launcher,
        max_instances=1,
        queue_timeout_ms=60_000,
        ttl_ms=1000,
        clock=clock,
        admit_start=admit_start,
    )

    async def time_passes() -> None:  # 0.5 s of the supervisor's clock every 10 ms
        while True:
            await asyncio.sleep(0.01)
            clock.now += 0.5

    async with sup.acquire("a"):  # the one slot, in use
        queued = asyncio.ensure_future(lease_once(sup, "v"))
        await asyncio.sleep(0.05)  # "v" passed the first check and waits for the slot
        refusing[0] = True
    ticking = asyncio.ensure_future(time_passes())
    with pytest.raises(NotOwnerError):
        await asyncio.wait_for(queued, 10)
    ticking.cancel()
    assert launcher.launches == {"a": 1}
    await sup.close()
