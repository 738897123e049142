"""What the supervisor holds at one moment, as plain values (`Supervisor.snapshot`).

A leaf module: the admin API and the metrics read a `Snapshot` without importing the
supervisor (nor the supervisor the metrics).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class Phase(enum.Enum):
    """Where an instance is in its life: starting (one start task), ready (leased), stopping."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as it was at one moment (`Supervisor.snapshot`): plain values, nothing
    that reaches back into the supervisor.  ``started_at`` and ``last_active`` are wall-clock
    seconds, ``idle_for_s`` seconds (0 while a request is in flight)."""

    user_id: str
    phase: Phase
    pid: int | None
    port: int | None
    started_at: float | None
    log_path: Path | None
    last_active: float
    idle_for_s: float
    requests: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the supervisor holds at one moment, for the admin API and metrics: the
    ``instances`` (registry order), users ``held`` for maintenance, ``slots_used`` of
    ``max_instances``, the start ``queue_length`` and the memory floor ``min_free_bytes``."""

    instances: tuple[InstanceView, ...]
    held: tuple[str, ...]
    slots_used: int
    max_instances: int
    queue_length: int
    min_free_bytes: int
