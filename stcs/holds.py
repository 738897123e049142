"""Holds and start back-offs: the supervisor's two per-user "not now" rules, each a small table
on the supervisor's injected clock (monotonic seconds), so tests drive them with their own.

* `Holds`: a user held for maintenance (admin stop, block, backup, restore): new requests wait
  on the hold's event until it is released; a hold with a TTL (a maintenance hold) ends by
  itself once the clock passes its deadline (`Holds.expired`, from `Supervisor.tick`).
* `Backoffs`: a user whose starts failed (gunicorn's ``WORKER_BOOT_ERROR`` lesson): no start
  for 1 s after the first failure, doubling per failure up to `BACKOFF_MAX_S`; a series ends
  when an instance stays up `BACKOFF_STABLE_S`, and is forgotten `BACKOFF_FORGET_S` after it
  is over.

What a hold or a back-off *does* to a request (wait, StartBackoffError, MemoryLimitError) and
what is logged and counted is the supervisor's (`stcs.supervisor`); these only keep the facts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

BACKOFF_FIRST_S = 1.0  # the first back-off after a failure; doubles with each further one
BACKOFF_MAX_S = 60.0
BACKOFF_STABLE_S = 60.0  # an instance up this long ends its user's back-off series
BACKOFF_FORGET_S = 600.0  # a back-off over this long ago with no start since is forgotten


class Holds:
    """The users held now: user id -> an event set when the hold is released, and for holds
    with a TTL their deadline (``clock`` seconds) and TTL (s)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._released: dict[str, asyncio.Event] = {}
        self._expiry: dict[str, tuple[float, float]] = {}

    def waiting_on(self, user_id: str) -> asyncio.Event | None:
        """The event a request for ``user_id`` waits on (set at release); None: not held."""
        return self._released.get(user_id)

    def hold(self, user_id: str, ttl_s: float | None = None) -> None:
        """Hold ``user_id`` (idempotent); with ``ttl_s`` the hold ends by itself that many
        seconds from now (a later call sets a new deadline)."""
        if user_id not in self._released:
            self._released[user_id] = asyncio.Event()
        if ttl_s is not None:
            self._expiry[user_id] = (self._clock() + ttl_s, ttl_s)

    def release(self, user_id: str) -> None:
        """End ``user_id``'s hold and its TTL (idempotent): whoever waits goes on."""
        self._expiry.pop(user_id, None)
        event = self._released.pop(user_id, None)
        if event is not None:
            event.set()

    def has_ttl(self, user_id: str) -> bool:
        """Whether ``user_id`` is under a hold with a TTL (a maintenance hold)."""
        return user_id in self._expiry

    def expired(self, now: float) -> list[tuple[str, float]]:
        """``(user id, ttl_s)`` of the holds whose deadline is at or before ``now`` (not
        released here: the caller releases them)."""
        if not self._expiry:
            return []
        return [(u, ttl) for u, (deadline, ttl) in self._expiry.items() if now >= deadline]

    def drop_ttls(self) -> None:
        """Forget every deadline (at shutdown: nothing ends by itself any more)."""
        self._expiry.clear()

    def users(self) -> tuple[str, ...]:
        """The users held now, sorted."""
        return tuple(sorted(self._released))


@dataclass
class Backoff:
    """A user's failed-start series: ``failures`` in a row, no start before ``until``
    (monotonic seconds of the supervisor's clock)."""

    failures: int = 0
    until: float = 0.0
    over_memory: str = ""  # the last failure was a memory stop: what it said (names the limit)

    @property
    def delay(self) -> float:
        """Seconds of back-off after ``failures`` failures: 1, 2, 4, ... `BACKOFF_MAX_S`."""
        return float(min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S))


class Backoffs:
    """The users whose starts back off: user id -> `Backoff`, on ``clock`` (seconds)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._series: dict[str, Backoff] = {}

    def __bool__(self) -> bool:
        return bool(self._series)

    def __contains__(self, user_id: str) -> bool:
        """Whether ``user_id`` has a series (in force or over, not yet ended or forgotten)."""
        return user_id in self._series

    def left(self, user_id: str) -> tuple[float, Backoff] | None:
        """Seconds ``user_id``'s back-off still runs and its series; None when none is in
        force."""
        backoff = self._series.get(user_id)
        if backoff is None:
            return None
        left = backoff.until - self._clock()
        return (left, backoff) if left > 0 else None

    def fail(self, user_id: str, over_memory: str = "") -> Backoff:
        """One failure more for ``user_id`` (``over_memory``: it was a memory stop, and this
        is what its requests are told): no start for `Backoff.delay` seconds from now."""
        backoff = self._series.setdefault(user_id, Backoff())
        backoff.failures += 1
        backoff.over_memory = over_memory
        backoff.until = self._clock() + backoff.delay
        return backoff

    def run_from_now(self, user_id: str) -> None:
        """Make ``user_id``'s back-off (if any) run its full delay from now at least (after a
        slow stop, so the stop does not eat the back-off)."""
        backoff = self._series.get(user_id)
        if backoff is not None:
            backoff.until = max(backoff.until, self._clock() + backoff.delay)

    def clear(self, user_id: str) -> None:
        """End ``user_id``'s series (idempotent)."""
        self._series.pop(user_id, None)

    def settle(self, now: float, up_since: Callable[[str], float | None]) -> None:
        """End the series of users whose instance has been ready since `BACKOFF_STABLE_S`
        before ``now`` (``up_since``: when it became ready, None if it is not), and forget
        back-offs over since `BACKOFF_FORGET_S` (the table stays as small as the set of failing
        users)."""
        for user_id, backoff in list(self._series.items()):
            ready_at = up_since(user_id)
            stable = ready_at is not None and now - ready_at >= BACKOFF_STABLE_S
            if stable or now - backoff.until >= BACKOFF_FORGET_S:
                del self._series[user_id]
