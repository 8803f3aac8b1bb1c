"""Accuracy-aware adapter generation (vision/adapter_gen.py): the greedy packing, a tiny real run end to end
(fine-tune → peft folder → adapter manager → the chat API), and the committed default adapters."""

from __future__ import annotations

import base64
import copy
import io
import json
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from torch import nn

from tests.conftest import free_port
from tests.vision_fixtures import ToyImageEncoder, tiny_llama, tiny_tokenizer
from vision.adapter_gen import Adapter, Backbone, GenConfig, generate, margin, meets, pack
from vision.adapter_tasks import HELDOUT_SPLITS, build_heldout, load_tasks
from vision.adapters import read_peft_adapter
from vision.api import build_router
from vision.data import DataConfig, build, cache_features, is_correct
from vision.decoder import PackedDecoder
from vision.model import VisionLanguageModel
from vision.scheduler import SchedulerConfig
from vision.service import DEFAULT_ADAPTER_DIR, VisionService, VisionServiceConfig


# ---------------------------------------------------------------------- greedy packing, with a fake trainer
class FakeTrainer:
    """Weights are the set of tasks trained on ("+" once trained longer); accuracy comes from a table of what
    helps and what hurts; a task the weights were not trained on is answered as the base model does."""

    def __init__(self, alone: dict[str, float], conflicts: set[frozenset[str]], base: dict[str, float] | None = None,
                 longer_gain: float = 0.0) -> None:
        self.alone, self.conflicts, self.base, self.gain = alone, conflicts, base or {}, longer_gain
        self.calls: list[tuple[str, list[str]]] = []

    def identity(self):
        self.calls.append(("identity", []))
        return frozenset()

    def fresh(self, tasks):
        self.calls.append(("fresh", list(tasks)))
        return frozenset(tasks)

    def longer(self, weights, tasks):
        self.calls.append(("longer", list(tasks)))
        return weights | {"+"}

    def extend(self, weights, tasks):
        self.calls.append(("extend", list(tasks)))
        return weights | frozenset(tasks)

    def accuracy(self, weights, tasks):
        out = {}
        for t in tasks:
            if t not in weights:
                out[t] = self.base.get(t, 0.0)
                continue
            hurt = any(frozenset((t, o)) in self.conflicts for o in weights if o not in (t, "+"))
            out[t] = self.alone[t] + (self.gain if "+" in weights else 0.0) - (0.3 if hurt else 0.0)
        return out


def packing(decisions):
    return [d for d in decisions if d["phase"] == "pack"]


def test_greedy_packing_keeps_merges_that_meet_every_target():
    targets = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.5}
    # c conflicts with a (so it opens a second adapter), d cannot reach its target even alone
    trainer = FakeTrainer({"a": 0.9, "b": 0.9, "c": 0.7, "d": 0.3, "e": 0.9}, {frozenset("ac")})
    packed, solo, decisions = pack(list(targets), targets, trainer, progress=False, escalations=0)
    assert [a.tasks for a in packed] == [["a", "b", "e"], ["c"], ["d"]]
    assert [a.name for a in packed] == ["a-b-e", "c", "d"]
    assert set(solo) == set(targets) and all(s.tasks == [t] for t, s in solo.items())
    rejected = [(d["task"], d["into"]) for d in decisions if not d["kept"]]
    assert rejected == [("c", "a-b")]
    assert not any(d["task"] == "d" and d.get("into") for d in decisions)  # below target alone: never tried
    assert ("extend", ["a", "b", "e"]) in trainer.calls
    assert not any(kind in ("longer", "identity") for kind, _ in trainer.calls)
    # every packed adapter's recorded accuracy meets every member's target except the task that cannot
    assert all(meets(a.accuracy, targets) for a in packed if a.tasks != ["d"])


