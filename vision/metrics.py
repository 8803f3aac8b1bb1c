"""Prometheus view of the vision service, read at scrape time (nothing is counted twice on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class VisionCollector:
    """Registered into the server's registry by ``create_app`` when a vision service is served."""

    def __init__(self, service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        sched, orch, adapters = self.service.scheduler, self.service.orchestrator, self.service.adapters
        stats = sched.stats()
        yield _gauge("vision_requests_running", "Chat requests decoding", stats["running"])
        yield _gauge("vision_requests_waiting", "Chat requests queued for a KV-cache or adapter slot", stats["waiting"])
        yield _counter("vision_steps", "Packed forward steps", stats["steps"])
        yield _counter("vision_tokens_generated", "Tokens generated", stats["tokens_generated"])
        yield _counter("vision_step_failures", "Steps that raised (their requests failed)", stats["step_failures"])
        done = CounterMetricFamily("vision_requests_finished", "Chat requests ended, by reason", labels=["reason"])
        for reason, n in sorted(sched.finished.items()):
            done.add_metric([reason], n)
        yield done
        modes = CounterMetricFamily("vision_lora_mode_steps", "Steps run in each LoRA mode", labels=["mode"])
        for mode, n in sorted(orch.mode_steps.items()):
            modes.add_metric([mode], n)
        yield modes
        yield _counter("vision_lora_switches", "Orchestrator mode or merged-adapter switches", orch.switches)
        yield _gauge("vision_adapters_registered", "Adapters registered (host copies)", len(adapters.names()))
        yield _gauge("vision_adapters_resident", "Adapters in device slots", len(adapters.resident()))
        yield _counter("vision_adapter_loads", "Adapter copies into a device slot", adapters.loads)
        yield _counter("vision_adapter_evictions", "Idle adapters evicted from a device slot (LRU)", adapters.evictions)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
