"""Batched heterogeneous LoRA: ATMM vs peft, a per-adapter loop and a Punica/SGMV-style kernel, in one run.

Every case is one batch of a small model, a stack of ``--layers`` Linear(d, d) layers, each with LoRA
adapters: several adapters of mixed ranks (max, max/2, max/4, max/8), Zipf-skewed token counts, 1/16 of
the tokens base-only, tokens shuffled as in a decode batch (``vision.lora.profile.make_problem``).
Timed per case (the median of ``triton.testing.do_bench`` on CUDA; the best of >= 5 wall-clock repeats on
the CPU, where other load only ever adds time):

* ``atmm_ms``: the LoRA operator alone over all layers; Triton with profiled tiles on CUDA, the grouped
  torch path on the CPU;
* ``sgmv_ms``: the Punica/vLLM-style baseline: the same grouped operator with every rank zero-padded to the
  max rank and fixed tiles (vLLM's defaults, ``tiling.default_config``); on the CPU the torch path with
  padded ranks;
* ``loop_ms``: a Python loop over the adapters present: mask, gather, two matmuls, index_add;
* ``peft_ms``: a real peft LoraModel around the same stack, ``model(x, adapter_names=[...])`` (one name per
  token row), which includes the base layers, so it is compared with ``atmm_layer_ms`` = base layers +
  ATMM; ``base_ms`` is the base layers alone.

``speedup_vs_peft = peft_ms / atmm_layer_ms``, ``speedup_vs_loop = loop_ms / atmm_ms``,
``speedup_vs_sgmv = sgmv_ms / atmm_ms``. Every method's output is checked against ATMM's first (``max_rel_err``: max |diff| / max |ATMM|).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vision.lora import tiling
from vision.lora.atmm import atmm, atmm_torch, check_inputs, make_batch_info
from vision.lora.profile import Problem, make_problem


@dataclass
class Case:
    d: int
    adapters: int
    tokens: int
    ranks: str
    atmm_ms: float
    sgmv_ms: float
    loop_ms: float
    atmm_layer_ms: float
    peft_ms: float
    base_ms: float
    speedup_vs_peft: float
    speedup_vs_loop: float
    speedup_vs_sgmv: float
    max_rel_err: float
    tile_shrink: str
    tile_expand: str


class LinearStack(nn.Module):
    """The plain model peft wraps: ``layers`` bias-free Linear(d, d) applied in turn."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_peft(stack: LinearStack, p: Problem):
    """A peft LoraModel with one adapter per slot (its rank, lora_alpha 16), weights copied from ``p``."""
    from peft import LoraConfig, get_peft_model

    targets = [f"layers.{i}" for i in range(len(stack.layers))]

    def cfg(r: int) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=16, target_modules=targets, lora_dropout=0.0, bias="none")

    model = get_peft_model(stack, cfg(p.ranks[0]), adapter_name="a0")
    for s, r in enumerate(p.ranks[1:], start=1):
        model.add_adapter(f"a{s}", cfg(r))
    with torch.no_grad():
        for i, layer in enumerate(model.base_model.model.layers):
            for s, r in enumerate(p.ranks):
                layer.lora_A[f"a{s}"].weight.copy_(p.lora_a[i, s, :r])
                layer.lora_B[f"a{s}"].weight.copy_(p.lora_b[i, s, :, :r])
    return model.to(p.x.device, p.x.dtype).eval()


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu_time(fn, min_s: float = 0.15, max_reps: int = 30) -> float:
        """Best of the repeats: other load on a shared CPU only ever adds time."""
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < min_s and len(times) < max_reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    return cpu_time


