"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions_active = Gauge("realtime_sessions_active", "Live voice sessions", registry=r)
        self.sessions_total = Counter("realtime_sessions_total", "Voice sessions accepted", registry=r)
        self.refusals = Counter(
            "realtime_refusals_total",
            "Sessions and requests refused (capacity, unauthorized, key_rate_limited, key_session_limit, draining,"
            " slow_consumer)", ["reason"], registry=r,
        )
        self.sessions_closed = Counter(
            "realtime_sessions_closed_total", "Sessions the server ended (expired, drained)", ["reason"], registry=r
        )
        self.draining = Gauge("realtime_draining", "1 while the server drains before shutting down", registry=r)
        self.store_commits = Counter("realtime_store_commits_total", "Record-store transactions committed", registry=r)
        self.store_errors = Counter(
            "realtime_store_errors_total", "Record-store writes that failed, were dropped or were late", ["kind"],
            registry=r,
        )
        self.store_queue = Gauge("realtime_store_queue_depth", "Record-store writes waiting", registry=r)
        self.errors = Counter("realtime_errors_total", "Error events sent to clients", ["code"], registry=r)
        self.frames = Counter("realtime_frames_total", "Session-frames stepped by the engine", registry=r)
        self.frames_dropped = Counter(
            "realtime_frames_dropped_total", "Engine ticks skipped because a step overran the frame period",
            registry=r,
        )
        self.input_underruns = Counter(
            "realtime_input_underruns_total", "Frames a session had no microphone audio for (silence used)",
            registry=r,
        )
        self.input_overflows = Counter(
            "realtime_input_overflow_frames_total", "Microphone frames dropped because a client sent too fast",
            registry=r,
        )
        self.step_seconds = Histogram(
            "realtime_step_seconds", "Wall time of one engine tick (all sessions)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5),
            registry=r,
        )
        self.batch_size = Histogram(
            "realtime_step_batch_size", "Sessions per batched model step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.responses = Counter("realtime_responses_total", "Responses finished", ["status"], registry=r)
        self.step_failures = Counter("realtime_step_failures_total", "Model steps that raised", registry=r)
        self.interruptions = Counter("realtime_interruptions_total", "IRQ tokens emitted while speaking", registry=r)
