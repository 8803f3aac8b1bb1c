"""Serving steps from CUDA graphs (vision/step_graphs.py): static LoRA batches, the padded static step with
every token a row (prompt chunks and decode tokens), and the scheduler around it. On the CPU the static step runs uncaptured;
with LoRA its Triton kernels run under TRITON_INTERPRET=1 in a subprocess. Capture itself needs CUDA."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.vision_fixtures import ToyImageEncoder, peft_reference, save_adapters, tiny_llama, tiny_tokenizer
from vision.decoder import PackedDecoder, PackedStep, Segment
from vision.lora import atmm, atmm_reference, fill_batch_info, make_batch_info, static_batch_info
from vision.model import VisionLanguageModel
from vision.orchestrator import Mode, Orchestrator, Plan
from vision.scheduler import GenRequest, SamplingParams, SchedulerConfig
from vision.service import VisionService, VisionServiceConfig
from vision.step_graphs import StepGraphs, length_bucket, row_buckets

ROOT = Path(__file__).resolve().parents[1]


def test_buckets():
    assert row_buckets(1) == (1,)
    assert row_buckets(6) == (1, 2, 4, 6)
    assert row_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert row_buckets(200) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 128, 192, 200)
    assert [length_bucket(n, 1000) for n in (1, 64, 65, 300, 999)] == [64, 64, 128, 512, 1000]
    with pytest.raises(ValueError):
        row_buckets(0)


@pytest.mark.parametrize("slots,ranks", [
    ([2, 0, -1, 1, 0, 2, 2, -1, 1, 0, 3], [8, 3, 16, 1]),
    ([1, 1, 1], [0, 4]),
    ([0, 1, 1, 0, 2], [4, 0, 6]),  # a rank-0 slot's tokens are base-only
    ([-1, -1], [4, 8]),
    ([], [4]),
])
def test_a_filled_static_batch_describes_the_same_segments(slots, ranks):
    info = static_batch_info(16, len(ranks), 16, "cpu")
    fill_batch_info(info, slots, ranks)
    ref = make_batch_info(torch.tensor(slots, dtype=torch.long), torch.tensor(ranks))
    lens = info.seg_lens.tolist()
    nonempty = [g for g, n in enumerate(lens) if n]
    assert nonempty == list(ref.seg_slots_host)
    assert [lens[g] for g in nonempty] == list(ref.seg_lens_host)
    starts = info.seg_starts.tolist()
    order = info.token_order.tolist()
    got = [order[starts[g]:starts[g] + lens[g]] for g in nonempty]
    want = [ref.token_order[s:s + n].tolist() for s, n in zip(ref.seg_starts_host, ref.seg_lens_host, strict=True)]
    assert got == want
    assert info.seg_ranks.tolist() == ranks and info.seg_slots.tolist() == list(range(len(ranks)))
    assert info.token_slots.tolist() == slots + [-1] * (16 - len(slots))


def test_static_batch_refuses_the_torch_path_and_bad_fills():
    info = static_batch_info(4, 2, 8, "cpu")
    x, y = torch.randn(4, 6), torch.zeros(4, 5)
    a, b = torch.randn(2, 8, 6), torch.randn(2, 5, 8)
    sc, sr = torch.ones(2), torch.tensor([8, 4])
    fill_batch_info(info, [1, 0, -1, 1], [8, 4])
    with pytest.raises(ValueError, match="Triton"):
        atmm(y, x, a, b, sc, sr, info, backend="torch")
    # the reference reads the filled token slots: equal to the built batch's
    ref = atmm_reference(torch.zeros(4, 5), x, a, b, sc, sr, make_batch_info(torch.tensor([1, 0, -1, 1]), sr))
    torch.testing.assert_close(atmm(y, x, a, b, sc, sr, info, backend="reference"), ref)
    for bad in (([0] * 5, [8, 4]), ([2], [8, 4]), ([0], [8]), ([0], [9, 4])):
        with pytest.raises(ValueError):
            fill_batch_info(info, *bad)
    with pytest.raises(ValueError, match="static"):
        fill_batch_info(make_batch_info(torch.tensor([0]), sr), [0], [8, 4])


def _prefilled(decoder: PackedDecoder, prompts: list[list[int]], slots: int, max_len: int = 128):
    """A cache with each prompt prefilled in its own slot, and the prompts' next-token embeddings."""
    cache = decoder.new_cache(slots, max_len)
    segs = [Segment(i, 0, len(p)) for i, p in enumerate(prompts)]
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.no_grad():
        decoder(decoder.embed_tokens(ids), PackedStep.build(segs, torch.device("cpu")), cache)
    return cache


