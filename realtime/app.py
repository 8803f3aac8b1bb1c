"""The one ASGI app: health, readiness, metrics, engine statistics and the realtime websocket.

``create_app`` builds everything and starts nothing: the engine thread and the record store start in
the app's lifespan, so importing this module or building an app in a test has no side effects.

What other routers reuse (``app.state``): ``auth`` (``realtime.auth.Authenticator``: keys and per-key
limits; depend on ``realtime.auth.require_key``), ``drain`` (``realtime.drain.Drain``), ``store``
(``realtime.store.RecordStore`` or None) and ``metrics``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from realtime import protocol as P
from realtime.auth import (
    AUTH_RESPONSES,
    Authenticator,
    AuthError,
    KeyLimits,
    auth_error_handler,
    install_log_redaction,
    key_from,
    load_keys,
    require_key,
)
from realtime.config import Settings
from realtime.dialogue import Dialogue
from realtime.drain import Drain
from realtime.engine import Engine, EngineConfig, VoiceModel
from realtime.metrics import Metrics
from realtime.responder import EchoResponder, Responder
from realtime.session import RealtimeSession
from realtime.store import RecordStore

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


def create_app(
    settings: Settings | None = None, model: VoiceModel | None = None, responder: Responder | None = None,
    dialogue: Dialogue | None = None, vision: Any = None,
) -> FastAPI:
    """The app. ``model``: the voice model (built from ``settings`` when None). ``dialogue``: the brain that
    hears voice turns and writes answers (``realtime.dialogue.build_dialogue``; the CLI builds it from
    ``settings.chat_model`` / ``asr_model``); without one, sessions speak what ``responder`` (echo by
    default) says and voice turns are only reported, which keeps tests and embedders fast. ``vision``: a
    ``vision.service.VisionService`` (or a list: the vision model first, then e.g. the 3D model) served at
    ``/v1/chat/completions`` and ``/v1/models`` (OpenAI-compatible),
    behind the same keys and per-key limits.
    """
    settings = settings or Settings()
    vision_services = [] if vision is None else (list(vision) if isinstance(vision, (list, tuple)) else [vision])
    metrics = Metrics()
    model = model if model is not None else build_voice_model(settings)
    engine = Engine(
        model, EngineConfig(capacity=settings.capacity, batched=settings.engine_mode == "batched"), metrics
    )
    responder = dialogue.responder if dialogue is not None else (responder or EchoResponder())
    default_limits = KeyLimits(settings.key_max_sessions, settings.key_rpm)
    auth = Authenticator(load_keys(settings.api_keys, settings.api_keys_file or None, default_limits), metrics)
    drain = Drain(auth, metrics)
    store = RecordStore(settings.db, metrics) if settings.db and settings.db.lower() != "none" else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        install_log_redaction()  # uvicorn logs websocket paths with their query: ?api_key=...
        if store is not None:
            store.start()
        engine.start()
        for svc in vision_services:
            svc.start()
        log.info("engine started: %d slots, %s, device %s, voice weights: %s",
                 settings.capacity, settings.engine_mode, model.device, model.weights_note)
        if dialogue is not None:
            log.info("dialogue: responder %s, speech recognition %s", dialogue.responder.name,
                     "on" if dialogue.hears_turns else "off")
        if auth.enabled:
            log.info("API keys (by hash): %s", ", ".join(auth.key_hashes))
        try:
            yield
        finally:
            engine.stop()
            for svc in vision_services:
                svc.stop()
            if dialogue is not None:
                dialogue.close()
            if store is not None:
                store.close()

    app = FastAPI(title="duplex-server", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.state.dialogue, app.state.auth, app.state.drain, app.state.store = dialogue, auth, drain, store
    app.add_exception_handler(AuthError, auth_error_handler)
    app.state.vision = vision
    if vision_services:
        from vision.api import build_router
        from vision.metrics import VisionCollector

        app.include_router(build_router(vision_services, auth=require_key))
        metrics.registry.register(VisionCollector(vision_services[0]))
    if settings.demo:  # the Gradio demos (web/demo.py): a client that calls this server back over loopback
        from web.demo import mount_demo

        mount_demo(app, settings.host, settings.port)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready: the engine stopped, or the server drains"}})
    async def readyz() -> JSONResponse:
        ready = engine.healthy and not drain.draining
        body = {
            "ready": ready, "draining": drain.draining, "sessions": engine.live_sessions, "capacity": settings.capacity,
            "device": str(model.device), "voice_weights": model.weights_note, "engine_mode": settings.engine_mode,
            "responder": responder.name, "hears_turns": dialogue is not None and dialogue.hears_turns,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/engine/stats", dependencies=[Depends(require_key)], responses=AUTH_RESPONSES)
    async def engine_stats(reset: str | None = None) -> dict[str, Any]:
        """Step-time percentiles and batch sizes; ``reset=1`` starts a fresh window."""
        summary = {**engine.stats.summary(), "frame_ms": engine.frame_period * 1e3, "sessions": engine.live_sessions}
        if reset in ("1", "true"):
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
        """Refusals in order: no/wrong key 401, the key's rate 429 (before the upgrade, cheap); draining
        (an ``error`` event + close 1001, so browsers see why); the key's sessions 429; capacity (1013)."""
        headers = {k.lower(): v for k, v in ws.headers.items()}
        key = key_from(headers, ws.query_params, ws.scope.get("subprotocols") or [])
        try:
            who = auth.admit(key, refuse_draining=False)
            if drain.draining:
                metrics.refusals.labels("draining").inc()
                await _refuse_open(ws, P.ErrorCode.SERVER_SHUTTING_DOWN,
                                   "the server is shutting down; connect again (another replica will answer)",
                                   P.CloseCode.GOING_AWAY)
                return
            lease = auth.open_session(who)
        except AuthError as e:
            await ws.send_denial_response(e.response())
            return
        try:
            beta = "realtime=v1" in headers.get("openai-beta", "") or ws.query_params.get("beta") in ("1", "true")
            session = RealtimeSession(ws, engine, settings, metrics, responder, beta, model_name="lslm-duplex",
                                      dialogue=dialogue, principal=who, store=store, drain=drain)
            await session.run()
        finally:
            lease.release()

    return app


async def _refuse_open(ws: WebSocket, code: P.ErrorCode, message: str, close_code: int) -> None:
    """Accept, say why in an ``error`` event, close: what a browser client can read (a denial it cannot)."""
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)  # as the session does
    await ws.send_json(P.error_event(P.ProtocolError(code, message)))
    await ws.close(close_code, message[:120])
