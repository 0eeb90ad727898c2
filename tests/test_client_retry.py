"""The retrying client (serving/client.py) against a real HTTP server on 127.0.0.1 that fails on purpose."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dialclip_ray.serving.client import retrieve


class Script:
    """The statuses the server answers in order (the last one repeats), and what it saw."""

    def __init__(self, statuses: list[tuple[int, dict]]):
        self.statuses, self.seen = statuses, []


@pytest.fixture()
def server():
    script = Script([])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            script.seen.append((time.monotonic(), body))
            status, headers = script.statuses[min(len(script.seen), len(script.statuses)) - 1]
            payload = json.dumps({"hits": [], "n": len(script.seen)} if status == 200 else {"error": "down"}).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/retrieve", script
    httpd.shutdown()
    httpd.server_close()


def test_a_503_with_retry_after_is_retried_after_the_hinted_wait(server):
    url, script = server
    script.statuses = [(503, {"Retry-After": "1"}), (200, {})]
    answer = retrieve(url, {"context": []}, timeout=5, retries=3, backoff_s=0.01, rng=random.Random(0))
    assert answer.status == 200 and answer.body["n"] == 2 and answer.attempts == 2
    assert answer.waits_s == [1.0]  # the server's hint, not the 10 ms backoff
    assert script.seen[1][0] - script.seen[0][0] >= 0.95
    assert script.seen[0][1] == script.seen[1][1] == {"context": []}  # the same request resent


def test_persistent_5xx_gives_up_after_the_retries_and_4xx_is_not_retried(server):
    url, script = server
    script.statuses = [(500, {})]
    answer = retrieve(url, {}, timeout=5, retries=2, backoff_s=0.01)
    assert answer.status == 500 and answer.attempts == 3 and len(script.seen) == 3 and len(answer.waits_s) == 2
    script.seen.clear()
    script.statuses = [(422, {})]
    answer = retrieve(url, {}, timeout=5, retries=5)
    assert answer.status == 422 and answer.attempts == 1 and len(script.seen) == 1


def test_a_refused_connection_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = retrieve(f"http://127.0.0.1:{port}/v1/retrieve", {}, timeout=2, retries=2, backoff_s=0.01)
    assert answer.status == 0 and answer.attempts == 3 and "cannot reach" in answer.body["error"]
