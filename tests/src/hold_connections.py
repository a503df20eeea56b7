"""Holds many TCP connections to one server, as a client that wants to keep a server's
connection slots does: IDLE connections that send nothing, and SLOW ones that send a request
head a few bytes at a time and never finish it (slowloris).

Usage: hold_connections.py SERVER_IP SERVER_PORT IDLE SLOW

Starts every connect without waiting (a server that stops accepting fills its backlog, and the
connects beyond it hang), waits until each has connected or failed, at most 5 s, and prints
`held N`: how many connected. Then, until stdin closes, sends one more header byte every 100 ms
on each SLOW connection the server has not closed. It never reconnects."""
import resource
import select
import socket
import sys
import time

SERVER = (sys.argv[1], int(sys.argv[2]))
IDLE, SLOW = int(sys.argv[3]), int(sys.argv[4])

# One descriptor per connection, beyond the usual soft limit of 1024.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

socks = []
for _ in range(IDLE + SLOW):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(SERVER)
    socks.append(s)

poller = select.poll()
by_fd = {}
for s in socks:
    poller.register(s, select.POLLOUT)
    by_fd[s.fileno()] = s
connected = set()
deadline = time.monotonic() + 5
while by_fd and time.monotonic() < deadline:
    for fd, _ in poller.poll(100):
        s = by_fd.pop(fd)
        poller.unregister(fd)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            connected.add(s)
print(f"held {len(connected)}", flush=True)

slow = [s for s in socks[IDLE:] if s in connected]
for s in slow:
    try:
        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    except OSError:
        pass
stdin = select.poll()
stdin.register(sys.stdin, select.POLLIN | select.POLLHUP)
n = 0
while not stdin.poll(100):
    n += 1
    for s in list(slow):
        try:
            s.send(b"x-%d: y\r\n" % n)
        except OSError:
            # The server closed it: it stays closed.
            slow.remove(s)
