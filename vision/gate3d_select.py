"""Choosing the shipped AdaToken-3D policy on the validation split, never the test split.

Why: the contribution analysis (vision/gate3d_flows.py) fits how fast spatial tokens stop mattering with depth —
``f(l) = a · exp(−b l) + c``, the share of spatial tokens the prompt still reads at layer ``l`` — but its 5% rule
says nothing about *where* to cut or how hard, and nothing about accuracy. So the curve proposes a few policies
and validation accuracy decides among them.

Candidates (:func:`candidates`), all from the fitted curve, counted with ``policy_flops``:

* ``fitted``: ``analyze``'s own policy — stages at ``first`` and then evenly to the last layer, keep ``f(l)/f(0)``
  (at least 10%) — the reference;
* for each *span* (the ``n_stages`` stages spread over the whole depth after ``first``, as ``analyze`` places them,
  or over its first half: the curve's late cuts moved early) and each FLOPs-cut *target* (60, 65, 70%): keep ratios ``s · f(l)/f(0)`` at those layers, one scale ``s``
  per candidate, the largest whose FLOPs cut reaches the target at the longest prompt evaluated (bisection: the
  cut falls as ``s`` grows, and as text tokens are added), so every prompt's cut reaches it.

Evaluation (:func:`evaluate`): the first N validation questions, each answered greedily by ``generate`` ungated
and under every candidate (the same prompt embeddings), scored by ``answer_correct`` exactly as bench/gate3d.py
scores the test split. FLOPs cut = 1 − mean gated FLOPs / mean ungated FLOPs over those prompts.

Rule (:func:`choose`): among candidates with cut ≥ ``min_cut`` and validation accuracy ≥ ungated − ``tolerance``
(1 point), the smallest cut (ties: the more accurate); if none, the most accurate with cut ≥ ``min_cut``; if no
candidate reaches ``min_cut``, the most accurate of all. Smallest, not largest: FLOPs are exact but accuracy is
estimated (± 1.3 points at 900 questions, more than the tolerance), so the deepest cut that passes is the one whose
accuracy was most likely overestimated (the largest rule once chose a 65.7% cut at −0.3 ± 1.3 on validation that
measured −3.7 ± 2.3 on test; docs/gate3d.md). ``--write`` saves it with ``meta.selected_on = "val"``, the
candidate table and N (and the curve, so a rerun builds the same candidates).

``python -m vision.gate3d select [--quick] [--examples N] [--min-cut 0.6] [--write] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vision.gate3d import GatePolicy, LMShape, answer_correct, policy_flops, scene_questions


@dataclass(frozen=True)
class SelectConfig:
    """What the selection searches and how it decides."""

    examples: int = 300  # validation questions
    min_cut: float = 0.6  # the FLOPs cut a shipped policy must reach
    tolerance: float = 1.0  # accuracy points below ungated still counted as "no loss"
    targets: tuple[float, ...] = (0.6, 0.65, 0.7)  # FLOPs-cut targets of the scaled candidates
    spans: tuple[float, ...] = (1.0, 0.5)  # share of the depth after ``first`` the stages spread over
    first: int = 2  # the first stage layer (as ``fit_policy``)
    n_stages: int = 3
    min_keep: float = 0.05  # no stage keeps fewer than this share of the spatial tokens
    fitted_min_keep: float = 0.1  # ``fit_policy``'s floor, to rebuild its policy exactly


QUICK = SelectConfig(examples=8, targets=(0.6,))


@dataclass
class Candidate:
    name: str
    policy: GatePolicy
    span: float
    target: float | None  # None: the curve as fitted (scale 1)
    scale: float


@dataclass
class Row:
    """One line of the candidate table (validation figures)."""

    name: str
    stages: list[list[float]]
    target: float | None
    flops_cut: float
    gflops: float
    accuracy: float  # %
    delta: float  # accuracy − ungated accuracy, points (paired, same questions)
    delta_se: float  # its standard error, points
    eligible: bool = False  # cut ≥ min_cut and delta ≥ −tolerance
    chosen: bool = False


@dataclass
class Selection:
    rows: list[Row]
    ungated_accuracy: float
    ungated_gflops: float
    chosen: Row
    reason: str
    examples: int
    extra: dict = field(default_factory=dict)


def curve(fit: dict) -> Callable[[float], float]:
    """The fitted decay ``f(l) = a · exp(−b l) + c``."""
    a, b, c = fit["a"], fit["b"], fit["c"]
    return lambda li: a * math.exp(-b * li) + c


def stage_layers(n_layers: int, first: int, n_stages: int, span: float) -> list[int]:
    """``n_stages`` layers from ``first``, evenly over ``span`` of the remaining depth (span 1 = ``fit_policy``'s)."""
    width = span * (n_layers - first)
    return sorted({min(n_layers - 1, first + round(i * width / n_stages)) for i in range(n_stages)})


def scaled_policy(f: Callable[[float], float], layers: list[int], scale: float, min_keep: float,
                  digits: int = 4, meta: dict | None = None) -> GatePolicy:
    """Keep ``scale · f(l)/f(0)`` at each layer, clipped to [``min_keep``, the previous stage's ratio]."""
    f0 = max(f(0), 1e-9)
    stages, prev = [], 1.0
    for li in layers:
        r = round(float(np.clip(scale * f(li) / f0, min_keep, prev)), digits)
        if r < 1.0:
            stages.append((li, r))
            prev = r
    return GatePolicy(tuple(stages), "adatoken3d", dict(meta or {}))


def flops_cut(shape: LMShape, policy: GatePolicy, T: int, n_spatial: int) -> float:
    return 1.0 - policy_flops(shape, policy, T, n_spatial) / policy_flops(shape, None, T, n_spatial)


def hit_target(shape: LMShape, f: Callable[[float], float], layers: list[int], target: float, T: int,
               n_spatial: int, min_keep: float) -> tuple[GatePolicy, float]:
    """The largest scale whose policy cuts at least ``target`` of the prefill FLOPs (the smallest scale's policy
    when the target is out of reach), and that scale."""
    f0 = max(f(0), 1e-9)
    lo, hi = 0.0, f0 / max(f(layers[0]), 1e-9)  # scale 0: every stage at min_keep; hi: the first stage keeps all
    if flops_cut(shape, scaled_policy(f, layers, hi, min_keep), T, n_spatial) >= target:
        return scaled_policy(f, layers, hi, min_keep), hi
    for _ in range(50):
        mid = (lo + hi) / 2
        if flops_cut(shape, scaled_policy(f, layers, mid, min_keep), T, n_spatial) >= target:
            lo = mid
        else:
            hi = mid
    return scaled_policy(f, layers, lo, min_keep), lo


def candidates(shape: LMShape, fit: dict, T: int, n_spatial: int, cfg: SelectConfig) -> list[Candidate]:
    """The fitted policy, then one candidate per (span, target); see the module doc."""
    f = curve(fit)
    L = shape.layers
    base = stage_layers(L, cfg.first, cfg.n_stages, 1.0)
    out = [Candidate("fitted", scaled_policy(f, base, 1.0, cfg.fitted_min_keep, digits=3), 1.0, None, 1.0)]
    for span in cfg.spans:
        layers = stage_layers(L, cfg.first, cfg.n_stages, span)
        for t in cfg.targets:
            pol, s = hit_target(shape, f, layers, t, T, n_spatial, cfg.min_keep)
            out.append(Candidate(f"span{span:.2f}-cut{t:.0%}", pol, span, t, s))
    return out


def choose(rows: list[Row], min_cut: float, tolerance: float) -> tuple[Row, str]:
    """The selection rule (module doc). Marks ``eligible`` / ``chosen`` on the rows."""
    eps = 1e-9
    for r in rows:
        r.eligible = bool(r.flops_cut >= min_cut - eps and r.delta >= -tolerance - eps)
    ok = [r for r in rows if r.eligible]
    big = [r for r in rows if r.flops_cut >= min_cut - eps]
    if ok:
        best, why = min(ok, key=lambda r: (r.flops_cut, -r.accuracy)), (
            f"smallest FLOPs cut among candidates with cut >= {min_cut:.0%} and accuracy within {tolerance:g} point(s)"
            " of ungated")
    elif big:
        best, why = max(big, key=lambda r: (r.accuracy, r.flops_cut)), (
            f"no candidate within {tolerance:g} point(s) of ungated: the most accurate with cut >= {min_cut:.0%}")
    else:
        best, why = max(rows, key=lambda r: (r.accuracy, r.flops_cut)), (
            f"no candidate reaches a {min_cut:.0%} cut: the most accurate of all")
    best.chosen = True
    return best, why


def paired_se(base, other) -> float:
    """The standard error, in points, of the mean accuracy difference ``other − base`` over the same questions
    (0/1 correctness per question); NaN below two questions."""
    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return float(100.0 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


@torch.no_grad()
def evaluate(model, prompts: list, answers: list[str], policies: dict[str, GatePolicy | None],
             progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per policy: (n,) 0/1 correctness over the questions, and the mean prefill FLOPs of its prompts."""
    from tqdm import tqdm

    dec = model.decoder
    shape = LMShape.of(dec)
    cache = dec.new_cache(1, max(p.length for p in prompts) + 16)
    correct = {m: np.zeros(len(prompts), dtype=np.int64) for m in policies}
    flops = dict.fromkeys(policies, 0.0)
    bar = tqdm(list(zip(prompts, answers, strict=True)), desc="gate3d select (val)", unit="question",
               disable=not progress)
    for i, (prompt, ans) in enumerate(bar):
        emb = model.embed_prompt(prompt)
        n_sp = sum(b - a for a, b in prompt.spatial_spans())
        for m, pol in policies.items():
            flops[m] += policy_flops(shape, pol, emb.shape[0], n_sp) / len(prompts)
            correct[m][i] = int(answer_correct(model, prompt, pol, cache, emb, ans))
        bar.set_postfix(ungated=f"{100 * correct['ungated'][: i + 1].mean():.1f}%")
    return correct, flops


def fitted_curve(model, policy_file: Path | None, calib: int, data: Path | None) -> tuple[dict, dict]:
    """``(fit, meta)``: the curve saved with the policy by ``analyze`` (or a previous ``select``), else a fresh
    analysis of ``calib`` validation prompts."""
    if policy_file is not None and policy_file.is_file():
        meta = GatePolicy.load(policy_file).meta
        if "fit" in meta:
            keep = ("fit", "threshold", "layers", "trained_encoder", "calibration_prompts")
            where = policy_file.resolve()
            where = where.relative_to(Path.cwd()) if where.is_relative_to(Path.cwd()) else where
            return meta["fit"], {k: meta[k] for k in keep if k in meta} | {"curve_from": str(where)}
    from vision.gate3d_flows import THRESHOLD, analyze, calibration_prompts, fit_decay

    fl = analyze(model, calibration_prompts(model, calib, data))
    a, b, c = fit_decay(1.0 - fl.share_under)
    fit = {"a": a, "b": b, "c": c}
    return fit, {"fit": fit, "threshold": THRESHOLD, "layers": len(model.decoder.layers),
                 "trained_encoder": bool(model.spatial.trained), "calibration_prompts": fl.samples,
                 "curve_from": "analysis"}


def select(model, cfg: SelectConfig, fit: dict, data: Path | None = None, progress: bool = True) -> Selection:
    """Build the candidates, evaluate them and ungated on ``cfg.examples`` validation questions, choose."""
    folder, pts, ex = scene_questions("val", cfg.examples, data)
    prompts = [model.question_prompt(e.question, torch.from_numpy(pts[e.scene])) for e in ex]
    shape = LMShape.of(model.decoder)
    T = max(p.length for p in prompts)  # a longer prompt cuts less: the targets then hold for every prompt
    cands = candidates(shape, fit, T, model.tokens_per_cloud, cfg)
    pols: dict[str, GatePolicy | None] = {"ungated": None} | {c.name: c.policy for c in cands}
    correct, flops = evaluate(model, prompts, [e.answer for e in ex], pols, progress)
    n = len(ex)
    u = correct["ungated"]
    rows = []
    for c in cands:
        d = correct[c.name] - u
        rows.append(Row(c.name, [list(s) for s in c.policy.stages], c.target,
                        float(1.0 - flops[c.name] / flops["ungated"]), float(flops[c.name] / 1e9),
                        float(100.0 * correct[c.name].mean()), float(100.0 * d.mean()), paired_se(u, correct[c.name])))
    chosen, why = choose(rows, cfg.min_cut, cfg.tolerance)
    return Selection(rows, float(100.0 * u.mean()), float(flops["ungated"] / 1e9), chosen, why, n,
                     {"data": str(folder), "split": "val", "max_prompt_tokens": T,
                      "spatial_tokens": model.tokens_per_cloud})


def chosen_policy(sel: Selection, cfg: SelectConfig, curve_meta: dict) -> GatePolicy:
    """The chosen candidate as a policy file's content: stages, and the evidence in ``meta``."""
    meta = curve_meta | {
        "selected_on": "val", "examples": sel.examples, "candidate": sel.chosen.name, "rule": sel.reason,
        "min_cut": cfg.min_cut, "tolerance_points": cfg.tolerance, "val_accuracy": sel.chosen.accuracy,
        "val_ungated_accuracy": sel.ungated_accuracy, "val_flops_cut": sel.chosen.flops_cut,
        "candidates": [asdict(r) for r in sel.rows]}
    return GatePolicy(tuple((int(li), float(r)) for li, r in sel.chosen.stages), "adatoken3d", meta)


def table(sel: Selection) -> str:
    lines = [f"AdaToken-3D policy selection on {sel.examples} validation questions ({sel.extra.get('data')}); "
             f"ungated {sel.ungated_accuracy:.1f}%, {sel.ungated_gflops:.2f} GFLOPs",
             f"{'candidate':<18}{'stages (layer: keep)':<30}{'FLOPs cut':>10}{'GFLOPs':>8}{'val acc %':>10}"
             f"{'Δ vs ungated':>16}  ok"]
    for r in sel.rows:
        st = ", ".join(f"L{int(li)}:{k:.1%}" for li, k in r.stages) or "-"
        mark = ("yes" if r.eligible else "no") + (" <= chosen" if r.chosen else "")
        lines.append(f"{r.name:<18}{st:<30}{r.flops_cut:>10.1%}{r.gflops:>8.2f}{r.accuracy:>10.1f}"
                     f"{f'{r.delta:+.1f} ± {r.delta_se:.1f}':>16}  {mark}")
    lines.append(f"chosen: {sel.chosen.name} ({sel.reason})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, model=None) -> int:
    """``python -m vision.gate3d select``; ``model``: a loaded 3D LMM (tests), else ``load_point_lm(--weights)``."""
    from vision.gate3d_flows import policy_path

    ap = argparse.ArgumentParser(prog="python -m vision.gate3d select", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 questions, 3 candidates: under a minute on the CPU")
    ap.add_argument("--examples", type=int, default=None, help="validation questions (default 300, quick 8)")
    ap.add_argument("--min-cut", type=float, default=0.6, help="the FLOPs cut the chosen policy must reach")
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy points below ungated allowed")
    ap.add_argument("--targets", type=str, default=None, help="FLOPs-cut targets, e.g. 0.6,0.65,0.7")
    ap.add_argument("--spans", type=str, default=None, help="depth spans of the stages, e.g. 1,0.667,0.5")
    ap.add_argument("--policy", type=Path, default=None,
                    help="the policy file whose fitted curve builds the candidates (default the shipped one)")
    ap.add_argument("--calib", type=int, default=32, help="calibration prompts when the policy file has no curve")
    ap.add_argument("--write", action="store_true", help="write the chosen policy to --out")
    ap.add_argument("--out", type=Path, default=None, help="default vision/weights3d/policy_smollm2.json")
    ap.add_argument("--json", type=Path, default=None, help="write the candidate table and the choice here")
    ap.add_argument("--weights", type=Path, default=None, help="3D weights folder (default vision/weights3d)")
    ap.add_argument("--data", type=Path, default=None, help="a built scene3d folder (default: the full, then quick)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else SelectConfig()
    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    cfg = SelectConfig(examples=args.examples or base.examples, min_cut=args.min_cut, tolerance=args.tolerance,
                       targets=floats(args.targets) if args.targets else base.targets,
                       spans=floats(args.spans) if args.spans else base.spans)
    t0 = time.time()
    if model is None:
        from vision.model3d import WEIGHTS3D, load_point_lm

        model = load_point_lm(args.weights or WEIGHTS3D)
    out = args.out or policy_path("smollm2")
    fit, curve_meta = fitted_curve(model, args.policy or policy_path("smollm2"), 4 if args.quick else args.calib,
                                   args.data)
    sel = select(model, cfg, fit, args.data)
    print(table(sel))
    policy = chosen_policy(sel, cfg, curve_meta)
    if args.write:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(policy.to_json())
        print(f"wrote {out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": asdict(cfg), "examples": sel.examples, "ungated_accuracy": sel.ungated_accuracy,
            "ungated_gflops": sel.ungated_gflops, "candidates": [asdict(r) for r in sel.rows],
            "chosen": asdict(sel.chosen), "rule": sel.reason, "policy": [list(s) for s in policy.stages],
            "written_to": str(out) if args.write else None, "curve": curve_meta | {"fit": fit},
            "seconds": round(time.time() - t0, 1), **sel.extra}, indent=1))
    return 0
