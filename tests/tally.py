"""A `stcs.recorder.Recorder` for tests: it counts the events the core reports."""

from __future__ import annotations

import collections

from stcs.recorder import NullRecorder


class Tally(NullRecorder):
    """Counts each event by name and label: ``tally["instance_start", "ok"]``,
    ``tally["backoff_refusal"]``; 0 for an event never reported."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()

    def __getitem__(self, key: str | tuple[str, ...]) -> int:
        return self.counts[(key,) if isinstance(key, str) else key]

    def instance_start(self, result: str, seconds: float | None = None) -> None:
        self.counts["instance_start", result] += 1

    def instance_stop(self, reason: str) -> None:
        self.counts["instance_stop", reason] += 1

    def queue_wait(self, seconds: float) -> None:
        self.counts["queue_wait",] += 1

    def queue_timeout(self) -> None:
        self.counts["queue_timeout",] += 1

    def memory_floor_wait(self) -> None:
        self.counts["memory_floor_wait",] += 1

    def start_backoff(self) -> None:
        self.counts["start_backoff",] += 1

    def backoff_refusal(self) -> None:
        self.counts["backoff_refusal",] += 1

    def new_user_refusal(self) -> None:
        self.counts["new_user_refusal",] += 1

    def auth_lookup(self, result: str) -> None:
        self.counts["auth_lookup", result] += 1

    def quota_rejection(self, limit: str) -> None:
        self.counts["quota_rejection", limit] += 1
