"""The fastest real stand-in for chroma that stcs can supervise: started through
`chromaCommand` as ``heartbeat.py run --host H --path P --port N`` (run with ``python -S``:
~20 ms to its first answer), it answers every request ``200 {}`` and closes.  It writes one
line to its output, as chroma would, so a log file exists.  For tests that need many real
starts and stops (the supervisor's and launcher's bookkeeping), never for chroma's
behaviour."""

import socket
import sys

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(64)
print(f"listening on {port}", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
