"""CUDA graphs of the serving step: prefill chunks and decode tokens replayed without Python or launch gaps.

Why: on a GPU a step of a small model is launch-bound. ``bench lora-serving`` measured SmolLM2-135M's shape
(30 layers) at ~50 ms per eager step on an H200 without LoRA and ~90 ms with one ATMM call per projection:
host time spent launching well over a thousand small kernels, so one more kernel cost as much as its work
and no LoRA mode could pay for itself. Capturing decode steps alone (as vLLM's V0 did) left every step that
also carried a prompt chunk eager, and under load that is nearly every step. So the whole packed step is
captured, as vLLM V1 and SGLang capture mixed batches:

* **Every token is a row** with its own cache slot, cache row and rotary position, prompt tokens included.
  Keys and values of all rows are written first; then each row attends to its own slot's rows up to its
  own (a per-row mask), which is causal attention within a prompt chunk and decode attention for a decode
  token, in one batched call. The cost is a gather of (rows × attended length) keys per layer, small next
  to launch overhead at this size; steps that would gather more than ``max_gather`` key elements per layer
  run eagerly (prefill per prompt), which is where a large model's step is bound by its work anyway.
* **Shapes are bucketed** (:class:`GraphKey`): rows padded up to a bucket, the attended length up to a
  power of two, the LoRA mode (merged weights or not, an add batch, a subtract batch). Padded rows write to
  a scratch cache slot that no request owns, attend to its first row only, and carry no adapter.
* **Inputs live in static buffers**: embeddings, rotary positions, cache slots and rows, the rows whose
  logits are wanted, and the LoRA batches (``vision.lora.atmm.static_batch_info``, filled in place). The
  merged weights live in each layer's second buffer, which a merge rewrites in place, so one graph serves
  whichever adapter is merged.
* A key's graph is **captured on first use**, the real step running as the warm-up (its cache writes then
  happen once more, with the same values), into one memory pool shared by all graphs (they never run
  concurrently), as vLLM does.

Not captured: Qwen2-VL prompt chunks with M-RoPE positions, the AdaToken-3D gated prefill, the mixture-of-
modality router (routing is computed on the host per step), and CPU runs. ``capture=False`` runs the same
padded static step eagerly: the CPU tests check it against the plain packed forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from vision.decoder import KVCache, PackedDecoder, PackedStep, Segment
from vision.lora.atmm import LoRABatchInfo, fill_batch_info, static_batch_info, triton_available
from vision.lora_linear import LoRAContext

log = logging.getLogger(__name__)

MIN_LENGTH = 64  # the smallest attended-length bucket


@dataclass(frozen=True)
class GraphKey:
    rows: int  # packed tokens, padded to a bucket
    length: int  # cache rows attended, padded to a power of two (capped at the cache length)
    merged: bool  # the layers read their merged weight buffers
    add: bool  # some token adds its adapter's delta
    subtract: bool  # some token subtracts the merged adapter's delta (mixture mode)


def row_buckets(capacity: int) -> tuple[int, ...]:
    """1, 2, 4, every 8 up to 64, then every 64 up to ``capacity``: padding wastes at most 7 rows of a
    decode batch and 63 of a step carrying a prompt chunk."""
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    sizes = {b for b in (1, 2, 4) if b < capacity} | set(range(8, min(capacity, 65), 8))
    sizes |= set(range(128, capacity, 64)) | {capacity}
    return tuple(sorted(s for s in sizes if s <= capacity))


def length_bucket(rows: int, max_len: int) -> int:
    """The power of two (at least ``MIN_LENGTH``) covering ``rows`` attended cache rows, capped at ``max_len``."""
    n = MIN_LENGTH
    while n < rows:
        n *= 2
    return min(n, max_len)


class StepGraphs:
    """Packed steps of up to ``capacity`` tokens and ``max_segments`` requests over ``cache``, from CUDA graphs.

    ``scratch_slot``: a cache slot no request uses (padded rows write there). ``ctx``: the LoRA context of
    the wrapped layers, or None for a model without LoRA. ``capture``: None = on CUDA only. ``max_gather``:
    the most key elements (rows × attended length × kv heads × head dim) a step may gather per layer (2**27:
    256 MB in 16 bits); larger steps are left to the eager path.
    """

    def __init__(self, decoder: PackedDecoder, cache: KVCache, scratch_slot: int, capacity: int, max_segments: int,
                 ctx: LoRAContext | None = None, capture: bool | None = None, max_gather: int = 1 << 27) -> None:
        dev = cache.k.device
        if not 0 <= scratch_slot < cache.slots:
            raise ValueError(f"scratch_slot {scratch_slot} is not a slot of a {cache.slots}-slot cache")
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if ctx is not None and not triton_available():
            raise ValueError("step graphs with LoRA need the Triton kernels (pip install triton)")
        self.decoder, self.cache, self.ctx, self.scratch = decoder, cache, ctx, scratch_slot
        self.buckets = row_buckets(capacity)
        self.max_segments, self.max_gather = max_segments, max_gather
        n = self.buckets[-1]
        self.embeds = torch.zeros(n, decoder.hidden_size, device=dev, dtype=cache.k.dtype)
        # one buffer, refilled with one copy a step: rotary positions, cache slots, cache rows (n each), then the
        # rows whose logits are wanted (max_segments)
        self.inputs = torch.zeros(3 * n + max_segments, dtype=torch.long, device=dev)
        self.index = self.inputs[:3 * n].view(3, n)
        self.logit_rows = self.inputs[3 * n:]
        self.rows = torch.arange(n, device=dev)
        self.cols = torch.arange(cache.max_len, device=dev)
        self.lora: dict[int, tuple[LoRABatchInfo, LoRABatchInfo]] = {}  # per row bucket: add, subtract
        if ctx is not None:
            if ctx.slot_ranks_host is None:
                raise ValueError("the LoRA context has no slot ranks: wrap the layers with wrap_decoder_layers")
            slots, r_max = len(ctx.slot_ranks_host), self._max_rank()
            self.lora = {b: (static_batch_info(b, slots, r_max, dev), static_batch_info(b, slots, r_max, dev))
                         for b in self.buckets}
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps = 0  # steps run (replayed, or uncaptured)
        self.capture_ms = 0.0

    def _max_rank(self) -> int:
        from vision.lora_linear import LoRALinear

        ranks = [m.lora_a.shape[1] for m in self.decoder.modules() if isinstance(m, LoRALinear)]
        if not ranks:
            raise ValueError("a LoRA context was given but the decoder has no LoRA layers")
        return max(ranks)

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def fits(self, segments: list[Segment]) -> bool:
        """Whether a step of these segments can run here (else the caller runs it eagerly)."""
        T = sum(s.length for s in segments)
        if not segments or len(segments) > self.max_segments or self.bucket(T) is None:
            return False
        if any(s.positions is not None for s in segments):
            return False  # M-RoPE rows: three positions per token
        end = max(s.start + s.length for s in segments)
        per_row = self.decoder.n_kv_heads * self.decoder.head_dim
        gather = self.bucket(T) * length_bucket(end, self.cache.max_len) * per_row
        return end <= self.cache.max_len and gather <= self.max_gather

    @torch.inference_mode()
    def run(self, embeds: Tensor, segments: list[Segment], add: list[int] | None = None,
            subtract: list[int] | None = None) -> Tensor:
        """(n_segments, vocab) float logits of each segment's last token; ``embeds`` (T, d) packed as segments.

        ``add`` / ``subtract``: per token, the adapter slot whose delta it adds / subtracts (-1 none), as
        ``Orchestrator.batch_slots`` gives them; the context's ``merged_slot`` must be set (``prepare``).
        The result is a view of a static buffer: read it before the next step.
        """
        if not self.fits(segments):
            raise ValueError("this step does not fit the graphs (see fits()): run it eagerly")
        T, n_seg = embeds.shape[0], len(segments)
        if T != sum(s.length for s in segments):
            raise ValueError(f"{T} embedding rows for segments of {sum(s.length for s in segments)} tokens")
        if self.ctx is None and (add is not None or subtract is not None):
            raise ValueError("LoRA batches for a decoder without LoRA layers")
        Tp = self.bucket(T)
        end = max(s.start + s.length for s in segments)
        merged = self.ctx is not None and self.ctx.merged_slot >= 0
        key = GraphKey(Tp, length_bucket(end, self.cache.max_len), merged, add is not None, subtract is not None)
        positions, slots, cache_rows, last = [], [], [], []
        for s in segments:
            cache_rows.extend(range(s.start, s.start + s.length))
            positions.extend(range(s.start + s.pos_offset, s.start + s.pos_offset + s.length))
            slots.extend([s.slot] * s.length)
            last.append(len(cache_rows) - 1)
        pad, n = Tp - T, self.index.shape[1]
        self.inputs.copy_(torch.tensor(positions + [0] * (n - T) + slots + [self.scratch] * (n - T) + cache_rows
                                       + [0] * (n - T) + last + [0] * (self.max_segments - n_seg), dtype=torch.long))
        self.embeds[:T].copy_(embeds)
        if pad:
            self.embeds[T:Tp].zero_()
        if self.ctx is not None:
            info_add, info_sub = self.lora[Tp]
            ranks = self.ctx.slot_ranks_host
            if add is not None:
                fill_batch_info(info_add, add, ranks)
            if subtract is not None:
                fill_batch_info(info_sub, subtract, ranks)
        self.steps += 1
        if not self.capture:
            return self._forward(key)[:n_seg]
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key)
        else:
            entry[0].replay()
        return entry[1][:n_seg]

    def _forward(self, key: GraphKey) -> Tensor:
        """The padded static step: what a graph captures (everything it reads is a static buffer)."""
        T = key.rows
        positions, slots, cache_rows = self.index[0, :T], self.index[1, :T], self.index[2, :T]
        mask = (self.cols[:key.length].unsqueeze(0) <= cache_rows.unsqueeze(1))[:, None, None, :]
        rows = self.rows[:T]
        n_logits = min(T, self.max_segments)
        step = PackedStep(segments=(Segment(0, 1, 1),) * T, positions=positions, prefill=(), decode=tuple(range(T)),
                          decode_slots=slots, decode_positions=cache_rows, logits_rows=self.logit_rows[:n_logits],
                          offsets=tuple(range(T)), decode_rows=rows, decode_mask=mask)
        ctx = self.ctx
        if ctx is None:
            return self.decoder(self.embeds[:T], step, self.cache)
        saved = ctx.add, ctx.subtract
        info_add, info_sub = self.lora[T]
        ctx.add = info_add if key.add else None
        ctx.subtract = info_sub if key.subtract else None
        try:
            return self.decoder(self.embeds[:T], step, self.cache)
        finally:
            ctx.add, ctx.subtract = saved

    def _capture(self, key: GraphKey) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up on a side stream (the real step: Triton compiles, cuBLAS picks), capture, replay."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the voice engine) may keep using the GPU while this one captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(key)
        graph.replay()
        self.graphs[key] = (graph, out)
        ms = (time.perf_counter() - t0) * 1e3
        self.capture_ms += ms
        log.debug("captured step graph %s in %.0f ms", key, ms)
        return graph, out

    def stats(self) -> dict[str, float | int]:
        return {"graphs": len(self.graphs), "steps": self.steps, "capture_ms": round(self.capture_ms, 1)}
