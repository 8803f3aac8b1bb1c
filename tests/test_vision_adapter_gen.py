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
from vision.adapter_gen import Adapter, Backbone, GenConfig, generate, meets, pack
from vision.adapters import read_peft_adapter
from vision.api import build_router
from vision.data import DataConfig, build, cache_features, is_correct
from vision.decoder import PackedDecoder
from vision.model import VisionLanguageModel
from vision.scheduler import SchedulerConfig
from vision.service import DEFAULT_ADAPTER_DIR, VisionService, VisionServiceConfig


# ---------------------------------------------------------------------- greedy packing, with a fake trainer
class FakeTrainer:
    """Weights are the set of tasks trained on; accuracy comes from a table of what helps and what hurts."""

    def __init__(self, alone: dict[str, float], conflicts: set[frozenset[str]]) -> None:
        self.alone, self.conflicts = alone, conflicts
        self.calls: list[tuple[str, list[str]]] = []

    def fresh(self, tasks):
        self.calls.append(("fresh", list(tasks)))
        return frozenset(tasks)

    def extend(self, weights, tasks):
        self.calls.append(("extend", list(tasks)))
        return weights | frozenset(tasks)

    def accuracy(self, weights, tasks):
        out = {}
        for t in tasks:
            hurt = any(frozenset((t, o)) in self.conflicts for o in weights if o != t)
            out[t] = self.alone[t] - (0.3 if hurt else 0.0)
        return out


def test_greedy_packing_keeps_merges_that_meet_every_target():
    targets = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.5}
    # c conflicts with a (so it opens a second adapter), d cannot reach its target even alone
    trainer = FakeTrainer({"a": 0.9, "b": 0.9, "c": 0.7, "d": 0.3, "e": 0.9}, {frozenset("ac")})
    packed, solo, decisions = pack(list(targets), targets, trainer, progress=False)
    assert [a.tasks for a in packed] == [["a", "b", "e"], ["c"], ["d"]]
    assert [a.name for a in packed] == ["a-b-e", "c", "d"]
    assert set(solo) == set(targets) and all(s.tasks == [t] for t, s in solo.items())
    rejected = [(d["task"], d["into"]) for d in decisions if not d["kept"]]
    assert rejected == [("c", "a-b")]
    assert not any(d["task"] == "d" and d["into"] for d in decisions)  # below target alone: never tried
    assert ("extend", ["a", "b", "e"]) in trainer.calls
    # every packed adapter's recorded accuracy meets every member's target except the task that cannot
    assert all(meets(a.accuracy, targets) for a in packed if a.tasks != ["d"])


def test_an_adapter_below_its_target_takes_no_other_task():
    targets = {"d": 0.5, "a": 0.5, "c": 0.5}
    trainer = FakeTrainer({"d": 0.3, "a": 0.7, "c": 0.7}, {frozenset("ac")})
    packed, _, decisions = pack(["d", "a", "c"], targets, trainer, progress=False)
    assert [a.tasks for a in packed] == [["d"], ["a"], ["c"]]
    assert not any(kind == "extend" and "d" in tasks for kind, tasks in trainer.calls)
    assert [(d["task"], d["into"], d["kept"]) for d in decisions] == [("d", None, True), ("a", None, True),
                                                                      ("c", "a", False), ("c", None, True)]


def test_a_rejected_merge_leaves_the_adapter_as_it_was():
    targets = {"a": 0.5, "b": 0.5}
    packed, _, _ = pack(["a", "b"], targets, FakeTrainer({"a": 0.6, "b": 0.6}, {frozenset("ab")}), progress=False)
    assert [a.weights for a in packed] == [frozenset("a"), frozenset("b")]
    assert isinstance(packed[0], Adapter) and packed[0].accuracy == {"a": 0.6}


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
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(1280, 64), nn.GELU(), nn.Linear(64, 64))
    cfg = GenConfig(tasks=("colour", "grounding"), targets={"colour": 0.0, "grounding": 0.0}, data=data,
                    out=root / "run", export=root / "export", rank=4, alpha=8, steps=3, merge_steps=2, batch=4,
                    train_examples=12, val_examples=6, dtype="float32")
    report = generate(cfg, Backbone(copy.deepcopy(base), tok, projector, name="tiny-llama"), progress=False)
    return report, cfg, tok, base


def test_tiny_generate_writes_peft_folders_and_a_report(tiny_run):
    report, cfg, _, base = tiny_run
    # targets of 0 accept every merge: both tasks in one adapter; the per-task adapters are kept aside
    assert [a["tasks"] for a in report["adapters"]] == [["colour", "grounding"]]
    assert report["tasks"]["grounding"]["adapter"] == "colour-grounding"
    assert [d["kept"] for d in report["decisions"] if d["into"]] == [True]
    folder = cfg.export / "colour-grounding"
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
    report, cfg, tok, base = tiny_run
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
