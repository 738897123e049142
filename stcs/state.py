"""Per-application state shared by the request handlers (`app`, `admin`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from stcs.auth import Blocklist, Resolver
from stcs.config import Settings
from stcs.metrics import Metrics
from stcs.quotas import Quotas
from stcs.supervisor import Supervisor
from stcs.upstream import UpstreamPool


@dataclass
class State:
    """Filled by the cleanup contexts of `app.create_app`."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    blocklist: Blocklist | None = None
    probe_session: aiohttp.ClientSession | None = None  # readiness probes, admin heartbeats
    upstream_pool: UpstreamPool = field(default_factory=UpstreamPool)  # the data plane
    resolver: Resolver | None = None
    supervisor: Supervisor | None = None
    quotas: Quotas | None = None  # per-user limits (the request path's admit/done hooks)
    shutting_down: bool = False
    in_flight: int = 0  # requests being handled now (all endpoints)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight == 0

    def __post_init__(self) -> None:
        self.idle.set()


STATE = web.AppKey("stcs_state", State)
INFO = web.RequestKey("stcs_request_info", dict[str, Any])  # what the request line logs
