"""ATMM: the batched multi-LoRA operator (VaLoRA, METHODS.md §2), public API, PyTorch path and reference.

For a batch whose tokens belong to different adapters of different ranks it adds, in place::

    y[t] += scaling[s] * (x[t] @ lora_a[s, :r_s].T) @ lora_b[s, :, :r_s].T     s = token_slots[t], r_s = slot_ranks[s]

for every token with ``s >= 0`` (``-1`` = base model only, nothing added). Shapes::

    x (T, d_in)   y (T, d_out)   lora_a (S, r_max, d_in)   lora_b (S, d_out, r_max)   scaling (S,)   slot_ranks (S,)

``S`` device slots each hold one adapter in peft/vLLM layout (A is (r, d_in), B is (d_out, r)), stored at
``r_max`` columns; only the first ``r_s`` rows of A and columns of B of slot ``s`` are read, so a slot need
not be zero-padded. An adapter whose modules have different ranks (peft ``rank_pattern``) is stored at its
largest rank with zero padding, so that a slot has one rank for every layer.

The batch is described once per forward by :func:`make_batch_info` (one host sync there, none per layer):
tokens sorted by slot (stable), one *segment* per adapter present. Both fast paths are grouped, one
problem per segment, as two products: shrink (d_in -> r) then expand (r -> d_out).

Backends (``atmm(..., backend=)``): ``"triton"`` (``atmm_triton.py``, tile shapes from the profiled table
of ``tiling.py``), ``"torch"`` (below: one matmul pair per segment), ``"reference"`` (a per-token loop in
float64), ``"auto"`` (Triton on CUDA when importable, else torch).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(frozen=True, eq=False)  # eq=False: identity semantics, tensors do not compare to bool
class LoRABatchInfo:
    """Where each adapter's tokens are; built once per forward batch and shared by every layer.

    Device tensors (on ``token_slots.device``), ``T`` tokens, ``T_a`` of them with an adapter, ``G`` segments::

        token_slots (T,)  int64   the input: slot of each token's adapter, -1 = base only
        token_order (T_a,) int64  token indices sorted by slot (stable); segment g is
                                  token_order[seg_starts[g] : seg_starts[g] + seg_lens[g]]
        seg_starts, seg_lens, seg_slots, seg_ranks (G,) int32
        workspace   (T_a, max_rank) float32  shrink output of the Triton path, reused by every layer

    Host copies (Python ints) drive the grid sizes and the torch path, so no layer syncs with the device.
    ``contiguous``: every segment's tokens are one run of consecutive input rows (a prefill batch, or any
    batch already grouped by adapter); the torch path then works on slices of x and y, without gather.
    """

    token_slots: torch.Tensor
    token_order: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots: torch.Tensor
    seg_ranks: torch.Tensor
    workspace: torch.Tensor
    num_tokens: int
    num_active: int
    num_segments: int
    max_seg_len: int
    max_rank: int
    max_slot: int
    contiguous: bool
    seg_slots_host: tuple[int, ...]
    seg_starts_host: tuple[int, ...]
    seg_lens_host: tuple[int, ...]
    seg_ranks_host: tuple[int, ...]
    seg_first_host: tuple[int, ...]  # first input row of each segment (meaningful when contiguous)
    static: bool = False  # built by static_batch_info: device tensors refilled in place, Triton only


def _int_vector(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {getattr(t, 'dtype', type(t))} "
                         f"of shape {tuple(getattr(t, 'shape', ()))}")


def make_batch_info(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> LoRABatchInfo:
    """Sort the batch's tokens by adapter slot and describe the segments (one host sync).

    token_slots (T,) int: slot per token, -1 = base model only; slot_ranks (S,) int: rank of each slot.
    Tokens of a rank-0 slot are treated as base-only. Raises ValueError on a slot outside [-1, S) or a
    negative rank.
    """
    _int_vector(token_slots, "token_slots")
    _int_vector(slot_ranks, "slot_ranks")
    device = token_slots.device
    slots = token_slots.detach().to("cpu", torch.int64)  # the one host sync of the batch
    ranks = slot_ranks.detach().to("cpu", torch.int64)
    S = ranks.numel()
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= S):
        raise ValueError(f"token_slots must be in [-1, {S}) for {S} slots, got values in "
                         f"[{int(slots.min())}, {int(slots.max())}]")
    if S and int(ranks.min()) < 0:
        raise ValueError(f"slot_ranks must be >= 0, got {ranks.tolist()}")
    active = slots >= 0
    if S:
        active &= ranks[slots.clamp(min=0)] > 0
    idx = torch.nonzero(active).squeeze(1)
    order = idx[torch.argsort(slots[idx], stable=True)]
    seg_slots, seg_lens = torch.unique_consecutive(slots[order], return_counts=True)
    seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
    seg_ranks = ranks[seg_slots]
    seg_first = order[seg_starts] if order.numel() else seg_starts
    same_seg = torch.diff(slots[order]) == 0
    contiguous = bool((torch.diff(order)[same_seg] == 1).all())  # consecutive rows inside every segment
    max_rank = int(seg_ranks.max()) if seg_ranks.numel() else 0
    T_a = int(order.numel())
    i32 = dict(device=device, dtype=torch.int32)
    return LoRABatchInfo(
        token_slots=token_slots.to(torch.int64),
        token_order=order.to(device),
        seg_starts=seg_starts.to(**i32), seg_lens=seg_lens.to(**i32), seg_slots=seg_slots.to(**i32),
        seg_ranks=seg_ranks.to(**i32),
        workspace=torch.empty((T_a, max(max_rank, 1)), device=device, dtype=torch.float32),
        num_tokens=int(slots.numel()), num_active=T_a, num_segments=int(seg_slots.numel()),
        max_seg_len=int(seg_lens.max()) if seg_lens.numel() else 0, max_rank=max_rank,
        max_slot=int(seg_slots.max()) if seg_slots.numel() else -1, contiguous=contiguous,
        seg_slots_host=tuple(seg_slots.tolist()), seg_starts_host=tuple(seg_starts.tolist()),
        seg_lens_host=tuple(seg_lens.tolist()), seg_ranks_host=tuple(seg_ranks.tolist()),
        seg_first_host=tuple(seg_first.tolist()),
    )


def static_batch_info(capacity: int, slots: int, max_rank: int, device: torch.device | str) -> LoRABatchInfo:
    """A batch description whose device tensors never move, for a captured CUDA graph to read.

    One segment per slot, in slot order (``seg_slots`` = 0..S-1), ``capacity`` rows of ``token_order``; each
    step rewrites the tensors in place (:func:`fill_batch_info`). The host fields are the worst case (every
    slot a segment, ``capacity`` tokens in one, rank ``max_rank``), so the Triton grid launched when the graph
    was captured covers any fill: programs past a segment's length or rank exit at once. The grouped torch
    path reads host fields instead, so a static info runs on the Triton backend (or the reference) only.
    """
    if capacity < 1 or slots < 1 or max_rank < 1:
        raise ValueError("capacity, slots and max_rank must be at least 1")
    rows = torch.full((2, capacity), -1, dtype=torch.int64, device=device)  # token slots, token order
    segs = torch.zeros(4, slots, dtype=torch.int32, device=device)  # starts, lengths, ranks, slots
    segs[3] = torch.arange(slots, dtype=torch.int32, device=device)
    zeros = (0,) * slots
    return LoRABatchInfo(  # rows and segs stay whole: fill_batch_info rewrites each with one copy
        token_slots=rows[0], token_order=rows[1], seg_starts=segs[0], seg_lens=segs[1], seg_ranks=segs[2],
        seg_slots=segs[3], workspace=torch.zeros((capacity, max_rank), device=device, dtype=torch.float32),
        num_tokens=capacity, num_active=capacity, num_segments=slots, max_seg_len=capacity, max_rank=max_rank,
        max_slot=slots - 1, contiguous=False, seg_slots_host=tuple(range(slots)), seg_starts_host=zeros,
        seg_lens_host=zeros, seg_ranks_host=zeros, seg_first_host=zeros, static=True,
    )


def fill_batch_info(info: LoRABatchInfo, token_slots: list[int], slot_ranks: list[int]) -> None:
    """Describe this step's tokens in a static info's tensors, in place: two small host-to-device copies.

    ``token_slots``: host ints, at most the info's capacity (the rest are base-only padding); ``slot_ranks``:
    each slot's rank (the manager's host mirror). Same grouping as :func:`make_batch_info`: tokens sorted by
    slot (stable), a rank-0 slot's tokens treated as base-only. No device sync.
    """
    if not info.static:
        raise ValueError("fill_batch_info rewrites a static batch info (static_batch_info), not a built one")
    cap, S = info.num_tokens, info.num_segments
    if len(token_slots) > cap or len(slot_ranks) != S:
        raise ValueError(f"{len(token_slots)} tokens for a capacity of {cap}, {len(slot_ranks)} ranks for {S} slots")
    if any(s < -1 or s >= S for s in token_slots):
        raise ValueError(f"token_slots must be in [-1, {S})")
    if any(r < 0 or r > info.max_rank for r in slot_ranks):
        raise ValueError(f"slot ranks must be within [0, {info.max_rank}], got {slot_ranks}")
    lens = [0] * S
    order: list[list[int]] = [[] for _ in range(S)]
    for t, s in enumerate(token_slots):
        if s >= 0 and slot_ranks[s] > 0:
            order[s].append(t)
            lens[s] += 1
    flat = [t for ts in order for t in ts]
    starts, acc = [], 0
    for n in lens:
        starts.append(acc)
        acc += n
    pad = cap - len(token_slots)
    rows = torch.tensor([list(token_slots) + [-1] * pad, flat + [0] * (cap - len(flat))], dtype=torch.int64)
    torch.as_strided(info.token_slots, (2, cap), (cap, 1)).copy_(rows)  # token_slots, token_order
    segs = torch.tensor([starts, lens, slot_ranks], dtype=torch.int32)
    torch.as_strided(info.seg_starts, (3, S), (S, 1)).copy_(segs)  # starts, lengths, ranks


def check_inputs(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor, slot_ranks: torch.Tensor, info: LoRABatchInfo) -> None:
    """Cheap shape/dtype/device checks (no device sync); ValueError says what to fix."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D (T, d), got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[0] != info.num_tokens or y.shape[0] != info.num_tokens:
        raise ValueError(f"x has {x.shape[0]} and y {y.shape[0]} rows, but the batch info was built for "
                         f"{info.num_tokens} tokens; call make_batch_info for this batch")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be (S, r_max, d_in) and lora_b (S, d_out, r_max), got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    S, r_max, d_in = lora_a.shape
    if lora_b.shape[0] != S or lora_b.shape[2] != r_max:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
                         f"expected ({S}, d_out, {r_max})")
    if d_in != x.shape[1] or lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"dims: x has d_in={x.shape[1]}, lora_a {d_in}; y has d_out={y.shape[1]}, lora_b "
                         f"{lora_b.shape[1]}")
    if scaling.shape != (S,) or slot_ranks.shape != (S,):
        raise ValueError(f"scaling and slot_ranks must have shape ({S},), got {tuple(scaling.shape)} and "
                         f"{tuple(slot_ranks.shape)}")
    if info.max_rank > r_max:
        raise ValueError(f"an adapter in the batch has rank {info.max_rank} > r_max={r_max} of the slot buffers")
    if info.max_slot >= S:
        raise ValueError(f"the batch uses slot {info.max_slot} but only {S} slots are given")
    if not (x.dtype == y.dtype == lora_a.dtype == lora_b.dtype) or not x.dtype.is_floating_point:
        raise ValueError(f"x, y, lora_a, lora_b must share one floating dtype, got {x.dtype}, {y.dtype}, "
                         f"{lora_a.dtype}, {lora_b.dtype}")
    devs = {t.device for t in (y, x, lora_a, lora_b, scaling, slot_ranks, info.token_order)}
    if len(devs) != 1:
        raise ValueError(f"all tensors and the batch info must be on one device, got {sorted(map(str, devs))}")


