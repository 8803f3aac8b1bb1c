"""OpenAI-compatible HTTP API of the vision service: chat completions (SSE streaming), models, adapters.

Shaped like OpenAI's and vLLM's so the official ``openai`` package works unchanged: the ``model`` field
names the base model or a LoRA adapter; images are ``image_url`` content parts (data URLs); errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Adapters load and unload at run time
(``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``; vLLM's ``/v1/load_lora_adapter`` names work too).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vision.adapters import AdapterError
from vision.scheduler import Event, GenRequest, QueueFull, SamplingParams
from vision.service import RequestError, VisionService

MAX_BODY_BYTES = 64 * 1024 * 1024


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None
    spatial_gate: str | None = None  # 3D models: "adatoken" (the default), "fastv" or "none"


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    path: str | None = None
    lora_name: str | None = None  # vLLM's names
    lora_path: str | None = None


def error(status: int, message: str, code: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    if status == 404:
        kind = "not_found_error" if code != "model_not_found" else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def build_router(services: VisionService | Sequence[VisionService], auth: Callable[..., Any] | None = None,
                 default_max_tokens: int = 256) -> APIRouter:
    """The routes over one or more served models (e.g. the vision model and the 3D model); the first one is the
    one ``"default"`` names, and adapters load into it."""
    all_services = [services] if isinstance(services, VisionService) else list(services)
    if not all_services:
        raise ValueError("build_router needs at least one service")
    service = all_services[0]
    deps = [Depends(auth)] if auth is not None else []
    router = APIRouter(dependencies=deps)

    def every_model() -> list[dict[str, Any]]:
        """Every base model and adapter; ``input_modalities`` (our extension) says what content parts it takes."""
        return [{**m, "input_modalities": ["text", "point_cloud" if svc.takes_clouds else "image"]}
                for svc in all_services for m in svc.models()]

    def route(name: str, messages: list[dict[str, Any]]) -> tuple[VisionService, str | None]:
        """The service and adapter a request goes to: by model name; point clouds naming "default" go to the
        model that takes them."""
        clouds = any(isinstance(p, dict) and p.get("type") == "point_cloud_url"
                     for m in messages if isinstance(m.get("content"), list) for p in m["content"])
        if clouds and name in ("default", "base"):
            svc = next((x for x in all_services if x.takes_clouds), service)
            return svc, None  # (the first model refuses clouds with a clear code when none takes them)
        for svc in all_services:
            if name == svc.model.name or name in svc.adapters:
                return svc, svc.resolve_model(name)
        if name in ("default", "base"):
            return service, None
        raise RequestError(f"no model or adapter named {name!r}; GET /v1/models lists them", "model_not_found",
                           "model", 404)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": every_model()}

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str) -> Any:
        for m in every_model():
            if m["id"] == name:
                return m
        return error(404, f"no model or adapter named {name!r}", "model_not_found", "model")

    @router.post("/v1/adapters")
    @router.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Any:
        try:
            body = LoadAdapter.model_validate(await _json(request))
        except (ValidationError, ValueError) as e:
            return error(400, f"invalid body: {_short(e)}", "invalid_request")
        name, path = body.name or body.lora_name, body.path or body.lora_path
        if not name or not path:
            return error(400, "give the adapter's name and path: {\"name\": ..., \"path\": ...}", "invalid_request")
        if name in (service.model.name, "base", "default"):
            return error(409, f"{name!r} is the base model's name", "adapter_exists", "name")
        try:
            adapter = await asyncio.to_thread(service.adapters.register, name, path)
        except AdapterError as e:
            return error(e.status, e.message, e.code, "path")
        return {"id": name, "object": "model", "rank": adapter.rank, "target_modules": adapter.target_modules,
                "parent": service.model.name}

    @router.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str) -> Any:
        try:
            service.adapters.unregister(name)
        except AdapterError as e:
            return error(e.status, e.message, e.code, "name")
        return {"id": name, "object": "model", "deleted": True}

    @router.post("/v1/unload_lora_adapter")
    async def unload_adapter_vllm(request: Request) -> Any:
        body = await _json(request)
        return await unload_adapter(str(body.get("lora_name") or body.get("name") or ""))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = ChatRequest.model_validate(await _json(request))
        except ValidationError as e:
            first = e.errors()[0]
            return error(400, f"invalid request: {first['msg']}", "invalid_request",
                         ".".join(str(p) for p in first["loc"]) or None)
        except ValueError as e:
            return error(400, str(e), "invalid_json")
        try:
            svc, adapter = route(body.model, body.messages)
            prompt = await asyncio.to_thread(svc.build_prompt, body.messages)
        except RequestError as e:
            return error(e.status, e.message, e.code, e.param)
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        asked = body.max_completion_tokens or body.max_tokens
        room = svc.scheduler.cfg.max_len - prompt.length  # unasked, an answer may fill the context (as vLLM)
        params = SamplingParams(max_tokens=asked or max(1, min(default_max_tokens, room)),
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        req = GenRequest(rid, adapter, prompt, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        if svc.takes_clouds:
            try:
                req.gate = svc.gate_for(body.spatial_gate)
            except RequestError as e:
                return error(e.status, e.message, e.code, e.param)
        try:
            svc.scheduler.submit(req)
        except ValueError as e:
            return error(400, str(e), "context_length_exceeded", "messages")
        except QueueFull as e:
            return error(429, str(e), "queue_full", kind="rate_limit_error")
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(req, events, body.model, created, include_usage, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = []
        try:
            while True:
                ev = await events.get()
                if ev.kind == "delta":
                    text.append(ev.text)
                elif ev.kind == "error":
                    return error(500 if ev.code != "invalid_request" else 400, ev.text, ev.code)
                else:
                    break
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": ev.finish_reason, "logprobs": None}],
                "usage": ev.usage}

    @router.get("/v1/vision/stats")
    async def vision_stats() -> dict[str, Any]:
        return {svc.model.name: svc.stats() for svc in all_services}

    return router


async def _sse(req: GenRequest, events: asyncio.Queue[Event], model: str, created: int, include_usage: bool,
               request: Request) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": req.id, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await events.get()
            if ev.kind == "delta":
                yield chunk({"content": ev.text})
            elif ev.kind == "error":
                err = {"error": {"message": ev.text, "type": "server_error", "param": None, "code": ev.code}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            else:
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield chunk({}, None, ev.usage)
                yield "data: [DONE]\n\n"
                return
    finally:
        req.cancelled = True  # a client that went away frees its slot at the next step; no-op when done


async def _json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ValueError(f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MB")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ValueError(f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MB")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(e)
