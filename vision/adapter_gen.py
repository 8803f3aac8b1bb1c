"""Accuracy-aware adapter generation (VaLoRA's first component): as few LoRA adapters as every task's target allows.

``python -m vision.adapters generate [--tasks counting,colour,...] [--targets counting=0.45,...]``

1. **one adapter per task**: a fresh rank-``r`` LoRA on SmolLM2's ``q_proj`` / ``v_proj`` is fine-tuned on
   each task alone (the per-task baseline, and the adapter a task falls back to);
2. **greedy packing**, task by task in the given order: the task's data is added to each packed adapter
   in turn, the adapter is fine-tuned further on the union (warm start, batches balanced over its
   tasks), and the merge is kept if *every* member still meets its target on val; otherwise the task
   gets its own adapter (from step 1). A task whose own adapter misses its target is not packed.

Training is the stage-1 loop of vision/train.py (its encoding, batching and answer-only loss, reused),
with the projector and SmolLM2 frozen and peft's LoRA layers the only trainable weights. Accuracy is
teacher-forced exact match on the answer and the end-of-turn token: what greedy decoding would answer.
The packed adapters are written in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``,
float16) to ``--export`` (default vision/weights/adapters/, which the server loads at start), with
``generation.json`` (which task landed where, at what val accuracy, every packing decision); the
per-task adapters go to ``OUT/solo/`` for ``python -m vision.adapters evaluate``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vision.adapter_tasks import DEFAULT_TASKS, TASKS, TaskData, load_tasks
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
    steps: int = 90  # fine-tuning a new adapter on one task
    merge_steps: int = 50  # fine-tuning a packed adapter further on the union with one more task
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 10
    train_examples: int = 400  # per task
    val_examples: int = 64  # per task
    seed: int = 0
    dtype: str = "bfloat16"  # the frozen LM's dtype on the CPU

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("at least one task")
        if self.rank < 1 or self.steps < 1 or self.merge_steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("rank, steps, merge_steps, batch and lr must be positive")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be bfloat16 or float32")
        self.data, self.out = Path(self.data), Path(self.out)
        self.export = Path(self.export) if self.export is not None else None


# ---------------------------------------------------------------------- greedy packing
class Trainer(Protocol):
    def fresh(self, tasks: list[str]) -> Any:
        """A new adapter fine-tuned on ``tasks``."""
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

    @property
    def name(self) -> str:
        return "-".join(self.tasks)


def meets(acc: dict[str, float], targets: dict[str, float]) -> bool:
    return all(acc[t] >= targets[t] for t in acc)


def pack(tasks: list[str], targets: dict[str, float], trainer: Trainer, progress: bool = True,
         solo_weights: dict[str, Any] | None = None, on_solo: Any = None
         ) -> tuple[list[Adapter], dict[str, Adapter], list[dict[str, Any]]]:
    """→ packed adapters, one adapter per task, and the log of packing decisions. ``solo_weights``: per-task
    adapters already trained (a rerun with other targets); ``on_solo(adapter)`` is called as each is ready."""
    from tqdm import tqdm

    solo: dict[str, Adapter] = {}
    for t in tqdm(tasks, desc="one adapter per task", disable=not progress):
        w = (solo_weights or {}).get(t)
        w = trainer.fresh([t]) if w is None else w
        solo[t] = Adapter([t], w, trainer.accuracy(w, [t]))
        if on_solo is not None:
            on_solo(solo[t])
        tqdm.write(f"  {t}: val {solo[t].accuracy[t]:.3f} (target {targets[t]:.2f})") if progress else None
    packed: list[Adapter] = []
    decisions: list[dict[str, Any]] = []
    for t in tqdm(tasks, desc="greedy packing", disable=not progress):
        placed = False
        if meets(solo[t].accuracy, targets):  # a task that misses its target alone keeps its own adapter
            for i, a in enumerate(packed):
                if not meets(a.accuracy, targets):  # a merge cannot lift a member that misses its target already
                    continue
                members = a.tasks + [t]
                w = trainer.extend(a.weights, members)
                acc = trainer.accuracy(w, members)
                ok = meets(acc, targets)
                decisions.append({"task": t, "into": a.name, "accuracy": acc, "kept": ok})
                if progress:
                    tqdm.write(f"  {t} into {a.name}: " + ", ".join(f"{m} {v:.3f}" for m, v in acc.items())
                               + (" → kept" if ok else " → rejected"))
                if ok:
                    packed[i] = Adapter(members, w, acc)
                    placed = True
                    break
        if not placed:
            packed.append(Adapter([t], solo[t].weights, dict(solo[t].accuracy)))
            decisions.append({"task": t, "into": None, "accuracy": solo[t].accuracy, "kept": True})
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
        feats_by_split = {s: load_features(cfg.data, s) for s in ("train", "val")}
        chunks, offset = [], 0
        for td in tasks:
            for split, store in (("train", self.train), ("val", self.val)):
                exs = td.split(split)
                rows: dict[str, int] = {}
                feats, where = None, {}
                for ex in exs:
                    src = "val" if ex.split == "val" else "train"
                    feats, where = feats_by_split[src]
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
    def fresh(self, tasks: list[str]) -> dict[str, Tensor]:
        return self._train(self.init, tasks, self.cfg.steps)

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

    def _train(self, weights: dict[str, Tensor], tasks: list[str], steps: int) -> dict[str, Tensor]:
        from tqdm import tqdm

        self._load(weights)
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        sched = TrainConfig(steps=steps, lr=self.cfg.lr, warmup=min(self.cfg.warmup, steps))
        seed = self.cfg.seed + len(tasks)
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
    tasks = load_tasks(cfg.data, list(cfg.tasks), cfg.targets, cfg.train_examples, cfg.val_examples)
    targets = {t.name: t.target for t in tasks}
    backbone = backbone or Backbone.default(getattr(torch, cfg.dtype))
    trainer = LoRATrainer(cfg, tasks, backbone, progress)
    base = trainer.accuracy({k: torch.zeros_like(v) for k, v in trainer.init.items()}, list(targets))
    solo_dir = cfg.out / "solo"
    reuse = {}
    if reuse_solo:
        from safetensors.torch import load_file

        for t in targets:
            f = solo_dir / t / "adapter_model.safetensors"
            if f.is_file():
                reuse[t] = {k: v.float() for k, v in load_file(str(f)).items()}

    def save_solo(a: Adapter) -> None:
        trainer.save(a.weights, solo_dir / a.name, {"tasks": a.tasks, "val_accuracy": a.accuracy})

    packed, solo, decisions = pack(list(targets), targets, trainer, progress, reuse, save_solo)
    report = {
        "config": {k: (_rel(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(cfg).items()},
        "tasks": {t.name: {"data_task": t.task, "target": t.target, "train": len(t.train), "val": len(t.val),
                           "test": len(t.test), "base_val_accuracy": base[t.name],
                           "solo_val_accuracy": solo[t.name].accuracy[t.name],
                           "adapter": next(a.name for a in packed if t.name in a.tasks),
                           "val_accuracy": next(a.accuracy[t.name] for a in packed if t.name in a.tasks)}
                  for t in tasks},
        "adapters": [{"name": a.name, "tasks": a.tasks, "rank": cfg.rank, "target_modules": list(cfg.target_modules),
                      "val_accuracy": a.accuracy} for a in packed],
        "decisions": decisions,
        "solo_dir": str(solo_dir), "reused_solo": sorted(reuse),
        "seconds": round(time.monotonic() - t0),
    }
    dest = cfg.out / "packed"
    shutil.rmtree(dest, ignore_errors=True)
    for a in packed:
        trainer.save(a.weights, dest / a.name, {"tasks": a.tasks, "val_accuracy": a.accuracy})
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
    print(f"\n{len(report['tasks'])} tasks → {len(report['adapters'])} adapters (val accuracy, teacher-forced exact match)\n")
    print("| task | target | base | alone | packed | adapter |\n|---|---|---|---|---|---|")
    for name, t in report["tasks"].items():
        print(f"| {name} | {t['target']:.2f} | {t['base_val_accuracy']:.3f} | {t['solo_val_accuracy']:.3f} | "
              f"{t['val_accuracy']:.3f}{'' if t['val_accuracy'] >= t['target'] else ' (below target)'} | {t['adapter']} |")
    for a in report["adapters"]:
        print(f"adapter {a['name']}: rank {a['rank']} on {', '.join(a['target_modules'])}; tasks {', '.join(a['tasks'])}")
    print(f"({report['seconds']} s)")


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
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--steps", type=int, default=90)
    g.add_argument("--merge-steps", type=int, default=50)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--train-examples", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
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
                    alpha=2 * args.rank, steps=args.steps, merge_steps=args.merge_steps, batch=args.batch, lr=args.lr,
                    train_examples=args.train_examples, seed=args.seed)
    report = generate(cfg, reuse_solo=args.reuse_solo)
    print_report(report)
    print(f"wrote {cfg.out / 'packed'}" + (f" and {cfg.export}" if cfg.export else ""))