def test_an_adapter_below_its_target_takes_no_other_task():
    targets = {"d": 0.5, "a": 0.5, "c": 0.5}
    trainer = FakeTrainer({"d": 0.3, "a": 0.7, "c": 0.7}, {frozenset("ac")})
    packed, _, decisions = pack(["d", "a", "c"], targets, trainer, progress=False, escalations=0)
    assert [a.tasks for a in packed] == [["d"], ["a"], ["c"]]
    assert not any(kind == "extend" and "d" in tasks for kind, tasks in trainer.calls)
    assert [(d["task"], d["into"], d["kept"]) for d in packing(decisions)] == [
        ("d", None, True), ("a", None, True), ("c", "a", False), ("c", None, True)]


def test_a_rejected_merge_leaves_the_adapter_as_it_was():
    targets = {"a": 0.5, "b": 0.5}
    packed, _, _ = pack(["a", "b"], targets, FakeTrainer({"a": 0.6, "b": 0.6}, {frozenset("ab")}), progress=False)
    assert [a.weights for a in packed] == [frozenset("a"), frozenset("b")]
    assert isinstance(packed[0], Adapter) and packed[0].accuracy == {"a": 0.6}


def test_the_keep_rule_asks_for_a_margin_that_shrinks_with_more_val_questions():
    assert margin(0.5, 200) == pytest.approx((2 * 0.25 / 200) ** 0.5)  # 0.05
    assert margin(0.5, 800) == pytest.approx(margin(0.5, 200) / 2) and margin(0.5, 200, z=0) == 0
    assert margin(0.95, 200) < margin(0.6, 200)  # near 1 the estimate is surer
    m = {"a": margin(0.6, 200)}
    assert meets({"a": 0.6}, {"a": 0.6}) and not meets({"a": 0.6}, {"a": 0.6}, m)
    assert meets({"a": 0.6 + m["a"]}, {"a": 0.6}, m)
    # a task at its target plus less than the margin is not packed, nor taken as meeting it
    trainer = FakeTrainer({"a": 0.62, "b": 0.9}, set())
    packed, _, _ = pack(["a", "b"], {"a": 0.6, "b": 0.6}, trainer, progress=False, escalations=0,
                        margins={"a": m["a"], "b": m["a"]})
    assert [a.tasks for a in packed] == [["a"], ["b"]]


def test_a_task_that_misses_alone_is_escalated_and_the_better_kept():
    targets = {"a": 0.5, "b": 0.5}
    trainer = FakeTrainer({"a": 0.45, "b": 0.9}, set(), longer_gain=0.1)
    packed, solo, decisions = pack(["a", "b"], targets, trainer, progress=False, escalations=2, steps=10,
                                   merge_steps=5)
    assert [kind for kind, tasks in trainer.calls if tasks == ["a"]] == ["fresh", "longer"]  # met after one
    assert solo["a"].accuracy == {"a": pytest.approx(0.55)} and solo["a"].steps == 20
    esc = [d for d in decisions if d["action"].startswith("escalation")]
    assert [(d["task"], d["steps"], d["kept"]) for d in esc] == [("a", 20, True)]
    assert [a.tasks for a in packed] == [["a", "b"]] and packed[0].steps == 25  # then packable
    # no gain: escalated up to the bound, the first adapter kept, never packed
    trainer = FakeTrainer({"a": 0.45, "b": 0.9}, set(), longer_gain=-0.1)
    packed, solo, decisions = pack(["a", "b"], targets, trainer, progress=False, escalations=2, steps=10)
    assert [kind for kind, tasks in trainer.calls if tasks == ["a"]] == ["fresh", "longer", "longer"]
    assert solo["a"].steps == 10 and solo["a"].weights == frozenset("a")
    assert [a.tasks for a in packed] == [["a"], ["b"]]


def test_a_task_the_base_model_meets_gets_no_training_and_packs_as_it_is():
    targets = {"a": 0.5, "s": 0.9}
    trainer = FakeTrainer({"a": 0.8}, set(), base={"a": 0.2, "s": 0.99})
    packed, solo, decisions = pack(["a", "s"], targets, trainer, progress=False, base={"a": 0.2, "s": 0.99},
                                   steps=10, merge_steps=5)
    assert solo["s"].weights == frozenset() and solo["s"].steps == 0
    assert ("fresh", ["s"]) not in trainer.calls and not any(kind == "extend" for kind, _ in trainer.calls)
    assert [a.tasks for a in packed] == [["a", "s"]] and packed[0].steps == 10  # the merge cost no training
    assert packing(decisions)[-1]["action"] == "as it is, no training"


