"""LaVIN's Mixture-of-Modality Adaptation: MM-Adapters and their router, as a transform on a built LM.

One :class:`MMAdapter` sits before self-attention in every decoder layer (it wraps the layer's
``input_layernorm``, so Hugging Face's forward and our packed serving decoder both run it)::

    z  = input_layernorm(h)                                 # (…, d)
    z' = z + s · Σ_k w_k · U_k(drop(A z))                   # A: d→r shared; U_0, U_1: r→d, zero at init
    w  = softmax((W z0 + b) / τ)                            # z0: the modality token's normed state at
                                                            #     layer ``route_layer`` (0 by default)

The *modality token* is a learned embedding, one for text-only requests and one for image+text ones,
placed before the prompt; no other token attends to it and it gets no loss. Since it is first and
attends only to itself, its hidden state in every layer — and so every layer's routing weights — is a
function of the modality alone: :meth:`MixtureOfModalityAdapters.route` runs the modality tokens on
their own (a one-token forward: attention over a single key is its value), which is exactly what the
masked token computes inside the sequence, with no position shift for the others (RoPE sees only
relative positions). At serving time a request's routing weights are taken at its prefill
(:meth:`assign`: its cache slot gets its modality) and reused for every token it decodes; a packed step
mixing text-only and image requests gives each token its own request's weights. Slots never assigned
get zero weights: the adapters leave them alone, i.e. the plain model.

**Which state the router reads.** The paper routes each layer from that layer's state of the modality
token. In SmolLM2 that state stops carrying the modality after a few layers: the first position is the
model's attention sink and takes the same massive activations whatever its embedding, so after the
input layernorm the text and image tokens' states are nearly parallel (cosine similarity, for two random
embeddings of the embedding table's scale: 0.10 at layer 0, 0.80 at layer 1, above 0.99 from layer 3
and 0.9999 from layer 12 on), and a router there can only output the same weights for both (the first
trained run: routing accuracy 0.10). ``route_layer=0`` (the default) routes every layer from the modality token's normed
state at the first layer, where the two embeddings are still apart; ``route_layer=None`` is the paper's
literal form. Either way the weights are a function of the modality alone, computed once per modality.

**Which path is which.** The two paths are symmetric, so nothing in the answer loss ties path 1 to
images; training adds a small auxiliary routing loss (:meth:`MixtureOfModalityAdapters.routing_loss`:
cross-entropy of each layer's routing weights toward path = modality, the modality being known), which
is what makes "routing accuracy" (the share of decisions that take the modality's path) well defined.
vision/train.py fits the routers to it first (:func:`vision.train.fit_router`, a second: no LM forward),
so that from the first step each up-projection learns from its own modality only.

**In the layer's own scale.** ``gain_scaled=True`` multiplies each adapter's output by its layernorm's
gain, i.e. the adapter acts on the unit-RMS state before the gain (``g ⊙ (n + s·Σ w_k U_k(A z))``).
SmolLM2's first-layer gain is ~0.03 (the others 0.16–0.41): without the scaling, AdamW's lr-sized steps
on the up-projections and their biases are large against that layer's inputs, and the image questions
(whose loss the stage-1 projector already made small, so their gradients are small and noisy) lost
exact match from the first steps even on a path of their own (val exact match at step 50: 0.30 vs
0.47 with the scaling, from 0.55 before training).

**The vision side.** LaVIN also puts adapters in the vision encoder's blocks. Here the encoder is frozen
and its features are cached for training, so the practical version is one adapter *after* the encoder:
``visual_rank > 0`` adds :class:`VisualAdapter` (``f + U gelu(D f)``, U zero at init) on the 1280-d
features before the projector, applied with a forward pre-hook on the projector (:func:`attach_visual`).

``MMAConfig(paths=1)`` is the baseline of the paper's ablation: a single shared adapter, no router.
Shapes: L layers, M modalities, P paths (up-projections), T packed tokens, S cache slots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEXT, IMAGE = 0, 1  # modality-token ids


@dataclass
class MMAConfig:
    rank: int = 8  # the shared down-projection's width
    paths: int = 2  # up-projections mixed by the router; 1 = one shared adapter, no router (the baseline)
    temperature: float = 10.0  # τ of the router's softmax (the paper: 10 for 7B, 5 for 13B)
    scale: float = 1.0  # s
    dropout: float = 0.1  # on A z, while training
    modalities: int = 2  # modality tokens: TEXT, IMAGE
    route_layer: int | None = 0  # the router reads the modality token's state here (None: each layer's own)
    visual_rank: int = 0  # width of the adapter on the image encoder's features (0 = none)
    feature_dim: int = 1280  # the image encoder's feature width (EfficientNet-Lite0)
    gain_scaled: bool = False  # the adapter's output times the layernorm's gain (its updates in the layer's scale)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.paths < 1 or self.modalities < 1:
            raise ValueError("rank, paths and modalities must be at least 1")
        if self.route_layer is not None and self.route_layer < 0:
            raise ValueError("route_layer must be a layer index (or None: each layer's own state)")
        if self.visual_rank < 0:
            raise ValueError("visual_rank must be >= 0")
        if self.temperature <= 0:
            raise ValueError("the router's temperature must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def routed(self) -> bool:
        return self.paths > 1


class MMAdapter(nn.Module):
    """``z + s·Σ_k w_k U_k(drop(A z))`` and the router ``softmax((W z0 + b)/τ)`` of one layer."""

    def __init__(self, dim: int, cfg: MMAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(dim, cfg.rank)  # A, shared by the paths
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up = nn.Parameter(torch.zeros(cfg.paths, cfg.rank, dim))  # U_k (stored transposed), zero: identity
        self.up_bias = nn.Parameter(torch.zeros(cfg.paths, dim))
        self.router = nn.Linear(dim, cfg.paths) if cfg.routed else None
        self.drop = nn.Dropout(cfg.dropout)

    def route(self, z0: Tensor) -> Tensor:
        """(…, d) normed hidden state at the modality token → (…, P) routing weights. The router reads it
        at unit RMS: SmolLM2's first-layer norm gain is ~0.03, and at that scale a router learns its
        logits ~30x slower (weights of 0.58 after 100 steps, i.e. no routing at all)."""
        z0 = z0.float()
        z0 = z0 * torch.rsqrt(z0.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = F.linear(z0, self.router.weight.float(), self.router.bias.float())
        return torch.softmax(logits.float() / self.cfg.temperature, dim=-1)

    def forward(self, z: Tensor, w: Tensor | None, gain: Tensor | None = None) -> Tensor:
        """z (…, d); w (…, P) broadcastable to z's leading dims, or None with one path; ``gain`` (d,): the
        layernorm's weight, multiplied into the output when ``cfg.gain_scaled``."""
        h = self.drop(F.linear(z, self.down.weight.to(z.dtype), self.down.bias.to(z.dtype)))  # (…, r)
        P, r, d = self.up.shape
        up, bias = self.up.to(z.dtype), self.up_bias.to(z.dtype)
        if w is None:
            delta = h @ up[0] + bias[0]
        else:
            w = w.to(z.dtype)
            # Σ_k w_k (h U_k + b_k) as one product: [w_0 h, …, w_P h] (…, P·r) @ [U_0; …; U_P] (P·r, d)
            hw = (w.unsqueeze(-1) * h.unsqueeze(-2)).expand(*z.shape[:-1], P, r)
            delta = hw.reshape(*z.shape[:-1], P * r) @ up.reshape(P * r, d) + w.expand(*z.shape[:-1], P) @ bias
        if self.cfg.gain_scaled and gain is not None:
            delta = delta * gain.to(z.dtype)
        return z + self.cfg.scale * delta