def atmm(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
         slot_ranks: torch.Tensor, info: LoRABatchInfo, *, backend: str = "auto") -> torch.Tensor:
    """y += LoRA(x) for every token's adapter; y (T, d_out) is updated in place and returned.

    ``slot_ranks`` must hold the ranks given to :func:`make_batch_info`: the fast paths use the per-segment
    copy taken there (``info.seg_ranks`` on the device, ``info.seg_ranks_host``), so that no layer syncs and
    the workspace is never indexed past its width; the reference reads ``slot_ranks`` itself.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(y, x, lora_a, lora_b, scaling, slot_ranks, info)
    if backend == "auto":
        backend = "triton" if (x.is_cuda or info.static) and triton_available() else "torch"
    if info.static and backend == "torch":
        raise ValueError("a static batch info (static_batch_info, for CUDA graphs) runs on the Triton backend only")
    if backend == "reference":
        return atmm_reference(y, x, lora_a, lora_b, scaling, slot_ranks, info)
    if info.num_segments == 0:
        return y
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package; pip install triton")
        from vision.lora.atmm_triton import atmm_triton

        return atmm_triton(y, x, lora_a, lora_b, scaling, slot_ranks, info)
    return atmm_torch(y, x, lora_a, lora_b, scaling, info)


SlotWeights = tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]
"""One slot's LoRA factors as the grouped torch path multiplies them: ``(A_sᵀ (d_in, r), B_sᵀ (r, d_out), scale)``."""