# ---------------------------------------------------------------------- a tiny real run, end to end
class PixelFeatures:
    """Stands in for EfficientNet-Lite0 in the feature cache: (n, 49, 1280) from 7x7 pooled pixels."""

    def features(self, images):
        import numpy as np

        xs = [torch.from_numpy(np.asarray(im.convert("RGB").resize((7, 7)), dtype=np.float32) / 255.0).reshape(49, 3)
              for im in images]
        return torch.stack(xs).repeat(1, 1, 427)[:, :, :1280]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-gen")
    data = root / "data"
    build(DataConfig(images=(40, 16, 16), texts=(1, 1, 1)), data, features=False, progress=False)
    for split in ("train", "val", "test"):
        cache_features(data, split, progress=False, encoder=PixelFeatures())
    for i, split in enumerate(HELDOUT_SPLITS.values()):
        build_heldout(data, split, 4, seed=i, progress=False, encoder=PixelFeatures())
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(1280, 64), nn.GELU(), nn.Linear(64, 64))
    runs = {}
    # targets of 0: the base model meets both, so no training, and one adapter takes both as it is;
    # targets of 1 (a tiny random model answers none): both are trained, escalated once, and never packed
    for name, target in (("met", 0.0), ("missed", 1.0)):
        cfg = GenConfig(tasks=("colour", "grounding"), targets={"colour": target, "grounding": target}, data=data,
                        out=root / name, export=root / name / "export", rank=4, alpha=8, steps=3, merge_steps=2,
                        batch=4, train_examples=12, val_examples=6, heldout=4, escalations=1, dtype="float32")
        runs[name] = generate(cfg, Backbone(copy.deepcopy(base), tok, projector, name="tiny-llama"), progress=False), cfg
    return runs, tok, base


def test_held_out_splits_are_new_images_with_enough_questions_per_task(tiny_run):
    runs, _, _ = tiny_run
    data = runs["met"][1].data
    tasks = load_tasks(data, ["colour", "grounding", "counting", "scene", "reading"], heldout=4)
    for td in tasks:
        extra = {s: [e for e in td.split(s) if e.split in HELDOUT_SPLITS.values()] for s in ("val", "test")}
        assert len(extra["val"]) == len(extra["test"]) == 4, td.name
        images = {s: {e.image for e in td.split(s)} for s in ("train", "val", "test")}
        assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
        assert all((data / p).is_file() for p in images["val"] | images["test"])
        assert len(images["test"]) == len(td.test)  # one question of a task per image: independent questions


def test_tiny_generate_writes_peft_folders_and_a_report(tiny_run):
    runs, _, base = tiny_run
    report, cfg = runs["met"]
    assert [a["tasks"] for a in report["adapters"]] == [["colour", "grounding"]]
    assert report["tasks"]["grounding"]["adapter"] == "colour-grounding" and report["adapters"][0]["steps"] == 0
    assert [d["action"] for d in report["decisions"] if d["phase"] == "own"] == [
        "base model meets the target: identity adapter"] * 2
    assert [(d["kept"], d["action"]) for d in report["decisions"] if d.get("into")] == [(True, "as it is, no training")]
    report, cfg = runs["missed"]
    assert [a["tasks"] for a in report["adapters"]] == [["colour"], ["grounding"]]
    assert [d["action"] for d in report["decisions"] if d["phase"] == "own"] == [
        "own adapter", "escalation 1: 3 more steps"] * 2
    assert all(not t["meets"] and t["val"] == 6 and t["margin"] == 0 for t in report["tasks"].values())
    folder = cfg.export / "colour"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llama"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((cfg.export / "generation.json").read_text())["adapters"] == report["adapters"]
    assert (cfg.out / "solo" / "colour" / "adapter_model.safetensors").is_file()
    # peft itself reads it back, with trained (non-zero) B matrices
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b)


