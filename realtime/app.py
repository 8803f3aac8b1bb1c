"""The one ASGI app: health, readiness, metrics, engine statistics and the realtime websocket.

``create_app`` builds everything and starts nothing: the engine thread starts in the app's lifespan,
so importing this module or building an app in a test has no side effects.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from realtime.config import Settings
from realtime.dialogue import Dialogue
from realtime.engine import Engine, EngineConfig, VoiceModel
from realtime.metrics import Metrics
from realtime.responder import EchoResponder, Responder
from realtime.session import RealtimeSession

log = logging.getLogger(__name__)

__version__ = "0.1.0"

WEB_STATIC = Path(__file__).resolve().parent.parent / "web" / "static"  # the voice-chat page (web/README.md)


def build_voice_model(settings: Settings) -> VoiceModel:
    """The default voice model, or the checkpoint the settings name, on the resolved device."""
    from speech.duplex import load_default_voice_model, load_voice_model

    device = settings.resolved_device()
    if settings.voice_dir:
        return load_voice_model(settings.voice_dir, settings.capacity, device)
    return load_default_voice_model(settings.capacity, device)


def _key_from(scope_headers: dict[str, str], query: dict[str, str], subprotocols: list[str]) -> str | None:
    auth = scope_headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if scope_headers.get("x-api-key"):
        return scope_headers["x-api-key"]
    if query.get("api_key"):
        return query["api_key"]
    for p in subprotocols:  # browsers cannot set headers on a websocket (OpenAI's convention)
        if p.startswith("openai-insecure-api-key."):
            return p.split(".", 1)[1]
    return None


def _authorized(settings: Settings, key: str | None) -> bool:
    if not settings.api_keys:
        return True
    if key is None:
        return False
    ok = False
    for k in settings.api_keys:  # compare against all keys: time does not depend on which one matched
        ok |= hmac.compare_digest(k.encode(), key.encode())
    return ok


def create_app(
    settings: Settings | None = None, model: VoiceModel | None = None, responder: Responder | None = None,
    dialogue: Dialogue | None = None,
) -> FastAPI:
    """The app. ``model``: the voice model (built from ``settings`` when None). ``dialogue``: the brain that
    hears voice turns and writes answers (``realtime.dialogue.build_dialogue``; the CLI builds it from
    ``settings.chat_model`` / ``asr_model``); without one, sessions speak what ``responder`` (echo by
    default) says and voice turns are only reported, which keeps tests and embedders fast.
    """
    settings = settings or Settings()
    metrics = Metrics()
    model = model if model is not None else build_voice_model(settings)
    engine = Engine(
        model, EngineConfig(capacity=settings.capacity, batched=settings.engine_mode == "batched"), metrics
    )
    responder = dialogue.responder if dialogue is not None else (responder or EchoResponder())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("engine started: %d slots, %s, device %s, voice weights: %s",
                 settings.capacity, settings.engine_mode, model.device, model.weights_note)
        if dialogue is not None:
            log.info("dialogue: responder %s, speech recognition %s", dialogue.responder.name,
                     "on" if dialogue.hears_turns else "off")
        try:
            yield
        finally:
            engine.stop()
            if dialogue is not None:
                dialogue.close()

    app = FastAPI(title="duplex-server", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.state.dialogue = dialogue

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = engine.healthy
        body = {
            "ready": ready, "sessions": engine.live_sessions, "capacity": settings.capacity,
            "device": str(model.device), "voice_weights": model.weights_note, "engine_mode": settings.engine_mode,
            "responder": responder.name, "hears_turns": dialogue is not None and dialogue.hears_turns,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/engine/stats")
    async def engine_stats(request: Request) -> dict[str, Any]:
        if not _authorized(settings, _key_from(dict(request.headers), dict(request.query_params), [])):
            return JSONResponse({"error": {"code": "invalid_api_key", "message": "missing or wrong API key"}}, 401)
        summary = {**engine.stats.summary(), "frame_ms": engine.frame_period * 1e3, "sessions": engine.live_sessions}
        if request.query_params.get("reset") in ("1", "true"):
            engine.reset_stats()
        return summary

    static_files = {p.name for p in WEB_STATIC.glob("*") if p.is_file()} if WEB_STATIC.is_dir() else set()

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        """The voice-chat page; a client that asks for JSON gets where things are."""
        accept = request.headers.get("accept", "")
        if "index.html" not in static_files or ("application/json" in accept and "text/html" not in accept):
            return JSONResponse({"name": "duplex-server", "version": __version__, "realtime": "/v1/realtime",
                                 "health": "/healthz", "metrics": "/metrics"})
        return FileResponse(WEB_STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in static_files:  # only the page's own files: no path ever reaches the filesystem
            return JSONResponse({"error": {"code": "not_found", "message": f"no static file {name!r}"}}, 404)
        return FileResponse(WEB_STATIC / name, headers={"Cache-Control": "no-cache"})

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        headers = {k.lower(): v for k, v in ws.headers.items()}
        key = _key_from(headers, dict(ws.query_params), ws.scope.get("subprotocols") or [])
        if not _authorized(settings, key):
            metrics.refusals.labels("unauthorized").inc()
            body = {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                              "message": "missing or wrong API key (Authorization: Bearer KEY, or ?api_key=KEY)"}}
            await ws.send_denial_response(JSONResponse(body, status_code=401))
            return
        beta = "realtime=v1" in headers.get("openai-beta", "") or ws.query_params.get("beta") in ("1", "true")
        session = RealtimeSession(ws, engine, settings, metrics, responder, beta, model_name="lslm-duplex",
                                  dialogue=dialogue)
        await session.run()

    return app