def run_case(d: int, adapters: int, tokens: int, *, layers: int, max_rank: int, device: str, dtype) -> Case:
    p = make_problem(tokens, adapters, d, d, max_rank, layers=layers, device=device, dtype=dtype)
    stack = LinearStack(d, layers).to(device, dtype)
    weights = [layer.weight.detach() for layer in stack.layers]
    info = p.info
    padded_ranks = torch.full_like(p.slot_ranks, max_rank)
    info_pad = make_batch_info(p.token_slots, padded_ranks)
    names = ["__base__" if s < 0 else f"a{s}" for s in p.token_slots.tolist()]
    present = [(s, p.ranks[s]) for s in sorted(set(info.seg_slots_host))]
    y = torch.zeros(tokens, d, device=device, dtype=dtype)
    on_cuda = device == "cuda"
    if on_cuda:
        from vision.lora.atmm_triton import atmm_triton
    fixed = {op: tiling.default_config(op, info.num_active) for op in ("shrink", "expand")}

    def run_atmm(out=y):
        for i in range(layers):
            atmm(out, p.x, p.lora_a[i], p.lora_b[i], p.scaling, p.slot_ranks, info)
        return out

    def run_sgmv(out=y):  # the same entry checks as atmm(), fixed tiles instead of the table lookup
        for i in range(layers):
            check_inputs(out, p.x, p.lora_a[i], p.lora_b[i], p.scaling, padded_ranks, info_pad)
            if on_cuda:
                atmm_triton(out, p.x, p.lora_a[i], p.lora_b[i], p.scaling, padded_ranks, info_pad,
                            shrink_config=fixed["shrink"], expand_config=fixed["expand"])
            else:
                atmm_torch(out, p.x, p.lora_a[i], p.lora_b[i], p.scaling, info_pad)
        return out

    def run_loop(out=y):
        for i in range(layers):
            for s, r in present:
                idx = torch.nonzero(p.token_slots == s).squeeze(1)
                xa = p.x[idx] @ p.lora_a[i, s, :r].T
                out.index_add_(0, idx, (xa @ p.lora_b[i, s, :, :r].T) * p.scaling[s])
        return out

    def run_stack():  # base layers + ATMM, the computation peft does
        h = p.x
        for i in range(layers):
            h = atmm(F.linear(h, weights[i]), h, p.lora_a[i], p.lora_b[i], p.scaling, p.slot_ranks, info)
        return h

    def run_base():
        h = p.x
        for w in weights:
            h = F.linear(h, w)
        return h

    model = build_peft(stack, p)

    def run_peft():
        return model(p.x, adapter_names=names)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()

    with torch.inference_mode():
        ref = run_atmm(torch.zeros_like(y))
        err = max(rel(run_sgmv(torch.zeros_like(y)), ref), rel(run_loop(torch.zeros_like(y)), ref),
                  rel(run_peft(), run_stack()))
        bench = _timer(device)
        t = {name: bench(fn) for name, fn in (("atmm", run_atmm), ("sgmv", run_sgmv), ("loop", run_loop),
                                              ("stack", run_stack), ("peft", run_peft), ("base", run_base))}
    key = dict(tokens=info.num_active, adapters=info.num_segments, hidden=d, rank=info.max_rank, device=p.x.device)
    return Case(
        d=d, adapters=adapters, tokens=tokens, ranks=",".join(map(str, sorted(set(p.ranks)))),
        atmm_ms=t["atmm"], sgmv_ms=t["sgmv"], loop_ms=t["loop"], atmm_layer_ms=t["stack"], peft_ms=t["peft"],
        base_ms=t["base"], speedup_vs_peft=t["peft"] / t["stack"], speedup_vs_loop=t["loop"] / t["atmm"],
        speedup_vs_sgmv=t["sgmv"] / t["atmm"], max_rel_err=err,
        tile_shrink=tiling.lookup("shrink", **key).short() if on_cuda else "-",
        tile_expand=tiling.lookup("expand", **key).short() if on_cuda else "-",
    )


HEADER = (f"{'d':>5}{'adapt':>6}{'tokens':>7}{'atmm':>9}{'sgmv':>9}{'loop':>9}{'+base':>9}{'peft':>9}{'base':>9}"
          f"{'x sgmv':>8}{'x loop':>8}{'x peft':>8}{'err':>9}  tiles (shrink | expand)")