def test_generated_adapter_is_served_through_the_api(tiny_run):
    runs, tok, base = tiny_run
    cfg = runs["met"][1]
    lm = copy.deepcopy(base)
    model = VisionLanguageModel("tiny", PackedDecoder(lm), tok, ToyImageEncoder(lm.config.hidden_size), {2})
    service = VisionService(model, VisionServiceConfig(
        lora_slots=2, max_lora_rank=8, scheduler=SchedulerConfig(max_running=4, max_len=128, max_prefill_tokens=64)))
    assert service.load_adapter_dir(cfg.export) == ["colour-grounding"]
    adapter = service.adapters.get("colour-grounding")
    assert adapter.rank == 4 and adapter.target_modules == ["q_proj", "v_proj"]
    assert len(adapter.weights) == 2 * len(lm.model.layers)
    with serve(service) as client:
        assert "colour-grounding" in [m.id for m in client.models.list().data]
        out = client.chat.completions.create(model="colour-grounding", max_tokens=4,
                                             messages=[{"role": "user", "content": "what colour is the square?"}])
        assert out.model == "colour-grounding" and out.choices[0].message.content is not None


class serve:
    """The chat API over a real socket for ``service``; yields an ``openai`` client."""

    def __init__(self, service: VisionService) -> None:
        self.service = service

    def __enter__(self) -> openai.OpenAI:
        app = FastAPI()
        app.include_router(build_router(self.service, default_max_tokens=8))
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.service.start()
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()


# ---------------------------------------------------------------------- the committed default adapters
GENERATION = DEFAULT_ADAPTER_DIR / "generation.json"
KIND = {"colour": "single", "grounding": "single", "count": "count", "scene": "scene", "reading": "reading"}


