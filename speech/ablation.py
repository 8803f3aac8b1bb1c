"""The fusion ablation of the LSLM paper's Table 2 at our scale: ``python -m speech.ablation``.

Trains early, middle and late fusion with one identical budget (a smaller model than the default, so
all three fit one CPU session), evaluates each with ``speech.evaluate`` on the same held-out scenes,
and writes the table (``docs/fusion_ablation.md``) and a plot (``docs/fusion_ablation.png``).
Each run is resumable: a finished one is only re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from speech.config import LSLMConfig
from speech.evaluate import EvalConfig, build_model, evaluate
from speech.train import LSLMTrainConfig, train

FUSIONS = ("early", "middle", "late")
METRICS = ("f1", "f1_noisy", "wer", "wer_noisy", "false_interruption_rate", "false_interruption_rate_backchannel",
           "reaction_ms")
# The paper's Table 2 (command-based), as fractions: (WER clean, WER noisy, F1 clean, F1 noisy).
PAPER = {"early": (0.3356, 0.3499, 0.9810, 0.9720), "middle": (0.0405, 0.0451, 0.9800, 0.9738),
         "late": (0.0437, 0.0687, 0.9789, 0.9489)}


@dataclass
class AblationConfig:
    out: str = "runs/ablation"
    docs: str = "docs"
    report: str = "fusion_ablation"  # the table and plot are DOCS/REPORT.md and DOCS/REPORT.png
    data: str = "data/speech"
    weights: str = "speech/weights"  # the codec
    setting: str = "command"
    steps: int = 2000
    batch: int = 16
    d_model: int = 192
    n_layers: int = 4
    utterances: int = 60  # per evaluation scene
    fusions: str = "early,middle,late"
    listen_norm: bool = False  # True: normalised listening features (LSLMConfig.listen_norm), as the default
    guided_attention: float = 0.0  # weight of the guided-attention loss, as the default was trained (1.0)
    seed: int = 0


# Arm families in table order: the paper's recipe, then each addition the shipped default carries.
RECIPES = ((False, False), (True, False), (True, True))


def arm_name(fusion: str, listen_norm: bool, guided: bool = False) -> str:
    return fusion + ("-norm" if listen_norm else "") + ("-guided" if guided else "")


def run(ac: AblationConfig, quick: bool = False) -> dict:
    """Train (unless done) and evaluate each requested arm; results are kept per arm in its run folder,
    so arms run in separate invocations join one table."""
    from speech.asr import WhisperASR

    asr = WhisperASR()
    for fusion in ac.fusions.split(","):
        name = arm_name(fusion, ac.listen_norm, ac.guided_attention > 0)
        out = Path(ac.out) / name
        tc = LSLMTrainConfig(fusion=fusion, setting=ac.setting, data=ac.data,
                             codec=str(Path(ac.weights) / "codec.safetensors"), out=str(out), steps=ac.steps,
                             batch=ac.batch, seed=ac.seed, checkpoint_every=500, listen_norm=ac.listen_norm,
                             guided_attention=ac.guided_attention)
        model_cfg = LSLMConfig(d_model=ac.d_model, n_layers=ac.n_layers, n_heads=4, d_ff=4 * ac.d_model,
                               listen_norm=ac.listen_norm)
        if quick:
            tc.steps, tc.batch, tc.max_utterances, tc.checkpoint_every = 20, 4, 48, 20
            model_cfg = LSLMConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, listen_norm=ac.listen_norm)
        if not (out / "report.json").is_file():
            train(tc, model_cfg)
        ec = EvalConfig(weights=ac.weights, lslm=str(out / "lslm.safetensors"), data=ac.data,
                        setting=ac.setting, utterances=8 if quick else ac.utterances, seed=ac.seed)
        model = build_model(ec.weights, ec.lslm, ec.batch)
        report = evaluate(ec, model=model, asr=asr, with_vad=False)
        arm = {k: report[k] for k in METRICS}
        arm.update(fusion=fusion, listen_norm=ac.listen_norm, guided_attention=ac.guided_attention,
                   wer_original=report["wer_original"],
                   wer_codec=report["wer_codec"], teacher_forced=json.loads((out / "report.json").read_text())["eval"])
        (out / "ablation_eval.json").write_text(json.dumps(arm, indent=2))
    return collect(Path(ac.out))


def collect(root: Path) -> dict:
    """Every evaluated arm under ``root``, in table order."""
    order = [arm_name(f, n, g) for n, g in RECIPES for f in FUSIONS]
    arms = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/ablation_eval.json")}
    return {name: arms[name] for name in order if name in arms}


def table(results: dict) -> str:
    lines = ["| arm | WER clean | WER noisy | F1 clean | F1 noisy | false IRQ (noise) | false IRQ (words) "
             "| teacher-forced code accuracy | paper WER clean / noisy | paper F1 clean / noisy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = PAPER[r["fusion"]]
        lines.append(
            f"| {name} | {100 * r['wer']:.1f} | {100 * r['wer_noisy']:.1f} | {100 * r['f1']:.1f} | "
            f"{100 * r['f1_noisy']:.1f} | {100 * r['false_interruption_rate']:.1f} | "
            f"{100 * r['false_interruption_rate_backchannel']:.1f} | {100 * r['teacher_forced']['code_acc']:.1f} | "
            f"{100 * p[0]:.2f} / {100 * p[1]:.2f} | {100 * p[2]:.2f} / {100 * p[3]:.2f} |"
        )
    any_arm = next(iter(results.values()))
    lines.append(f"\nAll figures in %. Whisper tiny.en WER of the target voice itself: "
                 f"{100 * any_arm['wer_original']:.1f}%; through our codec: {100 * any_arm['wer_codec']:.1f}%.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(results)
    x = range(len(names))
    w = 0.38
    for ax, keys, title in ((ax1, ("f1", "f1_noisy"), "interruption F1 (higher is better)"),
                            (ax2, ("wer", "wer_noisy"), "WER of generated speech (lower is better)")):
        for j, (key, label) in enumerate(zip(keys, ("clean", "noisy"), strict=True)):
            vals = [100 * results[n][key] for n in names]
            bars = ax.bar([i + (j - 0.5) * w for i in x], vals, w, label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(list(x), names)
        ax.set_ylabel("%")
        ax.set_ylim(0, 108)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle("LSLM fusion ablation at our scale (command-based, held-out test split)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.ablation", description=__doc__.split("\n\n")[0])
    for name, value in asdict(AblationConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--quick", action="store_true", help="tiny models, 20 steps, 8 utterances (smoke run)")
    p.add_argument("--json", type=Path)
    args = vars(p.parse_args(argv))
    quick, json_path = args.pop("quick"), args.pop("json")
    ac = AblationConfig(**args)
    if quick and ac.out == AblationConfig.out:
        ac.out = "runs/ablation_quick"
    torch.set_grad_enabled(True)
    results = run(ac, quick)
    md = table(results)
    print("\n" + md)
    docs = Path(ac.out) if quick else Path(ac.docs)  # a smoke run never overwrites the docs
    docs.mkdir(parents=True, exist_ok=True)
    md_path, png_path = docs / f"{ac.report}.md", docs / f"{ac.report}.png"
    command = " ".join(["python -m speech.ablation", *(sys.argv[1:] if argv is None else argv)])
    md_path.write_text(
        f"# LSLM fusion ablation\n\nProduced by `{command}` (d_model {ac.d_model}, {ac.n_layers} layers, "
        f"{ac.steps} steps of batch {ac.batch}, {ac.utterances} utterances per scene, command-based, held-out "
        f"test split; arms trained by earlier invocations into {ac.out} join the table).\n\n{md}\n\n"
        f"![fusion ablation]({png_path.name})\n")
    plot(results, png_path)
    print(f"wrote {md_path} and {png_path}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
