"""The ports chroma children listen on, held by stcs while no child uses them (mechanism of the
launcher; docs/security.md, "Local users").

A process that *binds* a port — it need not listen — keeps every other process from binding it.
A local user binding every free port of ``childPortRange`` used to make every start fail (10 of
10 new users got 503 until it let go).  So with a range set, stcs holds every port of it that
no child of its own is using: a TCP socket bound to ``127.0.0.1:<port>``, never listening,
owned by stcs's uid, and **without** ``SO_REUSEADDR``.  That last point is the whole defence:
Linux lets two sockets share a port when both set ``SO_REUSEADDR`` and neither listens, so a
hold socket with it would let another uid bind — and then listen on — the port beside it.
Without it, another uid's bind of the port fails on ``127.0.0.1``, ``0.0.0.0`` or ``[::]``,
with or without ``SO_REUSEADDR``/``SO_REUSEPORT`` (checked as uid 65534:
tests/e2e/test_local_ports.py).

* `lend` gives a held port and its socket to a start.  The child inherits the socket and
  closes it right before chroma binds, once stcs has closed its own copy (the gate of
  `launcher.BOOTSTRAP`): the port is free only for chroma's own start-up (milliseconds).
  Who binds it in that window either makes the child fail to bind (the launcher retries on
  another port) or, listening, is refused by the readiness check (a listener of another uid is
  never taken for the child, `launcher.port_owned_by`).
* `give_back` binds the port again once its child has exited and no lease refers to it.
* `refill` (the supervisor's housekeeping, every `supervisor.HOUSEKEEPING_S`) binds every port of
  the range that is neither held nor lent: a port another process held becomes stcs's the moment
  it is let go, and stays stcs's.

What stcs cannot do is take a port another process holds: a range held whole *before* stcs
starts (or while it is down) blocks starts until it is let go.  stcs never moves a child outside
the range instead — the nftables rule protects that range only, so it would hand the tenant's
data to the very user who held the ports.  It says so (``child ports held by other processes``
at start, ``no free child port`` once per episode of failed starts, ``childPorts`` in
``/admin-health``, ``stcs_child_ports_foreign``).

Cost: one fd per port of the range (`check_fd_limit`).  Without a range, each child gets a port
the kernel picks (bind to port 0), handed over the same way, and nothing is held between
children: a user who binds most of the ephemeral range (net.ipv4.ip_local_port_range, ~28,000
ports) blocks every bind-to-0 on the host, stcs's among them — and without a range children are
not firewalled either, so local users are not kept out in that mode at all (docs/security.md).
"""

from __future__ import annotations

import random
import resource
import socket
from dataclasses import dataclass

import structlog

from stcs.errors import ConfigError, StartFailedError

log = structlog.get_logger("stcs.ports")

# Open files stcs needs beside the held ports at the least (logs, locks, listeners, sessions);
# `server.raise_fd_limit` adds what maxConnections needs.
FD_MARGIN = 1024


@dataclass(frozen=True, slots=True)
class PortCounts:
    """Ports of ``childPortRange`` (``size``; 0 without a range): ``held`` by stcs, ``lent`` to
    children (with or without a range), ``foreign``: neither, i.e. bound by another process."""

    size: int
    held: int
    lent: int
    foreign: int

    def as_json(self) -> dict[str, int]:
        return {"size": self.size, "held": self.held, "lent": self.lent, "foreign": self.foreign}


def check_fd_limit(ports: int) -> int:
    """Make sure stcs may open ``ports`` held sockets plus `FD_MARGIN` files: raise the soft
    open-files limit up to the hard one if needed.  Returns the soft limit in force.

    Raises ConfigError when the hard limit is too low (the range is too large for it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = ports + FD_MARGIN
    if hard != resource.RLIM_INFINITY and need > hard:
        raise ConfigError(
            f"childPortRange: {ports} ports, and stcs holds each with an open file; the "
            f"open-files hard limit is {hard} (needs {need}): raise it (systemd LimitNOFILE=, "
            "ulimit -Hn) or narrow the range"
        )
    if need > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    return soft


def _bind(port: int) -> socket.socket | None:
    """A socket bound to ``127.0.0.1:port`` with SO_REUSEADDR off (see the module), or None.

    A child's port is in TIME_WAIT for a minute after it exits (chroma closes its side of the
    probes' and requests' connections first), and a bind without SO_REUSEADDR fails on it while
    one with it succeeds — another uid's too.  So when the plain bind fails, bind with it and
    clear it at once: what counts when another socket binds is the option's value *then*
    (checked on Linux 6.18 as uid 65534, in every shape: tests/e2e/test_local_ports.py).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        return sock
    except OSError:
        sock.close()
    if port == 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError:
        sock.close()
        return None
    return sock


