"""Listening sockets handed over by systemd: socket activation (``stcs.socket``).

With socket activation systemd (PID 1) owns the listening socket and passes it to each stcs
it starts; while one stcs stops and the next starts, the socket stays open and the kernel
holds new connections in its backlog instead of refusing them.  The protocol is
sd_listen_fds(3): ``LISTEN_PID`` (must be our pid, else the variables were meant for another
process), ``LISTEN_FDS`` (how many), the sockets at file descriptors 3, 4, …; the variables
are removed from the environment so that no child (chroma) takes them for its own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from stcs.errors import ConfigError

SD_LISTEN_FDS_START = 3  # sd-daemon.h
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The stream sockets systemd passed to this process (empty without socket activation).

    ``environ`` defaults to `os.environ`; the ``LISTEN_*`` variables are removed from it in
    every case (sd_listen_fds with ``unset_environment``).  The sockets are non-blocking and
    not inherited by children.

    Raises ConfigError when ``LISTEN_FDS`` is not a count or a passed descriptor is not a
    listening stream socket (a misconfigured ``stcs.socket``, e.g. ``ListenDatagram=``).
    """
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    for name in _VARIABLES:
        environ.pop(name, None)
    if not pid or not count or pid.strip() != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS: expected a count, got {count!r}") from None
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ConfigError(f"socket activation: descriptor {fd} is not a listening TCP socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def describe(sock: socket.socket) -> str:
    """``host:port`` a socket listens on (for the ``listening`` line)."""
    address = sock.getsockname()
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"{host}:{address[1]}"
    return str(address)
