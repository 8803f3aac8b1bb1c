"""AdaToken-3D's contribution analysis: how much the spatial tokens matter, layer by layer, from attention.

On a calibration set of 3D questions, per layer ``l`` and with ``A_l`` the head-averaged attention (rows sum to 1),
``V`` the spatial tokens, ``S`` the tokens before them (system prompt, user header) and ``P`` those after
(the question, the assistant header):

* intra-flow   ``intra_l = mean_{i∈V} Σ_{j∈V} A_l[i, j]``      — spatial tokens reading spatial tokens;
* inter-flow   ``inter_l = 0.7 · mean_{i∈V} Σ_{j∈S} A_l[i, j] + 0.3 · mean_{i∈P} Σ_{j∈V} A_l[i, j]``
  — system → spatial and spatial → prompt (information flows from the attended token to the attending one);
* memory       ``mem_l = γ · mem_{l-1} + (1 − γ) · (intra_l + inter_l)`` with γ = 0.5 — what earlier layers carried;
* contribution ``C_l = intra_l + inter_l + mem_l``, normalised across layers by its maximum.

Per token: ``r_{l,j} = mean_{i∈P} A_l[i, j]`` (what the prompt reads from spatial token j), divided by the
largest ``r_{l,·}`` of that layer; a token "contributes under 5%" when this is below 0.05 (per layer, and
averaged over layers for the headline share).

The policy (:func:`fit_policy`): a decaying curve ``f(l) = a · exp(−b l) + c`` is fitted (least squares, grid over
``b``) to the per-layer share of spatial tokens contributing at least 5%; the stages sit at ``first`` and then
evenly through the depth, each keeping ``f(l) / f(0)`` of the spatial tokens (at least ``min_keep``, never more
than the stage before). Refit per architecture: the result is saved per model in ``vision/weights3d/``. The 5% rule
says where tokens stop mattering, not what pruning them costs in accuracy, so the shipped policy is then chosen by
``python -m vision.gate3d select --write`` (vision/gate3d_select.py): candidates built from this curve (``meta.fit``),
judged on validation accuracy. ``analyze`` overwrites the policy file with the curve's own policy: rerun ``select``.

:func:`dense_forward` is also the gate's reference twin: the decoder's layers with explicit attention matrices and
per-layer visibility masks (no pruning of work, just masking), so a gated prefill can be checked against it.

``python -m vision.gate3d analyze [--quick] [--calib N]`` → ``docs/gate3d_flows.png``, the policy JSON, a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision.decoder import PackedDecoder, _rotate_half
from vision.gate3d import GatePolicy

THRESHOLD = 0.05
GAMMA = 0.5
POLICY_DIR = Path(__file__).parent / "weights3d"


def policy_path(model_name: str) -> Path:
    return POLICY_DIR / f"policy_{model_name}.json"


@torch.no_grad()
def dense_forward(decoder: PackedDecoder, embeds: Tensor, positions: Tensor | None = None,
                  visible: list[Tensor] | None = None, keep_attn: bool = False) -> tuple[Tensor, list[Tensor]]:
    """(T, d) → ((T, vocab) logits, per-layer (T, T) head-averaged attention if ``keep_attn``).

    ``visible[l]``: (T, T) bool, which keys each query may see in layer ``l`` (ANDed with causality).
    """
    T = embeds.shape[0]
    pos = torch.arange(T, device=embeds.device) if positions is None else positions
    cos, sin = decoder.rotary_emb(embeds.unsqueeze(0), pos.unsqueeze(0))
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
    Hq, Hkv, D = decoder.n_heads, decoder.n_kv_heads, decoder.head_dim
    causal = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
    h, attns = embeds, []
    for li, layer in enumerate(decoder.layers):
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = at.q_proj(x).view(T, Hq, D)
        k = at.k_proj(x).view(T, Hkv, D)
        v = at.v_proj(x).view(T, Hkv, D)
        if hasattr(at, "q_norm"):
            q, k = at.q_norm(q), at.k_norm(k)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = Hq // Hkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(D)
        mask = causal if visible is None else causal & visible[li]
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)  # (Hq, T, T)
        if keep_attn:
            attns.append(p.mean(0))
        o = torch.einsum("hqk,khd->qhd", p, v.float()).to(x.dtype)
        h = h + at.o_proj(o.reshape(T, Hq * D))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return decoder.lm_head(decoder.norm(h)).float(), attns


@dataclass
class Flows:
    intra: np.ndarray  # (L,)
    inter: np.ndarray
    system_to_spatial: np.ndarray
    spatial_to_prompt: np.ndarray
    memory: np.ndarray
    contribution: np.ndarray  # normalised by its max
    share_under: np.ndarray  # (L,) spatial tokens contributing < THRESHOLD, per layer
    token_contribution: np.ndarray  # (n_tokens_total,) per token, averaged over layers (all calibration prompts)
    share_under_overall: float  # tokens whose contribution, averaged over layers, is under THRESHOLD
    share_under_layers: float  # (token, layer) pairs under THRESHOLD: the mean of ``share_under``
    samples: int

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()
                if k != "token_contribution"} | {"tokens": int(self.token_contribution.size)}


def prompt_flows(attns: list[Tensor], span: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-layer flows of one prompt with one spatial span ``[s, e)``."""
    s, e = span
    out = {k: [] for k in ("intra", "sys", "out", "tok")}
    for A in attns:
        A = A.double()
        out["intra"].append(A[s:e, s:e].sum(1).mean().item())
        out["sys"].append(A[s:e, :s].sum(1).mean().item())
        out["out"].append(A[e:, s:e].sum(1).mean().item())
        r = A[e:, s:e].mean(0)
        out["tok"].append((r / r.max().clamp_min(1e-30)).numpy())
    return {k: np.asarray(v) for k, v in out.items()}