class VisualAdapter(nn.Module):
    """``f + U gelu(D f)`` on the image encoder's features (…, F); U zero at init (identity)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.up(F.gelu(self.down(f)))


@dataclass
class MMAState:
    """What the adapters of one forward read: ``weights`` (L, …, P), broadcastable against each layer's
    input without its last dim ((L, T, P) packed, (L, B, 1, P) batched); ``None`` = adapters off."""

    weights: Tensor | None = None


class AdaptedNorm(nn.Module):
    """A layer's ``input_layernorm`` followed by its MM-Adapter (the adapter's input is the normed state)."""

    def __init__(self, norm: nn.Module, adapter: MMAdapter, state: MMAState, layer: int) -> None:
        super().__init__()
        self.norm, self.adapter, self.state, self.layer = norm, adapter, state, layer

    def forward(self, h: Tensor) -> Tensor:
        z = self.norm(h)
        gain = getattr(self.norm, "weight", None)
        if self.adapter.router is None:
            return self.adapter(z, None, gain)
        w = self.state.weights
        return z if w is None else self.adapter(z, w[self.layer], gain)


class MixtureOfModalityAdapters(nn.Module):
    """The adapters of every layer, the modality embeddings, and the serving state (slot → modality)."""

    def __init__(self, layers: nn.ModuleList, dim: int, cfg: MMAConfig, embed_std: float = 0.02,
                 max_slots: int = 1024) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapters = nn.ModuleList(MMAdapter(dim, cfg) for _ in layers)
        self.modality = nn.Parameter(torch.randn(cfg.modalities, dim) * embed_std)  # (M, d)
        self.visual = VisualAdapter(cfg.feature_dim, cfg.visual_rank) if cfg.visual_rank else None
        self.visual_enabled = True  # the scheduler turns it off for a LoRA adapter's request (attach_visual)
        self.state = MMAState()
        self._layers = [layers]  # not a submodule: the LM's weights are not ours to save
        self._table: Tensor | None = None  # (L, M + 1, P): row M (unassigned) is zero
        self.register_buffer("slot_modality", torch.full((max_slots,), cfg.modalities, dtype=torch.long),
                             persistent=False)
        self._slot_host = [cfg.modalities] * max_slots

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers[0]

    # ------------------------------------------------------------------ the router
    def route(self, modalities: Tensor) -> Tensor:
        """(N,) modality ids → (L, N, P) routing weights, from the modality tokens' own forward.
        (Ones for a single shared adapter: it has no router and applies to every token.)"""
        if not self.cfg.routed:
            return torch.ones(len(self.layers), len(modalities), 1, device=self.modality.device)
        h = self.modality[modalities]  # (N, d)
        p = next(self.layers.parameters())
        h = h.to(p.dtype)
        k = self.cfg.route_layer
        if k is not None:
            if k >= len(self.layers):
                raise ValueError(f"route_layer {k} is past the last of {len(self.layers)} layers")
            for layer in self.layers[:k]:  # the modality token's forward up to layer k, adapters off
                h = _one_token_layer(layer, h, layer.input_layernorm.norm(h))
            z = self.layers[k].input_layernorm.norm(h)  # (N, d)
            return torch.stack([layer.input_layernorm.adapter.route(z) for layer in self.layers])
        out = []
        for layer in self.layers:
            norm: AdaptedNorm = layer.input_layernorm
            z = norm.norm(h)
            w = norm.adapter.route(z)  # (N, P)
            out.append(w)
            h = _one_token_layer(layer, h, norm.adapter(z, w, getattr(norm.norm, "weight", None)))
        return torch.stack(out)

    def routing_loss(self, weights: Tensor | None = None) -> Tensor:
        """Auxiliary loss: cross-entropy of every layer's routing weights toward path = modality (text →
        path 0, image → path 1). ``weights``: :meth:`route` of every modality, (L, M, P), or None."""
        M = self.cfg.modalities
        if not self.cfg.routed or self.cfg.paths < M:
            raise ValueError("the routing loss needs a router with a path per modality")
        if weights is None:
            weights = self.route(torch.arange(M, device=self.modality.device))
        m = torch.arange(M, device=weights.device)
        return -weights[:, m, m].clamp_min(1e-9).log().mean()

    def table(self) -> Tensor:
        """(L, M + 1, P) routing weights of every modality (and zeros for "unassigned"), cached."""
        if self._table is None:
            with torch.no_grad():
                w = self.route(torch.arange(self.cfg.modalities, device=self.modality.device))
            zeros = torch.zeros_like(w[:, :1])
            self._table = torch.cat([w, zeros], dim=1)
        return self._table

    def refresh(self) -> None:
        """Forget the cached table (after the weights change)."""
        self._table = None

    # ------------------------------------------------------------------ serving
    def assign(self, slot: int, modality: int) -> None:
        """At a request's prefill: its cache ``slot`` takes the routing weights of ``modality`` until
        reassigned; every decoded token of the request reuses them."""
        if not 0 <= modality < self.cfg.modalities:
            raise ValueError(f"modality must be in [0, {self.cfg.modalities})")
        if self._slot_host[slot] != modality:
            self._slot_host[slot] = modality
            self.slot_modality[slot] = modality
        self.table()

    def release(self, slot: int) -> None:
        self._slot_host[slot] = self.cfg.modalities
        self.slot_modality[slot] = self.cfg.modalities

    def set_packed_step(self, step: Any) -> None:
        """Per-token weights (L, T, P) of a packed step (vision.decoder.PackedStep) from its slots."""
        slots = [s.slot for s in step.segments for _ in range(s.length)]
        idx = torch.tensor(slots, dtype=torch.long, device=self.slot_modality.device)
        self.state.weights = self.table()[:, self.slot_modality[idx]]

    def _decoder_pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.set_packed_step(args[1])

    def set_batch(self, modalities: Tensor) -> Tensor:
        """Training/batched forward: (B,) modality ids → weights (L, B, 1, P) with gradients, set and returned."""
        w = self.route(torch.arange(self.cfg.modalities, device=modalities.device))[:, modalities].unsqueeze(2)
        self.state.weights = w
        return w

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"mma_config": json.dumps(asdict(self.cfg))})


def _one_token_layer(layer: nn.Module, h: Tensor, z: Tensor) -> Tensor:
    """One decoder layer on N independent one-token sequences (N, d); ``z`` is the (adapted) normed ``h``."""
    h = h + _self_attention_of_one_token(layer.self_attn, z)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _self_attention_of_one_token(attn: nn.Module, z: Tensor) -> Tensor:
    """(N, d) → (N, d): attention of N independent single-token sequences (softmax over one key = 1)."""
    n_kv = attn.config.num_key_value_heads
    n_q = attn.config.num_attention_heads
    v = attn.v_proj(z)  # (N, Hkv·D)
    D = v.shape[-1] // n_kv
    v = v.view(-1, n_kv, D).repeat_interleave(n_q // n_kv, dim=1)  # query head i reads kv head i // groups
    return attn.o_proj(v.reshape(-1, n_q * D))


def apply_mma(layers: nn.ModuleList, cfg: MMAConfig, embed_std: float = 0.02) -> MixtureOfModalityAdapters:
    """Wrap every layer's ``input_layernorm`` with an MM-Adapter, in place; the LM is otherwise untouched.

    Returns the module that owns the new parameters (adapters, routers, modality embeddings).
    """
    if any(isinstance(layer.input_layernorm, AdaptedNorm) for layer in layers):
        raise ValueError("these layers already carry MM-Adapters")
    p = next(layers.parameters())
    dim = layers[0].input_layernorm.weight.shape[0]
    mma = MixtureOfModalityAdapters(layers, dim, cfg, embed_std).to(p.device)
    for i, layer in enumerate(layers):
        layer.input_layernorm = AdaptedNorm(layer.input_layernorm, mma.adapters[i], mma.state, i)
    return mma


def remove_mma(layers: nn.ModuleList) -> None:
    """Undo :func:`apply_mma`: every layer gets its plain ``input_layernorm`` back."""
    for layer in layers:
        if isinstance(layer.input_layernorm, AdaptedNorm):
            layer.input_layernorm = layer.input_layernorm.norm


def attach_to_decoder(mma: MixtureOfModalityAdapters, decoder: nn.Module) -> Any:
    """Serving: before each packed forward, give every token its request's routing weights.

    Returns the hook's handle (``.remove()`` detaches it).
    """
    return decoder.register_forward_pre_hook(mma._decoder_pre_hook)


def attach_visual(mma: MixtureOfModalityAdapters, projector: nn.Module) -> Any:
    """Run the MM-Adapters' :class:`VisualAdapter` on the image features before ``projector`` (the
    projector's own weights and state-dict keys stay as they are). Returns the hook's handle, or None
    when these adapters have no visual part."""
    if mma.visual is None:
        return None
    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        if not mma.visual_enabled:  # a LoRA adapter's request: the plain features it was trained on
            return None
        return (mma.visual(args[0].to(mma.visual.up.weight.dtype)).to(args[0].dtype), *args[1:])

    return projector.register_forward_pre_hook(hook)


def load_mma(path: Path, layers: nn.ModuleList, device: Any = None, dtype: torch.dtype | None = None
             ) -> MixtureOfModalityAdapters:
    """Wrap ``layers`` with the MM-Adapters saved in ``path`` (by :meth:`MixtureOfModalityAdapters.save`)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = MMAConfig(**json.loads(f.metadata()["mma_config"]))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mma = apply_mma(layers, cfg)
    mma.load_state_dict(tensors)
    p = next(layers.parameters())
    mma.to(device=device or p.device, dtype=dtype or p.dtype).eval()
    mma.requires_grad_(False)
    return mma
