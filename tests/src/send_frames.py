"""Sends Ethernet frames exactly as given, through a packet socket bound to one interface: no
header of the kernel's is added or checked, so a test can send frames that no socket of a
higher layer would let through (an IPv4 header shorter than 20 bytes, a header that ends the
packet).

Usage: send_frames.py INTERFACE HEX_FRAME...

Prints the number of frames sent."""
import socket
import sys

INTERFACE = sys.argv[1]
FRAMES = [bytes.fromhex(f) for f in sys.argv[2:]]

with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind((INTERFACE, 0))
    for frame in FRAMES:
        if s.send(frame) != len(frame):
            sys.exit(f"short send of a {len(frame)}-byte frame")
print(len(FRAMES))
