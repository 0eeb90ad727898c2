"""The HTTP ingress: validate, encode (QueryEncoder), fan out to every shard, merge with FAISS.

Nothing a client sends gets a 5xx: the body is read with a byte cap and a read deadline
(slow or partial bodies get 408 and cannot hold the replica), decoded and validated in a
thread (UTF-8, JSON, then ``RetrieveRequest``, whose schema the OpenAPI document states),
and every other problem is a JSON ``ErrorResponse`` naming the field. Shards that miss
their deadline are named: 503 by default, or flagged partial results when the request
sets ``allow_partial``. A shard (or the encoder) whose call failed -- its replica died --
is known to be down: it is skipped, so requests are answered at once instead of each
waiting the full timeout, and probed in the background every ``cooloff_s`` until it
answers again. Only ``await`` is used on handles (never ``.result()``).

No lost requests: encoder and shard calls are idempotent, so a call whose replica died
(``RayActorError``/``ActorDiedError``, ``ActorUnavailableError``) is sent once more, which
Serve routes to a live replica; only a second failure marks the deployment down. A
shard that misses the request's deadline is a 504 naming it; a deployment that is down
a 503 with ``Retry-After``. ``/healthz`` says the ingress answers; ``/readyz`` that the
encoder and every shard answer a ping now. Every answer names the index version it came
from; with a version root as ``index_dir`` the ingress follows ``ROOT/CURRENT`` (or the
token-guarded ``POST /admin/index``), pre-loading the new version on every shard before
pinning new requests to it (``shard.py``).
"""

import asyncio
import hmac
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dialclip_ray.errors import format_validation_error
from dialclip_ray.index import merge_topk
from dialclip_ray.serving.schemas import (B64_PATTERN, BatchItem, BatchRequest, BatchResponse, ErrorResponse, Hit,
                                          ReadyResponse, RetrieveRequest, RetrieveResponse, SwapRequest)

logger = logging.getLogger("ray.serve")

api = FastAPI(title="DialCLIP retrieval", version="1",
              description="Multi-modal dialog retrieval: a dialog in, the top-k images or texts out.")

_ERRORS = {
    400: "the body is empty, not UTF-8 or not JSON, or Content-Length is invalid",
    408: "the body did not arrive in time (a pause or the whole upload took too long)",
    413: "the body is larger than the app's max_body_bytes",
    415: "the content type is not application/json",
    422: "the request breaks a rule of the schema, names an image id that is not in the index's corpora, "
         "or carries an image that does not decode or is over the pixel budgets",
    503: "the query encoder or some shards are down (missing_shards names the shards); retry after Retry-After",
    504: "shards missed the request's deadline, or the encoder the app's (missing_shards names the shards)",
}
_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
_BATCH_ERRORS = {c: t for c, t in _ERRORS.items() if c < 500}
_BATCH_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in _BATCH_ERRORS.items()}


def _body(model: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model}"}}}}}


_BODY, _BATCH_BODY = _body("RetrieveRequest"), _body("BatchRequest")
_MAX_MESSAGE = 2000
_THREAD_PARSE_BYTES = 64 * 1024  # bodies above this are decoded and validated in a thread


def _register_request_schema() -> None:
    """The body is parsed by hand (byte cap first), so put its schema in the OpenAPI document ourselves."""
    original = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (RetrieveRequest, BatchRequest):
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(defs.pop("$defs", {}))
                components[model.__name__] = defs
        return api.openapi_schema

    api.openapi = openapi


_register_request_schema()


