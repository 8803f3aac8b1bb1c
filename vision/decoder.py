"""The language model's serving forward: packed prefill + decode over a slot KV cache, LoRA-ready.

Hugging Face's Llama / Qwen2 / Mistral causal LMs keep their weights (``nn.Linear`` modules, norms, the
rotary embedding) and we run them our own way, as vLLM and gpt-fast do: one *packed* step carries the
tokens of several requests at once — whole prompts being prefilled and single tokens being decoded —
so every linear layer (and the batched LoRA operator wrapped around it) sees one (T, d) matrix, while
attention runs per prompt (causal) and batched for the decode tokens. Keys and values live in a
preallocated cache indexed by request slot: no allocation grows with the conversation.

Shapes: T packed tokens; S cache slots; L max positions; Hq / Hkv query / key-value heads; D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class Segment:
    """``length`` consecutive tokens of one request (its cache ``slot``) written at cache index ``start``.

    ``pos_offset``: rotary position minus cache index. Zero normally; positive after tokens were pruned
    from the cache at prefill (3D token gating keeps the survivors' original positions, so later tokens
    continue from the unpruned length), and Qwen2-VL's ``rope_delta`` when decoding after an image.
    ``positions``: explicit M-RoPE positions (temporal, height, width rows) of a prompt chunk holding
    image tokens; the step then carries (3, T) positions, other segments repeating theirs in each row.
    """

    slot: int
    start: int
    length: int
    pos_offset: int = 0
    positions: Tensor | None = field(default=None, compare=False)  # (3, length) M-RoPE rows of a prompt chunk


@dataclass(frozen=True)
class PackedStep:
    """What one forward computes, built once per step (host-side lists become a few small tensors)."""

    segments: tuple[Segment, ...]
    positions: Tensor  # (T,) int64 rotary position of each packed token, or (3, T) with M-RoPE segments
    prefill: tuple[int, ...]  # indices into segments with length > 1 (or a first token)
    decode: tuple[int, ...]  # indices of single-token continuations
    decode_slots: Tensor  # (B_dec,) int64
    decode_positions: Tensor  # (B_dec,) int64 cache index of each decode token
    logits_rows: Tensor  # (n_segments,) the packed row of each segment's last token
    offsets: tuple[int, ...]  # packed row of each segment's first token
    decode_rows: Tensor  # (B_dec,) packed rows of the decode tokens
    decode_mask: Tensor | None  # (B_dec, 1, 1, L_dec) cache rows each decode token sees; shared by every layer

    @staticmethod
    def build(segments: list[Segment], device: torch.device) -> PackedStep:
        pos, rows, pre, dec, offsets = [], [], [], [], []
        offset = 0
        for i, s in enumerate(segments):
            if s.length < 1:
                raise ValueError("a segment must hold at least one token")
            if s.positions is not None and tuple(s.positions.shape) != (3, s.length):
                raise ValueError(f"a segment's positions must be (3, {s.length}), not {tuple(s.positions.shape)}")
            pos.extend(range(s.start + s.pos_offset, s.start + s.pos_offset + s.length))
            offsets.append(offset)
            offset += s.length
            rows.append(offset - 1)
            (dec if s.length == 1 and s.start > 0 else pre).append(i)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        decode_mask = None
        if dec:
            starts = as_long([segments[i].start for i in dec])
            end = max(segments[i].start for i in dec) + 1
            decode_mask = (torch.arange(end, device=device).unsqueeze(0) <= starts.unsqueeze(1))[:, None, None, :]
        positions = as_long(pos)
        if any(s.positions is not None for s in segments):
            positions = positions.expand(3, -1).clone()
            for s, o in zip(segments, offsets, strict=True):
                if s.positions is not None:
                    positions[:, o:o + s.length] = s.positions.to(device)
        return PackedStep(
            tuple(segments), positions, tuple(pre), tuple(dec),
            as_long([segments[i].slot for i in dec]), as_long([segments[i].start for i in dec]), as_long(rows),
            tuple(offsets), as_long([offsets[i] for i in dec]), decode_mask,
        )


class KVCache:
    """Per-layer keys and values: (S, Hkv, L, D) each, written in place by position."""

    def __init__(self, n_layers: int, slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PackedDecoder(nn.Module):
    """Serving forward over a Hugging Face decoder-only LM's modules (weights shared, not copied)."""

    def __init__(self, hf_lm: nn.Module) -> None:
        super().__init__()
        cfg = hf_lm.config
        arch = getattr(cfg, "model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported language model {arch!r}: the packed decoder runs {', '.join(SUPPORTED_ARCHS)}")
        base = hf_lm.model
        self.config = cfg
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = hf_lm.lm_head
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.max_positions = getattr(cfg, "max_position_embeddings", 2048)
        self.sliding_window = getattr(cfg, "sliding_window", None) if arch == "mistral" else None

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(len(self.layers), slots, max_len, self.n_kv_heads, self.head_dim, p.device, p.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, embeds: Tensor, step: PackedStep, cache: KVCache) -> Tensor:
        """(T, d) input embeddings → (n_segments, vocab) logits of each segment's last token."""
        x = embeds.unsqueeze(0)  # (1, T, d): HF's rotary module wants a batch dim
        cos, sin = self.rotary_emb(x, step.positions.unsqueeze(-2))  # (1, T, D); M-RoPE: (3, 1, T) in
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, D)
        h = embeds
        for li, layer in enumerate(self.layers):
            h = h + self._attention(li, layer.self_attn, layer.input_layernorm(h), cos, sin, step, cache)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h[step.logits_rows])
        return self.lm_head(h).float()

    def _attention(self, li: int, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
                   step: PackedStep, cache: KVCache) -> Tensor:
        T = x.shape[0]
        q = attn.q_proj(x).view(T, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(T, self.n_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms (absent in Llama / Qwen2)
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = torch.empty_like(q)  # (T, Hq, D)
        kc, vc = cache.k[li], cache.v[li]  # (S, Hkv, L, D)
        offsets = step.offsets
        for i in step.prefill:
            s, o = step.segments[i], offsets[i]
            kc[s.slot, :, s.start:s.start + s.length] = k[o:o + s.length].transpose(0, 1)
            vc[s.slot, :, s.start:s.start + s.length] = v[o:o + s.length].transpose(0, 1)
            end = s.start + s.length
            keys, values = kc[s.slot, :, :end], vc[s.slot, :, :end]  # (Hkv, end, D)
            qs = q[o:o + s.length].transpose(0, 1)  # (Hq, n, D)
            mask = None
            if s.start > 0:  # a continuation chunk: causal against the cache, offset by start
                qpos = torch.arange(s.start, end, device=x.device).unsqueeze(1)
                mask = torch.arange(end, device=x.device).unsqueeze(0) <= qpos
            o_att = F.scaled_dot_product_attention(
                qs.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads,
            )
            out[o:o + s.length] = o_att[0].transpose(0, 1)
        if step.decode:
            rows = step.decode_rows
            slots, pos = step.decode_slots, step.decode_positions
            kc[slots, :, pos] = k[rows]
            vc[slots, :, pos] = v[rows]
            end = step.decode_mask.shape[-1]
            keys, values = kc[slots, :, :end], vc[slots, :, :end]  # (B, Hkv, end, D)
            o_att = F.scaled_dot_product_attention(
                q[rows].unsqueeze(2), keys, values, attn_mask=step.decode_mask,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )  # (B, Hq, 1, D)
            out[rows] = o_att[:, :, 0]
        return attn.o_proj(out.reshape(T, self.n_heads * self.head_dim))