def test_uncaptured_static_step_equals_the_packed_forward():
    """Prompt chunks (a first one and a continuation) and decode tokens as rows of one padded static step:
    the padding rows, the scratch slot, the length bucket and a rotary offset."""
    decoder = PackedDecoder(tiny_llama(128))
    prompts = [[5, 9, 30, 41, 7], [11, 3, 60], [15, 16, 17, 18, 19, 20, 21], [8]]
    cache = _prefilled(decoder, prompts, slots=6)
    ref_cache = copy.deepcopy(cache)
    segs = [Segment(0, 5, 1), Segment(1, 3, 1, pos_offset=4), Segment(2, 7, 3),  # decode, decode, a continuation
            Segment(4, 0, 4), Segment(3, 1, 1)]  # a new prompt, decode: 10 rows, bucket 16
    emb = decoder.embed_tokens(torch.tensor([12, 13, 14, 22, 23, 40, 41, 42, 43, 9]))
    graphs = StepGraphs(decoder, cache, scratch_slot=5, capacity=16, max_segments=5, capture=False)
    assert graphs.fits(segs)
    with torch.no_grad():
        want = decoder(emb, PackedStep.build(segs, torch.device("cpu")), ref_cache)
    got = graphs.run(emb, segs)
    assert got.shape == want.shape == (5, 128)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for s in range(5):  # every request's cache rows are the plain forward's
        torch.testing.assert_close(cache.k[:, s], ref_cache.k[:, s])
        torch.testing.assert_close(cache.v[:, s], ref_cache.v[:, s])
    # what does not fit is refused, for the caller to run eagerly
    assert not graphs.fits([Segment(0, 5, 17)])  # more rows than the capacity
    assert not graphs.fits([Segment(i, 5, 1) for i in range(6)])  # more segments than requests
    assert not graphs.fits([Segment(0, 0, 3, positions=torch.zeros(3, 3, dtype=torch.long))])  # M-RoPE
    small = StepGraphs(decoder, cache, 5, 16, 5, capture=False, max_gather=8 * 64 * 2 * 16)
    assert small.fits([Segment(0, 5, 1)] * 1) and not small.fits([Segment(0, 0, 9)])
    with pytest.raises(ValueError, match="eagerly"):
        graphs.run(decoder.embed_tokens(torch.arange(17)), [Segment(0, 5, 17)])
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(decoder, cache, 5, 16, 5, capture=True)
    with pytest.raises(ValueError, match="scratch"):
        StepGraphs(decoder, cache, 6, 16, 5, capture=False)


def _generate(service: VisionService, requests, max_tokens: int = 6) -> list[list[int]]:
    import threading

    done = threading.Event()
    left = [len(requests)]
    gens = []

    def emit(ev):
        if ev.kind in ("done", "error"):
            left[0] -= 1
            if left[0] == 0:
                done.set()

    service.scheduler.start()
    try:
        for i, (name, ids) in enumerate(requests):
            prompt = service.model.build_prompt([{"role": "user", "content": "x"}], [])
            prompt.pieces = [ids]
            req = GenRequest(f"r{i}", name, prompt, SamplingParams(max_tokens=max_tokens), emit)
            gens.append(req)
            service.scheduler.submit(req)
        assert done.wait(120), "requests did not finish"
    finally:
        service.scheduler.stop()
    return [g.out_ids for g in gens]


REQUESTS = [("ad-b", [11, 3, 60, 2, 8, 99, 4]), ("ad-a", [5, 9, 30, 41, 7]), (None, [15, 16, 17, 18]),
            ("ad-b", [70, 71, 72]), ("ad-c", [70, 71, 72]), ("ad-b", [1, 2, 3, 4, 5, 6, 7, 8, 9])]


def _service(lm, tok, paths: dict, policy: str, graphs: str, device: str = "cpu") -> VisionService:
    model = VisionLanguageModel("tiny", PackedDecoder(copy.deepcopy(lm)), tok,
                                ToyImageEncoder(lm.config.hidden_size) if device == "cpu" else None, {2})
    cfg = VisionServiceConfig(device=device, lora_slots=3, max_lora_rank=8, policy=policy,
                              scheduler=SchedulerConfig(max_running=4, max_len=128, max_prefill_tokens=8,
                                                        cuda_graphs=graphs))
    service = VisionService(model, cfg)
    for name, path in paths.items():
        service.adapters.register(name, path)
    return service


def ref_greedy(ref, name, ids, n):
    """peft's greedy answer (``name`` None: the base model; ``ref`` may then be the plain HF model)."""
    kw = {} if name is None and not hasattr(ref, "peft_config") else {"adapter_names": [name or "__base__"]}
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(ref(torch.tensor([out]), **kw).logits[0, -1].argmax()))
    return out[len(ids):]


