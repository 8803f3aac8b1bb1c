"""Continuous batching of chat requests across LoRA adapters: one thread, one packed forward per step.

Each step packs (a) a chunk of every prompt still being prefilled, up to ``max_prefill_tokens``, and
(b) one token of every request already decoding — whatever adapter each uses — into one forward of the
packed decoder (vision/decoder.py). The orchestrator picks the step's LoRA mode from the step's adapter
mix. A request holds a KV-cache slot and its adapter's device slot from admission to its end; when
either is short, it waits in the queue (FIFO among those that can run) instead of slowing others.

Requests talk to the thread through ``emit`` callbacks (the API bridges them into asyncio) and a
``cancelled`` flag; a step that raises fails the requests in it and the loop goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vision.adapters import AdapterError, AdapterManager
from vision.decoder import PackedStep, Segment
from vision.detokenize import IncrementalDetokenizer
from vision.lora.atmm import triton_available
from vision.mma import IMAGE, TEXT
from vision.model import Prompt, VisionLanguageModel
from vision.openmp import release_thread_pool
from vision.orchestrator import Mode, Orchestrator, Plan
from vision.step_graphs import StepGraphs

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_running: int = 16  # KV-cache slots = requests decoding at once
    max_len: int = 2048  # positions per request (prompt + answer)
    max_prefill_tokens: int = 512  # prompt tokens per step: long prompts are prefilled in chunks
    max_waiting: int = 256  # queue depth; beyond it requests are refused (429)
    # steps from CUDA graphs (vision/step_graphs.py): "auto" = on CUDA unless the model routes per modality;
    # "off"; "uncaptured" = the same padded static step run eagerly (tests, debugging, any device)
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_len < 16 or self.max_prefill_tokens < 1:
            raise ValueError("max_running >= 1, max_len >= 16 and max_prefill_tokens >= 1 are required")
        if self.cuda_graphs not in ("auto", "off", "uncaptured"):
            raise ValueError(f"cuda_graphs must be auto, off or uncaptured, not {self.cuda_graphs!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy: the answer is a function of the prompt
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, as vLLM's flag)


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    code: str = ""


@dataclass
class GenRequest:
    id: str
    adapter: str | None  # None = the base model
    prompt: Prompt
    params: SamplingParams
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # scheduler-owned state
    cache_slot: int = -1
    adapter_slot: int = -1
    embeds: torch.Tensor | None = None
    prefilled: int = 0
    cache_len: int = 0  # rows of this request in the KV cache (fewer than positions after gated pruning)
    pos_offset: int = 0  # rotary position minus cache index (tokens pruned at prefill)
    gate: Any = None  # a vision.gate3d.GatePolicy: prefill prunes the prompt's spatial tokens
    gate_stats: dict[str, int] = field(default_factory=dict)  # spatial tokens kept / total, for the usage
    out_ids: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None  # the answer's text, decoded a window at a time
    sent_chars: int = 0
    generator: torch.Generator | None = None


class QueueFull(Exception):
    pass


class Scheduler:
    """Owns the KV cache and drives the model; everything else reaches it through ``submit``."""

    def __init__(self, model: VisionLanguageModel, adapters: AdapterManager | None, orchestrator: Orchestrator | None,
                 cfg: SchedulerConfig | None = None) -> None:
        self.model, self.adapters, self.orchestrator = model, adapters, orchestrator
        self.cfg = cfg or SchedulerConfig()
        self.graphs = self._step_graphs()
        self.cache = self.graphs.cache if self.graphs is not None else model.decoder.new_cache(
            self.cfg.max_running, self.cfg.max_len)
        self._free_slots = list(range(self.cfg.max_running))[::-1]
        self._waiting: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = self.tokens_generated = self.failures = 0
        self.last_batch = 0
        self.mode_last = "unmerged"
        self.finished: dict[str, int] = {}  # requests ended, by finish reason / error code / "cancelled"

    def _step_graphs(self) -> StepGraphs | None:
        """The step graphs, with one more cache slot for their padding rows; None where they do not apply."""
        mode, model, cfg = self.cfg.cuda_graphs, self.model, self.cfg
        if mode == "off" or (mode == "auto" and model.device.type != "cuda"):
            return None
        if getattr(model, "mma", None) is not None:  # per-token routing is computed on the host each step
            if mode == "uncaptured":
                raise ValueError("step graphs do not run a model with mixture-of-modality routing")
            return None
        ctx = self.orchestrator.ctx if self.orchestrator is not None else None
        if ctx is not None and not triton_available():
            if mode == "uncaptured":
                raise ValueError("step graphs with LoRA need the Triton kernels (pip install triton)")
            log.warning("triton is not installed: steps run eagerly")
            return None
        cache = model.decoder.new_cache(cfg.max_running + 1, cfg.max_len)
        return StepGraphs(model.decoder, cache, cfg.max_running, cfg.max_running + cfg.max_prefill_tokens,
                          cfg.max_running, ctx, capture=mode == "auto")

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the scheduler thread; after :meth:`stop`, a new start serves again."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cv:
            self._stop = False
        release_thread_pool()  # this thread's OpenMP workers would throttle the scheduler's (vision.openmp)
        self._thread = threading.Thread(target=self._loop, name="vision-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        if req.prompt.length + req.params.max_tokens > self.cfg.max_len:
            raise ValueError(f"the prompt ({req.prompt.length} tokens) plus max_tokens ({req.params.max_tokens}) is over "
                             f"the context limit of {self.cfg.max_len} tokens")
        if req.params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(req.params.seed)
        with self._cv:
            if len(self._waiting) >= self.cfg.max_waiting:
                raise QueueFull(f"the queue is full ({self.cfg.max_waiting} requests waiting); retry later")
            self._waiting.append(req)
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out = {"running": len(self._running), "waiting": len(self._waiting), "steps": self.steps,
                   "tokens_generated": self.tokens_generated, "last_batch": self.last_batch,
                   "step_failures": self.failures}
        if self.orchestrator is not None:
            out["orchestrator"] = self.orchestrator.stats()
        if self.graphs is not None:
            out["cuda_graphs"] = self.graphs.stats()
        return out

    @torch.inference_mode()
    def calibrate(self, decode_tokens: int = 8, prompt_tokens: int = 64) -> None:
        """Price LoRA work and merges on this device with real forwards, before the first request.

        Forwards (best of 3, after a warm-up) with and without LoRA: ``decode_tokens`` decode tokens of one
        adapter ("narrow"), the same tokens each of its own adapter ("spread"), one ``prompt_tokens``-token
        prompt ("wide"). Slots hold full-rank zero weights meanwhile (slot contents are restored).
        """
        orch = self.orchestrator
        if orch is None:
            return
        layers = list(orch.layers.values())
        S, r_max = layers[0].lora_a.shape[0], layers[0].lora_a.shape[1]
        n = min(decode_tokens, self.cfg.max_running, S)
        wide = min(prompt_tokens, self.cfg.max_len - 1)
        if n < 2:
            orch.time_merges()
            return
        saved = orch.slot_ranks.clone()
        saved_layers = [lay.rank_state() for lay in layers]
        saved_host = list(orch.ctx.slot_ranks_host)
        for lay in layers:  # every slot full rank: the costliest case, whatever is loaded
            lay.assume_rank(r_max)
        orch.slot_ranks.fill_(r_max)
        orch.ctx.slot_ranks_host[:] = [r_max] * S
        dev = self.model.device
        d = self.model.decoder
        hidden = torch.zeros(max(n, wide), d.hidden_size, device=dev, dtype=self.model.dtype)
        cases = {"narrow": [0] * n, "spread": list(range(n)), "wide": [0] * wide}

        def forward(name: str, lora: bool) -> float:
            slots_list = cases[name]
            if name == "wide":
                segs = [Segment(0, 0, wide)]
            else:
                segs = [Segment(i, 1, 1) for i in range(n)]
            step = PackedStep.build(segs, dev)
            rows = hidden[:len(slots_list)]
            best = math.inf
            for _ in range(4):
                _sync(dev)
                t0 = time.perf_counter()
                graph = self.graphs is not None and self.graphs.fits(segs)  # run as the step will be served
                if graph:
                    orch.prepare(Plan(Mode.UNMERGED))
                    graph = self._graph_step(rows, segs, slots_list if lora else None, None) is not None
                if not graph:
                    if lora:
                        orch.apply(Plan(Mode.UNMERGED), torch.tensor(slots_list, dtype=torch.long, device=dev))
                    else:
                        orch.ctx.add = orch.ctx.subtract = None
                    d(rows, step, self.cache)
                _sync(dev)
                best = min(best, (time.perf_counter() - t0) * 1e3)
            return best

        try:
            base = {k: forward(k, False) for k in ("narrow", "wide")}
            lora = {k: forward(k, True) for k in cases}
            orch.fit(base, lora, n, wide, n)
            orch.time_merges()
        finally:
            orch.slot_ranks.copy_(saved)
            orch.ctx.slot_ranks_host[:] = saved_host
            for lay, state in zip(layers, saved_layers, strict=True):
                lay.restore_rank_state(state)
            orch.ctx.add = orch.ctx.subtract = None
            orch.current = Plan(Mode.UNMERGED)
            orch.mode_steps.clear()
            orch.switches = 0
            self.cache.k.zero_()
            self.cache.v.zero_()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        pooled = False  # this thread has OpenMP workers: it stepped since it last went idle
        while True:
            with self._cv:
                if pooled and not self._stop and not self._waiting and not self._running:
                    release_thread_pool()  # idle: its workers would throttle another thread's (vision.openmp)
                    pooled = False
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                self._admit()
                batch = list(self._running)
                waiting = [(r.adapter, time.monotonic() - r.arrived) for r in self._waiting]
            if not batch:
                time.sleep(0.005)  # every waiting request is blocked on an adapter slot
                continue
            pooled = True
            try:
                self._step(batch, waiting)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("vision step failed")
                self.failures += 1
                code = "out_of_memory" if isinstance(e, torch.OutOfMemoryError) else "server_error"
                for r in batch:
                    self._finish(r, Event("error", text=f"the model step failed: {type(e).__name__}", code=code))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, None)
        self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> None:
        """Move waiting requests in, in arrival order, while a cache slot and their adapter's device slot
        are free. Under the "merged" baseline only the lane's adapter is admitted (:meth:`_lane`), so
        that every step runs merged; "auto" admits everyone and prices each step's mode instead
        (``Orchestrator.decide``)."""
        merged = self.orchestrator is not None and self.orchestrator.cfg.policy == "merged"
        lane = self._lane() if merged else None
        keep: list[GenRequest] = []
        for r in self._waiting:
            if not self._free_slots or (merged and r.adapter != lane):
                keep.append(r)
                continue
            if r.adapter is not None:
                try:
                    slot = self.adapters.acquire(r.adapter)
                except AdapterError as e:  # unloaded while it waited
                    self._emit(r, Event("error", text=e.message, code=e.code))
                    continue
                if slot is None:
                    keep.append(r)
                    continue
                r.adapter_slot = slot
            r.cache_slot = self._free_slots.pop()
            mma = getattr(self.model, "mma", None)
            if mma is not None and r.adapter is None:  # the slot takes its modality's routing (prefill and decode)
                mma.assign(r.cache_slot, IMAGE if r.prompt.images else TEXT)
            # a LoRA adapter's request keeps the slot unassigned: the plain model its adapter was trained on
            self._running.append(r)
        self._waiting = deque(keep)

    def _lane(self) -> str | None:
        """The "merged" baseline's lane (None: the base model's): the running requests' adapter, else the
        oldest waiting request's. Requests of other adapters wait for the lane to drain, however long: a
        server that only ever runs merged must."""
        if self._running:
            return self._running[0].adapter
        return self._waiting[0].adapter if self._waiting else None

    @torch.inference_mode()
    def _step(self, batch: list[GenRequest], waiting: list[tuple[str | None, float]]) -> None:
        model, dev = self.model, self.model.device
        segments, chunks, token_slots, owners = [], [], [], []
        budget = self.cfg.max_prefill_tokens
        for r in batch:
            if r.embeds is None and r.prefilled == 0:
                try:
                    if getattr(model, "mma", None) is not None:  # the image-feature adapter: as the routing above
                        model.mma.visual_enabled = r.adapter is None
                    r.embeds = model.embed_prompt(r.prompt)
                except Exception as e:  # noqa: BLE001 - e.g. an image the encoder rejects
                    self._finish(r, Event("error", text=f"cannot encode the prompt: {e}", code="invalid_request"))
                    continue
            total = r.prompt.length
            if r.prefilled == 0 and r.gate is not None:
                self._gated_prefill(r)  # alone, before the packed step: it prunes as it goes
                continue
            if r.prefilled < total:
                if budget <= 0:
                    continue
                n = min(total - r.prefilled, budget)
                budget -= n
                mrope = getattr(r.prompt, "positions", None)  # Qwen2-VL: (3, length) positions of the prompt
                segments.append(Segment(r.cache_slot, r.prefilled, n, positions=None if mrope is None
                                        else mrope[:, r.prefilled:r.prefilled + n]))
                chunks.append(r.embeds[r.prefilled:r.prefilled + n])
                r.prefilled += n
                r.cache_len += n
                r.pos_offset = getattr(r.prompt, "rope_delta", 0)  # decoded tokens: cache index + delta
            else:
                segments.append(Segment(r.cache_slot, r.cache_len, 1, r.pos_offset))
                r.cache_len += 1
                chunks.append(None)  # filled below, batched
            token_slots.extend([r.adapter_slot] * segments[-1].length)
            owners.append(r)
        if not segments:
            return
        if any(a.adapter_slot > b.adapter_slot for a, b in itertools.pairwise(owners)):
            # grouped by adapter, each LoRA segment is one run of rows: no gather and scatter per layer
            order = sorted(range(len(owners)), key=lambda i: owners[i].adapter_slot)
            segments, chunks, owners = ([xs[i] for i in order] for xs in (segments, chunks, owners))
            token_slots = [r.adapter_slot for r, seg in zip(owners, segments, strict=True) for _ in range(seg.length)]
        dec_idx = [i for i, c in enumerate(chunks) if c is None]
        if dec_idx:
            ids = torch.tensor([owners[i].out_ids[-1] for i in dec_idx], device=dev)
            emb = model.embed_tokens(ids)
        plan = None
        if self.orchestrator is not None:
            res = self._resident_waiting(waiting)
            remaining: dict[int, int] = {}
            for r in owners:
                left = r.params.max_tokens - len(r.out_ids)
                remaining[r.adapter_slot] = max(remaining.get(r.adapter_slot, 0), left)
            plan = self.orchestrator.decide(token_slots, res, remaining)
        for j, i in enumerate(dec_idx):
            chunks[i] = emb[j:j + 1]
        embeds = torch.cat(chunks)
        prepared = False
        logits = None
        if self.graphs is not None and self.graphs.fits(segments):
            add = sub = None
            if plan is not None:
                self.orchestrator.prepare(plan)
                prepared = True
                add, sub = self.orchestrator.batch_slots(plan, token_slots)
            logits = self._graph_step(embeds, segments, add, sub)
        if logits is None:
            step = PackedStep.build(segments, dev)
            if plan is not None:
                slots_t = torch.tensor(token_slots, dtype=torch.long, device=dev)
                (self.orchestrator.set_batch if prepared else self.orchestrator.apply)(plan, slots_t)
            logits = model.decoder(embeds, step, self.cache)  # (n_segments, vocab)
        nxt = self._sample(logits, owners)  # reads the logits back: the step has finished on the device
        self.steps += 1
        self.last_batch = len(owners)
        if self.orchestrator is not None:
            self.mode_last = self.orchestrator.current.mode.value
        for r, tok in zip(owners, nxt, strict=True):
            if r.prefilled < r.prompt.length:
                continue  # a middle chunk of a long prompt: its logits are not an answer yet
            r.out_ids.append(int(tok))
            self.tokens_generated += 1
            self._advance(r)

    def _graph_step(self, embeds: torch.Tensor, segments: list[Segment], add: list[int] | None,
                    sub: list[int] | None) -> torch.Tensor | None:
        """The step from a CUDA graph. If a graph fails (capture is the fragile part), graphs are turned
        off for good, logged, and None says to run the step eagerly: its cache writes are idempotent."""
        try:
            return self.graphs.run(embeds, segments, add, sub)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - serving goes on without graphs
            log.exception("a CUDA-graph step failed: this scheduler runs its steps eagerly from now on")
            self.graphs = None
            return None

    def _gated_prefill(self, r: GenRequest) -> None:
        """AdaToken-3D: the whole prompt at once, spatial tokens pruned by the gate; then decode as usual."""
        from vision.gate3d import gated_prefill

        if self.orchestrator is not None:  # a gated request has no adapter: plain weights, no LoRA term
            self.orchestrator.apply(Plan(Mode.UNMERGED), torch.full((1,), -1, dtype=torch.long,
                                                                    device=self.model.device))
        spans = r.prompt.spatial_spans()
        out = gated_prefill(self.model.decoder, self.cache, r.cache_slot, r.embeds, spans, r.gate)
        r.prefilled, r.cache_len, r.pos_offset = r.prompt.length, out.kept, out.pos_offset
        total_spatial = sum(e - s for s, e in spans)
        r.gate_stats = {"spatial_tokens_total": total_spatial,
                        "spatial_tokens_kept": total_spatial - (r.prompt.length - out.kept)}
        r.out_ids.append(int(self._sample(out.logits[None], [r])[0]))
        self.tokens_generated += 1
        self._advance(r)

    def _resident_waiting(self, waiting: list[tuple[str | None, float]]) -> list[tuple[int, float]]:
        if self.adapters is None:
            return []
        resident = self.adapters.resident()
        return [(resident.get(a, -2) if a is not None else -1, s * 1e3) for a, s in waiting]

    def _sample(self, logits: torch.Tensor, owners: list[GenRequest]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(owners):
            p = r.params
            if p.temperature <= 0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1)
            if p.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                keep = sp.cumsum(0) - sp < p.top_p
                probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
            out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return out

    def _advance(self, r: GenRequest) -> None:
        tok = r.out_ids[-1]
        stop_tok = tok in self.model.stop_ids and not r.params.ignore_eos
        if r.detok is None:
            r.detok = IncrementalDetokenizer(self.model.tokenizer)
        if not stop_tok:
            r.detok.push(tok)
        finish = "stop" if stop_tok else ("length" if len(r.out_ids) >= r.params.max_tokens else "")
        if finish:
            r.detok.flush()
        text = r.detok.text
        for s in r.params.stop:  # what was sent holds no stop string: look from just before it
            cut = text.find(s, max(0, r.sent_chars - len(s) + 1))
            if cut >= 0:
                text, finish = text[:cut], "stop"
        held = 0 if finish else _held_back(text, r.params.stop)
        new = text[r.sent_chars:len(text) - held]
        if new:
            r.sent_chars += len(new)
            self._emit(r, Event("delta", text=new))
        if finish:
            usage = {"prompt_tokens": r.prompt.length, "completion_tokens": len(r.out_ids),
                     "total_tokens": r.prompt.length + len(r.out_ids), **r.gate_stats}
            self._finish(r, Event("done", finish_reason=finish, usage=usage))

    def _finish(self, r: GenRequest, event: Event | None) -> None:
        if r in self._running:
            self._running.remove(r)
            self._free_slots.append(r.cache_slot)
            if getattr(self.model, "mma", None) is not None:
                self.model.mma.release(r.cache_slot)  # an unassigned slot: the plain model
            if r.adapter is not None and r.adapter_slot >= 0:
                self.adapters.release(r.adapter)
        r.cache_slot = r.adapter_slot = -1
        r.embeds = None
        reason = "cancelled" if event is None else (event.finish_reason or event.code or event.kind)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if event is not None:
            self._emit(r, event)

    @staticmethod
    def _emit(r: GenRequest, event: Event) -> None:
        try:
            r.emit(event)
        except Exception:  # noqa: BLE001 - a vanished client must not stop the loop
            r.cancelled = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters kept back: a partial UTF-8 character, or a prefix of a stop string at the end."""
    if text.endswith("\ufffd"):
        return 1
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return held
