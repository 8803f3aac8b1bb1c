"""AdaToken-3D spatial-token gating at prefill (and FastV, its baseline), over the packed decoder's KV cache.

``gated_prefill`` runs one request's prompt through a :class:`~vision.decoder.PackedDecoder`'s layers itself,
with the same modules and the same SDPA attention as ``PackedDecoder.forward``, and at each *stage layer* of a
:class:`GatePolicy`:

1. computes the layer's q/k/v for the tokens still alive (as usual);
2. scores every alive spatial token by the attention the last prompt token pays it — one attention row, the
   last token's query against the alive keys, softmax, mean over heads — computed apart, so the layer's
   attention itself stays one SDPA call;
3. keeps the ``round(keep · n_spatial)`` best (``keep`` is relative to the *original* spatial count), in their
   original order, and drops the others' rows from q/k/v and the residual stream; this layer and every later
   one run on the survivors only.

Positions: survivors keep their rotary positions (the cos/sin of their original index). KV cache: every layer
writes its alive tokens' keys and values; at the end every layer's cache rows are compacted to the *final*
survivors (cache index 0..kept-1), so decoding sees one consistent token set in every layer. Decode steps then
run through ``PackedDecoder.forward`` with ``Segment(slot, kept + i, 1, pos_offset=T - kept)``: cache index
``kept + i``, rotary position ``T + i``, as if nothing had been pruned. (Layers before the first stage computed
the survivors' keys with the pruned tokens present; that is the method, and ``dense_forward`` in
``vision/gate3d_flows.py`` reproduces it with per-layer masks as the reference twin.)

``GatePolicy.fastv(K, R)``: FastV — one stage at layer K keeping 1 − R of the spatial tokens. ``policy=None`` or
keep 1.0 everywhere: the plain prefill (tested equal to ``PackedDecoder.forward``).

Analytic prefill FLOPs (``prefill_flops``): matmul FLOPs (2 per multiply-add) of every layer's projections,
MLP and causal attention for the tokens it processes, plus the scoring rows and the last token's LM head.

Shapes: T prompt tokens; n alive tokens; Hq / Hkv heads; D head dim; d model width.

``python -m vision.gate3d analyze [--quick]`` — the contribution analysis (vision/gate3d_flows.py): the fitted curve
and a first policy from it. ``python -m vision.gate3d select [--quick] [--write]`` — the shipped policy: candidates
built from that curve, chosen by validation accuracy and FLOPs (vision/gate3d_select.py). ``exact_match`` /
``answer_correct`` / ``scene_questions`` are the scoring both the selection and ``bench/gate3d.py`` use.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vision.decoder import KVCache, PackedDecoder, _rotate_half


@dataclass(frozen=True)
class GatePolicy:
    """``stages``: (layer, keep ratio of the original spatial tokens); layers increasing, ratios non-increasing."""

    stages: tuple[tuple[int, float], ...]
    name: str = "adatoken3d"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        layers = [s[0] for s in self.stages]
        ratios = [s[1] for s in self.stages]
        if layers != sorted(set(layers)) or any(li < 0 for li in layers):
            raise ValueError(f"stage layers must be distinct, increasing and >= 0: {layers}")
        if any(not 0.0 < r <= 1.0 for r in ratios) or ratios != sorted(ratios, reverse=True):
            raise ValueError(f"keep ratios must be in (0, 1] and non-increasing: {ratios}")

    @staticmethod
    def fastv(k: int = 2, r: float = 0.5) -> GatePolicy:
        """FastV: after layer ``k`` (0-based: layers 0..k-1 see every token) drop ``r`` of the spatial tokens."""
        return GatePolicy(((k, 1.0 - r),), "fastv")

    @staticmethod
    def ungated() -> GatePolicy:
        return GatePolicy((), "ungated")

    def keep_counts(self, n_spatial: int) -> list[tuple[int, int]]:
        return [(li, max(1, round(r * n_spatial))) for li, r in self.stages]

    def for_depth(self, n_layers: int, from_layers: int) -> GatePolicy:
        """The same stages at the same relative depths of a model with ``n_layers`` layers."""
        stages, seen = [], set()
        for li, r in self.stages:
            lj = min(n_layers - 1, round(li * n_layers / from_layers))
            if lj not in seen:
                stages.append((lj, r))
                seen.add(lj)
        return GatePolicy(tuple(stages), self.name, {**self.meta, "scaled_from_layers": from_layers})

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "stages": [list(s) for s in self.stages], "meta": self.meta}, indent=1)

    @staticmethod
    def load(path: str | Path) -> GatePolicy:
        d = json.loads(Path(path).read_text())
        return GatePolicy(tuple((int(li), float(r)) for li, r in d["stages"]), d.get("name", "adatoken3d"),
                          d.get("meta", {}))


@dataclass
class GatedPrefill:
    logits: Tensor  # (vocab,) float32, of the last prompt token
    kept: int  # cache rows after compaction: the first decode token goes to cache index ``kept``
    pos_offset: int  # T - kept: what every later Segment of this request carries
    keep_index: Tensor  # (kept,) original prompt index of each cache row
    layer_alive: list[Tensor]  # per layer, the original indices of the tokens it processed
    layer_tokens: list[int]  # per layer, how many
    scored_layers: list[int]  # layers where a scoring row was computed (FLOPs)

    def decode_segment(self, slot: int, generated: int):
        """The Segment of this request's ``generated``-th decode token (0 = the first token after the prompt)."""
        from vision.decoder import Segment

        return Segment(slot, self.kept + generated, 1, self.pos_offset)


