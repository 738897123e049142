"""Reload the settings of a running stcs (SIGHUP, ``systemctl reload``).

The configuration is read again from the sources it was read from at start (`server.serve`'s
``load``: the same command line, config file and environment).  Then, by each setting's
``reloadable`` flag (`stcs.config.setting`):

* reloadable settings that changed are pushed into the running services (`apply`): the relay's
  edge limits and timeouts, the supervisor's TTL and caps, the launcher's timeouts, the auth
  resolver, the quotas' defaults, the log level.  No connection and no child is touched; a
  new value counts from the next request, start or check.
* other settings that changed are logged as needing a restart and keep their running value.
* a configuration that does not load (bad YAML, unknown key, invalid value) changes nothing: an
  error line says why, naming the key.

The log lines name the changed keys, never a value (secrets among them).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog

from stcs import log as log_mod
from stcs.auth import REJECTION_CACHE_MS, AuthServerResolver
from stcs.config import SETTINGS, Resolved, SettingInfo, Settings, validate
from stcs.errors import ConfigError
from stcs.fairness import AddressBuckets
from stcs.quotas import Limits
from stcs.state import State
from stcs.supervisor import EVICT_MIN_IDLE_S

log = structlog.get_logger("stcs.reload")

MB = 1024 * 1024


def changes(old: Settings, new: Settings) -> tuple[list[SettingInfo], list[SettingInfo]]:
    """The settings whose value differs: (applied live, needing a restart).

    ``authServerEndpoint`` from empty to set (or back) switches between UUID tokens and an
    auth server: that needs a restart, a change of URL does not."""
    live: list[SettingInfo] = []
    restart: list[SettingInfo] = []
    for info in SETTINGS:
        before, after = getattr(old, info.name), getattr(new, info.name)
        if before == after:
            continue
        mode_switch = info.key == "authServerEndpoint" and bool(before) != bool(after)
        (live if info.reloadable and not mode_switch else restart).append(info)
    return live, restart


def apply(state: State, relay: Any, settings: Settings) -> None:
    """Push ``settings`` (the running ones with the reloadable changes) into the services of
    ``state`` and into ``relay`` (`stcs.relay.Relay`: it copies its timeouts at start)."""
    old, state.settings = state.settings, settings
    log_mod.set_level(settings.log_level)
    if relay is not None:
        relay.apply(settings)
    sup = state.supervisor
    sup.ttl = settings.db_ttl / 1000
    sup.evict_min_idle = min(EVICT_MIN_IDLE_S, sup.ttl)
    sup.max_instances = settings.db_max_instances
    sup.queue_timeout = settings.queue_timeout / 1000
    sup.min_free_bytes = settings.db_min_free_memory_mb * MB
    rate = settings.address_new_users_per_minute
    if rate != old.address_new_users_per_minute:  # new buckets: each address starts full
        sup._new_users = AddressBuckets(rate / 60, rate, sup._clock) if rate > 0 else None
    if settings.max_connections > old.max_connections:
        from stcs.server import raise_fd_limit  # here: `server` imports this module

        raise_fd_limit(settings.max_connections, state.ports.counts().size if state.ports else 0)
    launcher = sup.launcher
    for attr, value in (
        ("_start_timeout", settings.db_start_timeout / 1000),
        ("_stop_timeout", settings.db_stop_timeout / 1000),
        ("_max_retries", settings.db_max_retries),
        ("_log_max_bytes", settings.child_log_max_bytes),
        ("_log_retention", settings.child_log_retention / 1000),
    ):
        if hasattr(launcher, attr):
            setattr(launcher, attr, value)
    _apply_resolver(state, settings)
    quotas = state.quotas
    quotas.defaults = Limits.from_settings(settings)
    quotas._merge_all()
    quotas.concurrency_timeout = settings.user_concurrency_timeout / 1000
    quotas.disk_interval = settings.user_disk_check_interval / 1000


def _apply_resolver(state: State, settings: Settings) -> None:
    resolver: Any = state.resolver
    while not isinstance(resolver, AuthServerResolver) and hasattr(resolver, "_inner"):
        resolver = resolver._inner  # ExistingUsersResolver wraps it
    if not isinstance(resolver, AuthServerResolver):
        return  # UUID mode: nothing to apply (a switch to an auth server needs a restart)
    if resolver._endpoint != settings.auth_server_endpoint:
        resolver._cache.clear()  # answers of the previous auth server
        resolver._endpoint = settings.auth_server_endpoint
        resolver.health.endpoint = settings.auth_server_endpoint
    resolver._api_key = settings.auth_server_api_key
    resolver._cache_ttl = settings.auth_cache_ttl / 1000
    resolver._reject_ttl = min(settings.auth_cache_ttl, REJECTION_CACHE_MS) / 1000
    resolver._timeout_s = settings.auth_timeout / 1000
    resolver._max_per_address = settings.auth_max_lookups_per_address


async def reload(state: State, relay: Any, load: Callable[[], Resolved]) -> None:
    """Read the configuration again (``load``) and apply it as the module says; log the
    outcome: ``settings reloaded`` (``changed``: keys), ``settings need a restart``
    (``keys``), or ``settings not reloaded`` (``reason``).  Never raises for a bad file."""
    old = state.settings
    try:
        resolved = await asyncio.to_thread(load)
    except ConfigError as exc:
        log.error("settings not reloaded", reason=str(exc))
        return
    live, restart = changes(old, resolved.settings)
    merged = dataclasses.replace(
        old, **{info.name: getattr(resolved.settings, info.name) for info in live}
    )
    if live:
        try:  # the mix of new and kept values must hold together too
            validate(merged, resolved.sources)
        except ConfigError as exc:
            log.error("settings not reloaded", reason=str(exc))
            return
    if restart:
        log.warning("settings need a restart", keys=[info.key for info in restart])
    apply(state, relay, merged)
    log.info("settings reloaded", changed=[info.key for info in live])
