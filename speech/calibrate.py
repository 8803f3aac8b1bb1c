"""Fit when the voice model stops for the user: ``python -m speech.calibrate [--quick] [--write]``.

The model decides IRQ (VoiceModelConfig): IRQ's logit must lead every other output by a margin on
several consecutive frames. Argmax decoding (margin 0, one frame) stops on single-frame spikes that
noise alone produces. This command runs the validation split's scenes (never the test split) with IRQ
never firing, records IRQ's lead on every frame, and scores every (margin, frames) pair from that one
run. That is exact, not an estimate: speech tokens are chosen among the other outputs whatever the
policy, so every policy's run equals this one until the frame it stops at (tested).

The chosen pair is the best mean interruption F1 (clean and noisy) whose false-interruption rate on
noise alone stays within ``--max-false``, under single sentences and under long answers (two sentences
in one, longer than any training utterance, where IRQ's lead drifts up near the end), among margins of
at least ``--min-margin`` (0 by default:
IRQ must be the model's own top choice; a negative margin fires while IRQ merely trails the top
output, which near the end of an answer, where EOS and IRQ both rise, stops on faint noise), held for
at least ``--min-frames`` frames (2 by default: near the end of an answer longer than any training
sentence, IRQ's lead spikes for single frames on faint noise alone; the barge-in control session
shows it); ``--write`` stores it in the LSLM checkpoint's metadata, where serving and ``speech.evaluate`` read it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from speech.checkpoints import write_irq_policy
from speech.corpus import Corpus
from speech.evaluate import (
    CALIBRATION_SCENES,
    EvalConfig,
    Outcome,
    SceneMaker,
    Trial,
    build_model,
    interruption_scores,
    run_model,
)

DEFAULT_MARGINS = tuple(float(m) for m in np.round(np.arange(-3.0, 8.01, 0.25), 2))
DEFAULT_FRAMES = (1, 2, 3, 4, 6)


@dataclass
class CalibConfig:
    weights: str = "speech/weights"
    lslm: str = ""  # an LSLM file other than weights/lslm.safetensors
    data: str = "data/speech"
    split: str = "val"
    setting: str = "command"
    utterances: int = 150  # per scene
    batch: int = 16
    max_false: float = 0.02  # false interruptions allowed on noise alone
    min_margin: float = 0.0  # the lowest margin considered (0: IRQ must be the argmax)
    min_frames: int = 2  # the fewest consecutive frames considered (1 admits single-frame spikes)
    seed: int = 0


def stop_frame(leads: list[float], margin: float, frames: int) -> int | None:
    """The first frame at which IRQ's lead has reached ``margin`` on ``frames`` consecutive frames."""
    run = 0
    for f, lead in enumerate(leads):
        run = run + 1 if lead >= margin else 0
        if run >= frames:
            return f
    return None


def score_policy(scenes: dict[str, tuple[list[Trial], list[Outcome]]], margin: float, frames: int, mu: int,
                 frame_ms: float) -> dict[str, float]:
    """The evaluation's figures for one policy, from the never-firing run's recorded leads."""
    row: dict[str, float] = {"irq_margin": margin, "irq_frames": frames}
    for scene, (trials, free) in scenes.items():
        outs = []
        for o in free:
            stop = stop_frame(o.irq_leads, margin, frames)
            eos = o.eos_frame if stop is None else None
            outs.append(Outcome(stop_frame=stop, eos_frame=eos))
        s = interruption_scores(trials, outs, mu, frame_ms)
        if scene in ("clean", "noisy"):
            row[f"f1_{scene}"] = s["f1"]
            row[f"reaction_ms_{scene}"] = s["reaction_ms"]
        else:
            row[f"false_{scene}"] = s["false_stop_rate"]
    row["f1_mean"] = (row["f1_clean"] + row["f1_noisy"]) / 2
    return row


def _false_on_noise(row: dict[str, float]) -> float:
    """The worse of the false-interruption rates on noise alone: single sentences, long answers."""
    return max(row["false_noise"], row.get("false_long", 0.0))


def choose(rows: list[dict[str, float]], max_false: float, min_margin: float = 0.0,
           min_frames: int = 1) -> dict[str, float]:
    """Best mean F1 (to 0.1 point) within the false-interruption budget (on noise alone, under single
    sentences and under long answers), among margins >= ``min_margin`` held >= ``min_frames`` frames;
    then fewer false stops on other words, then faster. When no policy fits the budget, the one with
    the fewest false interruptions on noise."""
    rows = [r for r in rows if r["irq_margin"] >= min_margin and r["irq_frames"] >= min_frames]
    if not rows:
        raise ValueError(f"no policy in the grid has a margin >= {min_margin} over >= {min_frames} frames")
    ok = [r for r in rows if _false_on_noise(r) <= max_false]
    if not ok:
        return min(rows, key=lambda r: (_false_on_noise(r), -r["f1_mean"]))
    return max(ok, key=lambda r: (round(r["f1_mean"], 3), -r["false_backchannel"], -r["reaction_ms_clean"]))


