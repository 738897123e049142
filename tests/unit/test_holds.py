"""`stcs.holds` on an injected clock: holds and their TTLs, the start back-off's schedule, its
end when an instance stays up and its forgetting.  What the supervisor does with them (requests
wait, StartBackoffError): test_policy.py and test_backoff.py."""

from __future__ import annotations

import pytest

from stcs.holds import (
    BACKOFF_FORGET_S,
    BACKOFF_MAX_S,
    BACKOFF_STABLE_S,
    Backoffs,
    Holds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_hold_is_waited_on_until_released() -> None:
    holds = Holds(Clock())
    assert holds.waiting_on("u") is None and holds.users() == ()
    holds.hold("u")
    holds.hold("u")  # idempotent: one event
    event = holds.waiting_on("u")
    assert event is not None and not event.is_set() and holds.users() == ("u",)
    assert not holds.has_ttl("u")
    holds.release("u")
    assert event.is_set() and holds.waiting_on("u") is None and holds.users() == ()
    holds.release("u")  # idempotent


async def test_a_hold_with_a_ttl_is_expired_on_the_clock_and_only_then() -> None:
    clock = Clock()
    holds = Holds(clock)
    holds.hold("b", ttl_s=60)
    holds.hold("a")  # no TTL: never expires
    assert holds.has_ttl("b") and not holds.has_ttl("a")
    assert holds.expired(clock.now + 59.9) == []
    assert holds.expired(clock.now + 60) == [("b", 60)]
    assert holds.users() == ("a", "b")  # expired is reported, not released: the caller does
    holds.release("b")
    assert not holds.has_ttl("b") and holds.expired(clock.now + 1e6) == []
    holds.hold("a", ttl_s=5)
    holds.drop_ttls()  # shutdown: nothing ends by itself
    assert holds.expired(clock.now + 1e6) == [] and holds.users() == ("a",)


def test_failures_back_off_doubling_up_to_the_cap() -> None:
    clock = Clock()
    backoffs = Backoffs(clock)
    assert not backoffs and backoffs.left("u") is None
    delays = [backoffs.fail("u").delay for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60] and BACKOFF_MAX_S == 60
    in_force = backoffs.left("u")
    assert in_force is not None and in_force[0] == pytest.approx(60)
    clock.now += 60
    assert backoffs.left("u") is None and backoffs  # over, but remembered
    backoffs.clear("u")
    assert not backoffs


def test_a_memory_stop_says_so_and_runs_its_delay_from_the_end_of_the_stop() -> None:
    clock = Clock()
    backoffs = Backoffs(clock)
    backoffs.fail("u", over_memory="userMaxMemoryMB is 100 MB")
    clock.now += 0.9  # the stop took 0.9 s of the 1 s back-off
    backoffs.run_from_now("u")
    in_force = backoffs.left("u")
    assert in_force is not None and in_force[0] == pytest.approx(1.0)
    assert in_force[1].over_memory == "userMaxMemoryMB is 100 MB"
    backoffs.run_from_now("nobody")  # no series: nothing happens
    assert backoffs.left("nobody") is None


def test_a_series_ends_when_an_instance_stays_up_and_is_forgotten_long_after() -> None:
    clock = Clock()
    backoffs = Backoffs(clock)
    backoffs.fail("up")
    backoffs.fail("gone")  # over at clock.now + 1
    ready_at = {"up": clock.now + 1}
    backoffs.settle(clock.now + BACKOFF_STABLE_S, ready_at.get)
    assert "up" in backoffs and "gone" in backoffs  # "up": not up long enough yet
    backoffs.settle(clock.now + 1 + BACKOFF_STABLE_S, ready_at.get)
    assert "up" not in backoffs and "gone" in backoffs
    backoffs.settle(clock.now + 1 + BACKOFF_FORGET_S - 0.1, ready_at.get)
    assert "gone" in backoffs
    backoffs.settle(clock.now + 1 + BACKOFF_FORGET_S, ready_at.get)
    assert not backoffs
