"""Who listens on a local TCP port: the kernel's own answer, by netlink ``sock_diag``.

`listener_uids` asks for the IPv4 TCP sockets in state LISTEN (``SOCK_DIAG_BY_FAMILY``, a
``struct inet_diag_req_v2`` with ``idiag_states = 1 << TCP_LISTEN``; ``linux/inet_diag.h``,
``sock_diag(7)``) and reads the owner uid of those on the port.  The kernel walks only its
table of listening sockets: ~0.1 ms whatever the number of connections on the host, where
reading ``/proc/net/tcp`` (psutil's way) walks every connection bucket (~7 ms here, 55 ms with
17,000 sockets) and holds the GIL to parse it.  No library exposes this query at that cost
(pyroute2's ``DiagSocket`` does, but takes ~190 ms to import).

Linux only, like the rest of stcs (``PR_SET_PDEATHSIG``, ``/proc``).
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes, zero:
# a dump filtered by state only).
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian), src[16],
# dst[16], if, cookie[2]; then expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBBHH16s16sIIIIIIII")
_SPORT, _SRC, _UID = 4, 6, 14


def _request(seq: int) -> bytes:
    body = _REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
    head = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return head + body


def listener_uids(port: int, timeout_s: float = 1.0, reaching: str | None = None) -> list[int]:
    """The owner uids of the IPv4 TCP sockets listening on ``port`` (none: ``[]``): on any
    local address, or with ``reaching`` (an IPv4 address) only those a connection to it
    reaches — bound to it or to ``0.0.0.0`` (a listener on ``127.0.0.2`` gets nothing sent to
    ``127.0.0.1``).  Blocking, about 0.1 ms.  Raises OSError when the kernel cannot answer
    (no ``sock_diag``: a kernel without ``CONFIG_INET_DIAG``)."""
    wanted = None if reaching is None else (socket.inet_aton(reaching), bytes(4))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(timeout_s)
        seq = os.getpid() & 0xFFFF
        sock.sendall(_request(seq))
        uids: list[int] = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return uids  # malformed: never loop on it
                if kind == NLMSG_DONE:
                    return uids
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-errno, os.strerror(-errno))
                if kind == SOCK_DIAG_BY_FAMILY:
                    fields = _MSG.unpack_from(data, offset + _NLMSGHDR.size)
                    if socket.ntohs(fields[_SPORT]) == port and (
                        wanted is None or fields[_SRC][:4] in wanted
                    ):
                        uids.append(fields[_UID])
                offset += (length + 3) & ~3  # NLMSG_ALIGN
