"""Accuracy of the default vision-language model on held-out image questions and text-only instructions.

``python -m vision.evaluate [--quick] [--json PATH]`` answers the test split (vision/data.py) greedily
through the serving path — prompts built by the model's chat template, images read by the server's
image loader, the continuous-batching scheduler, the packed decoder — for these arms:

=========================  ==========================================================================
``text_accuracy_base``     SmolLM2 alone (the text path of the default model, no adapters)
``image_accuracy_base``    the default model with its projector untrained (the seeded initialisation)
``image_accuracy_projector``  with the stage-1 projector (vision/weights/projector.safetensors)
``text_accuracy`` / ``image_accuracy_mma``  with the MM-Adapters and the router (mma.safetensors)
``text_accuracy_shared`` / ``image_accuracy_shared``  with one shared adapter, no router (mma_shared)
``image_accuracy``         the model as served by default: the MM-Adapters when trained, else the projector
``routing_accuracy``       share of (request, layer) routing decisions that take the request's modality's path
                           (path 0 text, path 1 image: what training's auxiliary routing loss ties them to)
``router_overhead``        extra time of a decode step with the router over one with a single shared adapter,
                           as a fraction of the plain step (``mma_overhead``: all adapters over plain)
=========================  ==========================================================================

Accuracy is exact match after :func:`vision.data.normalize_answer`. Arms whose weights are missing are
``null`` with a note. Requests of both modalities are submitted together, so MM-Adapter arms run mixed
packed batches in which each request has its own routing weights (the scheduler assigns a request's
cache slot its modality at admission and releases it at the end). ``--quick`` answers a few questions
per arm (under a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision.data import (
    DEFAULT_OUT,
    QUICK_OUT,
    DataConfig,
    Example,
    build,
    is_correct,
    load_split,
    normalize_answer,
)
from vision.decoder import PackedStep, Segment
from vision.images import ImageLimits, load_image
from vision.mma import IMAGE, TEXT, attach_to_decoder, attach_visual, load_mma, remove_mma
from vision.model import IMAGE_PLACEHOLDER, MMA_FILE, PROJECTOR_FILE, Prompt, VisionLanguageModel
from vision.scheduler import Event, GenRequest, SamplingParams, Scheduler, SchedulerConfig

SHARED_FILE = MMA_FILE.with_name("mma_shared.safetensors")


@dataclass
class Answer:
    example: Example
    text: str
    correct: bool  # exact match after normalisation
    contains: bool  # the answer appears as whole words somewhere in the reply (lenient, for chatty replies)


def contains_answer(reply: str, answer: str) -> bool:
    words = normalize_answer(re.sub(r"[^\w\s]", " ", reply.replace("\n", " "))).split()
    want = normalize_answer(answer).split()
    return any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


def run_greedy(scheduler: Scheduler, requests: list[tuple[str | None, Prompt]], max_tokens: int, tag: str
               ) -> tuple[list[str], list[float]]:
    """Submit every (adapter, prompt) at once to a started scheduler and wait for all of them.

    Returns each answer and the seconds from the first submission to its end; raises if any request
    failed or the scheduler thread died (instead of waiting forever)."""
    texts: dict[int, list[str]] = defaultdict(list)
    done = [threading.Event() for _ in requests]
    ended = [0.0] * len(requests)
    errors: dict[int, str] = {}

    def emit_for(i: int):
        def emit(ev: Event) -> None:
            if ev.kind == "delta":
                texts[i].append(ev.text)
            elif ev.kind in ("done", "error"):
                if ev.kind == "error":
                    errors[i] = ev.text
                ended[i] = time.monotonic()
                done[i].set()
        return emit

    t0 = time.monotonic()
    for i, (adapter, prompt) in enumerate(requests):
        scheduler.submit(GenRequest(f"{tag}-{i}", adapter, prompt, SamplingParams(max_tokens=max_tokens), emit_for(i)))
    for d in done:
        while not d.wait(1.0):
            if not scheduler._thread.is_alive():
                raise RuntimeError("the scheduler thread died (see the log above)")
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {next(iter(errors.values()))}")
    return ["".join(texts[i]) for i in range(len(requests))], [e - t0 for e in ended]


def answer_all(model: VisionLanguageModel, examples: list[Example], folder: Path, max_tokens: int = 24,
               max_running: int = 16) -> list[Answer]:
    """Greedy answers through the scheduler, every example submitted at once (mixed modalities)."""
    limits = ImageLimits(allowed_dir=Path(folder))
    sched = Scheduler(model, None, None, SchedulerConfig(max_running=max_running, max_len=512,
                                                           max_waiting=max(256, len(examples))))
    prompts = [(None, model.build_prompt(ex.messages(IMAGE_PLACEHOLDER),
                                         [load_image(str(Path(folder) / ex.image), limits)] if ex.image else []))
               for ex in examples]
    sched.start()
    try:
        texts, _ = run_greedy(sched, prompts, max_tokens, "eval")
    finally:
        sched.stop()
    return [Answer(ex, text, is_correct(text, ex.answer), contains_answer(text, ex.answer))
            for ex, text in zip(examples, texts, strict=True)]


def accuracy(answers: list[Answer], modality: str, lenient: bool = False) -> float | None:
    xs = [a.contains if lenient else a.correct for a in answers if a.example.modality == modality]
    return sum(xs) / len(xs) if xs else None


def by_task(answers: list[Answer]) -> dict[str, float]:
    tasks: dict[str, list[bool]] = defaultdict(list)
    for a in answers:
        tasks[a.example.task].append(a.correct)
    return {t: sum(v) / len(v) for t, v in sorted(tasks.items())}


def routing_accuracy(model: VisionLanguageModel, examples: list[Example]) -> dict[str, Any]:
    """Each request's routing weights (what its slot is assigned at prefill) → its decision in every layer
    (the path it weights most). Training ties path m to modality m (the auxiliary routing loss: text → 0,
    image → 1), so a decision is right when it takes its request's modality's path."""
    mma = model.mma
    if not mma.cfg.routed or mma.cfg.paths < mma.cfg.modalities:
        return {"routing_accuracy": None}
    table = mma.table()  # (L, M + 1, P)
    mods = torch.tensor([IMAGE if ex.image else TEXT for ex in examples])
    decision = table[:, mods].float().argmax(-1)  # (L, N)
    right = decision == mods[None]
    image_w, text_w = table[:, IMAGE].float(), table[:, TEXT].float()
    return {"routing_accuracy": float(right.float().mean()),
            "layers_separated": int((image_w.argmax(-1) != text_w.argmax(-1)).sum()), "layers": int(table.shape[0]),
            "routing_weight_own_path": {"text": float(text_w[:, TEXT].mean()), "image": float(image_w[:, IMAGE].mean())}}


@dataclass
class AdapterArm:
    """Loaded MM-Adapters kept off the model between uses: their wrapped norms, put in and taken out
    (with the visual adapter's hook on the projector, when they have one)."""

    mma: Any
    norms: list[Any]

    @classmethod
    def load(cls, model: VisionLanguageModel, path: Path) -> AdapterArm:
        layers = model.decoder.layers
        mma = load_mma(path, layers, model.device, model.dtype)
        norms = [layer.input_layernorm for layer in layers]
        remove_mma(layers)
        return cls(mma, norms)

    def install(self, model: VisionLanguageModel) -> list[Any]:
        for layer, norm in zip(model.decoder.layers, self.norms, strict=True):
            layer.input_layernorm = norm
        model.mma = self.mma
        hooks = [attach_to_decoder(self.mma, model.decoder)]
        if self.mma.visual is not None:
            hooks.append(attach_visual(self.mma, model.encoder.projector))
        return hooks

    @staticmethod
    def uninstall(model: VisionLanguageModel, hooks: list[Any]) -> None:
        for hook in hooks:
            hook.remove()
        remove_mma(model.decoder.layers)
        model.mma = None


@torch.inference_mode()
def decode_step_ms(model: VisionLanguageModel, arms: dict[str, AdapterArm | None], batch: int = 8, context: int = 96,
                   repeats: int = 40) -> dict[str, float]:
    """Median time (ms) of one packed decode step of ``batch`` requests at position ``context``, for each
    arm (``None`` = the plain model), measured in turns so that a busy CPU slows every arm alike.
    Slots alternate text / image; the step includes building per-token routing weights."""
    dec = model.decoder
    cache = dec.new_cache(batch, context + 8)
    ids = torch.randint(0, 1000, (batch,), device=model.device)
    segs = [Segment(s, context, 1) for s in range(batch)]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(repeats + 3):
        for name, arm in arms.items():
            hooks = arm.install(model) if arm is not None else None
            if arm is not None:
                for s in range(batch):
                    arm.mma.assign(s, IMAGE if s % 2 else TEXT)
            t0 = time.perf_counter()
            dec(model.embed_tokens(ids), PackedStep.build(segs, model.device), cache)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 3:
                times[name].append((time.perf_counter() - t0) * 1e3)
            if arm is not None:
                AdapterArm.uninstall(model, hooks)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _pick(examples: list[Example], modality: str, n: int | None) -> list[Example]:
    """The first ``n`` of a modality, taken round-robin over its tasks so that every task is in."""
    pool = [e for e in examples if e.modality == modality]
    if n is None or n >= len(pool):
        return pool
    tasks: dict[str, list[Example]] = defaultdict(list)
    for e in pool:
        tasks[e.task].append(e)
    out, k = [], 0
    while len(out) < n:
        for t in sorted(tasks):
            if k < len(tasks[t]) and len(out) < n:
                out.append(tasks[t][k])
        k += 1
    return out


def evaluate(folder: Path, split: str = "test", n_image: int | None = None, n_text: int | None = None,
             projector: Path = PROJECTOR_FILE, mma_file: Path = MMA_FILE, shared_file: Path = SHARED_FILE,
             progress: bool = True, quick: bool = False) -> dict[str, Any]:
    t_start = time.monotonic()
    examples = load_split(folder, split)
    images, texts = _pick(examples, "image", n_image), _pick(examples, "text", n_text)
    model = load_plain(projector=None)
    say = print if progress else (lambda *a, **k: None)
    res: dict[str, Any] = {"split": split, "image_questions": len(images), "text_questions": len(texts), "notes": []}
    tasks: dict[str, dict[str, float]] = {}

    def run(name: str, exs: list[Example]) -> list[Answer]:
        t0 = time.monotonic()
        ans = answer_all(model, exs, folder)
        say(f"  {name}: {len(exs)} answers in {time.monotonic() - t0:.0f} s")
        tasks[name] = by_task(ans)
        return ans

    # SmolLM2 alone and the untrained projector (the seeded initialisation load_vlm falls back to)
    say("arm: base (SmolLM2 alone, untrained projector)")
    ans = run("base", texts + images)
    res["text_accuracy_base"], res["image_accuracy_base"] = accuracy(ans, "text"), accuracy(ans, "image")
    res["text_accuracy_base_lenient"] = accuracy(ans, "text", lenient=True)
    res["examples_base"] = [{"q": a.example.question, "want": a.example.answer, "got": a.text} for a in ans[:6]]
    res["image_accuracy_projector"] = None
    if projector.is_file():
        model.encoder.load_projector(projector)
        say(f"arm: projector ({projector})")
        ans = run("projector", images)
        res["image_accuracy_projector"] = accuracy(ans, "image")
    else:
        res["notes"].append(f"{projector} not found: no trained projector (python -m vision.train --stage projector)")
    loaded: dict[str, AdapterArm] = {}
    for key, path, text_key, image_key in (("mma", mma_file, "text_accuracy", "image_accuracy_mma"),
                                           ("shared", shared_file, "text_accuracy_shared", "image_accuracy_shared")):
        res[text_key] = res[image_key] = None
        if not path.is_file():
            res["notes"].append(f"{path} not found: no {'router' if key == 'mma' else 'shared-adapter'} arm "
                                f"(python -m vision.train --stage mma{' --paths 1' if key == 'shared' else ''})")
            continue
        arm = loaded[key] = AdapterArm.load(model, path)
        hooks = arm.install(model)
        try:
            say(f"arm: {key} ({path})")
            ans = run(key, texts + images)
            res[text_key], res[image_key] = accuracy(ans, "text"), accuracy(ans, "image")
            res[f"{text_key}_lenient"] = accuracy(ans, "text", lenient=True)
            if key == "mma":
                res.update(routing_accuracy(model, texts + images))
                res["examples_mma"] = [{"q": a.example.question, "want": a.example.answer, "got": a.text}
                                       for a in ans[:6]]
        finally:
            AdapterArm.uninstall(model, hooks)
    res["image_accuracy"] = res["image_accuracy_mma"] if res["image_accuracy_mma"] is not None else res["image_accuracy_projector"]
    res.setdefault("routing_accuracy", None)
    ms = decode_step_ms(model, {"plain": None, **loaded}, repeats=10 if quick else 40)
    res["step_ms"] = ms
    res["mma_overhead"] = (ms["mma"] - ms["plain"]) / ms["plain"] if "mma" in ms else None
    res["router_overhead"] = (ms["mma"] - ms["shared"]) / ms["plain"] if "mma" in ms and "shared" in ms else None
    res["tasks"] = tasks
    res["device"], res["threads"] = str(model.device), torch.get_num_threads()
    res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


def load_plain(projector: Path | None) -> VisionLanguageModel:
    """The default model built as load_vlm builds it (float32, CPU), without the MM-Adapters of vision/weights:
    the evaluation's arms add them; the task adapters were trained on it (vision.adapter_eval)."""
    from lm.loading import load_causal_lm, stop_token_ids
    from vision.decoder import PackedDecoder
    from vision.model import DEFAULT_VLM, EfficientNetEncoder

    hf_lm, tokenizer = load_causal_lm("smollm2", "cpu", torch.float32)
    encoder = EfficientNetEncoder(hf_lm.config.hidden_size)
    if projector is not None:
        encoder.load_projector(projector)
    encoder.eval()
    return VisionLanguageModel(DEFAULT_VLM, PackedDecoder(hf_lm), tokenizer, encoder,
                               stop_token_ids(tokenizer, hf_lm.generation_config), "evaluation")


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(res: dict[str, Any]) -> None:
    rows = [("SmolLM2 alone", res["text_accuracy_base"], res.get("text_accuracy_base_lenient"), None),
            ("untrained projector", None, None, res["image_accuracy_base"]),
            ("trained projector (stage 1)", None, None, res["image_accuracy_projector"]),
            ("+ one shared adapter", res["text_accuracy_shared"], res.get("text_accuracy_shared_lenient"),
             res["image_accuracy_shared"]),
            ("+ MM-Adapters with router", res["text_accuracy"], res.get("text_accuracy_lenient"), res["image_accuracy_mma"])]
    print(f"\n{res['split']} split: {res['image_questions']} image questions, {res['text_questions']} text instructions "
          f"(exact match)\n")
    print(f"| {'model':30s} | text acc | text, answer in reply | image acc |\n|{'-' * 32}|----------|-----------------------|-----------|")
    for name, t, tl, i in rows:
        print(f"| {name:30s} | {_fmt(t):>8s} | {_fmt(tl):>21s} | {_fmt(i):>9s} |")
    print(f"\nimage_accuracy (served default) {_fmt(res['image_accuracy'])}; routing_accuracy {_fmt(res['routing_accuracy'])}"
          + (f" ({res['layers_separated']}/{res['layers']} layers separate the modalities)" if res.get("layers") else ""))
    if res.get("mma_overhead") is not None:
        print(f"decode step (8 requests, {res['device']}, {res['threads']} threads): plain {res['step_ms']['plain']:.1f} ms, "
              f"MM-Adapters {res['mma_overhead'] * 100:+.1f}%"
              + (f", router over one shared adapter {res['router_overhead'] * 100:+.1f}%" if res.get("router_overhead") is not None else ""))
    for arm, accs in res["tasks"].items():
        print(f"  {arm:9s} " + " ".join(f"{t}={v:.2f}" for t, v in accs.items()))
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"({res['seconds']} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vision.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few questions per arm (under a minute on the CPU)")
    p.add_argument("--data", type=Path, default=None, help=f"data folder (default {DEFAULT_OUT}, or {QUICK_OUT})")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per modality")
    p.add_argument("--projector", type=Path, default=PROJECTOR_FILE)
    p.add_argument("--mma", type=Path, default=MMA_FILE, help="MM-Adapters with the router")
    p.add_argument("--mma-shared", type=Path, default=SHARED_FILE, help="one shared adapter (the baseline)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    folder = args.data or (DEFAULT_OUT if (DEFAULT_OUT / f"{args.split}.jsonl").is_file() else QUICK_OUT)
    if not (folder / f"{args.split}.jsonl").is_file():
        build(DataConfig.quick(), folder, features=False)
    n = args.limit if args.limit is not None else (10 if args.quick else None)
    res = evaluate(folder, args.split, n, n, args.projector, args.mma, args.mma_shared, quick=args.quick)
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
