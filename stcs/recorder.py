"""How the core reports what happened, for metrics (in the manner of Sablier's ``Recorder``).

The supervisor, quotas and the auth-server resolver take a `Recorder` and call one method per
event; they never see a metric.  `stcs.metrics.Metrics` is the implementation that serves
Prometheus (the only module that imports prometheus-client); `NullRecorder` records nothing
(the default, and what unit tests pass when they do not count events).  Times are seconds.
"""

from __future__ import annotations

from typing import Protocol


class Recorder(Protocol):
    """The events the core reports.  Label values are a small fixed set (never a user id)."""

    def instance_start(self, result: str, seconds: float | None = None) -> None:
        """A start ended: ``result`` "ok" (``seconds`` from spawn to the first good heartbeat),
        "failed" or "abandoned" (its last waiting request left before the spawn)."""

    def instance_stop(self, reason: str) -> None:
        """An instance stopped: "idle", "evicted", "crashed", "shutdown", "admin",
        "unreachable", "wedged" or "memory"."""

    def queue_wait(self, seconds: float) -> None:
        """A start waited ``seconds`` in the start queue for a slot."""

    def queue_timeout(self) -> None:
        """A start gave up waiting for a slot (``queueTimeout``)."""

    def memory_floor_wait(self) -> None:
        """A start had to wait for ``dbMinFreeMemoryMB``."""

    def start_backoff(self) -> None:
        """A user's back-off began (a failed start, or a crash soon after it)."""

    def backoff_refusal(self) -> None:
        """A request was refused at once because its user's starts back off."""

    def new_user_refusal(self) -> None:
        """A never-seen user's start was refused by ``addressNewUsersPerMinute``."""

    def auth_lookup(self, result: str) -> None:
        """A token resolution: "ok", "rejected", "error", "saturated", "cache_hit",
        "abandoned" or "per_address"."""

    def quota_rejection(self, limit: str) -> None:
        """A request refused by a per-user limit: "disk", "collections", "records", "rate" or
        "concurrency"."""


class NullRecorder:
    """A `Recorder` that records nothing."""

    def instance_start(self, result: str, seconds: float | None = None) -> None:
        pass

    def instance_stop(self, reason: str) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def queue_timeout(self) -> None:
        pass

    def memory_floor_wait(self) -> None:
        pass

    def start_backoff(self) -> None:
        pass

    def backoff_refusal(self) -> None:
        pass

    def new_user_refusal(self) -> None:
        pass

    def auth_lookup(self, result: str) -> None:
        pass

    def quota_rejection(self, limit: str) -> None:
        pass


NULL_RECORDER = NullRecorder()