def _interpreted_scheduler_cases(folder: str) -> None:
    """In a subprocess with TRITON_INTERPRET=1: greedy answers through uncaptured step graphs, per policy,
    against peft's; prints {policy: [matched requests, requests, graph steps]} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vision.lora import TileConfig, tiling

    tiling.lookup = lambda op, **_: TileConfig(16, 16, 16)  # small tiles: the interpreter runs each program
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    paths = save_adapters(base, Path(folder))
    ref = peft_reference(base, paths)
    res = {}
    for policy in ("unmerged", "mixture", "merged", "auto"):
        service = _service(base, tok, paths, policy, "uncaptured")
        outs = _generate(service, REQUESTS)
        ok = sum(len(out) == 6 and out == ref_greedy(ref, name, ids, 6)
                 for out, (name, ids) in zip(outs, REQUESTS, strict=True))
        res[policy] = [ok, len(REQUESTS), service.scheduler.graphs.steps, service.orchestrator.stats()["mode_steps"]]
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    folder = tmp_path_factory.mktemp("adapters")
    code = f"from tests.test_step_graphs import _interpreted_scheduler_cases as f; f({str(folder)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", ["unmerged", "mixture", "merged", "auto"])
def test_scheduler_with_static_lora_steps_matches_peft_greedy(interpreted, policy):
    """The Triton kernels read the static batches (filled per step, padded grid) in every LoRA mode."""
    ok, total, steps, modes = interpreted[policy]
    assert ok == total, interpreted
    assert steps > 0  # steps went through the static step
    if policy == "mixture":
        assert modes.get("mixture", 0) > 0, modes


@pytest.mark.parametrize("graphs", ["off", "uncaptured"])
def test_scheduler_base_model_greedy_is_the_same_with_static_steps(graphs):
    """Prompt chunks and decode tokens as rows of the static step: the answers of the plain scheduler."""
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok))
    service = _service(lm, tok, {}, "auto", graphs)
    requests = [(None, ids) for _, ids in REQUESTS]
    outs = _generate(service, requests)
    for out, (name, ids) in zip(outs, requests, strict=True):
        assert len(out) == 6 and out == ref_greedy(lm, name, ids, 6)
    assert (service.scheduler.graphs is None) == (graphs == "off")
    if graphs == "uncaptured":
        assert service.scheduler.stats()["cuda_graphs"]["steps"] > 0


def test_a_failing_graph_step_falls_back_to_eager_and_loses_nothing(monkeypatch):
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok))
    service = _service(lm, tok, {}, "auto", "uncaptured")
    calls = []

    def broken(*args, **kw):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(service.scheduler.graphs, "run", broken)
    requests = [(None, ids) for _, ids in REQUESTS[:3]]
    outs = _generate(service, requests)
    for out, (name, ids) in zip(outs, requests, strict=True):
        assert len(out) == 6 and out == ref_greedy(lm, name, ids, 6)
    assert calls == [1] and service.scheduler.graphs is None and service.scheduler.failures == 0


def test_bad_graph_setting_is_refused():
    with pytest.raises(ValueError, match="cuda_graphs"):
        SchedulerConfig(cuda_graphs="always")


# ---- GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["unmerged", "mixture", "merged", "auto"])
def test_captured_steps_match_eager_on_cuda(tmp_path, policy):
    """Captured graphs replayed with new inputs (other requests, another merged adapter) answer as the
    eager scheduler does, token for token."""
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    paths = save_adapters(base, tmp_path)
    base = base.cuda()
    outs = {}
    for graphs in ("off", "auto"):
        service = _service(base, tok, paths, policy, graphs, device="cuda")
        outs[graphs] = _generate(service, REQUESTS * 2, max_tokens=8)
        assert all(len(out) == 8 for out in outs[graphs])
        if graphs == "auto":
            st = service.scheduler.stats()["cuda_graphs"]
            assert st["graphs"] > 0 and st["steps"] > st["graphs"], st
    assert outs["auto"] == outs["off"]


def test_orchestrator_batch_slots_mirror_set_batch():
    ctx_slots = [0, 2, -1, 1, 2]
    assert Orchestrator.batch_slots(Plan(Mode.UNMERGED), ctx_slots) == (ctx_slots, None)
    assert Orchestrator.batch_slots(Plan(Mode.UNMERGED), [-1, -1]) == (None, None)
    assert Orchestrator.batch_slots(Plan(Mode.MIXTURE, 2), ctx_slots) == ([0, -1, -1, 1, -1], [2, -1, 2, 2, -1])
    assert Orchestrator.batch_slots(Plan(Mode.MERGED, 1), [1, 1]) == (None, None)
    with pytest.raises(RuntimeError):
        Orchestrator.batch_slots(Plan(Mode.MERGED, 1), [1, 0])
