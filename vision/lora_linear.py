"""A linear layer that serves many LoRA adapters at once: base product, then ATMM per token's adapter.

Wrapped around the base model's ``nn.Linear`` modules *after* the model is built (a serving transform;
the model stays plain). Each layer owns ``S`` device slots of LoRA weights — ``lora_a`` (S, r_max, d_in)
and ``lora_b`` (S, d_out, r_max), peft's / vLLM's layout — filled and cleared by the adapter manager.
What a forward computes is decided once per step by the orchestrator and shared by every layer through
one :class:`LoRAContext`:

* **unmerged**: ``y = x Wᵀ + atmm(x, own adapters)``;
* **merged** (adapter k): ``y = x W'ᵀ`` with ``W' = W + s_k B_k A_k`` kept in a second buffer, so
  unmerging is a pointer swap (exact: the base weight is never modified);
* **mixture** (k merged, others present): ``y = x W'ᵀ + atmm(x, own adapters except k)
  − atmm(x, k for every token not of k)`` — VaLoRA's ``x(B_iA_i − B_kA_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.lora.atmm import LoRABatchInfo, SlotWeights, atmm, grouped_lora


@dataclass
class LoRAContext:
    """Per-step LoRA work shared by every wrapped layer (set by the orchestrator before a forward)."""

    add: LoRABatchInfo | None = None  # tokens that add their own adapter's delta
    subtract: LoRABatchInfo | None = None  # tokens that remove the merged adapter's delta (mixture mode)
    merged_slot: int = -1  # the slot folded into every layer's weight, -1 = none
    backend: str = "auto"
    slot_ranks: Tensor | None = None  # (S,) each slot's adapter rank (max over layers), kept by the manager
    slot_ranks_host: list[int] | None = None  # its host mirror


class LoRALinear(nn.Module):
    """``nn.Linear`` + LoRA slots. ``forward`` shape: (T, d_in) → (T, d_out)."""

    def __init__(self, base: nn.Linear, ctx: LoRAContext, slots: int, max_rank: int) -> None:
        super().__init__()
        if slots < 1 or max_rank < 1:
            raise ValueError("slots and max_rank must be at least 1")
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.register_buffer("lora_a", torch.zeros(slots, max_rank, self.in_features, dtype=w.dtype, device=w.device))
        self.register_buffer("lora_b", torch.zeros(slots, self.out_features, max_rank, dtype=w.dtype, device=w.device))
        self.register_buffer("scaling", torch.zeros(slots, dtype=torch.float32, device=w.device))
        self.register_buffer("neg_scaling", torch.zeros(slots, dtype=torch.float32, device=w.device))
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.long, device=w.device))
        self._merged: Tensor | None = None  # W + s B A of ctx.merged_slot, allocated on first merge
        self._merged_slot = -1
        self._ranks_host = [0] * slots  # host mirrors: merging reads them without a device sync
        self._scaling_host = [0.0] * slots
        self._widths = [0] * slots  # rows of A each slot really holds in this layer (0: not targeted)
        self._views: tuple[list[SlotWeights | None], list[SlotWeights | None]] | None = None  # (+s, −s) per slot
        self._views_of: Tensor | None = None  # the lora_a buffer the views were taken of

    # ------------------------------------------------------------------ slots
    @torch.no_grad()
    def set_lora(self, slot: int, a: Tensor | None, b: Tensor | None, scaling: float, rank: int) -> None:
        """Fill ``slot``: ``a`` (r, d_in), ``b`` (d_out, r); ``None`` = this adapter leaves the layer alone."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None and b is not None:
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a, non_blocking=True)
            self.lora_b[slot, :, :r].copy_(b, non_blocking=True)
        # a layer the adapter does not target keeps rank 0: the operator skips it at no cost
        self.ranks[slot] = rank if a is not None else 0
        self._ranks_host[slot] = rank if a is not None else 0
        self._scaling_host[slot] = scaling
        self._widths[slot] = a.shape[0] if a is not None and b is not None else 0
        self._views = None
        self.scaling[slot] = scaling
        self.neg_scaling[slot] = -scaling
        if slot == self._merged_slot:
            self._merged_slot = -1  # stale

    def reset_lora(self, slot: int) -> None:
        self.set_lora(slot, None, None, 0.0, 0)

    def rank_state(self) -> tuple[Tensor, list[int], list[int]]:
        """What :meth:`assume_rank` changes, for :meth:`restore_rank_state`."""
        return self.ranks.clone(), list(self._ranks_host), list(self._widths)

    def assume_rank(self, rank: int) -> None:
        """Treat every slot as holding ``rank`` rows, for timing the costliest case whatever is loaded (the rows
        past a slot's own are zero, so outputs do not change). Undo with :meth:`restore_rank_state`."""
        self.ranks.fill_(rank)
        self._widths = [rank] * len(self._widths)
        self._views = None

    def restore_rank_state(self, state: tuple[Tensor, list[int], list[int]]) -> None:
        ranks, host, widths = state
        self.ranks.copy_(ranks)
        self._ranks_host, self._widths, self._views = list(host), list(widths), None

    @torch.inference_mode()
    def merge(self, slot: int, rank: int | None = None) -> None:
        """Fold ``slot`` into a second weight buffer; the base weight itself stays untouched.

        ``rank`` overrides the slot's rank (calibration times a full-rank merge).
        """
        if slot == self._merged_slot and rank is None:
            return
        w = self.base.weight
        if self._merged is None:
            self._merged = torch.empty_like(w)
        r = self._ranks_host[slot] if rank is None else rank
        if r == 0:
            self._merged.copy_(w)
        elif w.dtype == torch.float32:  # one fused product into the buffer: no (d_out, d_in) temporaries
            torch.addmm(w, self.lora_b[slot, :, :r], self.lora_a[slot, :r], alpha=self._scaling_host[slot],
                        out=self._merged)
        else:  # half precision: add the delta in float32, round once
            delta = self.lora_b[slot, :, :r].float() @ self.lora_a[slot, :r].float()  # (d_out, d_in)
            torch.add(w.float(), delta, alpha=self._scaling_host[slot], out=delta)
            self._merged.copy_(delta)
        self._merged_slot = slot

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.ctx
        weight = self.base.weight
        if ctx.merged_slot >= 0:
            if ctx.merged_slot != self._merged_slot:
                raise RuntimeError("layer not merged with the context's adapter: call the orchestrator's apply()")
            weight = self._merged
        y = F.linear(x, weight, self.base.bias)
        if ctx.add is not None:
            self._lora(y, x, ctx.add, subtract=False)
        if ctx.subtract is not None:
            self._lora(y, x, ctx.subtract, subtract=True)
        return y

    def _lora(self, y: Tensor, x: Tensor, info: LoRABatchInfo, subtract: bool) -> None:
        """``y ±= LoRA(x)``. On the torch path the slots' views and host scales are kept between steps
        (:meth:`_slot_views`), so a segment costs its two products and nothing else; measured on a 2-core
        CPU at one decode token, that cut a LoRA projection's overhead over the base product from ~48 µs
        to ~7 µs."""
        backend = self.ctx.backend
        if backend == "torch" or (backend == "auto" and not x.is_cuda and not info.static):
            if x.shape[0] != info.num_tokens:
                raise ValueError(f"x has {x.shape[0]} rows but the batch info was built for {info.num_tokens} tokens")
            if info.max_slot >= len(self._widths):
                raise ValueError(f"the batch uses slot {info.max_slot} but the layer has {len(self._widths)} slots")
            if not info.static:
                grouped_lora(y, x, self._slot_views()[subtract], info)
                return
        scaling = self.neg_scaling if subtract else self.scaling
        atmm(y, x, self.lora_a, self.lora_b, scaling, self.ranks, info, backend=backend)

    def _slot_views(self) -> tuple[list[SlotWeights | None], list[SlotWeights | None]]:
        """Per slot ``(A_sᵀ, B_sᵀ, ±scale)`` over the rows the slot really holds here; rebuilt after a
        ``set_lora`` or when the buffers were replaced (``module.to``)."""
        if self._views is None or self._views_of is not self.lora_a:
            add: list[SlotWeights | None] = []
            sub: list[SlotWeights | None] = []
            for s, r in enumerate(self._widths):
                if r == 0:
                    add.append(None)
                    sub.append(None)
                    continue
                a_t, b_t = self.lora_a[s, :r].T, self.lora_b[s, :, :r].T
                add.append((a_t, b_t, self._scaling_host[s]))
                sub.append((a_t, b_t, -self._scaling_host[s]))
            self._views, self._views_of = (add, sub), self.lora_a
        return self._views


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wrap_decoder_layers(layers: nn.ModuleList, ctx: LoRAContext, slots: int, max_rank: int,
                        targets: tuple[str, ...] = TARGETS) -> dict[str, LoRALinear]:
    """Replace each targeted ``nn.Linear`` of every decoder layer in place; key ``layers.{i}.{path}``.

    The key is the suffix that peft's state-dict names end with, whatever wraps the LM (a causal LM,
    a LLaVA model), so an adapter file maps onto these layers by suffix.
    """
    wrapped: dict[str, LoRALinear] = {}
    w = next(layers.parameters())
    ctx.slot_ranks = torch.zeros(slots, dtype=torch.long, device=w.device)
    ctx.slot_ranks_host = [0] * slots
    for i, layer in enumerate(layers):
        for parent_name, parent in list(layer.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    lin = LoRALinear(child, ctx, slots, max_rank)
                    setattr(parent, child_name, lin)
                    path = f"{parent_name}.{child_name}" if parent_name else child_name
                    wrapped[f"layers.{i}.{path}"] = lin
    if not wrapped:
        raise ValueError(f"no linear layer named any of {targets} in the decoder layers")
    return wrapped
