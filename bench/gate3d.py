"""Spatial-token gating at prefill: ungated vs AdaToken-3D vs FastV, in one run.

``python -m bench.gate3d [--quick] [--json PATH] [--device cpu|cuda] [--shape smollm2|7b]``

* ``--shape smollm2`` (default): the 3D LMM (vision/model3d.py: the trained point encoder from vision/weights3d/
  if present, SmolLM2-135M-Instruct with its LoRA merged) on held-out scenes (vision/scene3d.py's test split):
  accuracy of generated answers (exact match after lower-casing; only meaningful with trained weights, else
  reported as ``null``), prefill FLOPs (counted analytically, vision/gate3d.py) and wall-clock prefill latency
  (the best of ``--repeats`` per prompt, summed over the timed prompts). Ungated = ``PackedDecoder.forward``
  over the whole prompt, the serving path.
* ``--shape 7b``: LLaVA-3D's size for speed alone: a Llama with 7B-shaped layers (d 4096, 32 layers, 32 heads,
  FFN 11008) and random bfloat16 weights, ~1,600 spatial tokens and 60 text tokens. On the CPU it needs ~14 GB
  of memory and about a minute per ungated prefill (64 s on 2 cores; one timed repeat by default); ``--quick``
  shrinks the layers (float32 on the CPU), not the token count.

Policies: AdaToken-3D = the shipped policy (vision/weights3d/policy_smollm2.json: chosen on the validation split by
``python -m vision.gate3d select --write`` among candidates built from ``python -m vision.gate3d analyze``'s
fitted curve; the paper's 8/16/24 → 80/60/40% when there is none), mapped to the model's depth;
FastV = K 2, R 50%. ``flops_reduction`` = 1 − FLOPs(AdaToken-3D) / FLOPs(ungated); ``accuracy_drop`` = ungated −
AdaToken-3D accuracy in points, ``accuracy_drop_se`` its paired standard error over the questions (at 300
questions a drop of a point or two is within it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vision.decoder import PackedDecoder, PackedStep, Segment
from vision.gate3d import GatePolicy, LMShape, answer_correct, gated_prefill, policy_flops, scene_questions
from vision.gate3d_select import paired_se

PAPER_POLICY = GatePolicy(((8, 0.8), (16, 0.6), (24, 0.4)), "adatoken3d", {"source": "paper (LLaVA-3D, 32 layers)"})


def load_policy(n_layers: int, path: Path | None = None) -> GatePolicy:
    from vision.gate3d_flows import policy_path

    path = path or policy_path("smollm2")
    if path.is_file():
        p = GatePolicy.load(path)
        p.meta["source"] = str(path)
        src_layers = int(p.meta.get("layers", n_layers))
    else:
        p, src_layers = PAPER_POLICY, 32
    return p if src_layers == n_layers else p.for_depth(n_layers, src_layers)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_prefill(dec: PackedDecoder, cache, emb: torch.Tensor, spans, policy: GatePolicy | None, repeats: int) -> float:
    """Best wall-clock seconds of one prefill (``policy`` None: the plain packed forward)."""
    dev = emb.device
    T = emb.shape[0]
    step = PackedStep.build([Segment(0, 0, T)], dev)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run warms up
            _sync(dev)
            t0 = time.perf_counter()
            if policy is None:
                dec(emb, step, cache)
            else:
                gated_prefill(dec, cache, 0, emb, spans, policy)
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
    return best


def methods(n_layers: int, policy: Path | None = None) -> dict[str, GatePolicy | None]:
    return {"ungated": None, "adatoken3d": load_policy(n_layers, policy), "fastv": GatePolicy.fastv(2, 0.5)}


def run_smollm2(args) -> dict:
    from vision.model3d import WEIGHTS3D, load_point_lm

    model = load_point_lm(args.weights or WEIGHTS3D, args.device)
    dec = model.decoder
    shape = LMShape.of(dec)
    pols = methods(shape.layers, args.policy)
    folder, pts, ex = scene_questions("test", args.examples or (8 if args.quick else 300), args.data)
    cache = dec.new_cache(1, 512)
    trained = bool(model.spatial.trained)
    rows = {m: {"flops": 0, "latency_s": 0.0} for m in pols}
    n_timed = min(len(ex), 4 if args.quick else 24)
    from tqdm import tqdm

    per_kind: dict[str, dict[str, list[int]]] = {}
    hits: dict[str, list[int]] = {m: [] for m in pols}
    for i, e in enumerate(tqdm(ex, desc="gate3d bench", unit="question")):
        prompt = model.question_prompt(e.question, torch.from_numpy(pts[e.scene]))
        emb = model.embed_prompt(prompt)
        T, spans = emb.shape[0], prompt.spatial_spans()
        n_sp = sum(b - a for a, b in spans)
        for m, pol in pols.items():
            rows[m]["flops"] += policy_flops(shape, pol, T, n_sp)
            if i < n_timed:
                rows[m]["latency_s"] += time_prefill(dec, cache, emb, spans, pol, args.repeats)
            ok = int(answer_correct(model, prompt, pol, cache, emb, e.answer))
            hits[m].append(ok)
            per_kind.setdefault(e.kind, {}).setdefault(m, []).append(ok)
    out = {}
    for m, r in rows.items():
        out[m] = {"accuracy": (100.0 * sum(hits[m]) / len(ex)) if trained else None,
                  "prefill_gflops": r["flops"] / len(ex) / 1e9, "prefill_ms": 1e3 * r["latency_s"] / max(1, n_timed),
                  "policy": list(pols[m].stages) if pols[m] is not None else []}
    res = {"shape": "smollm2", "device": str(dec.embed_tokens.weight.device), "questions": len(ex),
           "timed_prompts": n_timed, "spatial_tokens": model.tokens_per_cloud, "trained_encoder": trained,
           "data": str(folder), "methods": out, "policy_source": pols["adatoken3d"].meta.get("source", "fitted"),
           "policy_selected_on": pols["adatoken3d"].meta.get("selected_on"),
           "per_kind_accuracy": {k: {m: 100.0 * statistics.mean(v) for m, v in d.items()} for k, d in per_kind.items()}
           if trained else None}
    for key, m in (("accuracy_drop_se", "adatoken3d"), ("accuracy_drop_fastv_se", "fastv")):
        res[key] = paired_se(hits["ungated"], hits[m]) if trained and len(ex) > 1 else None
    return _headline(res)


def build_7b(quick: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    # 6.7 B parameters: 13.5 GB in bfloat16 (float32 would not fit a 24 GB machine); the tiny quick layers stay
    # float32 on the CPU
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" or not quick else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return lm


def run_7b(args) -> dict:
    torch.manual_seed(0)
    lm = build_7b(args.quick, args.device)
    dec = PackedDecoder(lm)
    shape = LMShape.of(dec)
    pols = methods(shape.layers, args.policy)
    pre, n_sp, post = 35, 1600, 25
    T = pre + n_sp + post
    dev = dec.embed_tokens.weight.device
    emb = (torch.randn(T, shape.d, device=dev) * 0.02).to(dec.embed_tokens.weight.dtype)
    spans = [(pre, pre + n_sp)]
    cache = dec.new_cache(1, T + 16)
    out = {}
    for m, pol in pols.items():
        out[m] = {"accuracy": None, "prefill_gflops": policy_flops(shape, pol, T, n_sp) / 1e9,
                  "prefill_ms": 1e3 * time_prefill(dec, cache, emb, spans, pol, args.repeats),
                  "policy": list(pol.stages) if pol is not None else []}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res = {"shape": "7b-quick" if args.quick else "7b", "device": name, "layers": shape.layers, "d": shape.d,
           "tokens": T, "spatial_tokens": n_sp, "methods": out, "policy_source": pols["adatoken3d"].meta.get("source")}
    return _headline(res)


def _headline(res: dict) -> dict:
    m = res["methods"]
    res["flops_reduction"] = 1 - m["adatoken3d"]["prefill_gflops"] / m["ungated"]["prefill_gflops"]
    res["flops_reduction_fastv"] = 1 - m["fastv"]["prefill_gflops"] / m["ungated"]["prefill_gflops"]
    res["speedup"] = m["ungated"]["prefill_ms"] / m["adatoken3d"]["prefill_ms"]
    res["speedup_fastv"] = m["ungated"]["prefill_ms"] / m["fastv"]["prefill_ms"]
    acc = [m[k]["accuracy"] for k in ("ungated", "adatoken3d", "fastv")]
    res["accuracy_drop"] = None if acc[0] is None else acc[0] - acc[1]
    res["accuracy_drop_fastv"] = None if acc[0] is None else acc[0] - acc[2]
    return res


def table(res: dict) -> str:
    lines = [f"gate3d [{res['shape']}] on {res['device']}",
             f"{'method':<12}{'accuracy %':>12}{'GFLOPs':>10}{'FLOPs cut':>11}{'prefill ms':>12}  policy"]
    full = res["methods"]["ungated"]["prefill_gflops"]
    for name, r in res["methods"].items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1f}"
        pol = ", ".join(f"L{li}:{k:.1%}" for li, k in r["policy"]) or "-"
        cut = f"{1 - r['prefill_gflops'] / full:.1%}" if name != "ungated" else "-"
        lines.append(f"{name:<12}{acc:>12}{r['prefill_gflops']:>10.3f}{cut:>11}{r['prefill_ms']:>12.2f}  {pol}")
    drop, se = res["accuracy_drop"], res.get("accuracy_drop_se")
    drop_txt = "-" if drop is None else f"{drop:.1f}" + ("" if se is None else f" ± {se:.1f}") + " points"
    lines.append(f"flops_reduction {res['flops_reduction']:.1%} (FastV {res['flops_reduction_fastv']:.1%}); "
                 f"prefill speedup {res['speedup']:.2f}x (FastV {res['speedup_fastv']:.2f}x); accuracy_drop "
                 f"{drop_txt}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["methods"])
    ms = res["methods"]
    panels = [("prefill GFLOPs", [ms[n]["prefill_gflops"] for n in names]),
              ("prefill ms", [ms[n]["prefill_ms"] for n in names])]
    if ms["ungated"]["accuracy"] is not None:
        panels.append(("accuracy %", [ms[n]["accuracy"] for n in names]))
    fig, ax = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for a, (label, vals) in zip(ax, panels, strict=True):
        a.bar(names, vals, color=["grey", "tab:blue", "tab:orange"])
        a.set_title(label)
        for i, v in enumerate(vals):
            a.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"spatial-token gating, {res['shape']} on {res['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gate3d", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few questions / tiny 7b layers: under a minute on the CPU")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the table (default: none with --quick)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=("smollm2", "7b"), default="smollm2")
    ap.add_argument("--examples", type=int, default=None, help="test questions (default 300, quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per prefill (best of)")
    ap.add_argument("--data", type=Path, default=None, help="a built scene3d folder")
    ap.add_argument("--weights", type=Path, default=None, help="3D weights folder (default vision/weights3d)")
    ap.add_argument("--policy", type=Path, default=None, help="AdaToken-3D policy JSON (default: the fitted one)")
    args = ap.parse_args(argv)
    slow = args.shape == "7b" and not args.quick and torch.device(args.device).type == "cpu"
    if slow:
        print("--shape 7b on the CPU: 13.5 GB of random weights, about a minute per ungated prefill")
    args.repeats = args.repeats or (2 if args.quick else 1 if slow else 5)
    res = run_7b(args) if args.shape == "7b" else run_smollm2(args)
    print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