def _error(status: int, message: str, missing: list[str] | None = None,
           retry_after_s: float | None = None, close: bool = False) -> JSONResponse:
    """The JSON error answer; ``close`` asks the server to close the connection (a body left unread)."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot break JSON
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + " ..."
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse(ErrorResponse(error=message, missing_shards=missing).model_dump(exclude_none=True),
                        status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))  # 404, 405... in the same error model


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error ({type(exc).__name__}); the request was not at fault")


async def read_body(request: Request, limit: int, timeout_s: float = 30.0,
                    idle_timeout_s: float = 5.0) -> bytes | JSONResponse:
    """The body, or a 4xx response: declared or actual size above ``limit`` -> 413 (with or without
    Content-Length); no chunk for ``idle_timeout_s`` or not complete after ``timeout_s`` -> 408."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return _error(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            return _error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", close=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(idle_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            total = f" of {declared}" if declared is not None else ""
            return _error(408, f"request body not received in time: {size}{total} bytes after "
                               f"{timeout_s - max(0.0, deadline - loop.time()):.1f} s (a pause over "
                               f"{idle_timeout_s:g} s or an upload over {timeout_s:g} s)", close=True)
        except ClientDisconnect:
            return _error(400, f"client disconnected after {size} bytes of the body", close=True)
        size += len(chunk)
        if size > limit:
            return _error(413, f"request body exceeds the limit of {limit} bytes", close=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(err: ValidationError) -> str:
    message = format_validation_error(err, "invalid request", root="body")
    return (message.replace("Value error, ", "")
            .replace(f"String should match pattern '{B64_PATTERN}'",
                     "not standard base64 (A-Z a-z 0-9 + /, padded with '=', no whitespace; optionally "
                     "after data:image/png|jpeg|webp;base64,)"))


def _never_assigned(response) -> bool:
    """Whether a handle call is still waiting for a replica to take it (none running, or all busy).

    Reads private state of Serve's ``DeploymentResponse`` (defensively: False when it is not there)."""
    future = getattr(response, "_replica_result_future", None)
    return future is not None and not future.done()


def parse_request(body: bytes, model: type = RetrieveRequest) -> RetrieveRequest | tuple[int, str]:
    """The validated request (``model``), or (status, message): 400 for bytes that are not UTF-8 JSON, 422
    for JSON that breaks the schema (each offending field named as a dotted path)."""
    if not body.strip():
        return 400, "body is empty: expected a JSON object (see RetrieveRequest in /openapi.json)"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return 400, f"body is not valid UTF-8: byte 0x{body[err.start]:02x} at offset {err.start}"
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        syntax = [e for e in err.errors(include_url=False) if e["type"] == "json_invalid"]
        if syntax:
            return 400, "body is not valid JSON: " + syntax[0]["msg"].removeprefix("Invalid JSON: ")
        return 422, _validation_message(err)


class Cooloff:
    """A downstream deployment (the encoder, a shard) that is known to be down.

    A failed call (its replica died, the handle raised) marks it down: callers skip it and answer at
    once, and a background task probes it every ``cooloff_s`` (each probe bounded by ``probe_timeout_s``)
    until one answers, which marks it up again. Timeouts alone do not mark it down (a slow shard is
    still asked, within each request's deadline)."""

    def __init__(self, name: str, probe: Callable[[], Awaitable[Any]], cooloff_s: float, probe_timeout_s: float,
                 on_down: Callable[[str], None] | None = None):
        self.name, self.probe, self.cooloff_s, self.probe_timeout_s = name, probe, cooloff_s, probe_timeout_s
        self.on_down = on_down
        self.down_since: float | None = None
        self.reason = ""
        self._task: asyncio.Task | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, err: BaseException) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        self.reason = str(err) if isinstance(err, TimeoutError) and str(err) else type(err).__name__
        logger.warning("%s failed (%s: %s): skipped and probed every %g s", self.name, self.reason, err,
                       self.cooloff_s)
        if self.on_down is not None:
            self.on_down(self.name)
        self._task = asyncio.get_running_loop().create_task(self._probe_until_up())

    def answered(self) -> None:
        """A call or ping got through (e.g. /readyz's): it is up now, without waiting for the next probe."""
        if self.down_since is None:
            return
        logger.info("%s answers again after %.1f s", self.name, time.monotonic() - self.down_since)
        if self._task is not None:
            self._task.cancel()
        self.down_since, self._task = None, None

    def describe(self) -> str:
        return (f"{self.name} is down (for {time.monotonic() - (self.down_since or 0):.1f} s: {self.reason}; "
                f"probed every {self.cooloff_s:g} s)")

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self.cooloff_s)
            try:
                await asyncio.wait_for(self.probe(), self.probe_timeout_s)
            except Exception as err:  # still down (or being replaced): try again after the next cool-off
                self.reason = (f"no answer to a probe within {self.probe_timeout_s:g} s"
                               if isinstance(err, asyncio.TimeoutError) else f"a probe failed ({type(err).__name__})")
                continue
            self._task = None  # this task ends here: nothing to cancel
            self.answered()
            return



