"""A small JSON service for the comparison tests: the same app deployed as live, baseline and
candidate. Responses carry a random request id and a timestamp (noise); the candidate has a
regression on POST /refunds (total 10 % high) and is three times slower on GET /slow."""
import json
import random
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, VARIANT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BASE_DELAY = 0.02


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without this, Nagle holds the body back until the
    # client's delayed ACK, adding 40 ms to every live answer.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, body, delay=BASE_DELAY):
        time.sleep(delay)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def noise(self):
        return {"request_id": str(uuid.uuid4()), "timestamp": time.time()}

    def do_GET(self):
        if self.path.startswith("/users/"):
            n = self.path.rsplit("/", 1)[-1]
            self.reply({"id": n, "name": "user-" + n, "plan": "gold", **self.noise()})
        elif self.path == "/slow":
            delay = BASE_DELAY * (3 if VARIANT == "candidate" else 1)
            self.reply({"ok": True, "items": [1, 2, 3], **self.noise()}, delay)
        else:
            self.reply({"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        amount = float(body.get("amount", 0))
        total = amount * (1.1 if VARIANT == "candidate" else 1.0)
        self.reply({"refund_id": random.randrange(1 << 30), "total": round(total, 2),
                    "currency": "EUR", **self.noise()})


ThreadingHTTPServer((HOST, PORT), App).serve_forever()