class PortHold:
    """The ports of ``port_range`` (inclusive; None: any port the kernel gives) as stcs holds
    and lends them.  Sockets are close-on-exec; a child gets one only through ``pass_fds``.

    Raises ConfigError (from `check_fd_limit`) when the range needs more open files than the
    hard limit allows.
    """

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self._range = port_range
        self._held: dict[int, socket.socket] = {}
        self.lent: set[int] = set()  # ports given to children not yet given back
        self._size = 0 if port_range is None else port_range[1] - port_range[0] + 1
        self._reported_foreign = False  # "child ports held by other processes" logged
        self._reported_exhausted = False  # "no free child port" logged for this episode
        if port_range is not None:
            check_fd_limit(self._size)
            if self.refill():
                counts = self.counts()
                log.warning(
                    "child ports held by other processes",
                    count=counts.foreign,
                    size=counts.size,
                    port_range=f"{port_range[0]}-{port_range[1]}",
                )
                self._reported_foreign = True

    def counts(self) -> PortCounts:
        held, lent = len(self._held), len(self.lent)
        if self._range is None:
            return PortCounts(0, 0, lent, 0)
        return PortCounts(self._size, held, lent, self._size - held - lent)

    def refill(self) -> int:
        """Bind every port of the range neither held nor lent (~5 µs a port); return how many
        are still bound by someone else."""
        if self._range is None:
            return 0
        first, last = self._range
        foreign = 0
        for port in range(first, last + 1):
            if port in self._held or port in self.lent:
                continue
            sock = _bind(port)
            if sock is None:
                foreign += 1
            else:
                self._held[port] = sock
        if not foreign and self._reported_foreign:
            self._reported_foreign = False
            log.info("child ports free again", size=self._size)
        return foreign

    def lend(self) -> tuple[int, socket.socket]:
        """A port for a new child and the socket holding it: the caller passes the socket to the
        child (which closes it just before chroma binds) and closes its own copy after the spawn.

        Raises StartFailedError when no port can be had (logged once per episode, with the
        number of ports held by other processes).
        """
        if self._range is None:
            return self._lend_any()
        if not self._held:
            self.refill()  # one let go since the last housekeeping?
        if not self._held:
            counts = self.counts()
            if not self._reported_exhausted:
                self._reported_exhausted = True
                log.error(
                    "no free child port",
                    held_by_others=counts.foreign,
                    lent=counts.lent,
                    size=counts.size,
                )
            raise StartFailedError("no free port for the user's chroma server")
        self._reported_exhausted = False
        port = random.choice(list(self._held))
        sock = self._held.pop(port)
        self.lent.add(port)
        return port, sock

    def _lend_any(self) -> tuple[int, socket.socket]:
        for _ in range(100):
            sock = _bind(0)
            if sock is None:
                break
            port: int = sock.getsockname()[1]
            # A port given back by the kernel may still be lent: its child has exited but a
            # request lease refers to it (`launcher.Child.release`).
            if port not in self.lent:
                self.lent.add(port)
                return port, sock
            sock.close()
        raise StartFailedError("no free port for the user's chroma server")

    def give_back(self, port: int) -> None:
        """``port``'s child has exited and no lease refers to it: hold it again (when it is in
        the range and can be bound; otherwise `refill` retries)."""
        self.lent.discard(port)
        if self._range is not None and self._range[0] <= port <= self._range[1]:
            sock = _bind(port)
            if sock is not None:
                self._held[port] = sock

    def close(self) -> None:
        """Let every held port go (shutdown)."""
        for sock in self._held.values():
            sock.close()
        self._held.clear()