def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean "the replica died", not "the request failed": the call is safe to send again."""
    from ray import exceptions as rx

    return tuple(t for t in (getattr(rx, "RayActorError", None), getattr(rx, "ActorDiedError", None),
                             getattr(rx, "ActorUnavailableError", None)) if t is not None)


RETRYABLE = _retryable()
ADMIN_TOKEN_ENV = "DIALCLIP_ADMIN_TOKEN"
PREWARM_CALLS = 4  # load calls per shard deployment on a swap: Serve spreads them over its replicas


class Failure(Exception):
    """A request that cannot be answered: becomes the JSON error (or a batch item's error)."""

    def __init__(self, status: int, message: str, missing: list[str] | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.missing, self.retry_after_s = status, message, missing, retry_after_s

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.missing, self.retry_after_s)


@dataclass(frozen=True)
class IndexVersion:
    """The index version requests are pinned to: its id, directory (server-side), shards and knob bounds."""

    id: str
    directory: str
    shards_per_target: dict[str, int]
    knobs: dict[str, dict]  # target -> {knob: KnobBounds}
    kinds: dict[str, str]
    manifests: dict[str, dict]

    @classmethod
    def load(cls, directory: str, identity: dict[str, Any], deployments: int) -> "IndexVersion":
        from dialclip_ray.index.layout import IndexLayout, IndexMismatchError

        layout = IndexLayout.load(directory)
        if layout.identity != identity:
            raise IndexMismatchError(f"index {layout.index_id} was built from another checkpoint than the app "
                                     f"serves; changing checkpoints needs a redeploy (serve deploy)")
        over = {t: len(m.shards) for t, m in layout.manifests.items() if len(m.shards) > deployments}
        if over:
            raise ValueError(f"index {layout.index_id} has more shards {over} than the app's {deployments} Shard "
                             f"deployments; a different shard count needs a redeploy (serve deploy)")
        return cls(layout.index_id, str(layout.directory), {t: len(m.shards) for t, m in layout.manifests.items()},
                   {t: dict(m.search) for t, m in layout.manifests.items()},
                   {t: m.kind for t, m in layout.manifests.items()},
                   {t: m.model_dump(mode="json") for t, m in layout.manifests.items()})


@serve.deployment(name="RetrievalIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class RetrievalIngress:
    def __init__(self, encoder, shards: list, settings: dict[str, Any], info: dict[str, Any]):
        from dialclip_ray.serving.metrics import IngressMetrics

        self.encoder = encoder
        self.shards = list(shards)
        self.settings = settings
        self.info = dict(info)
        self.metrics = IngressMetrics()
        self.index = IndexVersion.load(settings["index_dir"], settings["identity"], len(self.shards))
        self.info["index_version"] = self.index.id
        self.metrics.index_version.set(1, tags={"version": self.index.id})
        self.root = settings.get("index_root")
        self.admin_token = settings.get("admin_token") or os.environ.get(ADMIN_TOKEN_ENV) or None
        self._swap_lock: asyncio.Lock | None = None
        self._watch: asyncio.Task | None = None
        self._bad_versions: set[str] = set()
        cooloff = settings.get("cooloff_s", 2.0)

        def down(name: str) -> None:
            self.metrics.shard_down.inc(tags={"callee": name})

        self.encoder_state = Cooloff("QueryEncoder", self._probe(self.encoder), cooloff,
                                     settings["encoder_timeout_s"], down)
        self.shard_states = [Cooloff(f"Shard{i}", self._probe(s), cooloff, settings["shard_timeout_s"], down)
                             for i, s in enumerate(self.shards)]

    @staticmethod
    def _probe(handle) -> Callable[[], Awaitable[Any]]:
        async def ping():
            return await handle.ping.remote()
        return ping

    # --- health ---------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: this ingress process answers (says nothing about the encoder or the shards)."""
        return {"status": "ok"}

    @api.get("/readyz", response_model=ReadyResponse,
             responses={503: {"model": ErrorResponse, "description": "the encoder or some shards do not answer "
                                                                    "a ping now (the error names them)"}})
    async def readyz(self):
        """Readiness: the encoder and every shard answer a ping within ``ready_timeout_s`` now."""
        self._ensure_watch()
        timeout = self.settings.get("ready_timeout_s", 2.0)
        names = ["QueryEncoder"] + [f"Shard{i}" for i in range(len(self.shards))]
        responses = [h.ping.remote() for h in [self.encoder, *self.shards]]
        tasks = [asyncio.ensure_future(self._await(r)) for r in responses]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        why, missing = [], []
        for name, state, task, response in zip(names, [self.encoder_state, *self.shard_states], tasks, responses):
            if task in pending:
                task.cancel()
                response.cancel()
                why.append(f"{name} (no answer within {timeout:g} s)")
            elif task.exception() is not None:
                why.append(f"{name} ({type(task.exception()).__name__})")
            else:  # it answers: a cool-off of its own ends now, so "ready" means requests are served in full
                state.answered()
                continue
            if name.startswith("Shard"):
                missing.append(name)
        status = 200 if not why else 503
        self.metrics.request("/readyz", status)
        if why:
            return _error(503, "not ready: " + ", ".join(why) + " do not answer", missing or None,
                          retry_after_s=timeout)
        return ReadyResponse(status="ready", index_version=self.index.id)

    @api.get("/v1/info")
    async def get_info(self) -> dict:
        return self.info

    # --- retrieval ------------------------------------------------------------------------------------------

    async def _read(self, request: Request, model: type):
        ctype = request.headers.get("content-type", "application/json")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise Failure(415, f"content-type must be application/json, got {ctype!r}")
        body = await read_body(request, self.settings["max_body_bytes"], self.settings.get("body_timeout_s", 30.0),
                               self.settings.get("body_idle_timeout_s", 5.0))
        if isinstance(body, JSONResponse):
            return body
        parsed = (await asyncio.to_thread(parse_request, body, model) if len(body) > _THREAD_PARSE_BYTES
                  else parse_request(body, model))
        if isinstance(parsed, tuple):
            raise Failure(*parsed)
        return parsed

    @api.post("/v1/retrieve", response_model=RetrieveResponse, responses=_RESPONSES, openapi_extra=_BODY)
    async def retrieve(self, request: Request):
        t0 = time.perf_counter()
        self._ensure_watch()
        try:
            req = await self._read(request, RetrieveRequest)
            if isinstance(req, JSONResponse):
                self.metrics.request("/v1/retrieve", req.status_code)
                return req
            out = await self._answer(req, self.index, t0)
        except Failure as f:
            self.metrics.request("/v1/retrieve", f.status)
            return f.response()
        self.metrics.request("/v1/retrieve", 200)
        return out

    @api.post("/v1/retrieve/batch", response_model=BatchResponse, responses=_BATCH_RESPONSES,
              openapi_extra=_BATCH_BODY)
    async def retrieve_batch(self, request: Request):
        """Several dialogs in one body, answered concurrently (the encoder and the shards batch them); each
        item carries the status and answer /v1/retrieve would give it, all from one index version."""
        t0 = time.perf_counter()
        self._ensure_watch()
        try:
            batch = await self._read(request, BatchRequest)
            if isinstance(batch, JSONResponse):
                self.metrics.request("/v1/retrieve/batch", batch.status_code)
                return batch
        except Failure as f:
            self.metrics.request("/v1/retrieve/batch", f.status)
            return f.response()
        ix = self.index

        async def one(req: RetrieveRequest) -> BatchItem:
            try:
                return BatchItem(status=200, response=await self._answer(req, ix, time.perf_counter()))
            except Failure as f:
                return BatchItem(status=f.status, error=ErrorResponse(error=f.message, missing_shards=f.missing))

        items = await asyncio.gather(*(one(r) for r in batch.requests))
        self.metrics.request("/v1/retrieve/batch", 200)
        return BatchResponse(responses=items, took_ms=(time.perf_counter() - t0) * 1000, index_version=ix.id)

    async def _answer(self, req: RetrieveRequest, ix: IndexVersion, t0: float) -> RetrieveResponse:
        """One dialog against the pinned index version ``ix``; raises ``Failure``."""
        from dialclip_ray.index.factory import check_knobs

        if req.target not in ix.shards_per_target:
            raise Failure(422, f"target: this index holds no {req.target} vectors "
                               f"(has: {', '.join(ix.shards_per_target)})")
        knobs = {n: v for n, v in (("nprobe", req.nprobe), ("ef_search", req.ef_search)) if v is not None}
        try:
            check_knobs(knobs, ix.knobs.get(req.target, {}), f"the {req.target} index ({ix.kinds[req.target]})")
        except ValueError as err:
            raise Failure(422, str(err)) from None
        k = req.k or self.settings["top_k"]
        encoded = await self._encode(req)
        t1 = time.perf_counter()
        self.metrics.stage("encode", (t1 - t0) * 1000)
        timeout = self.settings["shard_timeout_s"]
        if req.timeout_ms is not None:
            timeout = min(timeout, req.timeout_ms / 1000)
        answers, missing, why, late = await self._fan_out(req.target, encoded["embedding"], k, timeout, knobs, ix)
        t2 = time.perf_counter()
        self.metrics.stage("search", (t2 - t1) * 1000)
        cooloff = self.encoder_state.cooloff_s
        if missing and not req.allow_partial:
            status = 504 if late and set(late) == set(missing) else 503  # all late: a deadline; else: down
            raise Failure(status, f"shard(s) {', '.join(missing)} missing: {'; '.join(why)} "
                                  f"(set allow_partial for partial results)", missing, retry_after_s=cooloff)
        if missing:
            self.metrics.partial.inc()
        hits = self._merge(answers, k)
        t3 = time.perf_counter()
        self.metrics.stage("merge", (t3 - t2) * 1000)
        self.metrics.stage("total", (t3 - t0) * 1000)
        return RetrieveResponse(hits=hits, partial=bool(missing), missing_shards=missing,
                                took_ms=(t3 - t0) * 1000, index_version=ix.id)

    @staticmethod
    async def _await(response) -> Any:
        return await response

    async def _bounded(self, response, timeout: float) -> tuple[str, Any]:
        """("ok", value) / ("error", exception) / ("timeout", whether no replica ever took the call)."""
        task = asyncio.ensure_future(self._await(response))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
        except BaseException:  # this request was cancelled (client gone)
            task.cancel()
            response.cancel()
            raise
        if not done:
            unassigned = _never_assigned(response)
            task.cancel()
            response.cancel()
            return "timeout", unassigned
        if task.exception() is not None:
            return "error", task.exception()
        return "ok", task.result()

    async def _encode(self, req: RetrieveRequest) -> dict[str, Any]:
        """The query embedding; a call whose replica died is sent once more (encoding is idempotent)."""
        state, cooloff = self.encoder_state, self.encoder_state.cooloff_s
        if state.down:
            raise Failure(503, state.describe() + "; retry later", retry_after_s=cooloff)
        limit = self.settings["encoder_timeout_s"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        for attempt in (0, 1):
            outcome, value = await self._bounded(self.encoder.encode.remote(req), deadline - loop.time())
            if outcome == "ok":
                if "error" in value:
                    raise Failure(value["status"], value["error"])
                return value
            if outcome == "timeout":
                if value:  # no replica took it: down (or saturated) until a probe answers
                    state.failed(TimeoutError("no QueryEncoder replica took the call"))
                    raise Failure(503, f"no query encoder replica took the call within {limit:g} s; retry later",
                                  retry_after_s=cooloff)
                raise Failure(504, f"query encoder did not answer within {limit:g} s", retry_after_s=cooloff)
            if attempt == 0 and isinstance(value, RETRYABLE):
                logger.warning("QueryEncoder call failed (%s): retrying once", type(value).__name__)
                self.metrics.retries.inc(tags={"callee": "QueryEncoder"})
                continue
            state.failed(value)  # a crashed or restarting encoder: the service, not the request
            raise Failure(503, f"query encoder failed ({type(value).__name__}); retry later", retry_after_s=cooloff)
        raise AssertionError("unreachable")

    async def _ask_shard(self, i: int, target: str, query: np.ndarray, k: int, knobs: dict[str, int],
                         ix: IndexVersion, calls: dict) -> dict[str, Any]:
        for attempt in (0, 1):
            calls[i] = self.shards[i].search.remote(target, query, k, knobs or None, ix.id, ix.directory)
            try:
                return await calls[i]
            except RETRYABLE as err:
                if attempt:
                    raise
                logger.warning("Shard%d call failed (%s): retrying once", i, type(err).__name__)
                self.metrics.retries.inc(tags={"callee": f"Shard{i}"})
        raise AssertionError("unreachable")

    async def _fan_out(self, target: str, query: np.ndarray, k: int, timeout: float, knobs: dict[str, int],
                       ix: IndexVersion) -> tuple[list[dict[str, Any]], list[str], list[str], list[str]]:
        """(answers, missing shard names, why each is missing, the missing ones that were only late).
        Shards known to be down are not asked."""
        n = ix.shards_per_target[target]
        asked = [i for i in range(n) if not self.shard_states[i].down]
        calls: dict[int, Any] = {}
        tasks = {i: asyncio.ensure_future(self._ask_shard(i, target, query, k, knobs, ix, calls)) for i in asked}
        pending = set()
        if tasks:
            try:
                _, pending = await asyncio.wait(tasks.values(), timeout=timeout)
            except BaseException:  # this request was cancelled (client gone)
                for i, task in tasks.items():
                    task.cancel()
                    if i in calls:
                        calls[i].cancel()
                raise
        unassigned = {i for i, task in tasks.items() if task in pending and i in calls and _never_assigned(calls[i])}
        for i, task in tasks.items():
            if task in pending:
                task.cancel()
                if i in calls:
                    calls[i].cancel()
        answers, missing, why, late = [], [], [], []
        for i in range(n):
            name, task = f"Shard{i}", tasks.get(i)
            if task is None:
                missing.append(name)
                why.append(self.shard_states[i].describe())
            elif task in pending:
                missing.append(name)
                if i in unassigned and timeout >= min(1.0, self.settings["shard_timeout_s"]):
                    # No replica took the call for a whole (server-sized) deadline: none is running (a dead
                    # replica being replaced) or all are saturated. Skip it until a probe gets through.
                    self.shard_states[i].failed(TimeoutError(f"no {name} replica took the call in {timeout:g} s"))
                    why.append(f"no {name} replica took the call within {timeout:g} s")
                else:
                    late.append(name)
                    why.append(f"{name} did not answer within {timeout:g} s")
            elif task.exception() is not None:  # died twice or the call failed: known down for a while
                self.shard_states[i].failed(task.exception())
                missing.append(name)
                why.append(f"{name} failed ({type(task.exception()).__name__})")
            elif "error" in task.result():
                logger.warning("%s failed: %s", name, task.result()["error"])
                missing.append(name)
                why.append(f"{name} failed")
            else:
                answers.append(task.result())
        return answers, missing, why, late

    def _merge(self, answers: list[dict[str, Any]], k: int) -> list[Hit]:
        if not answers:
            return []
        scores, labels = merge_topk([(a["scores"][None, :], a["labels"][None, :]) for a in answers], k)
        meta = {label: row for a in answers for label, row in a["metadata"].items()}
        hits = []
        for score, label in zip(scores[0].tolist(), labels[0].tolist()):
            if label < 0:
                continue
            row = dict(meta[label])
            hits.append(Hit(id=row.pop("id"), score=score, rank=len(hits) + 1, metadata=row))
        return hits

    # --- index versions (hot swap) ------------------------------------------------------------------------

    def _ensure_watch(self) -> None:
        """With a version root, follow ``ROOT/CURRENT`` (started on the replica's loop by its first request)."""
        if self.root and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow_current())

    async def _follow_current(self) -> None:
        from dialclip_ray.index.layout import current_version

        while True:
            await asyncio.sleep(self.settings.get("index_poll_s", 1.0))
            version = None
            try:
                version = await asyncio.to_thread(current_version, self.root)
                if version != self.index.id and version not in self._bad_versions:
                    await self._switch(os.path.join(self.root, version))
            except Exception as err:  # a bad new version: keep serving the old one, say why once
                if version not in self._bad_versions:
                    logger.error("not switching to index version %s: %s", version, err)
                    self._bad_versions.add(version)

    async def _switch(self, directory: str) -> IndexVersion:
        """Validate the version, pre-load it on every shard deployment, then pin new requests to it."""
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        async with self._swap_lock:
            new = await asyncio.to_thread(IndexVersion.load, directory, self.settings["identity"], len(self.shards))
            if new.id == self.index.id:
                return new
            n = max(new.shards_per_target.values())
            calls = [self.shards[i].load.remote(new.id, new.directory) for i in range(n) for _ in range(PREWARM_CALLS)]
            await asyncio.wait_for(asyncio.gather(*(self._await(c) for c in calls)),
                                   self.settings.get("swap_timeout_s", 300.0))
            old, self.index = self.index, new
            self.info.update(index_version=new.id, manifests=new.manifests)
            self.metrics.index_version.set(0, tags={"version": old.id})
            self.metrics.index_version.set(1, tags={"version": new.id})
            self.metrics.swaps.inc()
            logger.info("serving index version %s (was %s)", new.id, old.id)
            return new

    @api.post("/admin/index", include_in_schema=False)
    async def swap_index(self, request: Request):
        """Hot swap (bearer token): serve ``version`` of the version root; pre-loads it on every shard, switches
        this replica, then writes ``ROOT/CURRENT`` so the other ingress replicas follow within index_poll_s."""
        from dialclip_ray.index.layout import activate

        if not self.admin_token:
            return _error(404, "Not Found")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
            return _error(401, "admin routes need 'Authorization: Bearer <token>' with the app's admin token")
        try:
            body = await self._read(request, SwapRequest)
        except Failure as f:
            return f.response()
        if isinstance(body, JSONResponse):
            return body
        if not self.root:
            return _error(409, "index_dir is not a version root (ROOT/CURRENT); redeploy to change indexes")
        directory = os.path.join(self.root, body.version)
        if not os.path.isdir(directory):
            return _error(404, f"version: no index version {body.version!r} in the app's version root")
        previous = self.index.id
        try:
            new = await self._switch(directory)
        except Exception as err:
            return _error(422 if isinstance(err, (ValueError, FileNotFoundError)) else 503,
                          f"version: cannot serve {body.version!r}: {err}")
        await asyncio.to_thread(activate, self.root, new.id)
        self._bad_versions.discard(new.id)
        return {"index_version": new.id, "previous": previous}
