"""Accuracy-aware adapter generation (VaLoRA's first component): as few LoRA adapters as every task's target allows.

``python -m vision.adapters generate [--tasks counting,colour,...] [--targets counting=0.45,...]``

0. **the keep rule**: a task meets its target on val when its val accuracy is at least the target plus a
   margin of ``z`` standard errors of a val-minus-test difference (:func:`margin`; about 5 points at 0.6
   on 190 val questions), so that what is kept on val holds on test;
1. **one adapter per task**: a task the base model already meets gets the identity adapter (no training);
   every other task a fresh rank-``r`` LoRA on SmolLM2's ``q_proj`` / ``v_proj``, fine-tuned on the task
   alone (the per-task baseline, and the adapter a task falls back to). **Escalation**: when it misses its
   target, it is fine-tuned further for as many steps again (another data order, the schedule restarted),
   up to ``escalations`` times, keeping the better on val;
2. **greedy packing**, task by task in the given order: each packed adapter whose members all meet their
   targets is first asked the task as it is (kept with no training if that meets every target), else
   fine-tuned further on the union (warm start, batches balanced over its tasks) and kept if *every*
   member still meets its target on val; otherwise the task gets its own adapter (from step 1). A task
   whose own adapter misses its target is not packed.

Training is the stage-1 loop of vision/train.py (its encoding, batching and answer-only loss, reused),
with the projector and SmolLM2 frozen and peft's LoRA layers the only trainable weights. Accuracy is
teacher-forced exact match on the answer and the end-of-turn token: what greedy decoding would answer.
The packed adapters are written in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``,
float16) to ``--export`` (default vision/weights/adapters/, which the server loads at start), with
``generation.json`` (which task landed where, at what val accuracy, every decision: escalations and merges);
the per-task adapters go to ``OUT/solo/`` for ``python -m vision.adapters evaluate``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vision.adapter_tasks import DEFAULT_TASKS, HELDOUT, TARGET_RULE, TASKS, TaskData, load_tasks
from vision.data import DEFAULT_OUT, DataConfig, build, load_features
from vision.service import DEFAULT_ADAPTER_DIR as ADAPTER_DIR
from vision.train import Batcher, Encoded, TrainConfig, answer_loss, encode, exact_match, lr_at

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class GenConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    targets: dict[str, float] = field(default_factory=dict)  # overrides of the tasks' default targets
    data: Path = DEFAULT_OUT
    out: Path = Path("runs/adapters")
    export: Path | None = ADAPTER_DIR
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 100  # fine-tuning a new adapter on one task; each escalation adds as many again
    merge_steps: int = 60  # fine-tuning a packed adapter further on the union with one more task
    escalations: int = 1  # how many times a task whose own adapter misses its target is trained further
    z: float = 1.0  # the keep rule's margin in standard errors (see margin())
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 10
    train_examples: int = 1000  # per task (at most: scene has 436, reading 479, counting 623)
    val_examples: int | None = None  # per task (None: all of val)
    heldout: int = HELDOUT  # questions per task rendered for each of the held-out val and test splits
    seed: int = 0
    dtype: str = "bfloat16"  # the frozen LM's dtype on the CPU

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("at least one task")
        if self.rank < 1 or self.steps < 1 or self.merge_steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("rank, steps, merge_steps, batch and lr must be positive")
        if self.escalations < 0 or self.z < 0 or self.heldout < 0:
            raise ValueError("escalations, z and heldout must be zero or more")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be bfloat16 or float32")
        self.data, self.out = Path(self.data), Path(self.out)
        self.export = Path(self.export) if self.export is not None else None


# ---------------------------------------------------------------------- greedy packing
class Trainer(Protocol):
    def identity(self) -> Any:
        """An adapter that changes nothing (the base model)."""
        ...

    def fresh(self, tasks: list[str]) -> Any:
        """A new adapter fine-tuned on ``tasks``."""
        ...

    def longer(self, weights: Any, tasks: list[str]) -> Any:
        """``weights`` fine-tuned further on ``tasks`` for another full budget (an escalation)."""
        ...

    def extend(self, weights: Any, tasks: list[str]) -> Any:
        """``weights`` fine-tuned further on the union of ``tasks``' data."""
        ...

    def accuracy(self, weights: Any, tasks: list[str]) -> dict[str, float]:
        """Val accuracy of each of ``tasks`` with the adapter ``weights``."""
        ...


