"""A client for the retrieval endpoint that retries what is safe to retry (the standard library only).

Retrieval is read-only, so a request that failed with 500, 502, 503 or 504, or whose connection
was refused or dropped, can be sent again. ``retrieve`` does so with exponential backoff and full
jitter, and waits at least what the server's ``Retry-After`` asks (bounded by ``max_wait_s``): the
ingress sends one with every 503 (a shard or the encoder is down, or the service is cooling off).
A 4xx is the caller's mistake and is returned at once. ``dialclip query`` uses this; docs/serving.md
shows the same loop for other clients.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({500, 502, 503, 504})


@dataclass
class Answer:
    status: int                 # the last HTTP status (0: never reached the server)
    body: dict                  # its JSON body ({"error": ...} when it was not JSON)
    attempts: int               # requests sent
    waits_s: list[float] = field(default_factory=list)  # the pauses between them


def post_json(url: str, body: dict, timeout: float) -> tuple[int, dict, dict]:
    """(status, JSON answer, response headers) of one POST."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, headers = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        status, raw, headers = err.code, err.read(), dict(err.headers or {})
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, {"error": raw[:500].decode(errors="replace")}, headers


def _retry_after(headers: dict) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by our server; fall back to backoff
        return None


def retry_wait(attempt: int, headers: dict, backoff_s: float, max_wait_s: float, rng: random.Random) -> float:
    """Seconds before retry ``attempt + 1``: full-jitter exponential backoff, at least the server's
    ``Retry-After``, at most ``max_wait_s`` (also what the chaos run's locust users wait)."""
    wait = rng.uniform(0, backoff_s * 2 ** attempt)  # full jitter: clients do not retry in lockstep
    return min(max_wait_s, max(wait, _retry_after(headers) or 0.0))


def retrieve(url: str, body: dict, timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
             max_wait_s: float = 10.0, rng: random.Random | None = None) -> Answer:
    """POST ``body`` to ``url``; retry 5xx and connection failures up to ``retries`` times."""
    rng = rng or random.Random()
    waits: list[float] = []
    status, out = 0, {"error": "not sent"}
    for attempt in range(retries + 1):
        headers: dict = {}
        try:
            status, out, headers = post_json(url, body, timeout)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            status, out = 0, {"error": f"cannot reach {url}: {getattr(err, 'reason', err)}"}
        if status not in RETRY_STATUSES and status != 0:
            return Answer(status, out, attempt + 1, waits)
        if attempt == retries:
            break
        wait = retry_wait(attempt, headers, backoff_s, max_wait_s, rng)
        waits.append(round(wait, 3))
        time.sleep(wait)
    return Answer(status, out, retries + 1, waits)
