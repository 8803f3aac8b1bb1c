"""Multi-LoRA vision serving against peft: the three orchestrator modes, continuous batching, the manager."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tests.vision_fixtures import (
    ADAPTERS,
    ToyImageEncoder,
    peft_reference,
    save_adapters,
    tiny_llama,
    tiny_tokenizer,
)
from vision.adapters import AdapterError
from vision.decoder import PackedDecoder, PackedStep, Segment
from vision.model import Prompt, VisionLanguageModel
from vision.orchestrator import Mode, Plan
from vision.scheduler import GenRequest, SamplingParams, SchedulerConfig
from vision.service import VisionService, VisionServiceConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    paths = save_adapters(base, tmp_path_factory.mktemp("adapters"))
    ref = peft_reference(base, paths)
    return tok, base, paths, ref


def make_service(world, slots: int = 3, policy: str = "auto", max_running: int = 8) -> VisionService:
    tok, base, paths, _ = world
    lm = copy.deepcopy(base)
    model = VisionLanguageModel("tiny", PackedDecoder(lm), tok, ToyImageEncoder(lm.config.hidden_size), {2})
    cfg = VisionServiceConfig(lora_slots=slots, max_lora_rank=8, policy=policy,
                              scheduler=SchedulerConfig(max_running=max_running, max_len=128, max_prefill_tokens=64))
    service = VisionService(model, cfg)
    for name, path in paths.items():
        service.adapters.register(name, path)
    return service


PROMPTS = {"ad-a": [5, 9, 30, 41, 7], "ad-b": [11, 3, 60, 2, 8, 99, 4], "ad-c": [70, 71, 72], None: [15, 16, 17, 18]}


def ref_last_logits(ref, name: str | None, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids]), adapter_names=[name or "__base__"]).logits[0, -1]


@pytest.mark.parametrize("policy,dominant", [("unmerged", None), ("mixture", "ad-b"), ("mixture", "ad-a")])
def test_modes_match_peft_on_a_mixed_batch(world, policy, dominant):
    _, _, _, ref = world
    service = make_service(world, policy=policy)
    slots = {n: service.adapters.acquire(n) for n in ADAPTERS}
    segs, embeds, token_slots = [], [], []
    names = list(PROMPTS)
    if dominant:  # put the dominant adapter's prompt twice so the mixture merges it
        names = [dominant, *names]
    for i, name in enumerate(names):
        ids = PROMPTS[name]
        segs.append(Segment(i, 0, len(ids)))
        embeds.append(service.model.embed_tokens(torch.tensor(ids)))
        token_slots += [slots[name] if name else -1] * len(ids)
    cache = service.model.decoder.new_cache(8, 64)
    slots_t = torch.tensor(token_slots)
    plan = Plan(Mode.UNMERGED) if policy == "unmerged" else Plan(Mode.MIXTURE, slots[dominant])
    service.orchestrator.apply(plan, slots_t)
    with torch.no_grad():
        logits = service.model.decoder(torch.cat(embeds), PackedStep.build(segs, torch.device("cpu")), cache)
    for row, name in enumerate(names):
        torch.testing.assert_close(logits[row], ref_last_logits(ref, name, PROMPTS[name]), atol=2e-4, rtol=1e-4)


def test_merged_mode_matches_peft_and_unmerge_is_exact(world):
    _, _, _, ref = world
    service = make_service(world, policy="merged")
    slot = service.adapters.acquire("ad-b")
    ids = PROMPTS["ad-b"]
    w_before = {k: lin.base.weight.clone() for k, lin in service.layers.items()}
    for plan in (Plan(Mode.MERGED, slot), Plan(Mode.UNMERGED)):
        service.orchestrator.apply(plan, torch.full((len(ids),), slot))
        assert (service.ctx.merged_slot == slot) == (plan.mode == Mode.MERGED)
        with torch.no_grad():
            logits = service.model.decoder(service.model.embed_tokens(torch.tensor(ids)),
                                           PackedStep.build([Segment(0, 0, len(ids))], torch.device("cpu")),
                                           service.model.decoder.new_cache(1, 32))
        torch.testing.assert_close(logits[0], ref_last_logits(ref, "ad-b", ids), atol=2e-4, rtol=1e-4)
    for k, lin in service.layers.items():  # the base weights were never touched
        assert torch.equal(lin.base.weight, w_before[k])


def test_policy_picks_the_cheapest_mode_under_the_measured_costs(world):
    service = make_service(world)
    orch = service.orchestrator
    a, b = service.adapters.acquire("ad-a"), service.adapters.acquire("ad-b")
    # CPU-like: every adapter segment is its own pair of products, so merging the dominant one pays
    orch.call_ms, orch.segment_ms, orch.token_ms, orch.switch_ms = 1.0, 1.0, 0.01, 0.0
    assert orch.decide([a] * 10) == Plan(Mode.MERGED, a)
    assert orch.decide([a] * 8 + [b] * 2) == Plan(Mode.MIXTURE, a)
    assert orch.decide([a] * 5 + [b] * 5).mode == Mode.UNMERGED  # a tie: the subtract term costs what it saves
    assert orch.decide([-1] * 4).mode == Mode.UNMERGED
    # GPU-like: one launch covers all adapters; mixture's second call costs more than it saves
    orch.segment_ms, orch.token_ms = 0.0, 0.001
    assert orch.decide([a] * 8 + [b] * 2).mode == Mode.UNMERGED
    assert orch.decide([a] * 10) == Plan(Mode.MERGED, a)
    # a merge that costs more than the LoRA work it saves over the steps left is not made
    orch.switch_ms = 100.0
    orch.run_steps = None  # the calls above made runs of one step; with none measured, the answers' lengths bound it
    assert orch.decide([a] * 10, remaining={a: 2}).mode == Mode.UNMERGED
    assert orch.decide([a] * 10, remaining={a: 500}) == Plan(Mode.MERGED, a)


def _generate(service: VisionService, requests: list[tuple[str | None, list[int]]], max_tokens: int = 6,
              queue_first: bool = False):
    """Run requests concurrently through the scheduler thread; returns generated ids per request.
    ``queue_first``: all requests wait in the queue before the thread starts (its first admission sees them all)."""
    done = threading.Event()
    results: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    finished: list[int] = []

    def emitter(i):
        def emit(ev):
            results[i].append(ev)
            if ev.kind in ("done", "error"):
                finished.append(i)
                if len(finished) == len(requests):
                    done.set()
        return emit

    if not queue_first:
        service.scheduler.start()
    gens = []
    try:
        for i, (name, ids) in enumerate(requests):
            prompt = service.model.build_prompt([{"role": "user", "content": "x"}], [])
            prompt.pieces = [ids]  # drive the exact ids
            req = GenRequest(f"r{i}", name, prompt, SamplingParams(max_tokens=max_tokens, stop=()), emitter(i))
            gens.append(req)
            service.scheduler.submit(req)
        if queue_first:
            service.scheduler.start()
        assert done.wait(60), "requests did not finish"
    finally:
        service.scheduler.stop()
    return gens, results


def ref_greedy(ref, name, ids, n):
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(ref(torch.tensor([out]), adapter_names=[name or "__base__"]).logits[0, -1].argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("policy", ["auto", "unmerged", "merged"])
def test_scheduler_batches_adapters_and_matches_peft_greedy(world, policy):
    _, _, _, ref = world
    service = make_service(world, policy=policy, max_running=3)  # 5 requests, 3 slots: some wait
    requests = [("ad-b", PROMPTS["ad-b"]), ("ad-a", PROMPTS["ad-a"]), (None, PROMPTS[None]),
                ("ad-b", PROMPTS["ad-c"]), ("ad-c", PROMPTS["ad-c"])]
    gens, results = _generate(service, requests)
    for req, (name, ids) in zip(gens, requests, strict=True):
        events = results[int(req.id[1:])]
        assert events[-1].kind == "done", events[-1]
        want = ref_greedy(ref, name, ids, len(req.out_ids))
        assert req.out_ids == want, (name, policy)
    assert service.scheduler.steps > 0
    assert service.adapters.resident()  # slots were used, and all released:
    assert all(service.adapters._refs[n] == 0 for n in service.adapters._refs)


def test_steps_group_tokens_by_adapter(world):
    """Interleaved arrivals (a, b, a, b) run as one contiguous segment per adapter: the LoRA path adds into
    slices of each layer's output instead of gathering and scattering rows; answers still match peft."""
    _, _, _, ref = world
    service = make_service(world, policy="unmerged", max_running=4)
    contiguous: list[bool] = []
    apply = service.orchestrator.apply

    def recording(plan, token_slots):
        apply(plan, token_slots)
        contiguous.extend(info.contiguous for info in (service.ctx.add, service.ctx.subtract) if info is not None)

    service.orchestrator.apply = recording
    requests = [("ad-a", PROMPTS["ad-a"]), ("ad-b", PROMPTS["ad-b"]), ("ad-a", PROMPTS["ad-c"]),
                ("ad-b", PROMPTS[None])]
    gens, _ = _generate(service, requests, queue_first=True)
    for req, (name, ids) in zip(gens, requests, strict=True):
        assert req.out_ids == ref_greedy(ref, name, ids, len(req.out_ids)), name
    assert contiguous and all(contiguous)