def calibrate(cc: CalibConfig, margins=DEFAULT_MARGINS, frames=DEFAULT_FRAMES) -> dict:
    ec = EvalConfig(weights=cc.weights, lslm=cc.lslm, data=cc.data, split=cc.split, setting=cc.setting,
                    utterances=cc.utterances, batch=cc.batch, seed=cc.seed)
    model = build_model(ec.weights, ec.lslm or None, ec.batch, irq_margin=float("inf"), irq_frames=1)
    maker = SceneMaker(Corpus(ec.data), ec, model.frame_size, model.frame_rate)
    frame_ms = 1000.0 / model.frame_rate
    scenes = {}
    for scene in CALIBRATION_SCENES:
        trials = maker.trials(scene, ec.utterances)
        scenes[scene] = (trials, run_model(model, trials, f"{scene} ({cc.split})"))
    rows = [score_policy(scenes, m, k, maker.mu, frame_ms) for k in frames for m in margins]
    best = choose(rows, cc.max_false, cc.min_margin, cc.min_frames)
    argmax = score_policy(scenes, 0.0, 1, maker.mu, frame_ms)
    return {"config": asdict(cc), "model": model.weights_note, "chosen": best, "argmax": argmax, "grid": rows}


def _pct(v: float) -> str:
    return "   n/a" if v != v else f"{100 * v:6.1f}"


def _label(r: dict[str, float]) -> str:
    k = int(r["irq_frames"])
    return f"margin {r['irq_margin']:.2f}, {k} frame{'s' * (k > 1)}"


def print_report(report: dict) -> None:
    cc = report["config"]
    print(f"\nIRQ decision for {report['model']} ({cc['split']} split, {cc['utterances']} utterances per scene)")
    print(f"{'policy':32}{'F1 clean':>10}{'F1 noisy':>10}{'false noise':>13}{'false long':>12}{'false words':>13}"
          f"{'reaction ms':>13}")
    best_per_frames = {}
    for r in report["grid"]:
        k = r["irq_frames"]
        if _false_on_noise(r) <= cc["max_false"] and (k not in best_per_frames
                                                    or r["f1_mean"] > best_per_frames[k]["f1_mean"]):
            best_per_frames[k] = r
    c = report["chosen"]
    shown = [("argmax (margin 0, 1 frame)", report["argmax"])]
    shown += [(_label(r), r) for _, r in sorted(best_per_frames.items()) if _label(r) != _label(c)]
    shown.append((_label(c) + " (chosen)", c))
    for label, r in shown:
        print(f"{label:32}{_pct(r['f1_clean']):>10}{_pct(r['f1_noisy']):>10}{_pct(r['false_noise']):>13}"
              f"{_pct(r.get('false_long', float('nan'))):>12}{_pct(r['false_backchannel']):>13}"
              f"{r['reaction_ms_clean']:>13.0f}")
    if _false_on_noise(c) > cc["max_false"]:
        print(f"no policy keeps false interruptions on noise within {100 * cc['max_false']:.1f}%: "
              "chose the fewest")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.calibrate", description=__doc__.split("\n\n")[0])
    for name, value in asdict(CalibConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--quick", action="store_true", help="16 utterances per scene (under a minute)")
    p.add_argument("--write", action="store_true",
                   help="store the chosen policy in the LSLM checkpoint (--lslm, or WEIGHTS/lslm.safetensors)")
    p.add_argument("--json", type=Path, help="write the grid and the choice here")
    args = vars(p.parse_args(argv))
    quick, write, json_path = args.pop("quick"), args.pop("write"), args.pop("json")
    cc = CalibConfig(**args)
    if cc.split == "test":
        p.error("fit on the validation split; the test split is what speech.evaluate reports")
    if quick:
        cc.utterances = 16
    torch.set_grad_enabled(False)
    report = calibrate(cc)
    print_report(report)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    if write:
        target = Path(cc.lslm) if cc.lslm else Path(cc.weights) / "lslm.safetensors"
        c = report["chosen"]
        write_irq_policy(target, c["irq_margin"], int(c["irq_frames"]),
                         f"{cc.split} split, {cc.utterances} utterances per scene, max false {cc.max_false}, "
                         f"min margin {cc.min_margin}, min frames {cc.min_frames}")
        print(f"wrote irq_margin={c['irq_margin']}, irq_frames={int(c['irq_frames'])} into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
