"""A client that opens one connection per request, always from the same address and port
(SO_REUSEADDR and bind), as some clients and proxies do: every connection has the same 4-tuple.

Usage: one_port_client.py LOCAL_IP LOCAL_PORT SERVER_IP SERVER_PORT PATH...

Each path is fetched with `GET PATH HTTP/1.1` and `Connection: close` on a new connection,
read until the server closes, then the next. Prints one line per request: the local address
the connection left from, and the status line of the answer."""
import errno
import socket
import sys
import time

LOCAL_IP, LOCAL_PORT = sys.argv[1], int(sys.argv[2])
SERVER_IP, SERVER_PORT = sys.argv[3], int(sys.argv[4])
PATHS = sys.argv[5:]


def connect():
    # The previous connection on this 4-tuple may still be closing (LAST_ACK) for a moment:
    # connect() then fails with EADDRNOTAVAIL until its last ACK arrives.
    for _ in range(500):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LOCAL_IP, LOCAL_PORT))
        try:
            s.connect((SERVER_IP, SERVER_PORT))
            return s
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            time.sleep(0.01)
    sys.exit(f"{LOCAL_IP}:{LOCAL_PORT} stayed in use")


for path in PATHS:
    s = connect()
    s.settimeout(30)
    local = "%s:%d" % s.getsockname()
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {SERVER_IP}\r\nUser-Agent: one-port-client\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    s.close()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    print(local, status, flush=True)