def atmm_torch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               scaling: torch.Tensor, info: LoRABatchInfo) -> torch.Tensor:
    """The grouped PyTorch path (CPU, and the CUDA fallback): one shrink/expand matmul pair per segment.

    Ranks come from ``info`` (host), so low-rank adapters only multiply their own r_s columns; the scale
    stays a device tensor (no sync). Callers that keep their slots' views and host scales between calls
    (``LoRALinear``) go to :func:`grouped_lora` directly and skip building them per call.
    """
    weights = {s: (lora_a[s, :r].T, lora_b[s, :, :r].T, scaling[s])
               for s, r in zip(info.seg_slots_host, info.seg_ranks_host, strict=True)}
    return grouped_lora(y, x, weights, info)


def grouped_lora(y: torch.Tensor, x: torch.Tensor, weights: Mapping[int, SlotWeights | None] | Sequence[SlotWeights | None],
                 info: LoRABatchInfo) -> torch.Tensor:
    """``y += scale_s · (x A_sᵀ) B_sᵀ`` per segment, with each slot's factors given (``weights[slot]``; ``None``
    = the slot leaves this layer alone). No checks beyond the caller's: the hot loop of a step.

    A ``contiguous`` batch adds into slices of y in place (``addmm_``): per segment two products, nothing
    else allocated but the (n, r) shrink output. Otherwise x is gathered once (T_a, d_in) and the expand
    output (T_a, d_out) added back with one ``index_add_``.
    """
    segs = zip(info.seg_slots_host, info.seg_starts_host, info.seg_lens_host, info.seg_first_host, strict=True)
    if info.contiguous:
        for s, _, n, first in segs:
            w = weights[s]
            if w is None:
                continue
            a_t, b_t, scale = w
            rows = x if n == x.shape[0] else x[first:first + n]
            xa = torch.mm(rows, a_t)                           # (n, r)
            out = y if n == y.shape[0] else y[first:first + n]
            if isinstance(scale, torch.Tensor):
                out.addmm_(xa.mul_(scale), b_t)
            else:
                out.addmm_(xa, b_t, alpha=scale)               # (n, d_out) += s · (n, r) @ (r, d_out)
        return y
    xs = x.index_select(0, info.token_order)                   # (T_a, d_in), sorted by slot
    out = torch.empty((info.num_active, y.shape[1]), device=y.device, dtype=y.dtype)
    for s, start, n, _ in segs:
        w = weights[s]
        if w is None:
            out[start:start + n].zero_()
            continue
        a_t, b_t, scale = w
        xa = torch.mm(xs[start:start + n], a_t).mul_(scale)
        torch.mm(xa, b_t, out=out[start:start + n])
    return y.index_add_(0, info.token_order, out)


def atmm_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: torch.Tensor, slot_ranks: torch.Tensor, info: LoRABatchInfo) -> torch.Tensor:
    """Obviously correct and slow: one token at a time, in float64, straight from the definition."""
    ranks = slot_ranks.tolist()
    for t, s in enumerate(info.token_slots.tolist()):
        if s < 0 or ranks[s] == 0:
            continue
        r = ranks[s]
        a = lora_a[s, :r].double()        # (r, d_in)
        b = lora_b[s, :, :r].double()     # (d_out, r)
        delta = float(scaling[s]) * (b @ (a @ x[t].double()))
        y[t] = (y[t].double() + delta).to(y.dtype)
    return y


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
