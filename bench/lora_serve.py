"""Orchestrated multi-LoRA serving on a skewed trace: auto vs always-unmerged vs always-merged, one run.

The same trace — Poisson arrivals, adapters drawn Zipf-skewed (a few adapters hold most requests, as
in VaLoRA's traces), mixed ranks, fixed answer lengths (``ignore_eos``; ``--long-share`` makes a share
of them ``--long-tokens`` long) — is replayed against the real scheduler and orchestrator under three
policies:

* ``auto``: admission oldest first (VaLoRA's credits, no one held back) and per-step merged / mixture /
  unmerged, whichever the measured costs say is cheapest;
* ``unmerged``: every step runs base + ATMM for all adapters (S-LoRA / Punica style);
* ``merged``: one adapter merged at a time, other adapters' requests wait and the merge is swapped
  (dLoRA's merged mode without its unmerged fallback).

A policy name may end in ``:eager`` (e.g. ``unmerged:eager``): the same, with steps run eagerly
instead of from CUDA graphs (vision/step_graphs.py), to measure the graphs in the same run. Each policy's
service first replays an untimed warm-up trace (Triton compiles, graphs are captured), then the timed one.

The base model has SmolLM2-135M's shape (``--shape 7b`` for 7B-shaped layers on a GPU) with random
weights, so nothing is loaded; ``--layers`` trims depth for quick runs. Reported per policy: mean, p50,
p99 request latency, mean time to first token, throughput, mode steps and switches, and the costs the
orchestrator measured (at start: a decode step without LoRA, what LoRA adds to it; a merge, re-timed
by the real ones);
``latency_reduction`` = 1 − auto / best baseline (target ≥ 0.20).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # hidden, intermediate, heads, kv heads, layers
    "smollm2-135m": (576, 1536, 9, 3, 30),
    "7b": (4096, 11008, 32, 32, 32),
}


@dataclass
class PolicyResult:
    policy: str
    mean_ms: float
    p50_ms: float
    p99_ms: float
    ttft_ms: float
    tokens_per_s: float
    steps: int
    switches: int
    mode_steps: str
    graphs: int = 0  # step graphs captured (warm-up included)
    graph_steps: int = 0  # timed steps replayed from a graph
    costs: dict[str, float | int | None] | None = None  # the orchestrator's cost model at the end (ms, all layers)


COST_KEYS = ("base_step_ms", "base_step_tokens", "call_ms", "segment_ms", "token_ms", "merge_ms", "merge_ms_per_rank",
             "merges_observed")


def describe_costs(c: dict) -> str:
    """The measured costs in words: what a step's LoRA terms and a merge cost against the step itself,
    which is what decides whether merging can pay on this device."""
    if c.get("base_step_ms") is None:
        return "LoRA costs: not calibrated (fewer than 2 decode slots)"
    base, n = c["base_step_ms"], c["base_step_tokens"]
    return (f"measured costs (all layers): a decode step of {n} tokens {base:.1f} ms without LoRA; LoRA adds "
            f"{c['call_ms']:.2f} ms for one adapter ({c['call_ms'] / base:.0%}) and {c['segment_ms']:.2f} ms for "
            f"each other adapter in the step; a merge {c['merge_ms']:.1f} ms + {c['merge_ms_per_rank']:.3f} ms per rank"
            + (f" (as timed in service, {c['merges_observed']} merges)" if c.get("merges_observed") else " (calibrated)"))


class _CountTokenizer:
    """The bench has no text: answers are counted, not read."""

    def decode(self, ids, skip_special_tokens=True) -> str:  # noqa: ARG002
        return "x" * len(ids)


def build(shape: str, layers: int, n_adapters: int, max_rank: int, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vision.adapters import LoRAAdapter
    from vision.decoder import PackedDecoder

    hidden, inter, heads, kv, depth = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=layers or depth, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).to(dtype).eval()
    rng = np.random.default_rng(seed)
    ranks = [max_rank >> (i % 4) for i in range(n_adapters)]  # max, max/2, max/4, max/8, ...
    adapters = []
    probe = PackedDecoder(lm)
    for i, r in enumerate(ranks):
        weights = {}
        for li, layer in enumerate(probe.layers):
            for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                lin = layer.get_submodule(path)
                a = torch.from_numpy(rng.standard_normal((r, lin.in_features), dtype=np.float32) * 0.01)
                b = torch.from_numpy(rng.standard_normal((lin.out_features, r), dtype=np.float32) * 0.01)
                weights[f"layers.{li}.{path}"] = (a.to(dtype), b.to(dtype))
        adapters.append(LoRAAdapter(f"lora-{i}", "memory", r, 2.0, weights))
    return lm, adapters


def make_trace(n: int, n_adapters: int, rate: float, zipf: float, prompt_len: int, seed: int, max_tokens: int,
               long_share: float = 0.0, long_tokens: int = 0):
    """(arrival s, adapter, prompt ids, answer tokens) per request; a ``long_share`` of the answers are
    ``long_tokens`` long (drawn after everything else, so the rest of the trace does not change)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    weights = 1.0 / np.arange(1, n_adapters + 1) ** zipf
    names = rng.choice(n_adapters, n, p=weights / weights.sum())
    lens = rng.integers(prompt_len // 2, prompt_len + 1, n)
    prompts = [[int(x) for x in rng.integers(10, 4000, int(L))] for L in lens]
    long = rng.random(n) < long_share
    return [(float(t), f"lora-{a}", ids, long_tokens if is_long else max_tokens)
            for t, a, ids, is_long in zip(arrivals, names, prompts, long, strict=True)]


def run_policy(policy: str, lm, adapters, trace, warm, args, device: str) -> PolicyResult:
    from vision.decoder import PackedDecoder
    from vision.model import VisionLanguageModel
    from vision.scheduler import SchedulerConfig
    from vision.service import VisionService, VisionServiceConfig

    name, _, variant = policy.partition(":")
    if variant not in ("", "eager"):
        raise ValueError(f"unknown policy variant {variant!r} in {policy!r}: only ':eager'")
    model = VisionLanguageModel("bench", PackedDecoder(copy.deepcopy(lm)), _CountTokenizer(), None, set())
    cfg = VisionServiceConfig(device=device, lora_slots=len(adapters), max_lora_rank=args.max_rank, policy=name,
                              scheduler=SchedulerConfig(max_running=args.max_running, max_len=1024,
                                                        max_prefill_tokens=args.prefill_budget,
                                                        cuda_graphs="off" if variant else "auto"))
    service = VisionService(model, cfg)
    for a in adapters:
        service.adapters.add(a)
    service.start()
    try:
        if warm:
            replay(service, warm, args)
        orch, sched = service.orchestrator, service.scheduler
        modes0, switches0, steps0 = dict(orch.mode_steps), orch.switches, sched.steps
        graph_steps0 = sched.graphs.steps if sched.graphs is not None else 0
        lat, first, elapsed = replay(service, trace, args)
        modes = {k: v - modes0.get(k, 0) for k, v in orch.mode_steps.items() if v - modes0.get(k, 0)}
        graphs = sched.graphs
    finally:
        service.stop()
    if len(lat) < len(trace):
        raise RuntimeError(f"{policy}: {len(trace) - len(lat)} requests did not finish in {args.timeout} s")
    ms = np.array(list(lat.values())) * 1e3
    ttft = np.array(list(first.values())) * 1e3
    return PolicyResult(policy, float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                        float(ttft.mean()), sum(q[3] for q in trace) / elapsed, sched.steps - steps0,
                        orch.switches - switches0, ",".join(f"{k}:{v}" for k, v in sorted(modes.items())),
                        len(graphs.graphs) if graphs is not None else 0,
                        graphs.steps - graph_steps0 if graphs is not None else 0,
                        {k: v for k, v in orch.stats().items() if k in COST_KEYS})


def replay(service, trace, args) -> tuple[dict[int, float], dict[int, float], float]:
    """Submit the trace at its arrival times; (latency s, time to first token s) per request, and the span."""
    from vision.model import Prompt
    from vision.scheduler import GenRequest, SamplingParams

    lat, first, done_at = {}, {}, {}
    finished = threading.Event()
    remaining = [len(trace)]
    lock = threading.Lock()

    def emitter(i: int, t_arrive: float):
        def emit(ev):
            now = time.perf_counter()
            if i not in first:
                first[i] = now - t_arrive
            if ev.kind in ("done", "error"):
                done_at[i] = now
                lat[i] = now - t_arrive
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()
        return emit

    t0 = time.perf_counter()
    for i, (t, name, ids, answer) in enumerate(trace):
        wait = t0 + t - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        arrive = time.perf_counter()
        prompt = Prompt([ids], [], 0)
        params = SamplingParams(max_tokens=answer, ignore_eos=True)
        service.scheduler.submit(GenRequest(f"r{i}", name, prompt, params, emitter(i, arrive)))
    finished.wait(args.timeout)
    return lat, first, max(done_at.values(), default=time.perf_counter()) - t0


HEADER = (f"{'policy':>15} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9} {'TTFT ms':>9} {'tok/s':>8} {'steps':>6} "
          f"{'graph':>6} {'switch':>6}  modes")


def row(r: PolicyResult) -> str:
    return (f"{r.policy:>15} {r.mean_ms:9.1f} {r.p50_ms:9.1f} {r.p99_ms:9.1f} {r.ttft_ms:9.1f} {r.tokens_per_s:8.1f} "
            f"{r.steps:6d} {r.graph_steps:6d} {r.switches:6d}  {r.mode_steps}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench lora-serving", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a short trace on a 2-layer model (under a minute on a CPU)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the shape's own depth)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--rates", default="4,16", help="arrival rates to replay, requests per second (Poisson)")
    p.add_argument("--zipf", type=float, default=1.5, help="adapter popularity skew")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--long-share", type=float, default=0.0, help="share of requests with a long answer")
    p.add_argument("--long-tokens", type=int, default=256, help="a long answer's tokens")
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--prefill-budget", type=int, default=512)
    p.add_argument("--policies", default="auto,unmerged,merged",
                   help="comma-separated; a ':eager' suffix runs steps without CUDA graphs")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 2
        args.requests, args.max_tokens = min(args.requests, 24), min(args.max_tokens, 8)
        args.rates = args.rates.split(",")[0]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm, adapters = build(args.shape, args.layers, args.adapters, args.max_rank, device, dtype, args.seed)
    rates = [float(r) for r in args.rates.split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    depth = args.layers or SHAPES[args.shape][4]
    print(f"lora-serve on {name}: {args.shape} x{depth} layers, {args.adapters} adapters (zipf {args.zipf}), "
          f"{args.requests} requests per rate, {args.max_tokens} tokens each"
          + (f" ({args.long_share:.0%} of them {args.long_tokens})" if args.long_share else ""), flush=True)
    # Triton compiles a kernel per tile config on first use (seconds each) and each step shape's graph is
    # captured on first use: every policy replays part of a trace untimed first, so none pays for that
    warm = make_trace(max(8, args.requests // 4), args.adapters, rates[-1], args.zipf, args.prompt_len, args.seed + 1,
                      args.max_tokens)
    out: dict[str, dict] = {}
    reductions: dict[str, float] = {}
    for rate in rates:
        trace = make_trace(args.requests, args.adapters, rate, args.zipf, args.prompt_len, args.seed, args.max_tokens,
                           args.long_share, args.long_tokens)
        print(f"\n{rate:g} requests/s\n{HEADER}", flush=True)
        results = []
        for policy in args.policies.split(","):
            r = run_policy(policy.strip(), lm, adapters, trace, warm, args, device)
            print(row(r), flush=True)
            results.append(r)
        by = {r.policy: r for r in results}
        if "auto" in by and by["auto"].costs:
            print(describe_costs(by["auto"].costs))
        baselines = [by[k].mean_ms for k in ("unmerged", "merged") if k in by]
        if "unmerged:eager" in by and "unmerged" in by:
            print(f"CUDA graphs (unmerged): mean latency {1 - by['unmerged'].mean_ms / by['unmerged:eager'].mean_ms:+.1%} "
                  "lower than eager steps")
        reduction = 1.0 - by["auto"].mean_ms / min(baselines) if "auto" in by and baselines else math.nan
        if math.isnan(reduction):
            print("auto vs best baseline: n/a (needs auto and unmerged or merged in --policies)")
        else:
            print(f"auto vs best baseline: mean latency {reduction:+.1%} lower (target: 20% lower)")
        out[f"{rate:g}"] = {r.policy: asdict(r) for r in results}
        reductions[f"{rate:g}"] = reduction
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": name, "shape": args.shape, "layers": depth, "adapters": args.adapters,
            "requests": args.requests, "zipf": args.zipf, "max_tokens": args.max_tokens,
            "long_share": args.long_share, "long_tokens": args.long_tokens,
            "rates": out, "latency_reduction": reductions,
        }, indent=2))
    return 0
