"""Fair shares between client addresses: the bookkeeping the supervisor and the resolver use.

* `AddressBuckets`: a token bucket per client address (e.g. ``addressNewUsersPerMinute``: how
  many never-seen users one address may have started), its memory bounded.
* `AddressCounts`: how many of something (lookups in flight) each address holds now.
* `StartQueue`: the start queue, served round-robin between client addresses (FIFO within
  one), starts someone still waits for before those whose clients have all hung up.

A client address is the peer, or behind a trusted front proxy the ``X-Forwarded-For`` entry
`stcs.relay.client_address` gives; None (unknown) is one address like any other.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class Client(Protocol):
    """A request's client as the per-address rules see it (the relay's connection)."""

    @property
    def address(self) -> str | None:
        """The client address (the peer, or behind a trusted proxy its ``X-Forwarded-For``
        entry); None when unknown."""
        ...


MAX_ADDRESSES = 10_000  # per-address tables forget beyond this many addresses (LRU)


class AddressBuckets:
    """A token bucket per address: ``burst`` tokens, refilled at ``rate`` per second.

    At most ``max_addresses`` buckets are kept (least recently used forgotten first; a full
    bucket carries no information and is dropped first), so an attacker with many addresses
    costs bounded memory — each forgotten address starts again with a full bucket.
    Times are seconds of ``clock``.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float],
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._max = max_addresses
        self._buckets: OrderedDict[str | None, tuple[float, float]] = OrderedDict()

    def take(self, address: str | None) -> float:
        """Take one token for ``address``: 0.0 when taken, else the seconds until one is
        available (nothing taken)."""
        now = self._clock()
        tokens, stamp = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            self._buckets.move_to_end(address)
            return (1.0 - tokens) / self.rate
        if address not in self._buckets and len(self._buckets) >= self._max:
            self._forget(now)
        self._buckets[address] = (tokens - 1.0, now)
        self._buckets.move_to_end(address)
        return 0.0

    def _forget(self, now: float) -> None:
        full = [a for a, (t, s) in self._buckets.items() if t + (now - s) * self.rate >= self.burst]
        for address in full:
            del self._buckets[address]
        while len(self._buckets) >= self._max:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class AddressCounts:
    """How many of a bounded thing each address holds now (only addresses holding some are
    kept, so the table is as small as what is in flight)."""

    def __init__(self) -> None:
        self._counts: dict[str | None, int] = {}

    def get(self, address: str | None) -> int:
        return self._counts.get(address, 0)

    def add(self, address: str | None) -> None:
        self._counts[address] = self._counts.get(address, 0) + 1

    def remove(self, address: str | None) -> None:
        left = self._counts.get(address, 0) - 1
        if left > 0:
            self._counts[address] = left
        else:
            self._counts.pop(address, None)


@dataclass(eq=False)
class QueuePlace:
    """One start waiting for an instance slot: woken by ``event``; ``address`` is the client
    address of the request that began the start; ``live()`` tells whether a client still
    waits for it (all hung up: it yields to those that have one)."""

    address: str | None
    live: Callable[[], bool]
    event: asyncio.Event = field(default_factory=asyncio.Event)


class StartQueue:
    """The start queue: round-robin between addresses, FIFO within one address.

    The head is the first place, taking addresses in turn (the address served last goes to
    the back), whose start someone still waits for; if no client waits for any, the first in
    turn.  So one address holding many places delays another address's start by at most one
    slot grant per other address, not by all its places.
    """

    def __init__(self) -> None:
        self._by_address: OrderedDict[str | None, deque[QueuePlace]] = OrderedDict()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[QueuePlace]:
        for places in self._by_address.values():
            yield from places

    def add(self, place: QueuePlace) -> None:
        places = self._by_address.get(place.address)
        if places is None:
            places = self._by_address[place.address] = deque()
        places.append(place)
        self._length += 1

    def remove(self, place: QueuePlace) -> None:
        places = self._by_address.get(place.address)
        if places is None or place not in places:
            return
        places.remove(place)
        self._length -= 1
        if not places:
            del self._by_address[place.address]

    def head(self) -> QueuePlace | None:
        first: QueuePlace | None = None
        for places in self._by_address.values():
            for place in places:
                if place.live():
                    return place
                if first is None:
                    first = place
        return first

    def granted(self, place: QueuePlace) -> None:
        """``place`` got its slot: remove it; its address's next place waits its turn."""
        self.remove(place)
        if place.address in self._by_address:
            self._by_address.move_to_end(place.address)

    def wake_all(self) -> None:
        for place in self:
            place.event.set()
