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
"""

import asyncio
import logging
import math
import time
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
from dialclip_ray.serving.schemas import B64_PATTERN, ErrorResponse, Hit, RetrieveRequest, RetrieveResponse

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
    503: "the query encoder or some shards are down or too slow (missing_shards names the shards)",
}
_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/RetrieveRequest"}}}}}
_MAX_MESSAGE = 2000
_THREAD_PARSE_BYTES = 64 * 1024  # bodies above this are decoded and validated in a thread


def _register_request_schema() -> None:
    """The body is parsed by hand (byte cap first), so put its schema in the OpenAPI document ourselves."""
    original = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = original()
            defs = RetrieveRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["RetrieveRequest"] = defs
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


def parse_request(body: bytes) -> RetrieveRequest | tuple[int, str]:
    """The validated request, or (status, message): 400 for bytes that are not UTF-8 JSON, 422 for JSON
    that breaks the schema (each offending field named as a dotted path)."""
    if not body.strip():
        return 400, "body is empty: expected a JSON object (see RetrieveRequest in /openapi.json)"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return 400, f"body is not valid UTF-8: byte 0x{body[err.start]:02x} at offset {err.start}"
    try:
        return RetrieveRequest.model_validate_json(text)
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

    def __init__(self, name: str, probe: Callable[[], Awaitable[Any]], cooloff_s: float, probe_timeout_s: float):
        self.name, self.probe, self.cooloff_s, self.probe_timeout_s = name, probe, cooloff_s, probe_timeout_s
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
        self._task = asyncio.get_running_loop().create_task(self._probe_until_up())

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
            logger.info("%s answers again after %.1f s", self.name, time.monotonic() - self.down_since)
            self.down_since, self._task = None, None
            return


@serve.deployment(name="RetrievalIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class RetrievalIngress:
    def __init__(self, encoder, shards: list, settings: dict[str, Any], info: dict[str, Any]):
        self.encoder = encoder
        self.shards = list(shards)
        self.settings = settings
        self.info = info
        self.shards_per_target = {t: len(m["shards"]) for t, m in info["manifests"].items()}
        cooloff = settings.get("cooloff_s", 2.0)
        self.encoder_state = Cooloff("QueryEncoder", self._probe(self.encoder), cooloff,
                                     settings["encoder_timeout_s"])
        self.shard_states = [Cooloff(f"Shard{i}", self._probe(s), cooloff, settings["shard_timeout_s"])
                             for i, s in enumerate(self.shards)]

    @staticmethod
    def _probe(handle) -> Callable[[], Awaitable[Any]]:
        async def ping():
            return await handle.ping.remote()
        return ping

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def get_info(self) -> dict:
        return self.info

    @api.post("/v1/retrieve", response_model=RetrieveResponse, responses=_RESPONSES, openapi_extra=_BODY)
    async def retrieve(self, request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "application/json")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return _error(415, f"content-type must be application/json, got {ctype!r}")
        body = await read_body(request, self.settings["max_body_bytes"], self.settings.get("body_timeout_s", 30.0),
                               self.settings.get("body_idle_timeout_s", 5.0))
        if isinstance(body, JSONResponse):
            return body
        parsed = (await asyncio.to_thread(parse_request, body) if len(body) > _THREAD_PARSE_BYTES
                  else parse_request(body))
        if isinstance(parsed, tuple):
            return _error(*parsed)
        req = parsed
        if req.target not in self.shards_per_target:
            return _error(422, f"target: this index holds no {req.target} vectors "
                               f"(has: {', '.join(self.shards_per_target)})")
        k = req.k or self.settings["top_k"]
        cooloff = self.encoder_state.cooloff_s
        if self.encoder_state.down:
            return _error(503, self.encoder_state.describe() + "; retry later", retry_after_s=cooloff)
        response = self.encoder.encode.remote(req)
        task = asyncio.ensure_future(self._await(response))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.settings["encoder_timeout_s"])
        except BaseException:  # this request was cancelled (client gone)
            task.cancel()
            response.cancel()
            raise
        if not done:
            if _never_assigned(response):  # no replica took it: down (or saturated) until a probe answers
                self.encoder_state.failed(TimeoutError("no QueryEncoder replica took the call"))
            task.cancel()
            response.cancel()
            return _error(503, f"query encoder did not answer within {self.settings['encoder_timeout_s']} s",
                          retry_after_s=cooloff)
        if task.exception() is not None:  # a crashed or restarting encoder replica: the service, not the request
            self.encoder_state.failed(task.exception())
            return _error(503, f"query encoder failed ({type(task.exception()).__name__}); retry later",
                          retry_after_s=cooloff)
        encoded = task.result()
        if "error" in encoded:
            return _error(encoded["status"], encoded["error"])
        timeout = self.settings["shard_timeout_s"]
        if req.timeout_ms is not None:
            timeout = min(timeout, req.timeout_ms / 1000)
        answers, missing, why = await self._fan_out(req.target, encoded["embedding"], k, timeout)
        if missing and not req.allow_partial:
            return _error(503, f"shard(s) {', '.join(missing)} missing: {'; '.join(why)} "
                               f"(set allow_partial for partial results)", missing, retry_after_s=cooloff)
        hits = self._merge(answers, k)
        return RetrieveResponse(hits=hits, partial=bool(missing), missing_shards=missing,
                                took_ms=(time.perf_counter() - t0) * 1000)

    @staticmethod
    async def _await(response) -> Any:
        return await response

    async def _fan_out(self, target: str, query: np.ndarray, k: int, timeout: float
                       ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """(answers, missing shard names, why each is missing). Shards known to be down are not asked."""
        n = self.shards_per_target[target]
        asked = [i for i in range(n) if not self.shard_states[i].down]
        responses = {i: self.shards[i].search.remote(target, query, k) for i in asked}

        async def wait(resp):
            return await resp

        tasks = {i: asyncio.ensure_future(wait(r)) for i, r in responses.items()}
        pending = set()
        if tasks:
            try:
                _, pending = await asyncio.wait(tasks.values(), timeout=timeout)
            except BaseException:  # this request was cancelled (client gone)
                for i, task in tasks.items():
                    task.cancel()
                    responses[i].cancel()
                raise
        unassigned = {i for i, task in tasks.items() if task in pending and _never_assigned(responses[i])}
        for i, task in tasks.items():
            if task in pending:
                task.cancel()
                responses[i].cancel()
        answers, missing, why = [], [], []
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
                    why.append(f"{name} did not answer within {timeout:g} s")
            elif task.exception() is not None:  # its replica died or the call failed: known down for a while
                self.shard_states[i].failed(task.exception())
                missing.append(name)
                why.append(f"{name} failed ({type(task.exception()).__name__})")
            elif "error" in task.result():
                logger.warning("%s failed: %s", name, task.result()["error"])
                missing.append(name)
                why.append(f"{name} failed")
            else:
                answers.append(task.result())
        return answers, missing, why

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