def _fmt(c: Case) -> str:
    return (f"{c.d:>5}{c.adapters:>6}{c.tokens:>7}{c.atmm_ms:>9.3f}{c.sgmv_ms:>9.3f}{c.loop_ms:>9.3f}"
            f"{c.atmm_layer_ms:>9.3f}{c.peft_ms:>9.3f}{c.base_ms:>9.3f}{c.speedup_vs_sgmv:>7.2f}x"
            f"{c.speedup_vs_loop:>7.2f}x{c.speedup_vs_peft:>7.2f}x{c.max_rel_err:>9.1e}  {c.tile_shrink} | {c.tile_expand}")


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def plot(figures: dict, path: Path) -> None:
    """Speedup of ATMM over each baseline against tokens, one line per (d, adapters)."""
    from bench.plots import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    cases = figures["cases"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for ax, base in zip(axes, ("sgmv", "loop", "peft"), strict=True):
        for d, a in sorted({(c["d"], c["adapters"]) for c in cases}):
            cs = sorted((c for c in cases if c["d"] == d and c["adapters"] == a), key=lambda c: c["tokens"])
            ax.plot([c["tokens"] for c in cs], [c[f"speedup_vs_{base}"] for c in cs], marker="o",
                    label=f"d={d}, {a} adapters")
        ax.axhline(1.0, color="grey", lw=1, ls=":")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("tokens in the batch")
        ax.set_title(f"ATMM speedup vs {base}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"batched heterogeneous LoRA ({figures['device']}, {figures['dtype']})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench lora-op", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokens", default="16,256,1024,4096,8192", help="comma-separated tokens per batch")
    p.add_argument("--dims", default="576,4096", help="comma-separated model dims d (layers are d x d)")
    p.add_argument("--adapters", default="8,32", help="comma-separated adapter counts")
    p.add_argument("--max-rank", type=int, default=64, help="ranks are this, /2, /4, /8 in turn")
    p.add_argument("--layers", type=int, default=2, help="Linear layers in the model stack")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--quick", action="store_true", help="tokens 16..4096, d 576, 8 and 32 adapters (under a minute on a CPU)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="draw the speedups as a PNG here")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    tokens = [16, 256, 1024, 4096] if args.quick else [int(v) for v in args.tokens.split(",")]
    dims = [576] if args.quick else [int(v) for v in args.dims.split(",")]
    adapters = [8, 32] if args.quick else [int(v) for v in args.adapters.split(",")]
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    backend = "triton" if device == "cuda" else "torch"
    table = tiling.load_table(device_name) if device == "cuda" else None
    print(f"LoRA operator benchmark on {device_name}, {str(dtype).removeprefix('torch.')}, {args.layers} layers, "
          f"ATMM backend {backend}" + (f", tile table: {len(table.entries)} entries" if table is not None else "")
          + f"\ntimes in ms ({'median' if device == 'cuda' else 'best of repeats'}), speedups are ATMM's\n{HEADER}",
          flush=True)
    cases: list[Case] = []
    for d in dims:
        for a in adapters:
            for n in tokens:
                cases.append(run_case(d, a, n, layers=args.layers, max_rank=args.max_rank, device=device, dtype=dtype))
                print(_fmt(cases[-1]), flush=True)
    summary = {f"geomean_speedup_vs_{b}": _geomean([getattr(c, f"speedup_vs_{b}") for c in cases])
               for b in ("peft", "loop", "sgmv")}
    print("\nATMM speedup, geometric mean over cases: " + ", ".join(
        f"vs {k.rsplit('_', 1)[1]} {v:.2f}x" for k, v in summary.items()))
    bad = [c for c in cases if c.max_rel_err > (3e-2 if dtype != torch.float32 else 1e-4)]
    if bad:
        print(f"WARNING: {len(bad)} case(s) disagree with ATMM beyond tolerance: max err {max(c.max_rel_err for c in bad):.2e}")
    figures = {"device": device_name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
               "layers": args.layers, "max_rank": args.max_rank, "cases": [asdict(c) for c in cases], **summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(figures, args.plot)
            print(f"wrote {args.plot}")
        except ImportError as e:  # matplotlib missing: the JSON has the figures
            print(f"no plot: {e}")
    return 1 if bad else 0