@dataclass
class Adapter:
    tasks: list[str]
    weights: Any
    accuracy: dict[str, float]  # val, per member task
    steps: int = 0  # fine-tuning steps that went into it (packing steps included)

    @property
    def name(self) -> str:
        return "-".join(self.tasks)


def margin(target: float, n: int, z: float = 1.0) -> float:
    """How far above ``target`` a val accuracy on ``n`` questions must be for the task to count as meeting it:
    ``z`` standard errors of a val-minus-test difference (two independent samples of ``n`` at the target),
    so that an accuracy just kept on val holds on a test set of the same size about 84% of the time (z=1)."""
    return z * math.sqrt(max(2 * target * (1 - target), 0.0) / max(n, 1))


def meets(acc: dict[str, float], targets: dict[str, float], margins: dict[str, float] | None = None) -> bool:
    """The keep rule: every task's val accuracy at least its target plus its margin."""
    return all(acc[t] >= targets[t] + (margins or {}).get(t, 0.0) - 1e-9 for t in acc)


def pack(tasks: list[str], targets: dict[str, float], trainer: Trainer, progress: bool = True,
         solo_weights: dict[str, Any] | None = None, on_solo: Any = None, margins: dict[str, float] | None = None,
         base: dict[str, float] | None = None, escalations: int = 1, steps: int = 0, merge_steps: int = 0
         ) -> tuple[list[Adapter], dict[str, Adapter], list[dict[str, Any]]]:
    """→ packed adapters, one adapter per task, and the log of decisions (escalations and merges).

    ``base``: the base model's val accuracy; a task it already meets (with the margin) gets the identity
    adapter instead of training. A task whose own adapter misses is fine-tuned further, up to ``escalations``
    times (``steps`` more each: the log's step counts), keeping the better. ``solo_weights``: per-task
    adapters already trained (a rerun with other targets); ``on_solo(adapter)`` is called as each is ready."""
    from tqdm import tqdm

    say = tqdm.write if progress else (lambda *a, **k: None)
    solo: dict[str, Adapter] = {}
    decisions: list[dict[str, Any]] = []
    for t in tqdm(tasks, desc="one adapter per task", disable=not progress):
        w = (solo_weights or {}).get(t)
        if w is None and base is not None and meets({t: base[t]}, targets, margins):
            solo[t] = Adapter([t], trainer.identity(), {t: base[t]}, 0)
            decisions.append({"phase": "own", "task": t, "action": "base model meets the target: identity adapter",
                              "steps": 0, "accuracy": {t: base[t]}, "kept": True})
        else:
            n = 0 if w is not None else steps
            w = trainer.fresh([t]) if w is None else w
            solo[t] = Adapter([t], w, trainer.accuracy(w, [t]), n)
            decisions.append({"phase": "own", "task": t, "action": "own adapter" + (" (reused)" if n == 0 else ""),
                              "steps": n, "accuracy": solo[t].accuracy, "kept": True})
            for k in range(escalations):
                if meets(solo[t].accuracy, targets, margins):
                    break
                w2 = trainer.longer(solo[t].weights, [t])
                acc = trainer.accuracy(w2, [t])
                better = acc[t] > solo[t].accuracy[t]
                decisions.append({"phase": "own", "task": t, "action": f"escalation {k + 1}: {steps} more steps",
                                  "steps": solo[t].steps + steps, "accuracy": acc, "kept": better})
                say(f"  {t}: escalation {k + 1} → val {acc[t]:.3f}" + ("" if better else " (no better, dropped)"))
                if better:
                    solo[t] = Adapter([t], w2, acc, solo[t].steps + steps)
        if on_solo is not None:
            on_solo(solo[t])
        say(f"  {t}: val {solo[t].accuracy[t]:.3f} (target {targets[t]:.2f} + margin {(margins or {}).get(t, 0):.3f})")
    packed: list[Adapter] = []
    for t in tqdm(tasks, desc="greedy packing", disable=not progress):
        placed = False
        if meets(solo[t].accuracy, targets, margins):  # a task that misses its target alone keeps its own adapter
            for i, a in enumerate(packed):
                if not meets(a.accuracy, targets, margins):  # a merge cannot lift a member that misses already
                    continue
                members = a.tasks + [t]
                acc = {**a.accuracy, **trainer.accuracy(a.weights, [t])}  # first: does it answer t as it is?
                w, n = a.weights, 0
                if not meets(acc, targets, margins):  # then: fine-tune it further on the union
                    w, n = trainer.extend(a.weights, members), merge_steps
                    acc = trainer.accuracy(w, members)
                ok = meets(acc, targets, margins)
                decisions.append({"phase": "pack", "task": t, "into": a.name, "steps": a.steps + n, "accuracy": acc, "kept": ok,
                                  "action": "fine-tuned on the union" if n else "as it is, no training"})
                say(f"  {t} into {a.name}: " + ", ".join(f"{m} {v:.3f}" for m, v in acc.items())
                    + (" → kept" if ok else " → rejected"))
                if ok:
                    packed[i] = Adapter(members, w, acc, a.steps + n)
                    placed = True
                    break
        if not placed:
            packed.append(Adapter([t], solo[t].weights, dict(solo[t].accuracy), solo[t].steps))
            decisions.append({"phase": "pack", "task": t, "into": None, "steps": solo[t].steps,
                              "accuracy": solo[t].accuracy, "kept": True, "action": "own adapter in the packing"})
    return packed, solo, decisions