def combine(per_prompt: list[dict[str, np.ndarray]]) -> Flows:
    intra = np.mean([p["intra"] for p in per_prompt], 0)
    sys_ = np.mean([p["sys"] for p in per_prompt], 0)
    out = np.mean([p["out"] for p in per_prompt], 0)
    inter = 0.7 * sys_ + 0.3 * out
    mem = np.zeros_like(intra)
    for li in range(len(intra)):
        prev = mem[li - 1] if li else intra[0] + inter[0]
        mem[li] = GAMMA * prev + (1 - GAMMA) * (intra[li] + inter[li])
    c = intra + inter + mem
    tok = np.concatenate([p["tok"] for p in per_prompt], axis=1)  # (L, total tokens)
    share = (tok < THRESHOLD).mean(1)
    tok_mean = tok.mean(0)
    return Flows(intra, inter, sys_, out, mem, c / c.max(), share, tok_mean,
                 float((tok_mean < THRESHOLD).mean()), float(share.mean()), len(per_prompt))


def fit_decay(y: np.ndarray) -> tuple[float, float, float]:
    """``(a, b, c)`` of ``a · exp(−b l) + c`` fitted to ``y`` by least squares (b on a grid, a and c closed form)."""
    x = np.arange(len(y), dtype=np.float64)
    best = (np.inf, 0.0, 0.0, float(np.mean(y)))
    for b in np.concatenate([[0.0], np.logspace(-3, 1, 200)]):
        X = np.stack([np.exp(-b * x), np.ones_like(x)], 1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        err = float(np.square(X @ coef - y).sum())
        if err < best[0]:
            best = (err, float(coef[0]), float(b), float(coef[1]))
    return best[1], best[2], best[3]


def fit_policy(share_under: np.ndarray, first: int = 2, n_stages: int = 3, min_keep: float = 0.1) -> GatePolicy:
    """Stage layers and keep ratios from the per-layer share of contributing spatial tokens (see the module doc)."""
    active = 1.0 - share_under
    a, b, c = fit_decay(active)
    L = len(active)
    f = lambda li: a * math.exp(-b * li) + c  # noqa: E731
    f0 = max(f(0), 1e-9)
    layers = sorted({min(L - 1, first + round(i * (L - first) / n_stages)) for i in range(n_stages)})
    stages, prev = [], 1.0
    for li in layers:
        r = float(np.clip(f(li) / f0, min_keep, prev))
        r = round(r, 3)
        if r < 1.0:
            stages.append((li, r))
            prev = r
    return GatePolicy(tuple(stages), "adatoken3d", {"fit": {"a": a, "b": b, "c": c}, "threshold": THRESHOLD,
                                                     "layers": L})


def plot_flows(fl: Flows, policy: GatePolicy, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = np.arange(len(fl.intra))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].plot(L, fl.intra, label="intra (spatial↔spatial)")
    ax[0].plot(L, fl.system_to_spatial, label="system→spatial")
    ax[0].plot(L, fl.spatial_to_prompt, label="spatial→prompt")
    ax[0].plot(L, fl.memory, "--", label="memory")
    ax[0].set(xlabel="layer", ylabel="attention mass", title="flows per layer")
    ax[0].legend(fontsize=8)
    ax[1].plot(L, fl.contribution, label="contribution C_l (normalised)")
    ax[1].plot(L, 1 - fl.share_under, label=f"share of spatial tokens ≥ {THRESHOLD:.0%}")
    fit = policy.meta.get("fit")
    if fit:
        ax[1].plot(L, fit["a"] * np.exp(-fit["b"] * L) + fit["c"], ":", label="fitted decay")
    for li, r in policy.stages:
        ax[1].axvline(li, color="grey", lw=0.8)
        ax[1].annotate(f"keep {r:.0%}", (li, 1.07), ha="center", fontsize=8)
    ax[1].set(xlabel="layer", ylim=(0, 1.15), title="contribution and the fitted policy")
    ax[1].legend(fontsize=8)
    ax[2].hist(fl.token_contribution, bins=40)
    ax[2].axvline(THRESHOLD, color="red")
    ax[2].set(xlabel="token contribution (÷ layer max, mean over layers)", ylabel="spatial tokens",
              title=f"under {THRESHOLD:.0%}: {fl.share_under_overall:.0%} of tokens, "
                    f"{fl.share_under_layers:.0%} of (token, layer) pairs")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_prompts(model, n: int, data: Path | None, seed: int = 0) -> list:
    """``n`` (prompt) pairs from the scene set's validation split, or freshly generated scenes when none is built."""
    from vision.scene3d import DEFAULT_OUT, QUICK_OUT, SceneConfig, generate, load_split
    from vision.train3d import normalise_scenes

    out = []
    for folder in ([data] if data else [DEFAULT_OUT, QUICK_OUT]):
        if folder is not None and (Path(folder) / "val.npz").is_file():
            pts, _, _, ex = load_split(folder, "val")
            pts = normalise_scenes(pts)
            for e in ex[:n]:
                out.append(model.question_prompt(e.question, torch.from_numpy(pts[e.scene])))
            return out
    cfg = SceneConfig(n_points=model.spatial.cfg.n_points)
    for i in range(n):
        scene, p, _ = generate(seed, "val", i, cfg)
        q = scene.questions[0]["question"]
        out.append(model.question_prompt(q, torch.from_numpy(normalise_scenes(p[None])[0])))
    return out


def analyze(model, prompts: list) -> Flows:
    per = []
    for pr in prompts:
        emb = model.embed_prompt(pr)
        _, attns = dense_forward(model.decoder, emb, keep_attn=True)
        (span,) = pr.spatial_spans()
        per.append(prompt_flows([a.cpu() for a in attns], span))
    return combine(per)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vision.gate3d",
                                 description="AdaToken-3D contribution analysis (`analyze`); `select` (its own --help): "
                                             "the shipped policy, chosen on the validation split")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze", help="attention flows over a calibration set → plot, policy")
    a.add_argument("--quick", action="store_true", help="4 calibration prompts")
    a.add_argument("--calib", type=int, default=32, help="calibration prompts")
    a.add_argument("--weights", type=Path, default=None, help="3D weights folder (default vision/weights3d)")
    a.add_argument("--data", type=Path, default=None, help="a built scene3d folder (default: the full, then quick)")
    a.add_argument("--plot", type=Path, default=Path("docs/gate3d_flows.png"))
    a.add_argument("--policy-out", type=Path, default=None, help="default vision/weights3d/policy_<model>.json")
    a.add_argument("--json", type=Path, default=None, help="write the flows and the policy here too")
    args = ap.parse_args(argv)
    from vision.model3d import WEIGHTS3D, load_point_lm

    t0 = time.time()
    model = load_point_lm(args.weights or WEIGHTS3D)
    n = 4 if args.quick else args.calib
    prompts = calibration_prompts(model, n, args.data)
    fl = analyze(model, prompts)
    policy = fit_policy(fl.share_under)
    policy.meta["trained_encoder"] = bool(model.spatial.trained)
    policy.meta["calibration_prompts"] = fl.samples
    out = args.policy_out or policy_path("smollm2")
    if not args.quick or args.policy_out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(policy.to_json())
    title = (f"SmolLM2-135M + {'trained' if model.spatial.trained else 'random'} point encoder, "
             f"{fl.samples} prompts, {model.tokens_per_cloud} spatial tokens")
    plot_flows(fl, policy, args.plot, title)
    summary = {"flows": fl.as_dict(), "policy": {"stages": policy.stages, "meta": policy.meta},
               "policy_file": str(out) if (not args.quick or args.policy_out) else None, "plot": str(args.plot),
               "seconds": round(time.time() - t0, 1)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    print(f"spatial tokens contributing under {THRESHOLD:.0%}: {fl.share_under_overall:.1%} averaged over layers, "
          f"{fl.share_under_layers:.1%} of (token, layer) pairs ({fl.samples} prompts); policy {policy.stages}; "
          f"plot {args.plot}")
    return 0
