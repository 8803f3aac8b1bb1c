"""Gate-aware fine-tuning of the 3D LMM: some training sequences are seen through the AdaToken-3D gate.

Why: the 3D LMM was trained with every spatial token present, and on it a 60% prefill-FLOPs cut costs about four
points of accuracy (docs/gate3d.md). The gate itself is fixed by the method (vision/gate3d.py); what can change is
the model: trained on sequences pruned as the gate prunes them, the LoRA and the projector learn to answer from the
survivors. This module reproduces ``gated_prefill`` on the Hugging Face training model with attention masks, so
the training forward stays one batched, differentiable pass:

* **Selection** (:meth:`GateMasks.select`, no gradient): the prompts alone (system, cloud, first question, up to the
  first turn's last prompt token) run through the LM; before each stage layer, the last prompt token's query is
  scored against the alive keys (softmax, mean over heads, as ``last_row_attention``) and the top-k alive spatial
  tokens stay alive from that layer on. Prompt rows never read later rows (causal), so this equals the prompt part
  of the full sequence.
* **Masks** (:meth:`GateMasks.layer_mask`): in layer ``l``, rows up to the last prompt token read the spatial keys
  alive at ``l`` (prefill: pruned tokens leave the sequence at their stage); every later row (the answer, follow-up
  turns) reads only the *final* survivors, in every layer — decoding runs over the compacted cache.
* Sequences not drawn for the gate (``share``) get the plain causal mask, so ungated accuracy keeps being trained.

``gate_hooks`` installs the masks as forward pre-hooks on the decoder layers (``attention_mask`` replaced), so the
model code is untouched; the masks are additive floats, which every attention implementation accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vision.decoder import _rotate_half
from vision.gate3d import GatePolicy, last_row_attention


@dataclass
class GateBatch:
    """Where things are in a right-padded training batch of B sequences of length T."""

    lengths: Tensor  # (B,) real tokens per sequence
    spatial: tuple[int, int]  # [start, end) of the spatial tokens (the same in every sequence: one prefix)
    last_prompt: Tensor  # (B,) row of the first turn's last prompt token (the row that scores at inference)
    gated: Tensor  # (B,) bool: this sequence is seen through the gate


def inner_model(lm):
    """The decoder stack (embeddings → layers → norm) of a Hugging Face causal LM, peft-wrapped or not."""
    return lm.base_model.model.model if hasattr(lm, "peft_config") else lm.model


def decoder_layers(lm) -> list:
    return list(inner_model(lm).layers)


class GateMasks:
    """Per-layer alive spatial tokens of one batch, chosen as ``gated_prefill`` chooses them, and the masks that
    replay them."""

    def __init__(self, policy: GatePolicy, batch: GateBatch, n_layers: int) -> None:
        self.batch, self.n_layers = batch, n_layers
        s, e = batch.spatial
        self.stages = dict(policy.keep_counts(e - s))
        self.alive: list[Tensor] = []  # per layer, (B, n_spatial) bool: alive for the prompt rows; filled by select()

    @torch.no_grad()
    def select(self, lm, x: Tensor) -> None:
        """Run the prompts (``x`` (B, T, d), the batch's inputs, cut after the latest last prompt token) through
        ``lm`` under the gate, recording the alive spatial tokens per layer."""
        b = self.batch
        T = int(b.last_prompt.max()) + 1
        s, e = b.spatial
        alive = torch.ones(len(b.lengths), e - s, dtype=torch.bool, device=x.device)
        self.alive = []
        lengths = torch.minimum(b.lengths, b.last_prompt + 1)
        mask: list[Tensor] = []

        def pre(li: int):
            def hook(module, args, kwargs):
                nonlocal alive
                h = args[0] if args else kwargs["hidden_states"]
                if li in self.stages:
                    alive = self._prune(module, h, kwargs["position_embeddings"], alive, self.stages[li])
                if not self.alive or alive is not self.alive[-1]:  # a new mask only where a stage pruned
                    mask[:] = [self._mask(alive, alive, b.last_prompt, lengths, T, h.dtype)]
                self.alive.append(alive)
                kwargs["attention_mask"] = mask[0]
                return args, kwargs
            return hook

        handles = [layer.register_forward_pre_hook(pre(li), with_kwargs=True)
                   for li, layer in enumerate(decoder_layers(lm))]
        try:
            inner_model(lm)(inputs_embeds=x[:, :T])
        finally:
            for hd in handles:
                hd.remove()

    def _prune(self, layer, h: Tensor, pos_emb: tuple[Tensor, Tensor], alive: Tensor, keep_n: int) -> Tensor:
        """The gate's choice at one stage layer for every gated sequence: the top-k alive spatial tokens by the last
        prompt token's attention (its query against the alive keys, softmax, mean over heads)."""
        attn = layer.self_attn
        cfg = attn.config
        Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        cos, sin = pos_emb
        s, e = self.batch.spatial
        out = alive.clone()
        for bi in torch.nonzero(self.batch.gated).flatten().tolist():
            if int(alive[bi].sum()) <= keep_n:
                continue
            p = int(self.batch.last_prompt[bi])
            xn = layer.input_layernorm(h[bi, : p + 1])
            q = attn.q_proj(xn[p:]).view(1, Hq, D)
            k = attn.k_proj(xn).view(p + 1, Hkv, D)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            c, sn = cos[min(bi, cos.shape[0] - 1), : p + 1, None], sin[min(bi, sin.shape[0] - 1), : p + 1, None]
            q = q * c[p:] + _rotate_half(q) * sn[p:]
            k = k * c + _rotate_half(k) * sn
            keys = torch.ones(p + 1, dtype=torch.bool, device=h.device)
            keys[s:e] = alive[bi]
            rows = keys.nonzero().squeeze(1)  # the alive keys the scoring row reads, as in gated_prefill
            score = torch.full((p + 1,), float("-inf"), device=h.device)
            score[rows] = last_row_attention(q[0], k[rows], Hq)
            top = score[s:e].topk(keep_n).indices
            out[bi] = False
            out[bi, top] = True
        return out

    def _mask(self, prompt_alive: Tensor, final_alive: Tensor, last_prompt: Tensor, lengths: Tensor, T: int,
              dtype: torch.dtype) -> Tensor:
        """Additive (B, 1, T, T) mask: causal, no padding keys; rows up to ``last_prompt`` read the spatial keys in
        ``prompt_alive``, later rows those in ``final_alive``; text keys are never pruned."""
        B = len(lengths)
        s, e = self.batch.spatial
        dev = prompt_alive.device
        idx = torch.arange(T, device=dev)
        pa = torch.ones(B, T, dtype=torch.bool, device=dev)
        fa = torch.ones_like(pa)
        pa[:, s:e], fa[:, s:e] = prompt_alive, final_alive
        late = idx[None, :] > last_prompt[:, None]  # (B, T) rows after the prompt
        keys = torch.where(late[:, :, None], fa[:, None, :], pa[:, None, :])  # (B, T rows, T keys)
        ok = keys & (idx[None, :] <= idx[:, None])[None] & (idx[None, :] < lengths[:, None])[:, None, :]
        ok |= torch.eye(T, dtype=torch.bool, device=dev)[None]  # a row always reads itself (padding rows stay finite)
        return torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill(~ok, torch.finfo(dtype).min).unsqueeze(1)

    def layer_mask(self, li: int, T: int, dtype: torch.dtype) -> Tensor:
        """The training forward's mask in layer ``li`` (after :meth:`select`)."""
        b = self.batch
        return self._mask(self.alive[li], self.alive[-1], b.last_prompt, b.lengths, T, dtype)


@contextmanager
def gate_hooks(lm, masks: GateMasks, T: int, dtype: torch.dtype) -> Iterator[None]:
    """While open, every decoder layer of ``lm`` attends with ``masks.layer_mask`` instead of the plain mask."""
    built: list[Tensor] = []
    for li in range(masks.n_layers):  # layers between stages share their alive set, hence their mask
        same = li > 0 and masks.alive[li] is masks.alive[li - 1]
        built.append(built[-1] if same else masks.layer_mask(li, T, dtype))

    def pre(li: int):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = built[li]
            return args, kwargs
        return hook

    handles = [layer.register_forward_pre_hook(pre(li), with_kwargs=True)
               for li, layer in enumerate(decoder_layers(lm))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
