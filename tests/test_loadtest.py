"""The load-test log summary that fault reports are built from (requests, 5xx, failures, recovery)."""

from __future__ import annotations

import pytest

from dialclip_ray.serving.loadtest import start_locust, summarize


def test_summary_counts_and_recovery():
    rows = [{"t": 0.0, "status": 200, "ms": 10.0}, {"t": 1.0, "status": 200, "ms": 12.0},
            {"t": 2.0, "status": 503, "ms": 5.0}, {"t": 2.5, "status": 200, "ms": 20.0, "partial": True},
            {"t": 3.0, "status": 0, "ms": 10000.0}, {"t": 14.0, "status": 200, "ms": 11.0}]
    s = summarize(rows, fault_t=1.5)
    assert (s["requests_sent"], s["requests_5xx"], s["requests_failed"], s["requests_lost"]) == (6, 1, 3, 2)
    assert s["requests_partial"] == 1 and s["requests_no_answer"] == 1
    assert s["recovery_s"] == pytest.approx(3.0 + 10.0 - 1.5)  # the unanswered request ended last
    assert s["answered_after_recovery"] == 1 and s["status_counts"] == {"0": 1, "200": 4, "503": 1}
    assert summarize(rows[:2], fault_t=0.5)["recovery_s"] == 0.0


def test_retried_5xx_count_at_the_server_and_lost_only_after_the_retries():
    rows = [{"t": 0.0, "status": 200, "statuses": [503, 200], "ms": 30.0},
            {"t": 1.0, "status": 500, "statuses": [500, 503, 500], "ms": 90.0},
            {"t": 2.0, "status": 200, "ms": 10.0}]  # a log without retries: status is its only attempt
    s = summarize(rows)
    assert (s["requests_sent"], s["attempts"], s["requests_5xx"], s["requests_lost"]) == (3, 6, 4, 1)


def test_load_goes_to_loopback_only(tmp_path):
    with pytest.raises(ValueError, match="loopback only"):
        start_locust("http://example.com:8000", tmp_path / "log.jsonl")


@pytest.mark.parametrize("retries", [0, 2])
def test_locust_run_logs_every_request(tmp_path, retries):
    """locust itself, headless for 3 s with 2 users, against a loopback HTTP server (with retries:
    one that fails every other request, so each logged request took two attempts and none is lost)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dialclip_ray.serving.loadtest import read_log, stop_locust

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            fail = retries and len(seen) % 2 == 1  # with retries: every first attempt is a 503
            data = json.dumps({"error": "down"} if fail else {"hits": [], "partial": False}).encode()
            self.send_response(503 if fail else 200)
            if fail:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        log = tmp_path / "requests.jsonl"
        proc = start_locust(f"http://127.0.0.1:{server.server_port}", log, users=2 - bool(retries), seconds=3,
                            path="/app", retries=retries)
        stop_locust(proc, timeout_s=60)
    finally:
        server.shutdown()
    rows = read_log(log)
    assert rows and all(r["status"] == 200 and not r["partial"] for r in rows)
    assert sum(len(r["statuses"]) for r in rows) == len(seen)
    assert all(r["statuses"] == ([503, 200] if retries else [200]) for r in rows), rows[:3]
    assert summarize(rows)["requests_lost"] == 0
    assert all(b["context"] and b["k"] == 5 for b in seen)
