"""What the request handlers (`relay`, `app`, `admin`) share: one `State`, built once.

Every service in it exists from the start of serving to its end (`app.open_state` builds them
in order and tears them down in reverse; `server.serve` holds it open around both planes), so
no handler checks for a missing one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from stcs.auth import AuthServerHealth, Blocklist, Resolver
from stcs.config import Settings
from stcs.metrics import Metrics
from stcs.placement import Placement
from stcs.ports import PortHold
from stcs.quotas import Quotas
from stcs.readiness import Readiness
from stcs.supervisor import Supervisor
from stcs.upstream import UpstreamPool


@dataclass(eq=False)
class State:
    """The services (``settings`` … ``upstream_pool``) and the server's run-time facts.

    `shutting_down` is *the* shutdown flag, turned on once (`begin_shutdown`) when stcs stops
    taking new requests (``/health`` 503, new requests 503 ``ShuttingDownError``).
    ``in_flight`` counts requests being handled (all endpoints); ``idle`` is set while it is 0.
    """

    settings: Settings
    metrics: Metrics
    blocklist: Blocklist
    resolver: Resolver
    auth_server: AuthServerHealth | None  # the auth server's recent answers (None: UUID mode)
    supervisor: Supervisor
    quotas: Quotas  # per-user limits (the request path's admit/done hooks)
    upstream_pool: UpstreamPool  # the data plane's connections to children and control socket
    ports: PortHold | None = None  # childPortRange as held and lent (/admin-health)
    placement: Placement | None = None  # the cluster's ring and per-user move marks
    _shutting_down: bool = field(default=False, init=False)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    readiness: Readiness = field(init=False)  # ``/ready``: starting, draining, dbPath writable

    def __post_init__(self) -> None:
        self.idle.set()
        self.readiness = Readiness(self.settings.db_dir, lambda: self._shutting_down)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Stop taking new requests (idempotent; there is no way back)."""
        self._shutting_down = True


STATE = web.AppKey("stcs_state", State)
