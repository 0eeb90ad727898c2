"""Locust users for /v1/retrieve: a steady stream of valid text dialogs (run by ``serving.loadtest``).

Only locust imports this file (``locust -f``); it runs in its own process because locust's gevent
patches sockets and must never share a process with Ray. With ``$DIALCLIP_LOAD_RETRIES`` > 0 a user
retries a 5xx or a dropped connection as ``dialclip query`` does (``serving.client.retry_wait``:
backoff with jitter, at least Retry-After). Every request is appended to the JSON Lines file
``$DIALCLIP_LOAD_LOG`` as ``{"t", "status", "statuses", "ms", "partial", "index_version",
"hit_versions"}`` (status: the last attempt's, 0 = no answer within ``$DIALCLIP_LOAD_TIMEOUT_S``;
statuses: every attempt's), which is what the fault, swap and autoscaling reports are built from.
"""

import json
import os
import random
import time

from locust import HttpUser, constant, events, task

from dialclip_ray.serving.client import RETRY_STATUSES, retry_wait

WORDS = ("dog cat beach pizza sunset mountain car birthday cake guitar coffee rain city train flower baby "
         "party snow garden book lake bike friend photo look this my new today yesterday weekend").split()
LOG = open(os.environ["DIALCLIP_LOAD_LOG"], "a", buffering=1, encoding="utf-8")
PATH = os.environ.get("DIALCLIP_LOAD_PATH", "") + "/v1/retrieve"
TIMEOUT_S = float(os.environ.get("DIALCLIP_LOAD_TIMEOUT_S", "10"))
PARTIAL = os.environ.get("DIALCLIP_LOAD_ALLOW_PARTIAL", "0") == "1"
RETRIES = int(os.environ.get("DIALCLIP_LOAD_RETRIES", "0"))
BACKOFF_S = float(os.environ.get("DIALCLIP_LOAD_BACKOFF_S", "0.2"))
MAX_WAIT_S = 5.0


@events.test_start.add_listener
def _loopback_only(environment, **_):
    host = environment.host or ""
    if not host.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"load tests run against loopback only, not {host!r}")


RNG = random.Random()


class DialogUser(HttpUser):
    wait_time = constant(float(os.environ.get("DIALCLIP_LOAD_WAIT_S", "0.05")))

    @task
    def retrieve(self) -> None:
        rng = random.Random()
        turns = [{"speaker": i % 2, "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))}
                 for i in range(rng.randint(1, 4))]
        body = {"context": turns, "current": " ".join(rng.choices(WORDS, k=4)), "k": 5, "allow_partial": PARTIAL}
        t0 = time.time()
        statuses, partial, version, hit_versions = [], False, None, []
        for attempt in range(RETRIES + 1):
            with self.client.post(PATH, json=body, timeout=TIMEOUT_S, catch_response=True, name="/v1/retrieve") as r:
                status = r.status_code or 0
                statuses.append(status)
                headers = dict(r.headers or {})
                if status == 200:
                    answer = r.json()
                    partial, version = bool(answer.get("partial")), answer.get("index_version")
                    hit_versions = sorted({str(h.get("metadata", {}).get("version")) for h in answer["hits"]})
                    r.success()
                else:
                    r.failure(f"HTTP {status}")
            if (status not in RETRY_STATUSES and status != 0) or attempt == RETRIES:
                break
            time.sleep(retry_wait(attempt, headers, BACKOFF_S, MAX_WAIT_S, RNG))  # gevent-patched: yields
        LOG.write(json.dumps({"t": t0, "status": statuses[-1], "statuses": statuses, "ms": 1000 * (time.time() - t0),
                              "partial": partial, "index_version": version, "hit_versions": hit_versions}) + "\n")