def spatial_mask(T: int, spans: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    m = torch.zeros(T, dtype=torch.bool, device=device)
    for s, e in spans:
        if not 0 <= s < e <= T:
            raise ValueError(f"spatial span {(s, e)} is outside the prompt of {T} tokens")
        m[s:e] = True
    return m


def last_row_attention(q_row: Tensor, k: Tensor, n_heads: int) -> Tensor:
    """(Hq, D) query of one token, (n, Hkv, D) keys of the tokens it sees → (n,) attention, mean over heads."""
    n_kv = k.shape[1]
    kk = k.repeat_interleave(n_heads // n_kv, dim=1) if n_kv != n_heads else k  # (n, Hq, D)
    s = torch.einsum("hd,nhd->hn", q_row.float(), kk.float()) / math.sqrt(q_row.shape[-1])
    return s.softmax(-1).mean(0)


@torch.no_grad()
def gated_prefill(decoder: PackedDecoder, cache: KVCache, slot: int, embeds: Tensor, spans: list[tuple[int, int]],
                  policy: GatePolicy | None) -> GatedPrefill:
    """Prefill one request's whole prompt (``embeds`` (T, d)) into cache ``slot``, pruning spatial tokens.

    ``spans``: ``[start, end)`` of the spatial tokens in the prompt. The last prompt token must not be spatial
    (it scores the others). Returns the last token's logits and what decoding needs (see the module doc).
    """
    T = embeds.shape[0]
    dev = embeds.device
    sp = spatial_mask(T, spans, dev)
    if sp[-1]:
        raise ValueError("the last prompt token is spatial: a text token must close the prompt to score the others")
    if T > cache.max_len:
        raise ValueError(f"a prompt of {T} tokens does not fit a cache of {cache.max_len} positions")
    n_sp = int(sp.sum())
    stages = dict(policy.keep_counts(n_sp)) if policy is not None else {}
    positions = torch.arange(T, device=dev)
    cos, sin = decoder.rotary_emb(embeds.unsqueeze(0), positions.unsqueeze(0))
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, D)
    Hq, Hkv, D = decoder.n_heads, decoder.n_kv_heads, decoder.head_dim
    alive = positions
    h = embeds
    layer_alive, scored = [], []
    for li, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, Hq, D)
        k = attn.k_proj(x).view(n, Hkv, D)
        v = attn.v_proj(x).view(n, Hkv, D)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s = cos[alive], sin[alive]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        keep_n = stages.get(li)
        alive_sp = sp[alive]
        if keep_n is not None and int(alive_sp.sum()) > keep_n:
            score = last_row_attention(q[-1], k, Hq)  # (n,) the last prompt token's row
            scored.append(li)
            sp_rows = alive_sp.nonzero().squeeze(1)
            top = sp_rows[score[sp_rows].topk(keep_n).indices]
            keep_rows = torch.cat([(~alive_sp).nonzero().squeeze(1), top]).sort().values
            h, q, k, v, alive = h[keep_rows], q[keep_rows], k[keep_rows], v[keep_rows], alive[keep_rows]
            n = keep_rows.shape[0]
        cache.k[li, slot, :, :n] = k.transpose(0, 1)
        cache.v[li, slot, :, :n] = v.transpose(0, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                           v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=Hq != Hkv)
        h = h + attn.o_proj(o[0].transpose(0, 1).reshape(n, Hq * D))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        layer_alive.append(alive)
    kept = alive.shape[0]
    for li, la in enumerate(layer_alive):  # every layer's cache rows → the final survivors, in order
        if la.shape[0] != kept:
            rows = torch.searchsorted(la, alive)
            cache.k[li, slot, :, :kept] = cache.k[li, slot, :, rows]
            cache.v[li, slot, :, :kept] = cache.v[li, slot, :, rows]
    logits = decoder.lm_head(decoder.norm(h[-1:])).float()[0]
    return GatedPrefill(logits, kept, T - kept, alive, layer_alive, [a.shape[0] for a in layer_alive], scored)


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class LMShape:
    """What the FLOP count needs of a decoder: width, depth, heads, MLP width, vocabulary."""

    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @staticmethod
    def of(decoder: PackedDecoder) -> LMShape:
        cfg = decoder.config
        return LMShape(decoder.hidden_size, len(decoder.layers), decoder.n_heads, decoder.n_kv_heads,
                       decoder.head_dim, cfg.intermediate_size, decoder.vocab_size)


