"""The HTTP ingress: validate, encode (QueryEncoder), fan out to every shard, merge with FAISS.

The body is read with a byte cap and validated here, so malformed or oversized
requests are answered 4xx before any other replica works on them. Shards that miss
their deadline are named: 503 by default, or flagged partial results when the
request sets ``allow_partial``. Only ``await`` is used on handles (never ``.result()``).
"""

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from dialclip_ray.index import merge_topk
from dialclip_ray.serving.schemas import ErrorResponse, Hit, RetrieveRequest, RetrieveResponse

logger = logging.getLogger("ray.serve")

api = FastAPI(title="DialCLIP retrieval", version="1",
              description="Multi-modal dialog retrieval: a dialog in, the top-k images or texts out.")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 411, 413, 415, 422, 503)}
_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/RetrieveRequest"}}}}}


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


def _error(status: int, message: str, missing: list[str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, missing_shards=missing).model_dump(exclude_none=True),
                        status_code=status)


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "invalid request: " + "; ".join(parts)


async def read_body(request: Request, limit: int) -> bytes | JSONResponse:
    """The body, or a 4xx response: declared or actual size above ``limit`` -> 413."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return _error(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            return _error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _error(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="RetrievalIngress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class RetrievalIngress:
    def __init__(self, encoder, shards: list, settings: dict[str, Any], info: dict[str, Any]):
        self.encoder = encoder
        self.shards = list(shards)
        self.settings = settings
        self.info = info
        self.shards_per_target = {t: len(m["shards"]) for t, m in info["manifests"].items()}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def get_info(self) -> dict:
        return self.info

    @api.post("/v1/retrieve", response_model=RetrieveResponse, responses=_ERRORS, openapi_extra=_BODY)
    async def retrieve(self, request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "application/json")
        if "json" not in ctype.lower():
            return _error(415, f"content-type must be application/json, got {ctype!r}")
        body = await read_body(request, self.settings["max_body_bytes"])
        if isinstance(body, JSONResponse):
            return body
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"body is not valid JSON: {err}")
        try:
            req = RetrieveRequest.model_validate(payload)
        except ValidationError as err:
            return _error(422, validation_message(err))
        if req.target not in self.shards_per_target:
            return _error(422, f"target: this index holds no {req.target} vectors "
                               f"(has: {', '.join(self.shards_per_target)})")
        k = req.k or self.settings["top_k"]
        try:
            encoded = await asyncio.wait_for(self._encode(req), self.settings["encoder_timeout_s"])
        except asyncio.TimeoutError:
            return _error(503, f"query encoder did not answer within {self.settings['encoder_timeout_s']} s")
        except Exception as err:  # a crashed or restarting encoder replica: the service, not the request
            logger.warning("QueryEncoder failed: %s", err)
            return _error(503, f"query encoder failed ({type(err).__name__}); retry later")
        if "error" in encoded:
            return _error(encoded["status"], encoded["error"])
        timeout = self.settings["shard_timeout_s"]
        if req.timeout_ms is not None:
            timeout = min(timeout, req.timeout_ms / 1000)
        answers, missing = await self._fan_out(req.target, encoded["embedding"], k, timeout)
        if missing and not req.allow_partial:
            return _error(503, f"shard(s) {', '.join(missing)} did not answer within {timeout:g} s or failed "
                               f"(set allow_partial for partial results)", missing)
        hits = self._merge(answers, k)
        return RetrieveResponse(hits=hits, partial=bool(missing), missing_shards=missing,
                                took_ms=(time.perf_counter() - t0) * 1000)

    async def _encode(self, req: RetrieveRequest) -> dict[str, Any]:
        return await self.encoder.encode.remote(req)

    async def _fan_out(self, target: str, query: np.ndarray, k: int, timeout: float
                       ) -> tuple[list[dict[str, Any]], list[str]]:
        names = [f"Shard{i}" for i in range(self.shards_per_target[target])]
        responses = [self.shards[i].search.remote(target, query, k) for i in range(len(names))]

        async def wait(resp):
            return await resp

        tasks = [asyncio.ensure_future(wait(r)) for r in responses]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task, resp in zip(tasks, responses):
            if task in pending:
                task.cancel()
                resp.cancel()
        answers, missing = [], []
        for name, task in zip(names, tasks):
            if task in pending:
                missing.append(name)
            elif task.exception() is not None or "error" in task.result():
                failed = task.exception() or task.result()["error"]
                logger.warning("%s failed: %s", name, failed)
                missing.append(name)  # a failed shard is as absent as a slow one
            else:
                answers.append(task.result())
        return answers, missing

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