def test_calibration_prices_lora_on_every_slot_at_full_rank_and_restores_them(world, monkeypatch):
    """Calibration times LoRA work as the costliest case whatever is loaded (here nothing is): every slot
    multiplied at full rank, each its own segment in the spread forward. Afterwards the slots are as they
    were, and answers still match peft."""
    import vision.lora_linear as lora_linear

    _, _, _, ref = world
    service = make_service(world, slots=3)
    layers = list(service.layers.values())
    widths_before = [list(lay._widths) for lay in layers]
    seen: list[dict[int, int]] = []
    real = lora_linear.grouped_lora

    def spy(y, x, weights, info):
        seen.append({s: (0 if weights[s] is None else weights[s][0].shape[1]) for s in info.seg_slots_host})
        return real(y, x, weights, info)

    monkeypatch.setattr(lora_linear, "grouped_lora", spy)
    service.scheduler.calibrate()
    monkeypatch.setattr(lora_linear, "grouped_lora", real)
    assert seen and all(set(widths.values()) == {8} for widths in seen)  # max_lora_rank=8, no slot skipped
    assert any(len(widths) == 3 for widths in seen)  # the spread forward
    assert [list(lay._widths) for lay in layers] == widths_before
    gens, _ = _generate(service, [("ad-b", PROMPTS["ad-b"])])
    assert gens[0].out_ids == ref_greedy(ref, "ad-b", PROMPTS["ad-b"], len(gens[0].out_ids))


