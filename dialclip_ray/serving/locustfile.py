"""Locust users for /v1/retrieve: a steady stream of valid text dialogs (run by ``serving.loadtest``).

Only locust imports this file (``locust -f``); it runs in its own process because locust's gevent
patches sockets and must never share a process with Ray. Every request is appended to the JSON
Lines file ``$DIALCLIP_LOAD_LOG`` as ``{"t", "status", "ms", "partial"}`` (status 0: no answer
within ``$DIALCLIP_LOAD_TIMEOUT_S``), which is what the fault and autoscaling reports are built from.
"""

import json
import os
import random
import time

from locust import HttpUser, constant, events, task

WORDS = ("dog cat beach pizza sunset mountain car birthday cake guitar coffee rain city train flower baby "
         "party snow garden book lake bike friend photo look this my new today yesterday weekend").split()
LOG = open(os.environ["DIALCLIP_LOAD_LOG"], "a", buffering=1, encoding="utf-8")
PATH = os.environ.get("DIALCLIP_LOAD_PATH", "") + "/v1/retrieve"
TIMEOUT_S = float(os.environ.get("DIALCLIP_LOAD_TIMEOUT_S", "10"))
PARTIAL = os.environ.get("DIALCLIP_LOAD_ALLOW_PARTIAL", "0") == "1"


@events.test_start.add_listener
def _loopback_only(environment, **_):
    host = environment.host or ""
    if not host.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"load tests run against loopback only, not {host!r}")


class DialogUser(HttpUser):
    wait_time = constant(float(os.environ.get("DIALCLIP_LOAD_WAIT_S", "0.05")))

    @task
    def retrieve(self) -> None:
        rng = random.Random()
        turns = [{"speaker": i % 2, "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))}
                 for i in range(rng.randint(1, 4))]
        body = {"context": turns, "current": " ".join(rng.choices(WORDS, k=4)), "k": 5, "allow_partial": PARTIAL}
        t0 = time.time()
        status, partial = 0, False
        with self.client.post(PATH, json=body, timeout=TIMEOUT_S, catch_response=True, name="/v1/retrieve") as r:
            status = r.status_code or 0
            if status == 200:
                partial = bool(r.json().get("partial"))
                r.success()
            else:
                r.failure(f"HTTP {status}")
        LOG.write(json.dumps({"t": t0, "status": status, "ms": 1000 * (time.time() - t0), "partial": partial}) + "\n")
