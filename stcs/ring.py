"""nginx's consistent hash (``hash KEY consistent``), computed exactly as nginx computes it.

A pure function module: `Ring` maps a key (the user id, nginx's ``$stcs_user_id``) to the
``server`` entry of the upstream block that nginx would pick for it, so stcs can tell which
node owns a user (`stcs.placement`) and which users a change of the node list moves
(`stcs.cluster`).  The source of every rule is nginx's
``src/http/modules/ngx_http_upstream_hash_module.c`` (unchanged from 1.7.2 through 1.27):

* ``ngx_http_upstream_init_chash``: each server contributes ``weight * 160`` points.  The
  server's name *as written in the upstream block* (``10.0.0.11:8000``) is split at its last
  ``:`` when only digits follow it (``unix:PATH`` has no port); the base is the CRC-32 state
  after ``HOST``, one NUL byte and ``PORT`` (Cache::Memcached::Fast's layout); point ``j`` is
  ``crc32(HOST \\0 PORT PREV)`` where ``PREV`` is point ``j-1``'s hash as 4 little-endian bytes
  (0 for the first point).  ``ngx_crc32_update``/``ngx_crc32_final`` are the standard
  CRC-32 (``zlib.crc32``).  Points are sorted by hash; points with an equal hash are
  collapsed into the first (nginx's ``qsort`` leaves which of them first unspecified: for 4
  nodes the chance of any tie is ~5e-5, see `Ring.ties`).
* ``ngx_http_upstream_init_chash_peer``: the key's hash is ``ngx_crc32_long(key)``, the
  standard CRC-32 of its bytes.
* ``ngx_http_upstream_find_chash_point``: the first point whose hash is ``>=`` the key's
  (binary search); past the last point it wraps to the first (``point[hash % number]`` in
  ``ngx_http_upstream_get_chash_peer``).  With ``max_fails=0`` and ``proxy_next_upstream
  off`` (`stcs.deploy`'s cluster router) nginx never walks further: that server is the owner.

A host name that resolves to several addresses makes several peers with one name (each adds
its 160 points); stcs's router names each node by one address, as the cluster docs ask.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

POINTS_PER_WEIGHT = 160  # ngx_http_upstream_init_chash: npoints = peer->weight * 160


def _split_server(server: str) -> tuple[bytes, bytes]:
    """``(HOST, PORT)`` bytes as ``ngx_http_upstream_init_chash`` splits a server name."""
    raw = server.encode()
    if raw[:5].lower() == b"unix:":
        return raw[5:], b""
    colon = raw.rfind(b":")
    tail = raw[colon + 1 :] if colon >= 0 else b""
    if colon >= 0 and all(0x30 <= c <= 0x39 for c in tail):
        return raw[:colon], tail
    return raw, b""


def server_points(server: str, weight: int = 1) -> list[int]:
    """The ``weight * 160`` ring points (32-bit hashes) of upstream server ``server``, in the
    order nginx computes them."""
    host, port = _split_server(server)
    base = zlib.crc32(port, zlib.crc32(b"\0", zlib.crc32(host)))
    points: list[int] = []
    prev = 0
    for _ in range(weight * POINTS_PER_WEIGHT):
        prev = zlib.crc32(struct.pack("<I", prev), base)
        points.append(prev)
    return points


def key_hash(key: str) -> int:
    """``ngx_crc32_long`` of the key's bytes (UTF-8; user ids are ASCII)."""
    return zlib.crc32(key.encode())


@dataclass(frozen=True)
class Ring:
    """The consistent-hash ring of one upstream block: ``servers`` in their order in the
    block (the order only matters for ties), each with weight 1 unless ``weights`` says.

    Raises ValueError for an empty list, a duplicate server or a weight below 1.
    """

    servers: tuple[str, ...]
    _hashes: tuple[int, ...]
    _owners: tuple[str, ...]
    ties: int  # points collapsed into an equal one (nginx keeps one, unspecified which)

    @classmethod
    def of(cls, servers: Iterable[str], weights: Mapping[str, int] | None = None) -> Ring:
        names = tuple(servers)
        if not names:
            raise ValueError("a ring needs at least one server")
        if len(set(names)) != len(names):
            raise ValueError(f"a server is named twice: {', '.join(names)}")
        pairs: list[tuple[int, int, str]] = []
        for order, name in enumerate(names):
            weight = (weights or {}).get(name, 1)
            if weight < 1:
                raise ValueError(f"weight of {name} must be at least 1")
            pairs.extend((h, order, name) for h in server_points(name, weight))
        pairs.sort()
        hashes: list[int] = []
        owners: list[str] = []
        for h, _order, name in pairs:
            if hashes and hashes[-1] == h:
                continue
            hashes.append(h)
            owners.append(name)
        return cls(names, tuple(hashes), tuple(owners), len(pairs) - len(hashes))

    def owner(self, key: str) -> str:
        """The server nginx picks for ``key`` (``ngx_http_upstream_find_chash_point``)."""
        i = bisect.bisect_left(self._hashes, key_hash(key))
        return self._owners[i % len(self._owners)]

    def owners(self, keys: Iterable[str]) -> dict[str, str]:
        """``{key: owner}`` for each of ``keys``."""
        return {k: self.owner(k) for k in keys}


def parse_nodes(text: str) -> list[str]:
    """``HOST:PORT,HOST:PORT,…`` (``clusterNodes``, ``--from``/``--to``) as a list, in order.
    Raises ValueError for an empty list, an entry without a numeric port, or a duplicate."""
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    if not nodes:
        raise ValueError("name at least one node (HOST:PORT,…)")
    for node in nodes:
        host, sep, port = node.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{node!r}: expected HOST:PORT")
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is named twice")
    return nodes


def moves(placement: Mapping[str, str], new_servers: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Who moves when the node list becomes ``new_servers``: ``{user: (from, to)}`` for each
    user of ``placement`` (user -> the node that holds their data now) whose owner under the
    new ring is another node."""
    ring = Ring.of(new_servers)
    out: dict[str, tuple[str, str]] = {}
    for user, node in placement.items():
        target = ring.owner(user)
        if target != node:
            out[user] = (node, target)
    return out
