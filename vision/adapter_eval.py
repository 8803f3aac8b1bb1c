"""Evaluation of generated adapters through the serving path: base vs adapter, one adapter per task vs packed.

``python -m vision.adapters evaluate [--quick] [--json PATH]`` answers every task's test questions
(vision/adapter_tasks.py) greedily through the server's stack — the default model (frozen projector),
its LoRA layers, the adapter manager, the orchestrator and the continuous-batching scheduler — in
three arms on the same trace (all the tasks' questions submitted at once):

* ``base``: the model without an adapter;
* ``packed``: each question names its task's packed adapter (vision/weights/adapters/, the served defaults);
* ``per_task``: each question names its task's own adapter (``OUT/solo/`` of the generation run), when present.

Accuracy is exact match after :func:`vision.data.normalize_answer`; each arm's wall time and mean
request latency are reported too, and the val accuracies of generation.json (teacher-forced) beside them.
``--quick`` answers 3 questions per task (under a minute on this CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from vision.adapter_tasks import HELDOUT, load_tasks
from vision.data import DEFAULT_OUT, QUICK_OUT, DataConfig, Example, build, is_correct
from vision.evaluate import load_plain, run_greedy
from vision.images import ImageLimits, load_image
from vision.model import IMAGE_PLACEHOLDER, PROJECTOR_FILE
from vision.scheduler import SchedulerConfig
from vision.service import DEFAULT_ADAPTER_DIR, VisionService, VisionServiceConfig


def serve(service: VisionService, jobs: list[tuple[Example, str | None]], folder: Path, max_tokens: int = 12
          ) -> tuple[list[str], list[float]]:
    """Greedy answers of (question, adapter) pairs, all submitted at once; → answers, per-request latency (s)."""
    limits = ImageLimits(allowed_dir=Path(folder))
    requests = [(adapter, service.model.build_prompt(ex.messages(IMAGE_PLACEHOLDER),
                                                     [load_image(str(Path(folder) / ex.image), limits)]))
                for ex, adapter in jobs]
    return run_greedy(service.scheduler, requests, max_tokens, "adapter-eval")


def evaluate(folder: Path, adapters: Path = DEFAULT_ADAPTER_DIR, solo: Path | None = None, per_task: int | None = None,
             progress: bool = True, heldout: int = HELDOUT) -> dict[str, Any]:
    t_start = time.monotonic()
    say = print if progress else (lambda *a, **k: None)
    gen_file = adapters / "generation.json"
    if not gen_file.is_file():
        raise FileNotFoundError(f"{gen_file} not found: generate the adapters first (python -m vision.adapters generate)")
    gen = json.loads(gen_file.read_text())
    names = list(gen["tasks"])
    tasks = load_tasks(folder, names, {n: t["target"] for n, t in gen["tasks"].items()}, test=per_task,
                       heldout=heldout)
    solo = solo if solo is not None else Path(gen.get("solo_dir", "runs/adapters/solo"))
    service = VisionService(load_plain(PROJECTOR_FILE), VisionServiceConfig(lora_slots=8, max_lora_rank=64,
                                                               scheduler=SchedulerConfig(max_running=16, max_len=512,
                                                                                         max_waiting=4096)))
    packed_of = {}
    for a in gen["adapters"]:
        service.adapters.register(a["name"], adapters / a["name"])
        for t in a["tasks"]:
            packed_of[t] = a["name"]
    notes = []
    solo_of = {}
    for t in names:
        if (solo / t / "adapter_config.json").is_file():
            service.adapters.register(f"solo/{t}", solo / t)
            solo_of[t] = f"solo/{t}"
    if len(solo_of) < len(names):
        notes.append(f"per-task adapters not found under {solo} (made by generate): that arm is left out")
        solo_of = {}
    trace = [ex for td in tasks for ex in td.test]
    task_of = {id(ex): td.name for td in tasks for ex in td.test}
    arms = {"base": lambda t: None, "packed": lambda t: packed_of[t]}
    if solo_of:
        arms["per_task"] = lambda t: solo_of[t]
    service.start()
    results: dict[str, dict[str, float]] = {}
    timing: dict[str, dict[str, float]] = {}
    samples = []
    try:
        for arm, pick in arms.items():
            t0 = time.monotonic()
            answers, lat = serve(service, [(ex, pick(task_of[id(ex)])) for ex in trace], folder)
            wall = time.monotonic() - t0
            hits: dict[str, list[bool]] = defaultdict(list)
            for ex, a in zip(trace, answers, strict=True):
                hits[task_of[id(ex)]].append(is_correct(a, ex.answer))
            results[arm] = {t: sum(v) / len(v) for t, v in hits.items()}
            timing[arm] = {"seconds": round(wall, 2), "mean_latency_s": round(sum(lat) / len(lat), 3)}
            samples += [{"arm": arm, "q": ex.question, "want": ex.answer, "got": a} for ex, a in zip(trace[:2], answers[:2], strict=True)]
            say(f"  {arm}: {len(trace)} answers in {wall:.0f} s")
    finally:
        service.stop()
    out_tasks = {}
    for td in tasks:
        g = gen["tasks"][td.name]
        row = {"accuracy": results["packed"][td.name], "target": td.target, "base_accuracy": results["base"][td.name],
               "adapter": packed_of[td.name], "questions": len(td.test), "val_questions": g.get("val"),
               "val_accuracy": g["val_accuracy"], "val_base_accuracy": g.get("base_val_accuracy"),
               "val_per_task_accuracy": g.get("solo_val_accuracy"), "val_meets": g.get("meets")}
        if "per_task" in results:
            row["per_task_accuracy"] = results["per_task"][td.name]
        row["meets_target"] = row["accuracy"] >= td.target
        out_tasks[td.name] = row
    return {
        "split": "test", "tasks": out_tasks,
        "adapters": [{"name": a["name"], "tasks": a["tasks"], "rank": a["rank"], "target_modules": a["target_modules"]}
                     for a in gen["adapters"]],
        "adapter_count": {"packed": len(gen["adapters"]), "per_task": len(names)},
        "all_targets_met": all(r["meets_target"] for r in out_tasks.values()),
        "serving": timing, "examples": samples, "notes": notes,
        "device": "cpu", "threads": torch.get_num_threads(), "seconds": round(time.monotonic() - t_start, 1),
    }


def print_table(res: dict[str, Any]) -> None:
    per = "per_task_accuracy" in next(iter(res["tasks"].values()))
    print(f"\ntest questions, exact match; {res['adapter_count']['packed']} packed adapters for "
          f"{res['adapter_count']['per_task']} tasks\n")
    print("| task | target | n val / test | base val / test | own adapter val / test | packed val / test | adapter |\n"
          "|---|---|---|---|---|---|---|")

    def pair(v: float | None, t: float | None) -> str:
        return f"{'—' if v is None else f'{v:.3f}'} / {'—' if t is None else f'{t:.3f}'}"

    for name, r in res["tasks"].items():
        flag = "" if r["meets_target"] else " (test below target)"
        flag += "" if r.get("val_meets", True) in (True, None) else " (val below target + margin)"
        print(f"| {name} | {r['target']:.2f} | {r.get('val_questions') or '—'} / {r['questions']} | "
              f"{pair(r.get('val_base_accuracy'), r['base_accuracy'])} | "
              f"{pair(r.get('val_per_task_accuracy'), r.get('per_task_accuracy') if per else None)} | "
              f"{pair(r['val_accuracy'], r['accuracy'])}{flag} | {r['adapter']} |")
    for arm, t in res["serving"].items():
        print(f"serving {arm}: {t['seconds']} s for the trace, mean latency {t['mean_latency_s']} s")
    print(f"all targets met: {res['all_targets_met']}")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"({res['seconds']} s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="3 test questions per task (under a minute on the CPU)")
    p.add_argument("--data", type=Path, default=None, help=f"data folder (default {DEFAULT_OUT})")
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTER_DIR, help="the packed adapters + generation.json")
    p.add_argument("--solo", type=Path, default=None, help="the per-task adapters (default: generation.json's solo_dir)")
    p.add_argument("--limit", type=int, default=None, help="at most this many test questions per task")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def run_cli(args: argparse.Namespace) -> None:
    folder = args.data or (DEFAULT_OUT if (DEFAULT_OUT / "test.jsonl").is_file() or not args.quick else QUICK_OUT)
    if not (folder / "test.jsonl").is_file():
        print(f"{folder} not found: building the synthetic data")
        build(DataConfig.quick() if folder == QUICK_OUT else DataConfig(), folder, features=False)
    n = args.limit if args.limit is not None else (3 if args.quick else None)
    # --quick reads the data's own test questions only (no held-out split to render)
    res = evaluate(folder, args.adapters, args.solo, n, heldout=0 if args.quick else HELDOUT)
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