def test_manager_lru_eviction_and_pinning(world):
    service = make_service(world, slots=2)
    m = service.adapters
    sa = m.acquire("ad-a")
    sb = m.acquire("ad-b")
    assert m.acquire("ad-c") is None  # both slots in use: the request waits
    m.release("ad-a")
    sc = m.acquire("ad-c")  # ad-a is idle and least recent: evicted
    assert sc == sa and m.slot_of("ad-a") is None and m.evictions == 1
    assert m.slot_of("ad-b") == sb
    with pytest.raises(AdapterError) as e:
        m.unregister("ad-b")
    assert e.value.code == "adapter_in_use"
    with pytest.raises(AdapterError) as e:
        m.acquire("nope")
    assert e.value.status == 404


def test_manager_rejects_bad_adapter_files(world, tmp_path):
    import json
    import shutil

    service = make_service(world)
    m = service.adapters
    _, base, paths, _ = world
    with pytest.raises(AdapterError) as e:
        m.register("ad-a", paths["ad-a"])
    assert e.value.code == "adapter_exists"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(paths["ad-a"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError) as e:
        m.register("corrupt", corrupt)
    assert e.value.code == "adapter_invalid"
    big = tmp_path / "big"
    shutil.copytree(paths["ad-a"], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 64
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as e:
        m.register("big", big)
    assert e.value.code == "adapter_rank_too_large"
    # an adapter trained on a different base (other widths) does not fit
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.vision_fixtures import save_adapters as save

    other = LlamaForCausalLM(LlamaConfig(vocab_size=base.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    wrong = save(other, tmp_path / "wrong")
    with pytest.raises(AdapterError) as e:
        m.register("wrong", wrong["ad-a"])
    assert e.value.code == "adapter_incompatible"
    with pytest.raises(AdapterError) as e:
        m.register("missing", tmp_path / "nothing-here")
    assert e.value.status == 404
    assert sorted(m.names()) == sorted(ADAPTERS)  # nothing half-registered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["unmerged", "mixture"])
def test_modes_match_peft_on_cuda_with_the_triton_operator(world, policy):
    tok, base, paths, ref = world
    lm = copy.deepcopy(base).cuda()
    model = VisionLanguageModel("tiny", PackedDecoder(lm), tok, None, {2})
    service = VisionService(model, VisionServiceConfig(device="cuda", lora_slots=3, max_lora_rank=8, policy=policy))
    for name, path in paths.items():
        service.adapters.register(name, path)
    slots = {n: service.adapters.acquire(n) for n in ADAPTERS}
    names = ["ad-b", *PROMPTS] if policy == "mixture" else list(PROMPTS)
    segs, ids_all, token_slots = [], [], []
    for i, name in enumerate(names):
        ids = PROMPTS[name]
        segs.append(Segment(i, 0, len(ids)))
        ids_all += ids
        token_slots += [slots[name] if name else -1] * len(ids)
    plan = Plan(Mode.UNMERGED) if policy == "unmerged" else Plan(Mode.MIXTURE, slots["ad-b"])
    service.orchestrator.apply(plan, torch.tensor(token_slots, device="cuda"))
    assert service.ctx.backend == "auto"  # → the Triton kernels on CUDA
    with torch.no_grad():
        logits = model.decoder(model.embed_tokens(torch.tensor(ids_all, device="cuda")),
                               PackedStep.build(segs, torch.device("cuda")), model.decoder.new_cache(8, 64))
    for row, name in enumerate(names):
        torch.testing.assert_close(logits[row].cpu(), ref_last_logits(ref, name, PROMPTS[name]), atol=2e-3, rtol=1e-3)


def _queue(sched, specs: list[tuple[str, str, float]]) -> None:
    """Put requests (id, adapter, seconds ago) in the scheduler's queue, in that (arrival) order."""
    import time as _time

    now = _time.monotonic()
    for rid, adapter, ago in specs:
        prompt = Prompt([[1, 2, 3]], [], 0)
        sched._waiting.append(GenRequest(rid, adapter, prompt, SamplingParams(), lambda ev: None, arrived=now - ago))


def _ids(requests) -> list[str]:
    return [r.id for r in requests]


def test_auto_admits_every_adapter_oldest_first(world):
    """Under "auto" no request waits for another adapter's requests to finish: admission is by credit
    (waiting time, oldest first) alone, and only free cache slots bound it."""
    service = make_service(world, max_running=3)
    sched = service.scheduler
    _queue(sched, [("b1", "ad-b", 0.5), ("a1", "ad-a", 0.4), ("c1", "ad-c", 0.3), ("a2", "ad-a", 0.2)])
    sched._admit()
    assert _ids(sched._running) == ["b1", "a1", "c1"] and _ids(sched._waiting) == ["a2"]
    sched._finish(sched._running[0], None)
    sched._admit()
    assert _ids(sched._running) == ["a1", "c1", "a2"] and not sched._waiting
    assert dict(service.adapters._refs) == {"ad-a": 2, "ad-b": 0, "ad-c": 1}  # a reference per running request


def test_auto_merges_a_lone_adapter_only_when_the_merge_pays_back(world):
    """A merge is charged its measured cost spread over the steps the adapter's requests may still take:
    a lone adapter with a long way to go runs merged, one about to finish stays unmerged; once merged,
    staying merged costs nothing more."""
    service = make_service(world)
    orch = service.orchestrator
    a, b = service.adapters.acquire("ad-a"), service.adapters.acquire("ad-b")
    orch.call_ms, orch.segment_ms, orch.token_ms = 1.0, 0.5, 0.0  # LoRA: 1 ms a step for one adapter
    orch.calibrated, orch.merge_ms, orch.merge_ms_per_rank = True, 20.0, 0.0  # a merge: 20 ms
    assert orch.decide([a] * 2, remaining={a: 100}) == Plan(Mode.MERGED, a)  # 0.2 ms a step < 1 ms
    assert orch.decide([a] * 2, remaining={a: 10}).mode == Mode.UNMERGED  # 2 ms a step > 1 ms
    orch.apply(Plan(Mode.MERGED, a), torch.tensor([a, a]))
    assert orch.decide([a] * 2, remaining={a: 1}) == Plan(Mode.MERGED, a)  # already merged: free
    # mixed: one call and a segment (1.5 ms) beat mixture's two calls (2 ms), merged or not
    assert orch.decide([a, b], remaining={a: 100, b: 100}).mode == Mode.UNMERGED


def test_real_merges_reprice_merging(world):
    """Calibration times merges with the weights in cache; the merges made while serving are what the next
    decision is charged: the first replaces the calibrated figure, later ones move a moving average."""
    service = make_service(world)
    orch = service.orchestrator
    a, b = service.adapters.acquire("ad-a"), service.adapters.acquire("ad-b")
    orch.calibrated, orch.merge_ms, orch.merge_ms_per_rank = True, 1000.0, 0.0  # far from any real merge
    assert orch.merge_cost(a) == 1000.0
    orch.apply(Plan(Mode.MERGED, a), torch.tensor([a]))
    first = orch.switch_ms
    assert orch.merges_observed == 1 and 0 < first < 1000.0
    assert orch.merge_cost(b) == pytest.approx(first)
    orch.apply(Plan(Mode.MERGED, b), torch.tensor([b]))
    second = orch.switch_ms
    assert orch.merges_observed == 2
    assert orch.merge_cost(a) == pytest.approx(first + orch.cfg.ema * (second - first))
    orch.apply(Plan(Mode.MERGED, b), torch.tensor([b]))  # already merged: no merge, nothing observed
    assert orch.merges_observed == 2


def test_auto_stops_merging_when_other_adapters_keep_mixing_the_batch(world):
    """A merge pays back only while the batch stays one adapter's: the orchestrator measures how long such
    runs of steps last, and under arrivals that mix the batch every third step it stops merging, however
    long the lone adapter's answers still are. Long runs (a quiet server) keep merging."""
    service = make_service(world)
    orch = service.orchestrator
    a, b = service.adapters.acquire("ad-a"), service.adapters.acquire("ad-b")
    orch.call_ms, orch.segment_ms, orch.token_ms = 1.0, 0.5, 0.0
    orch.calibrated, orch.merge_ms, orch.merge_ms_per_rank = True, 20.0, 0.0
    left = {a: 100, b: 100}
    assert orch.run_steps is None and orch.decide([a] * 2, remaining=left) == Plan(Mode.MERGED, a)
    for _ in range(12):  # two steps of a alone, then b arrives; b's request ends, and again
        orch.decide([a, a], remaining=left)
        orch.decide([a, a], remaining=left)
        orch.decide([a, b], remaining=left)
    assert orch.run_steps == pytest.approx(2.0, abs=0.3)
    assert orch.decide([a] * 2, remaining=left).mode == Mode.UNMERGED  # 20 ms over 2 steps > 1 ms a step
    for _ in range(3):
        for _ in range(60):  # a quiet server: a alone for 60 steps at a time
            orch.decide([a], remaining=left)
        orch.decide([a, b], remaining=left)
    assert orch.run_steps > 20 and orch.decide([a], remaining=left) == Plan(Mode.MERGED, a)


def test_the_merged_baseline_runs_lanes_in_arrival_order(world):
    service = make_service(world, policy="merged", max_running=4)
    sched = service.scheduler
    _queue(sched, [("b1", "ad-b", 0.5), ("a1", "ad-a", 0.4), ("a2", "ad-a", 0.3), ("b2", "ad-b", 0.2)])
    sched._admit()  # the oldest request's adapter, whatever waits behind it; no starvation bound
    assert _ids(sched._running) == ["b1", "b2"] and _ids(sched._waiting) == ["a1", "a2"]


def test_lanes_keep_every_step_merged(world):
    """Requests of three adapters and the base model at once under the "merged" baseline: lanes make every
    step single-adapter, so the orchestrator never needs a LoRA term, and the answers still equal peft's."""
    _, _, _, ref = world
    policy = "merged"
    service = make_service(world, policy=policy, max_running=8)
    orch = service.orchestrator
    orch.calibrated, orch.merge_ms, orch.merge_ms_per_rank = True, 0.0, 0.0  # free merges: a lane always merges
    requests = [("ad-b", PROMPTS["ad-b"]), ("ad-a", PROMPTS["ad-a"]), (None, PROMPTS[None]),
                ("ad-b", PROMPTS["ad-c"]), ("ad-c", PROMPTS["ad-c"]), ("ad-a", PROMPTS["ad-b"])]
    gens, results = _generate(service, requests, queue_first=True)
    for req, (name, ids) in zip(gens, requests, strict=True):
        assert results[int(req.id[1:])][-1].kind == "done"
        assert req.out_ids == ref_greedy(ref, name, ids, len(req.out_ids)), (name, policy)
    steps = orch.mode_steps
    assert steps["merged"] > 0 and steps["mixture"] == 0, dict(steps)
    # unmerged steps are the base model's lane only (no adapter, nothing to merge)
    assert steps["unmerged"] <= sum(len(g.out_ids) for g in gens if g.adapter is None), dict(steps)


def test_adapter_dir_loads_good_adapters_and_skips_bad_ones(world, tmp_path):
    import shutil

    _, _, paths, _ = world
    service = make_service(world)
    for name in list(service.adapters.names()):
        service.adapters.unregister(name)
    assert service.load_adapter_dir(tmp_path / "missing") == []
    shutil.copytree(paths["ad-a"], tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    assert service.load_adapter_dir(tmp_path) == ["good"]
    assert service.adapters.names() == ["good"]


def test_a_stopped_scheduler_serves_again_when_started(world):
    service = make_service(world, max_running=2)
    first, _ = _generate(service, [(None, PROMPTS[None])])  # starts, serves, stops
    again, results = _generate(service, [(None, PROMPTS[None])])
    assert results[0][-1].kind == "done" and again[0].out_ids == first[0].out_ids
