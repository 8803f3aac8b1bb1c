"""ATMM (vision/lora): the torch path and the Triton kernels against the per-token reference, the tile
table, and peft's mixed-adapter batch. The Triton kernels run on the CPU under TRITON_INTERPRET=1 in a
subprocess (the variable must be set before triton kernels are defined, and must not leak into other tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vision.lora import TileConfig, atmm, atmm_reference, make_batch_info, tiling
from vision.lora.profile import make_problem

ROOT = Path(__file__).resolve().parents[1]


def _batch(slots: list[int], ranks: list[int], d_in: int = 24, d_out: int = 40, r_max: int | None = None,
           dtype=torch.float32, device="cpu", seed: int = 0):
    """x, y0, A, B, scaling, slot_ranks, token_slots for a batch given per token; A/B random beyond rank too."""
    g = torch.Generator().manual_seed(seed)
    S, r_max = len(ranks), r_max or max(ranks + [1])
    t = dict(device=device)
    return (torch.randn(len(slots), d_in, generator=g).to(dtype=dtype, **t),
            torch.randn(len(slots), d_out, generator=g).to(dtype=dtype, **t),
            torch.randn(S, r_max, d_in, generator=g).to(dtype=dtype, **t),
            torch.randn(S, d_out, r_max, generator=g).to(dtype=dtype, **t),
            (torch.rand(S, generator=g) + 0.5).to(**t),
            torch.tensor(ranks, dtype=torch.int64, **t), torch.tensor(slots, dtype=torch.int64, **t))


# name -> (token slots, slot ranks): unsorted mixed ranks with base-only tokens, one already grouped,
# a single adapter, unused slots (empty segments), nothing but base tokens, no tokens at all.
CASES = {
    "mixed": ([2, 0, -1, 1, 0, 2, 2, -1, 1, 0, 3, 2, 0, 1, 3, 0, 0, 2], [8, 3, 16, 1]),
    "grouped": ([0] * 7 + [1] * 3 + [-1] * 2 + [3] * 9, [4, 16, 2, 8]),
    "single": ([0] * 33, [12]),
    "empty-segments": ([4, -1, 4, 1, 1, 4, -1, 4], [8, 2, 16, 8, 5]),
    "rank-zero-slot": ([0, 1, 1, 0, 2], [4, 0, 6]),
    "base-only": ([-1] * 5, [4, 8]),
    "no-tokens": ([], [4, 8]),
}


def _check(name: str, dtype=torch.float32, backend="torch", **kw) -> float:
    slots, ranks = CASES[name]
    x, y0, a, b, sc, sr, ts = _batch(slots, ranks, dtype=dtype)
    info = make_batch_info(ts, sr)
    ref = atmm_reference(y0.clone(), x, a, b, sc, sr, info)
    out = atmm(y0.clone(), x, a, b, sc, sr, info, backend=backend, **kw)
    return ((out.double() - ref.double()).abs().max().item() / max(1.0, ref.abs().max().item())) if len(slots) else 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference_fp32(name):
    assert _check(name) < 1e-5


@pytest.mark.parametrize("name", ["mixed", "grouped", "single"])
def test_torch_path_matches_reference_bf16(name):
    assert _check(name, dtype=torch.bfloat16) < 2e-2


def test_reference_follows_the_definition_and_skips_base_tokens():
    x, y0, a, b, sc, sr, ts = _batch([1, -1, 0], [2, 3])
    y = atmm_reference(y0.clone(), x, a, b, sc, sr, make_batch_info(ts, sr))
    assert torch.equal(y[1], y0[1])  # base only: untouched
    want = y0[0] + sc[1] * (x[0] @ a[1, :3].T) @ b[1, :, :3].T
    assert torch.allclose(y[0], want, atol=1e-5)
    assert torch.allclose(y[2], y0[2] + sc[0] * (x[2] @ a[0, :2].T) @ b[0, :, :2].T, atol=1e-5)


def test_scaling_is_per_adapter_and_auto_uses_torch_on_cpu():
    x, y0, a, b, sc, sr, ts = _batch(CASES["mixed"][0], CASES["mixed"][1])
    info = make_batch_info(ts, sr)
    sc2 = sc.clone()
    sc2[2] = 0.0  # adapter 2 switched off; adapter 0 doubled
    sc2[0] *= 2
    base = atmm(y0.clone(), x, a, b, sc, sr, info) - y0
    out = atmm(y0.clone(), x, a, b, sc2, sr, info, backend="auto") - y0
    assert torch.allclose(out[ts == 2], torch.zeros_like(out[ts == 2]))
    assert torch.allclose(out[ts == 0], 2 * base[ts == 0], atol=1e-5)
    assert torch.allclose(out[ts == 1], base[ts == 1], atol=1e-6)


@pytest.mark.parametrize("name", ["mixed", "grouped", "empty-segments"])
def test_lora_linear_keeps_slot_views_and_matches_the_reference(name):
    """The layer's torch path (slot views kept between steps) against the reference on the same buffers:
    add and subtract, a slot holding fewer rows here than its rank (peft rank_pattern), a slot that leaves
    this layer alone, a slot refilled after a step, and buffers replaced by ``module.to``."""
    from vision.lora_linear import LoRAContext, LoRALinear

    slots, ranks = CASES[name]
    x, _, a, b, sc, _, ts = _batch(slots, ranks)
    ctx = LoRAContext(backend="auto")
    lin = LoRALinear(torch.nn.Linear(x.shape[1], b.shape[1], bias=False), ctx, len(ranks), a.shape[1])
    for s, r in enumerate(ranks):
        if s == 1:
            lin.set_lora(s, None, None, float(sc[s]), r)  # not targeted here, though its tokens are in the batch
        else:
            lin.set_lora(s, a[s, :max(r - 1, 1)], b[s, :, :max(r - 1, 1)], float(sc[s]), r)  # a row short
    slot_ranks = torch.tensor(ranks)

    def expected(subtract: bool) -> torch.Tensor:
        y = lin.base(x)
        scaling = lin.neg_scaling if subtract else lin.scaling
        return atmm_reference(y, x, lin.lora_a, lin.lora_b, scaling, lin.ranks, make_batch_info(ts, slot_ranks))

    info = make_batch_info(ts, slot_ranks)
    with torch.no_grad():
        for subtract in (False, True):
            ctx.add, ctx.subtract = (None, info) if subtract else (info, None)
            torch.testing.assert_close(lin(x), expected(subtract), atol=1e-5, rtol=1e-5)
        ctx.add, ctx.subtract = info, None
        lin.set_lora(0, 2 * a[0, :ranks[0]], b[0, :, :ranks[0]], 3.0, ranks[0])  # refilled between steps
        torch.testing.assert_close(lin(x), expected(False), atol=1e-5, rtol=1e-5)
        lin.to(torch.float64)  # new buffers: views of the old ones would read stale float32 weights
        x = x.double()
        torch.testing.assert_close(lin(x), expected(False), atol=1e-9, rtol=1e-9)
        with pytest.raises(ValueError, match="rows"):
            lin(x[:-1])


def test_batch_info_segments():
    slots, ranks = CASES["mixed"]
    info = make_batch_info(torch.tensor(slots), torch.tensor(ranks))
    assert info.seg_slots_host == (0, 1, 2, 3) and info.num_segments == 4 and not info.contiguous
    assert sum(info.seg_lens_host) == info.num_active == 16 and info.num_tokens == 18
    assert info.max_rank == 16 and info.max_seg_len == 6 and tuple(info.workspace.shape) == (16, 16)
    order = info.token_order.tolist()
    for s, start, n in zip(info.seg_slots_host, info.seg_starts_host, info.seg_lens_host, strict=True):
        assert [slots[i] for i in order[start:start + n]] == [s] * n
        assert order[start:start + n] == sorted(order[start:start + n])  # stable
    grouped = make_batch_info(torch.tensor(CASES["grouped"][0]), torch.tensor(CASES["grouped"][1]))
    assert grouped.contiguous and grouped.seg_first_host == (0, 7, 12)
    zero = make_batch_info(torch.tensor([0, 1, 1]), torch.tensor([4, 0]))  # rank 0 = base only
    assert zero.seg_slots_host == (0,) and zero.num_active == 1


def test_bad_input_raises_value_error():
    x, y0, a, b, sc, sr, ts = _batch([0, 1, -1], [4, 8])
    info = make_batch_info(ts, sr)
    with pytest.raises(ValueError, match="token_slots must be in"):
        make_batch_info(torch.tensor([0, 2]), sr)
    with pytest.raises(ValueError, match="token_slots must be in"):
        make_batch_info(torch.tensor([-2]), sr)
    with pytest.raises(ValueError, match="1-D integer"):
        make_batch_info(torch.zeros(2, 2, dtype=torch.long), sr)
    with pytest.raises(ValueError, match=">= 0"):
        make_batch_info(ts, torch.tensor([4, -1]))
    with pytest.raises(ValueError, match="rank 8 > r_max=4"):
        atmm(y0, x, a[:, :4], b[:, :, :4], sc, sr, info)
    with pytest.raises(ValueError, match="built for 3 tokens"):
        atmm(y0[:2], x[:2], a, b, sc, sr, info)
    with pytest.raises(ValueError, match="dims"):
        atmm(y0, x[:, :5], a, b, sc, sr, info)
    with pytest.raises(ValueError, match="does not match"):
        atmm(y0, x, a, b[:1], sc, sr, info)
    with pytest.raises(ValueError, match="one floating dtype"):
        atmm(y0.double(), x, a, b, sc, sr, info)
    with pytest.raises(ValueError, match="backend"):
        atmm(y0, x, a, b, sc, sr, info, backend="cutlass")
    with pytest.raises(ValueError, match="only 1 slots"):
        atmm(y0, x, a[:1], b[:1], sc[:1], sr[:1], info)


# ---- tile table ----------------------------------------------------------------------------------------

def test_tile_keys_are_bucketed():
    k = tiling.make_key("shrink", tokens=1000, adapters=5, hidden=4096, rank=48)
    assert (k.tokens, k.adapters, k.hidden, k.rank) == (1024, 8, 4096, 64)
    assert tiling.make_key("expand", tokens=3, adapters=1, hidden=576, rank=4).tokens == 16
    assert tiling.make_key("expand", tokens=100_000, adapters=200, hidden=576, rank=8).tokens == 8192
    assert tiling.TileKey.parse(str(k)) == k
    with pytest.raises(ValueError):
        tiling.TileKey.parse("shrink/t1/a2")
    with pytest.raises(ValueError):
        tiling.make_key("gather", tokens=1, adapters=1, hidden=1, rank=1)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=8, block_n=16, block_k=16)
    assert tiling.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_tile_table_lookup_round_trip_and_corrupt_file(tmp_path):
    tuned = TileConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=8, num_stages=3)
    key = tiling.make_key("shrink", tokens=900, adapters=7, hidden=576, rank=64)
    table = tiling.TileTable(device="Test GPU", entries={key: tuned}, meta={"by": "test"})
    path = tiling.write_table(table, tiling.table_path("Test GPU", tmp_path))
    assert path.name == "test-gpu.json"
    tiling.clear_cache()
    loaded = tiling.load_table("Test GPU", tmp_path)
    assert loaded.entries == table.entries and loaded.meta == {"by": "test"}
    assert loaded.lookup("shrink", tokens=1000, adapters=8, hidden=576, rank=33) == tuned  # same buckets
    assert loaded.lookup("expand", tokens=1000, adapters=8, hidden=576, rank=33) == tiling.default_config("expand", 1000)
    assert loaded.lookup("shrink", tokens=3000, adapters=8, hidden=576, rank=33) == tiling.default_config("shrink", 3000)
    assert tiling.load_table("No Such GPU", tmp_path).entries == {}
    assert tiling.lookup("shrink", tokens=64, adapters=2, hidden=32, rank=8) == tiling.default_config("shrink", 64)

    path.write_text('{"entries": {"shrink/t16/a1/h32/r8": {"block_m": 16')
    with pytest.raises(ValueError, match="not valid JSON"):
        tiling.read_table(path)
    path.write_text('{"entries": {"shrink/t16/a1/h32/r8": {"block_m": 12, "block_n": 16, "block_k": 16}}}')
    with pytest.raises(ValueError, match="bad entry"):
        tiling.read_table(path)
    tiling.clear_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tiling.load_table("Test GPU", tmp_path).entries == {}
    assert any("using default tiles" in str(w.message) for w in caught)
    tiling.clear_cache()


def test_profile_refuses_without_cuda_and_runs_under_the_interpreter(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "vision.lora.profile"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "no CUDA device" in r.stderr
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, "-m", "vision.lora.profile", "--device", "cpu", "--interpret", "--out",
                        str(out), "--json", str(tmp_path / "rows.json"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    table = tiling.read_table(out)
    assert {k.op for k in table.entries} == {"shrink", "expand"} and len(table.entries) == 2
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 2


# ---- Triton kernels under the interpreter ---------------------------------------------------------------

TRITON_CASES = ["mixed", "grouped", "single", "empty-segments", "rank-zero-slot", "base-only"]
DEFAULT_TILE_CASES = ["mixed", "base-only"]
SMALL = dict(shrink_config=TileConfig(16, 16, 16), expand_config=TileConfig(16, 16, 16))
SPLIT = dict(shrink_config=TileConfig(16, 16, 16, split_k=2), expand_config=TileConfig(16, 32, 16))


def _interpreter_cases() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: prints {case: relative error} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vision.lora.atmm_triton import atmm_triton

    res = {}
    for name in TRITON_CASES:
        slots, ranks = CASES[name]
        x, y0, a, b, sc, sr, ts = _batch(slots, ranks)
        info = make_batch_info(ts, sr)
        ref = atmm_reference(y0.clone(), x, a, b, sc, sr, info)
        for tag, kw in (("small", SMALL), ("split", SPLIT)):
            out = atmm_triton(y0.clone(), x, a, b, sc, sr, info, **kw)
            res[f"{name}/{tag}"] = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        if name in DEFAULT_TILE_CASES:  # the public entry, tiles from the table (the default: split_k=64 here)
            out = atmm(y0.clone(), x, a, b, sc, sr, info, backend="triton")
            res[f"{name}/default-tiles"] = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    # a static batch (CUDA graphs): padded capacity, one segment per slot, worst-case grid, refilled in place
    from vision.lora import fill_batch_info, static_batch_info

    for name in ("mixed", "empty-segments", "single"):
        slots, ranks = CASES[name]
        x, y0, a, b, sc, sr, ts = _batch(slots, ranks)
        cap = len(slots) + 5
        pad = lambda t: torch.cat([t, torch.zeros(5, t.shape[1])])  # noqa: E731 - base-only padding rows
        info = static_batch_info(cap, len(ranks), a.shape[1], "cpu")
        fill_batch_info(info, [0] * len(slots), ranks)  # a first fill, overwritten: refills must not leak
        fill_batch_info(info, slots, ranks)
        ref = atmm_reference(pad(y0.clone()), pad(x), a, b, sc, sr, info)
        for tag, kw in (("small", SMALL), ("split", SPLIT)):
            out = atmm_triton(pad(y0.clone()), pad(x), a, b, sc, sr, info, **kw)
            res[f"static-{name}/{tag}"] = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    # the padded-rank (SGMV-style) use of the same kernel: ranks = r_max with zero-padded weights
    p = make_problem(40, 3, 32, 48, 16, dtype=torch.float32)
    a, b = p.lora_a[0], p.lora_b[0]
    ref = atmm_reference(torch.zeros(40, 48), p.x, a, b, p.scaling, p.slot_ranks, p.info)
    padded = torch.full_like(p.slot_ranks, 16)
    out = atmm_triton(torch.zeros(40, 48), p.x, a, b, p.scaling, padded, make_batch_info(p.token_slots, padded), **SPLIT)
    res["padded-ranks"] = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", "from tests.test_atmm import _interpreter_cases; _interpreter_cases()"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{n}/{t}" for n in TRITON_CASES for t in ("small", "split")]
                         + [f"{n}/default-tiles" for n in DEFAULT_TILE_CASES] + ["padded-ranks"]
                         + [f"static-{n}/{t}" for n in ("mixed", "empty-segments", "single") for t in ("small", "split")])
def test_triton_kernel_matches_reference_under_interpreter(interpreted, case):
    assert interpreted[case] < 1e-5


# ---- peft ----------------------------------------------------------------------------------------------

def test_matches_peft_mixed_adapter_batch():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    d_in, d_out = 20, 28
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(d_in, d_out))
    specs = {"t1": (4, 8.0), "t2": (8, 4.0), "t3": (2, 16.0)}  # name -> (rank, lora_alpha)
    cfgs = {n: LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False)
            for n, (r, alpha) in specs.items()}  # init_lora_weights=False: B random too, not zero
    pm = get_peft_model(model, cfgs["t1"], adapter_name="t1")
    pm.add_adapter("t2", cfgs["t2"])
    pm.add_adapter("t3", cfgs["t3"])
    pm.eval()
    names = ["t2", "__base__", "t1", "t3", "t1", "t2", "t2", "__base__", "t3", "t1", "t1"]
    x = torch.randn(len(names), d_in)
    with torch.no_grad():
        want = pm(x, adapter_names=names)
        layer = pm.base_model.model.proj
        order = list(specs)
        r_max = max(r for r, _ in specs.values())
        lora_a = torch.zeros(len(order), r_max, d_in)
        lora_b = torch.zeros(len(order), d_out, r_max)
        for s, name in enumerate(order):
            r = specs[name][0]
            lora_a[s, :r] = layer.lora_A[name].weight
            lora_b[s, :, :r] = layer.lora_B[name].weight
        scaling = torch.tensor([layer.scaling[n] for n in order])
        ranks = torch.tensor([specs[n][0] for n in order])
        slots = torch.tensor([order.index(n) if n != "__base__" else -1 for n in names])
        base = layer.base_layer(x)
        info = make_batch_info(slots, ranks)
        got = atmm(base.clone(), x, lora_a, lora_b, scaling, ranks, info)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], base[1])


# ---- GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_reference(dtype):
    from vision.lora.atmm_triton import atmm_triton

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for tokens, adapters, d_in, d_out, rank in ((300, 5, 576, 1536, 64), (37, 9, 1536, 576, 16), (1, 1, 64, 64, 8)):
        p = make_problem(tokens, adapters, d_in, d_out, rank, device="cuda", dtype=dtype, seed=tokens)
        a, b = p.lora_a[0], p.lora_b[0]
        y0 = torch.randn(tokens, d_out, device="cuda").to(dtype)
        ref = atmm_reference(y0.clone().cpu(), p.x.cpu(), a.cpu(), b.cpu(), p.scaling.cpu(), p.slot_ranks.cpu(),
                             make_batch_info(p.token_slots.cpu(), p.slot_ranks.cpu()))
        scale = max(1.0, ref.abs().max().item())
        outs = [atmm(y0.clone(), p.x, a, b, p.scaling, p.slot_ranks, p.info),  # auto: Triton, table tiles
                atmm(y0.clone(), p.x, a, b, p.scaling, p.slot_ranks, p.info, backend="torch")]
        for shrink_cfg, expand_cfg in ((TileConfig(16, 16, 64), TileConfig(16, 64, 16)),
                                       (TileConfig(64, 64, 32, split_k=8), TileConfig(64, 128, 32)),
                                       (TileConfig(32, 32, 128, split_k=4, num_warps=8, num_stages=3),
                                        TileConfig(128, 256, 64, num_warps=8, num_stages=3))):
            outs.append(atmm_triton(y0.clone(), p.x, a, b, p.scaling, p.slot_ranks, p.info,
                                    shrink_config=shrink_cfg, expand_config=expand_cfg))
        for out in outs:
            assert ((out.cpu().float() - ref.float()).abs().max().item() / scale) < tol