# ---------------------------------------------------------------------- LoRA fine-tuning
@dataclass
class Backbone:
    """What the adapters are trained on: the frozen LM (a Hugging Face causal LM), its tokenizer, the projector."""

    lm: nn.Module
    tokenizer: Any
    projector: nn.Module
    name: str = BASE_MODEL  # the adapters' base_model_name_or_path

    @classmethod
    def default(cls, dtype: torch.dtype) -> Backbone:
        from lm.loading import load_causal_lm
        from vision.model import PROJECTOR_FILE, EfficientNetEncoder

        lm, tokenizer = load_causal_lm("smollm2", "cpu", torch.float32)
        encoder = EfficientNetEncoder(lm.config.hidden_size)
        if not PROJECTOR_FILE.is_file():
            raise FileNotFoundError(f"{PROJECTOR_FILE} not found: train the projector first (python -m vision.train)")
        encoder.load_projector(PROJECTOR_FILE)
        return cls(lm.to(dtype), tokenizer, encoder.projector.eval())


class LoRATrainer:
    """peft LoRA layers on the frozen LM; adapters are their state dicts (peft's key names), swapped in."""

    def __init__(self, cfg: GenConfig, tasks: list[TaskData], backbone: Backbone, progress: bool = True) -> None:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        self.cfg, self.progress, self.base_name = cfg, progress, backbone.name
        self.dtype = getattr(torch, cfg.dtype)
        self.lm = backbone.lm
        self.lm.requires_grad_(False)
        backbone.projector.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.lora_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        self.peft = get_peft_model(self.lm, self.lora_config)  # injects the LoRA layers into self.lm in place
        self.lora_config = self.peft.peft_config["default"]
        self.init = {k: v.detach().clone()
                     for k, v in get_peft_model_state_dict(self.peft, save_embedding_layers=False).items()}
        self.params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        # every task's train and val questions, encoded once; one feature tensor holds the images they use
        self.train: dict[str, list[Encoded]] = {}
        self.val: dict[str, list[Encoded]] = {}
        feats_by_split: dict[str, tuple[Tensor, dict[str, int]]] = {}
        chunks, offset = [], 0
        for td in tasks:
            for split, store in (("train", self.train), ("val", self.val)):
                exs = td.split(split)
                rows: dict[str, int] = {}
                for ex in exs:
                    if ex.split not in feats_by_split:
                        feats_by_split[ex.split] = load_features(cfg.data, ex.split)
                    feats, where = feats_by_split[ex.split]
                    if ex.image not in rows:
                        rows[ex.image] = offset
                        chunks.append(feats[where[ex.image]])
                        offset += 1
                store[td.name] = encode(exs, backbone.tokenizer, rows)
        self.features = torch.stack(chunks)  # (N, 49, 1280) float16
        self.batcher = Batcher(self.lm.model.embed_tokens, backbone.projector, self.features, self.dtype)

    # -- weights in and out
    def _load(self, weights: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, weights)

    def _state(self) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone()
                for k, v in get_peft_model_state_dict(self.peft, save_embedding_layers=False).items()}

    # -- Trainer
    def identity(self) -> dict[str, Tensor]:
        return {k: v if "lora_A" in k else torch.zeros_like(v) for k, v in self.init.items()}

    def fresh(self, tasks: list[str]) -> dict[str, Tensor]:
        return self._train(self.init, tasks, self.cfg.steps)

    def longer(self, weights: dict[str, Tensor], tasks: list[str]) -> dict[str, Tensor]:
        return self._train(weights, tasks, self.cfg.steps, seed_offset=100)

    def extend(self, weights: dict[str, Tensor], tasks: list[str]) -> dict[str, Tensor]:
        return self._train(weights, tasks, self.cfg.merge_steps)

    def _batch(self, tasks: list[str], step: int, seed: int) -> list[Encoded]:
        """``batch`` questions, tasks in turn (balanced whatever their sizes), each task's pool in a seeded order."""
        out = []
        for j in range(self.cfg.batch):
            k = step * self.cfg.batch + j
            t = tasks[k % len(tasks)]
            pool = self.train[t]
            epoch, pos = divmod(k // len(tasks), len(pool))
            order = list(range(len(pool)))
            random.Random(f"{seed}-{t}-{epoch}").shuffle(order)
            out.append(pool[order[pos]])
        return out

    def _train(self, weights: dict[str, Tensor], tasks: list[str], steps: int, seed_offset: int = 0
               ) -> dict[str, Tensor]:
        from tqdm import tqdm

        self._load(weights)
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        sched = TrainConfig(steps=steps, lr=self.cfg.lr, warmup=min(self.cfg.warmup, steps))
        seed = self.cfg.seed + len(tasks) + seed_offset  # an escalation sees the data in another order
        self.peft.train()
        bar = tqdm(range(steps), desc=f"  fine-tune {'+'.join(tasks)}", leave=False, disable=not self.progress)
        ema = None
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, sched)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                loss = answer_loss(self.lm, self._batch(tasks, step, seed), self.batcher, None)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            bar.set_postfix(loss=f"{ema:.3f}")
        self.peft.eval()
        return self._state()

    @torch.no_grad()
    def accuracy(self, weights: dict[str, Tensor], tasks: list[str]) -> dict[str, float]:
        self._load(weights)
        out = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            for t in tasks:
                items, hits = self.val[t], []
                for i in range(0, len(items), 16):
                    chunk = items[i:i + 16]
                    _, tok_hits, rows = answer_loss(self.lm, chunk, self.batcher, None)
                    hits += exact_match(tok_hits, rows, len(chunk)).tolist()
                out[t] = sum(hits) / len(hits)
        return out

    # -- peft files
    def save(self, weights: dict[str, Tensor], folder: Path, meta: dict[str, Any] | None = None) -> Path:
        """peft's format: ``adapter_config.json`` and ``adapter_model.safetensors`` (float16)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        config = copy.copy(self.lora_config)
        config.base_model_name_or_path, config.inference_mode = self.base_name, True  # not the local cache folder
        config.save_pretrained(str(folder))
        save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()},
                  str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt", **({"generation": json.dumps(meta)} if meta else {})})
        os.chmod(folder / "adapter_model.safetensors", 0o644)  # safetensors writes it private
        return folder


# ---------------------------------------------------------------------- the run
def generate(cfg: GenConfig, backbone: Backbone | None = None, progress: bool = True,
             reuse_solo: bool = False) -> dict[str, Any]:
    """The whole generation; ``reuse_solo`` takes the per-task adapters of an earlier run from ``OUT/solo``
    (same tasks and training settings) instead of training them again: a rerun with other targets."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    tasks = load_tasks(cfg.data, list(cfg.tasks), cfg.targets, cfg.train_examples, cfg.val_examples,
                       heldout=cfg.heldout)
    targets = {t.name: t.target for t in tasks}
    margins = {t.name: round(margin(t.target, len(t.val), cfg.z), 4) for t in tasks}
    backbone = backbone or Backbone.default(getattr(torch, cfg.dtype))
    trainer = LoRATrainer(cfg, tasks, backbone, progress)
    base = trainer.accuracy(trainer.identity(), list(targets))
    t_base = time.monotonic() - t0
    solo_dir = cfg.out / "solo"
    reuse = {}
    if reuse_solo:
        from safetensors.torch import load_file

        for t in targets:
            f = solo_dir / t / "adapter_model.safetensors"
            if f.is_file():
                reuse[t] = {k: v.float() for k, v in load_file(str(f)).items()}

    def save_solo(a: Adapter) -> None:
        trainer.save(a.weights, solo_dir / a.name, {"tasks": a.tasks, "val_accuracy": a.accuracy, "steps": a.steps})

    packed, solo, decisions = pack(list(targets), targets, trainer, progress, reuse, save_solo, margins, base,
                                   cfg.escalations, cfg.steps, cfg.merge_steps)
    report = {
        "config": {k: (_rel(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(cfg).items()},
        "target_rule": TARGET_RULE,
        "keep_rule": f"val accuracy >= target + {cfg.z:g} * sqrt(2 * target * (1 - target) / n_val)",
        "tasks": {t.name: {"data_task": t.task, "target": t.target, "margin": margins[t.name], "train": len(t.train),
                           "val": len(t.val), "test": len(t.test), "base_val_accuracy": base[t.name],
                           "solo_val_accuracy": solo[t.name].accuracy[t.name], "solo_steps": solo[t.name].steps,
                           "solo_meets": meets(solo[t.name].accuracy, targets, margins),
                           "adapter": next(a.name for a in packed if t.name in a.tasks),
                           "val_accuracy": next(a.accuracy[t.name] for a in packed if t.name in a.tasks),
                           "meets": next(meets({t.name: a.accuracy[t.name]}, targets, margins)
                                         for a in packed if t.name in a.tasks)}
                  for t in tasks},
        "adapters": [{"name": a.name, "tasks": a.tasks, "rank": cfg.rank, "target_modules": list(cfg.target_modules),
                      "steps": a.steps, "val_accuracy": a.accuracy} for a in packed],
        "decisions": decisions,
        "solo_dir": _rel(solo_dir), "reused_solo": sorted(reuse),
        "seconds": round(time.monotonic() - t0), "seconds_base_eval": round(t_base),
        "threads": torch.get_num_threads(),
    }
    dest = cfg.out / "packed"
    shutil.rmtree(dest, ignore_errors=True)
    for a in packed:
        trainer.save(a.weights, dest / a.name, {"tasks": a.tasks, "val_accuracy": a.accuracy, "steps": a.steps})
    (dest / "generation.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.export is not None:
        if cfg.export.exists():
            shutil.rmtree(cfg.export)
        shutil.copytree(dest, cfg.export)
        report["export"] = str(cfg.export)
    return report


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when it is under it (the report is committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{len(report['tasks'])} tasks → {len(report['adapters'])} adapters (val accuracy, teacher-forced exact "
          f"match; keep rule: {report['keep_rule']})\n")
    print("| task | n val | target | + margin | base | alone (steps) | packed | adapter |\n|---|---|---|---|---|---|---|---|")
    for name, t in report["tasks"].items():
        print(f"| {name} | {t['val']} | {t['target']:.2f} | {t['margin']:.3f} | {t['base_val_accuracy']:.3f} | "
              f"{t['solo_val_accuracy']:.3f} ({t['solo_steps']}) | "
              f"{t['val_accuracy']:.3f}{'' if t['meets'] else ' (misses)'} | {t['adapter']} |")
    for a in report["adapters"]:
        print(f"adapter {a['name']}: rank {a['rank']} on {', '.join(a['target_modules'])}, {a['steps']} steps; "
              f"tasks {', '.join(a['tasks'])}")
    print(f"({report['seconds']} s on {report['threads']} thread(s))")


def _targets(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name not in TASKS or not value:
            raise SystemExit(f"--targets takes task=accuracy pairs (tasks: {', '.join(TASKS)}), got {part!r}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vision.adapters", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="fine-tune and pack LoRA adapters for the tasks (see docs/adapters.md)")
    g.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, in packing order ({', '.join(TASKS)})")
    g.add_argument("--targets", default="", help="task=accuracy overrides, e.g. counting=0.5,colour=0.8")
    g.add_argument("--data", type=Path, default=DEFAULT_OUT, help="data folder (built if missing)")
    g.add_argument("--out", type=Path, default=Path("runs/adapters"))
    g.add_argument("--export", default=str(ADAPTER_DIR), help="where the packed adapters go ('' = nowhere)")
    d = GenConfig()
    g.add_argument("--rank", type=int, default=d.rank)
    g.add_argument("--steps", type=int, default=d.steps, help="steps of a task's own adapter (and of each escalation)")
    g.add_argument("--merge-steps", type=int, default=d.merge_steps)
    g.add_argument("--escalations", type=int, default=d.escalations, help="further fine-tunings of an own adapter "
                   "that misses its target")
    g.add_argument("--z", type=float, default=d.z, help="the keep rule's margin, in standard errors")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--train-examples", type=int, default=d.train_examples)
    g.add_argument("--heldout", type=int, default=d.heldout, help="questions per task rendered for held-out val and test")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--reuse-solo", action="store_true", help="take OUT/solo's per-task adapters from an earlier run")
    e = sub.add_parser("evaluate", help="base vs adapters, one per task vs packed, on the test questions")
    from vision.adapter_eval import add_arguments

    add_arguments(e)
    args = p.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.cmd == "evaluate":
        from vision.adapter_eval import run_cli

        run_cli(args)
        return
    if not (args.data / "train.jsonl").is_file():
        print(f"{args.data} not found: building the synthetic data (python -m vision.data build)")
        build(DataConfig(), args.data)
    cfg = GenConfig(tasks=tuple(filter(None, args.tasks.split(","))), targets=_targets(args.targets), data=args.data,
                    out=args.out, export=Path(args.export) if args.export else None, rank=args.rank,
                    alpha=2 * args.rank, steps=args.steps, merge_steps=args.merge_steps, escalations=args.escalations,
                    z=args.z, batch=args.batch, lr=args.lr, train_examples=args.train_examples, heldout=args.heldout,
                    seed=args.seed)
    report = generate(cfg, reuse_solo=args.reuse_solo)
    print_report(report)
    print(f"wrote {cfg.out / 'packed'}" + (f" and {cfg.export}" if cfg.export else ""))
