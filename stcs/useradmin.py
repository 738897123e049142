"""``stcs users block|unblock|hold|release|stop|limits``: one user's admin actions, through the
running server's admin API (`stcs.admin`), as ``stcs status`` reads it.

Each function takes the resolved settings (the server's ``appPort``, TLS and ``adminAPIKey``,
found as ``serve`` found them) and a user id as given; the id is normalised as the resolver
does (a UUID in UUID mode means its lowercase form) before it names anything.  They raise
`stcs.backup.OperationError` (no key, no server answering, a refusal: the message has the
status and the server's reason) and `stcs.errors.InvalidUserIdError`; the CLI turns those into
exit codes 1 and 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stcs.auth import normalize_user_id
from stcs.backup import AdminClient
from stcs.config import Settings

# The client waits for the server's own drain (drainTimeout, s) plus this margin (s).
_CLIENT_MARGIN_S = 30.0


def normalized(settings: Settings, user_id: str) -> str:
    """``user_id`` as the server names it.  Raises InvalidUserIdError."""
    return normalize_user_id(user_id, uuid_mode=settings.user_ids_are_secret)


def set_blocked(settings: Settings, user_id: str, blocked: bool, drain_s: float) -> dict[str, Any]:
    """``POST|DELETE /admin/users/{userId}/block``: refuse the user (403, their chroma stopped
    once its requests in flight end, waiting up to ``drain_s`` seconds) or allow them again.
    The answer: ``{"userId", "blocked"[, "stopped"[, "message"]]}``."""
    path = f"/admin/users/{normalized(settings, user_id)}/block?drainTimeout={drain_s:g}"
    return AdminClient(settings).request(
        "POST" if blocked else "DELETE", path, timeout=drain_s + _CLIENT_MARGIN_S
    )


def hold(settings: Settings, user_id: str, ttl_s: float, drain_s: float) -> dict[str, Any]:
    """``POST /admin/users/{userId}/hold``: the user's chroma stops after its requests in flight
    (up to ``drain_s`` s), new requests wait (up to ``queueTimeout``) until `release` or until
    ``ttl_s`` seconds have passed.  The answer: ``{"userId", "held", "stopped"}``."""
    path = (
        f"/admin/users/{normalized(settings, user_id)}/hold?ttl={ttl_s:g}&drainTimeout={drain_s:g}"
    )
    return AdminClient(settings).request("POST", path, timeout=drain_s + _CLIENT_MARGIN_S)


def release(settings: Settings, user_id: str) -> dict[str, Any]:
    """``DELETE /admin/users/{userId}/hold`` (a user who is not held: nothing to do)."""
    return AdminClient(settings).request(
        "DELETE", f"/admin/users/{normalized(settings, user_id)}/hold", timeout=30
    )


def stop(settings: Settings, user_id: str, drain_s: float) -> dict[str, Any]:
    """``DELETE /admin/instances/{userId}``: stop the user's chroma once its requests in flight
    end (up to ``drain_s`` s); the next request starts it again.  OperationError (404) when
    none runs."""
    path = f"/admin/instances/{normalized(settings, user_id)}?drainTimeout={drain_s:g}"
    return AdminClient(settings).request("DELETE", path, timeout=drain_s + _CLIENT_MARGIN_S)


def limits(
    settings: Settings,
    user_id: str,
    *,
    set_keys: Mapping[str, int] | None = None,
    unset_keys: tuple[str, ...] = (),
    clear: bool = False,
) -> dict[str, Any]:
    """``GET /admin/users/{userId}/limits``, changed first when asked: ``clear`` drops every
    override, then ``set_keys`` (YAML key -> value, 0 off) and ``unset_keys`` change only the
    keys they name (the admin API's ``PUT`` replaces the whole set, so the current overrides
    are read first; two operators changing one user at the same moment: the last wins).
    The answer: ``{"userId", "limits", "overrides", "usage"}``; a bad key or value is the
    server's 400 (OperationError naming it)."""
    client = AdminClient(settings)
    path = f"/admin/users/{normalized(settings, user_id)}/limits"
    doc = client.request("GET", path, timeout=30)
    if not (clear or set_keys or unset_keys):
        return doc
    overrides: dict[str, Any] = {} if clear else dict(doc.get("overrides") or {})
    overrides.update(set_keys or {})
    for key in unset_keys:
        overrides.pop(key, None)
    return client.request("PUT", path, timeout=30, body=overrides)


def shown(settings: Settings, user_id: str) -> str:
    """How the command line names a (normalised) user in what it prints: in UUID mode the id is
    a token, so its `stcs.log.user_ref` (the reference the server's log shows; output of a
    systemd timer lands in the journal), else the id itself."""
    if settings.user_ids_are_secret:
        from stcs.log import user_ref

        return user_ref(user_id)
    return user_id