def fresh_questions(task: str, n: int, seed: int = 1234):
    """``n`` new questions of the data's ``task`` (rendered now, as the test split's are)."""
    from vision.data_render import render

    rng = random.Random(f"adapter-test-{seed}-{task}")
    out = []
    while len(out) < n:
        image, qas = render(KIND[task], rng)
        qa = next((q for q in qas if q.task == task), None)
        if qa is not None:
            buf = io.BytesIO()
            image.save(buf, "PNG")
            out.append((f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}", qa.question, qa.answer))
    return out


@pytest.mark.skipif(not GENERATION.is_file(), reason="no committed adapters (python -m vision.adapters generate)")
def test_committed_generation_report_follows_the_keep_rule():
    """What generation.json says was kept, packed and escalated agrees with its own keep rule and numbers."""
    gen = json.loads(GENERATION.read_text())
    cfg = gen["config"]
    for name, t in gen["tasks"].items():
        assert t["val"] >= 150 and t["test"] >= 150, name  # large enough to decide with
        assert t["margin"] == pytest.approx(margin(t["target"], t["val"], cfg["z"]), abs=1e-4)
        assert t["meets"] == (t["val_accuracy"] >= t["target"] + t["margin"] - 1e-9)
        tried = [d for d in gen["decisions"] if d["task"] == name and d["action"].startswith("escalation")]
        if not (t["base_val_accuracy"] >= t["target"] + t["margin"]) and t["solo_val_accuracy"] < t["target"] + t["margin"]:
            assert len(tried) == cfg["escalations"], name  # a task that missed alone was escalated to the bound
    for a in gen["adapters"]:
        if len(a["tasks"]) > 1:  # a shared adapter: every member met its target with the margin
            assert all(gen["tasks"][t]["meets"] for t in a["tasks"]), a["name"]
    assert len(gen["adapters"]) < len(gen["tasks"])


@pytest.mark.skipif(not GENERATION.is_file(), reason="no committed adapters (python -m vision.adapters generate)")
def test_committed_adapters_load_by_default_and_answer_their_tasks():
    """The default service as `make serve` builds it, through the `openai` package: each committed adapter
    answers its surest task, and the base model (through the shipped MM-Adapters) answers text
    instructions (8 of 8 here; 0.687 on the test split) and colour questions (4 of 8; about 0.55)."""
    from vision.service import build_vision_service

    gen = json.loads(GENERATION.read_text())
    settings = SimpleNamespace(vision_model="default", adapter_dir="", lora_slots=8, max_lora_rank=64,
                               lora_policy="auto", vision_max_running=8)
    service = build_vision_service(settings, "cpu")
    names = [a["name"] for a in gen["adapters"]]
    assert sorted(service.adapters.names()) == sorted(names)
    for a in gen["adapters"]:  # small: rank <= 16, two target modules, float16 on disk
        path = DEFAULT_ADAPTER_DIR / a["name"]
        assert a["rank"] <= 16 and (path / "adapter_model.safetensors").stat().st_size < 4_000_000
        read_peft_adapter(path, a["name"], service.layers, 64)
    with serve(service) as client:
        assert set(names) <= {m.id for m in client.models.list().data}
        for a in gen["adapters"]:
            best = max(a["tasks"], key=lambda t: gen["tasks"][t]["val_accuracy"])  # its surest task
            task = gen["tasks"][best]["data_task"]
            right, replies = [], []
            for url, question, answer in fresh_questions(task, 16):  # stop at the first right answer
                out = client.chat.completions.create(model=a["name"], max_tokens=8, temperature=0, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}])
                assert out.model == a["name"]
                replies.append(out.choices[0].message.content)
                right.append(is_correct(replies[-1], answer))
                if right[-1]:
                    break
            if gen["tasks"][best]["val_accuracy"] < 0.3:  # reading (about 1 in 10): the answer's form, at least
                assert all(len(r.split()) <= 2 for r in replies), replies
                continue
            assert any(right), f"adapter {a['name']} answered none of 16 {best} questions right"
        # the base model, routed through the shipped MM-Adapters: text instructions and image questions, mixed
        if service.model.mma is not None:
            from vision.data_text import text_instruction

            rng = random.Random("mma-api-check")
            texts = [text_instruction(rng)[1:] for _ in range(8)]
            images = fresh_questions("colour", 8, seed=99)
            asked = [([{"type": "text", "text": q}], a) for q, a in texts] + [
                ([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}], a)
                for url, q, a in images]
            got = [client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
                {"role": "user", "content": content}]).choices[0].message.content for content, _ in asked]
            right = [is_correct(g, a) for g, (_, a) in zip(got, asked, strict=True)]
            assert sum(right[:8]) >= 5 and sum(right[8:]) >= 3, list(zip(got, [a for _, a in asked], strict=True))


def test_default_adapter_dir_is_used_only_for_the_default_model(monkeypatch, tmp_path):
    import vision.service as service_mod

    seen = {}
    monkeypatch.setattr(service_mod.VisionService, "load", classmethod(lambda cls, cfg: seen.setdefault("cfg", cfg)))
    monkeypatch.setattr(service_mod, "DEFAULT_ADAPTER_DIR", tmp_path)
    base = dict(lora_slots=2, max_lora_rank=8, lora_policy="auto", vision_max_running=2)
    for model, adapter_dir, want in (("default", "", str(tmp_path)), ("default", "/x", "/x"), ("default", "none", None),
                                     ("/some/llava", "", None)):
        seen.clear()
        service_mod.build_vision_service(SimpleNamespace(vision_model=model, adapter_dir=adapter_dir, **base), "cpu")
        assert seen["cfg"].adapter_dir == want, (model, adapter_dir)
    missing = Path(tmp_path / "missing")
    monkeypatch.setattr(service_mod, "DEFAULT_ADAPTER_DIR", missing)
    seen.clear()
    service_mod.build_vision_service(SimpleNamespace(vision_model="default", adapter_dir="", **base), "cpu")
    assert seen["cfg"].adapter_dir is None
