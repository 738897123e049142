"""The per-user limits and their overrides: the settings' defaults, each user's overrides
(``<dbPath>/.stcs/limits.json``, `Overrides`) and the merge of both (`Limits`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stcs.config import Settings

# YAML key -> `Limits` field (the same name as the `Settings` field holding the default).
LIMIT_KEYS: dict[str, str] = {
    "userMaxDiskMB": "user_max_disk_mb",
    "userMaxCollections": "user_max_collections",
    "userMaxRecordsPerCollection": "user_max_records_per_collection",
    "userRequestsPerSecond": "user_requests_per_second",
    "userRequestBurst": "user_request_burst",
    "userMaxConcurrentRequests": "user_max_concurrent_requests",
    "userMaxMemoryMB": "user_max_memory_mb",  # enforced by stcs.memory, not on the request path
}


# Smallest token bucket unless userRequestBurst is set: a chromadb 1.5 client's start-up is 3
# requests (auth/identity, tenant, database), get_or_create_collection 1, its first write 2
# (pre-flight-checks, the write): 6, with room for a retry or a second client.
CLIENT_START_BURST = 10


@dataclass(frozen=True)
class Limits:
    """One user's effective limits (0: off).  Units: MB, collections, records, requests/s,
    requests, requests in flight, MB."""

    user_max_disk_mb: int = 0
    user_max_collections: int = 0
    user_max_records_per_collection: int = 0
    user_requests_per_second: int = 0
    user_request_burst: int = 0
    user_max_concurrent_requests: int = 0
    user_max_memory_mb: int = 0
    active: bool = field(init=False, default=False)  # any limit on
    needs_kind: bool = field(init=False, default=False)  # a limit that depends on the route

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "needs_kind",
            bool(
                self.user_max_disk_mb
                or self.user_max_collections
                or self.user_max_records_per_collection
            ),
        )
        object.__setattr__(
            self,
            "active",
            self.needs_kind
            or bool(self.user_requests_per_second or self.user_max_concurrent_requests),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(**{name: getattr(settings, name) for name in LIMIT_KEYS.values()})

    def with_overrides(self, overrides: Mapping[str, int]) -> Limits:
        """These limits with ``overrides`` (YAML key -> value) applied."""
        values = {name: getattr(self, name) for name in LIMIT_KEYS.values()}
        values.update({LIMIT_KEYS[k]: v for k, v in overrides.items()})
        return Limits(**values)

    def as_keys(self) -> dict[str, int]:
        """``{YAML key: value}`` (the shape of the admin API and ``limits.json``)."""
        return {key: getattr(self, name) for key, name in LIMIT_KEYS.items()}

    @property
    def bucket_size(self) -> int:
        """Tokens the bucket holds: ``userRequestBurst``, else the larger of
        ``userRequestsPerSecond`` and `CLIENT_START_BURST` (a client's start-up)."""
        return self.user_request_burst or max(self.user_requests_per_second, CLIENT_START_BURST)


# The largest override value (2**53 - 1: exact as a JSON number anywhere, and as a float in the
# token bucket's arithmetic).  Any real limit is far below it.
MAX_LIMIT_VALUE = 2**53 - 1


def check_overrides(doc: object) -> dict[str, int | None]:
    """Validate an override document ``{key: int >= 0 | null}``; raises ValueError naming the
    first bad key or value."""
    if not isinstance(doc, dict):
        raise ValueError("limits must be a JSON object of setting names to numbers")
    out: dict[str, int | None] = {}
    for key, value in doc.items():
        if key not in LIMIT_KEYS:
            raise ValueError(f"unknown limit {key!r} (known: {', '.join(LIMIT_KEYS)})")
        if value is not None and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_LIMIT_VALUE
        ):
            raise ValueError(
                f"{key}: expected an integer from 0 to {MAX_LIMIT_VALUE} or null, got {value!r}"
            )
        out[key] = value
    return out


class Overrides:
    """Per-user limit overrides, persisted as ``{userId: {key: value}}`` in ``path``
    (``<dbPath>/.stcs/limits.json``; written atomically: write, then rename)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = {}
        self.users: dict[str, dict[str, int]] = {}
        for user_id, doc in raw.items():
            checked = check_overrides(doc)
            self.users[user_id] = {k: v for k, v in checked.items() if v is not None}

    def set(self, user_id: str, overrides: Mapping[str, int]) -> None:
        """Replace ``user_id``'s overrides (empty: none) and save."""
        if overrides:
            self.users[user_id] = dict(overrides)
        else:
            self.users.pop(user_id, None)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.users, indent=1, sort_keys=True))
        tmp.replace(self._path)
