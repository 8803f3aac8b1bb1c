"""The realtime server on Ray Serve: the same FastAPI app (``realtime.app.create_app``) as a Serve ingress
deployment, one replica per GPU.

    serve run deploy/ray/serve.yaml              # or: serve deploy deploy/ray/serve.yaml on a running cluster
    serve run deploy.ray.app:app                 # the defaults below, no config file

* Each replica builds its own app on its own GPU: voice model, engine thread (started by the app's lifespan,
  which Serve runs on the replica), and the dialogue brain, from ``RT_*`` environment variables (set them in
  serve.yaml's ``runtime_env.env_vars``) overridden by the ``settings`` argument.
* A websocket stays on the replica that accepted it for its whole life: Serve's proxy pins every ASGI
  connection to one replica. While it is open it counts as one ongoing request there, so Serve's router
  (power of two choices on ongoing requests) spreads new sessions over replicas, and ``max_ongoing_requests``
  bounds sessions plus in-flight HTTP calls per replica.
* If a replica dies, the proxy drops its websockets; ``CloseOnReplicaLoss`` (a proxy middleware: pass
  ``proxy_middlewares()`` to ``serve.start(http_options=...)``, or set
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.ray.app:proxy_middlewares`` on every node) turns the drop
  into a clean close, 1012 "service restart", and clients reconnect to a live replica. ``check_health`` makes
  Serve replace a replica whose engine thread died.
* Autoscaling: ``SessionSlotsPolicy`` scales on live sessions (reported by ``record_autoscaling_stats``, read
  from the engine) plus requests queued at the proxies, against a target fill of each replica's session
  slots (``capacity``). Connection counts alone are a poor signal for long-lived sockets.
* Every response, and the websocket handshake, carries ``x-replica`` (Serve's replica id) and
  ``x-replica-pid``: which replica served it (for debugging and the tests).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

from ray import serve
from starlette.middleware import Middleware

from realtime.app import create_app
from realtime.config import Settings


class ReplicaHeaders:
    """Pure ASGI middleware: ``x-replica`` / ``x-replica-pid`` on HTTP responses and websocket handshakes."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.headers = [(b"x-replica", replica.encode()), (b"x-replica-pid", str(os.getpid()).encode())]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CloseOnReplicaLoss:
    """Proxy-side ASGI middleware: a websocket the replica accepted but never closed (the replica died) gets a
    close frame, 1012 (service restart), instead of a dropped TCP connection (1006): clients know to reconnect."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        is_open = False

        async def watch_receive() -> dict:
            nonlocal is_open
            message = await receive()
            if message["type"] == "websocket.disconnect":  # the client left
                is_open = False
            return message

        async def watch_send(message: dict) -> None:
            nonlocal is_open
            if message["type"] == "websocket.accept":
                is_open = True
            elif message["type"] in ("websocket.close", "websocket.disconnect"):
                is_open = False
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        finally:
            if is_open:
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": 1012, "reason": "replica lost: reconnect"})


def proxy_middlewares() -> list[Middleware]:
    """Middlewares for Serve's HTTP proxies (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` points here)."""
    return [Middleware(CloseOnReplicaLoss)]


@serve.deployment(
    name="realtime",
    ray_actor_options={"num_gpus": 1},  # one replica per GPU
    # Sessions (websockets) plus in-flight HTTP calls per replica: capacity + headroom for health and stats.
    # Beyond it the proxy queues new connections, which SessionSlotsPolicy counts as demand.
    max_ongoing_requests=80,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=300,  # a replica being removed keeps its sessions this long
)
@serve.ingress()
class RealtimeServer:
    """One replica: ``create_app`` on this replica's device. ``settings``: overrides of ``RT_*`` variables
    (same names as ``realtime.config.Settings``). ``tiny_voice``: an untrained tiny voice model instead of
    the configured one (smoke runs and tests on CPU)."""

    def __init__(self, settings: dict[str, Any] | None = None, tiny_voice: bool = False) -> None:
        self.settings = Settings.load(settings)
        self.tiny_voice = tiny_voice
        self.engine: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from realtime.dialogue import build_dialogue

        device = self.settings.resolved_device()
        model = None
        if self.tiny_voice:
            from speech.config import VoiceModelConfig
            from speech.duplex import DuplexVoiceModel

            model = DuplexVoiceModel(VoiceModelConfig.tiny(), capacity=self.settings.capacity, device=device)
        vision = []
        if self.settings.vision_model.lower() != "none":  # adapters by name from RT_ADAPTER_DIR (shared storage)
            from vision.service import build_vision_service

            vision.append(build_vision_service(self.settings, device))
        if self.settings.point_model.lower() != "none":
            from vision.service import build_point_service

            vision.append(build_point_service(self.settings, device))
        app = create_app(self.settings, model=model, dialogue=build_dialogue(self.settings, device), vision=vision)
        app.add_middleware(ReplicaHeaders, replica=serve.get_replica_context().replica_id.unique_id)
        self.engine = app.state.engine
        return app

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``: a dead engine thread gets the replica replaced."""
        if self.engine is not None and not self.engine.healthy:
            raise RuntimeError("engine thread is not running")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics, pushed to the controller (read by SessionSlotsPolicy)."""
        return {"sessions_active": float(self.engine.live_sessions if self.engine else 0),
                "session_slots": float(self.settings.capacity)}


class SessionSlotsPolicy:
    """Serve autoscaling policy: replicas = (live sessions + queued requests) / (target_fill × slots).

    Used from serve.yaml as ``autoscaling_config.policy.policy_function: deploy.ray.app:SessionSlotsPolicy``
    (``policy_kwargs: {target_fill: 0.75}``). Serve applies min/max_replicas, the up/down-scaling factors and
    ``upscale_delay_s`` / ``downscale_delay_s`` around it. A replica being removed keeps its sessions until they
    end or ``graceful_shutdown_timeout_s`` passes (then 1012, reconnect), so keep ``downscale_delay_s`` long.
    """

    def __init__(self, target_fill: float = 0.75) -> None:
        if not 0 < target_fill <= 1:
            raise ValueError(f"target_fill must be within (0, 1], not {target_fill}")
        self.target_fill = target_fill

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        sessions, slots = metrics.get("sessions_active") or {}, metrics.get("session_slots") or {}
        if not slots:  # no replica has reported yet: keep what we have
            return ctx.target_num_replicas, {}
        demand = sum(sessions.values()) + (ctx.total_queued_requests or 0)
        return max(1, math.ceil(demand / (self.target_fill * max(slots.values())))), {}


app = RealtimeServer.bind()