def layer_tokens(policy: GatePolicy | None, T: int, n_spatial: int, n_layers: int) -> tuple[list[int], list[int]]:
    """Tokens each layer processes under ``policy`` (and the layers that score), without running the model."""
    stages = dict(policy.keep_counts(n_spatial)) if policy is not None else {}
    n_text, cur = T - n_spatial, n_spatial
    out, scored = [], []
    for li in range(n_layers):
        if li in stages and cur > stages[li]:
            cur = stages[li]
            scored.append(li)
        out.append(n_text + cur)
    return out, scored


def prefill_flops(shape: LMShape, tokens: list[int], scored: list[int] = ()) -> int:
    """Matmul FLOPs of a prefill whose layer ``l`` processes ``tokens[l]`` tokens (causal attention)."""
    s = shape
    proj = 2 * s.d * (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim)  # q, o and k, v per token
    mlp = 2 * 3 * s.d * s.ffn  # gate, up, down per token
    total = 0
    for n in tokens:
        attn = 2 * 2 * s.heads * s.head_dim * n * (n + 1) // 2  # QKᵀ and PV over causal pairs
        total += n * (proj + mlp) + attn
    for li in scored:
        total += 2 * s.heads * s.head_dim * tokens[li - 1 if li > 0 else 0]  # one query row against the keys
    return total + 2 * s.d * s.vocab  # the last token's LM head


def policy_flops(shape: LMShape, policy: GatePolicy | None, T: int, n_spatial: int) -> int:
    toks, scored = layer_tokens(policy, T, n_spatial, shape.layers)
    return prefill_flops(shape, toks, scored)


def main(argv: list[str] | None = None) -> int:
    """``analyze`` (vision/gate3d_flows.py) or ``select`` (vision/gate3d_select.py)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["select"]:
        from vision.gate3d_select import main as select_main

        return select_main(argv[1:])
    from vision.gate3d_flows import main as flows_main

    return flows_main(argv)


@torch.no_grad()
def generate(model, prompt, policy: GatePolicy | None, cache: KVCache, slot: int = 0, max_new_tokens: int = 6,
             embeds: Tensor | None = None) -> list[int]:
    """Greedy answer of one request: gated prefill (``policy``; ``None`` = the plain packed prefill), then decode
    steps through ``PackedDecoder.forward`` with the request's ``pos_offset`` — what the scheduler does per request."""
    from vision.decoder import PackedStep, Segment

    dec = model.decoder
    emb = model.embed_prompt(prompt) if embeds is None else embeds
    T = emb.shape[0]
    if policy is None:
        logits = dec(emb, PackedStep.build([Segment(slot, 0, T)], emb.device), cache)[0]
        kept, offset = T, 0
    else:
        g = gated_prefill(dec, cache, slot, emb, prompt.spatial_spans(), policy)
        logits, kept, offset = g.logits, g.kept, g.pos_offset
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok in model.stop_ids:
            break
        out.append(tok)
        if i == max_new_tokens - 1:
            break
        step = PackedStep.build([Segment(slot, kept + i, 1, offset)], emb.device)
        logits = dec(model.embed_tokens(torch.tensor([tok], device=emb.device)), step, cache)[0]
    return out


# ------------------------------------------------------------------ scoring (shared by bench/gate3d.py and select)
def exact_match(reply: str, answer: str) -> bool:
    """The benchmark's score: the reply, lower-cased, stripped of spaces and a final full stop, equals the answer."""
    return reply.strip().lower().rstrip(".") == answer


def scene_questions(split: str, n: int | None, data: Path | None = None) -> tuple[Path, object, list]:
    """``(folder, normalised points (scenes, P, 6), the first n examples)`` of a built scene3d split: ``data``, else
    data/scene3d, else data/scene3d-quick."""
    from vision.scene3d import DEFAULT_OUT, QUICK_OUT, load_split
    from vision.train3d import normalise_scenes

    folder = next((Path(f) for f in (data, DEFAULT_OUT, QUICK_OUT) if f and (Path(f) / f"{split}.npz").is_file()),
                  None)
    if folder is None:
        raise SystemExit(f"no scene set with a {split} split: run python -m vision.scene3d build [--quick]")
    pts, _, _, ex = load_split(folder, split)
    return folder, normalise_scenes(pts), ex[:n] if n else ex


def answer_correct(model, prompt, policy: GatePolicy | None, cache: KVCache, embeds: Tensor, answer: str) -> bool:
    """One question scored as the benchmark scores it: greedy ``generate`` under ``policy``, then ``exact_match``."""
    ids = generate(model, prompt, policy, cache, embeds=embeds)
    return exact_match(model.tokenizer.decode(ids, skip_special_tokens=True), answer)


if __name__ == "__main__":
    raise SystemExit(main())
