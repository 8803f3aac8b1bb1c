"""Offline profiling of the ATMM tile table: ``python -m vision.lora.profile [--device cuda] [--quick] [--out PATH]``.

For every shape of a grid (real token counts 16..8192, adapters 1..32, model dims 576/1536 as in
SmolLM2-135M and 4096/11008 as in 7B models, max ranks 8..64) it builds a heterogeneous batch (see
:func:`make_problem`), times every candidate tile shape of the shrink and of the expand kernel with
``triton.testing.do_bench`` (median), and keeps the fastest per bucketed key. The winners are merged
into ``vision/lora/tile_configs/<device-slug>.json`` (or ``--out``), which ``tiling.lookup`` reads at
run time. The default config (the miss fallback) is always among the candidates, so a profiled entry is
never slower than a miss on the profiling machine. Timings are in bfloat16.

Without CUDA it refuses; ``--device cpu --interpret --out PATH`` runs a tiny grid under the Triton
interpreter, to exercise the code path (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vision.lora import tiling
from vision.lora.atmm import LoRABatchInfo, make_batch_info
from vision.lora.tiling import TileConfig


@dataclass
class Problem:
    """A heterogeneous LoRA batch: ``adapters`` slots of mixed ranks, Zipf-skewed token counts, some
    base-only tokens, tokens shuffled (as a decode batch mixes adapters). ``layers`` sets of weights.

    x (T, d_in); lora_a (L, S, r_max, d_in), lora_b (L, S, d_out, r_max), zero beyond each slot's rank (so
    a baseline that pads every rank to r_max computes the same result); scaling (S,) = 16 / r (peft's
    lora_alpha / r with lora_alpha = 16); token_slots (T,) with -1 for base-only tokens.
    """

    x: torch.Tensor
    token_slots: torch.Tensor
    slot_ranks: torch.Tensor
    scaling: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    info: LoRABatchInfo
    ranks: list[int]


def mixed_ranks(adapters: int, max_rank: int, seed: int = 0) -> list[int]:
    """Ranks max_rank, max_rank/2, /4, /8 (at least 4) in turn, shuffled; the first slot has max_rank."""
    g = torch.Generator().manual_seed(seed)
    ranks = [max(4, max_rank >> (i % 4)) for i in range(adapters)]
    perm = [0] + [1 + int(i) for i in torch.randperm(adapters - 1, generator=g)] if adapters > 1 else [0]
    return [ranks[i] for i in perm]


def skewed_slots(tokens: int, adapters: int, base_fraction: float = 1 / 16, seed: int = 0) -> torch.Tensor:
    """(tokens,) slot per token: Zipf(1) shares over adapters, each present adapter >= 1 token, shuffled."""
    g = torch.Generator().manual_seed(seed)
    n_base = int(tokens * base_fraction)
    n_lora = tokens - n_base
    w = torch.tensor([1.0 / (i + 1) for i in range(adapters)])
    counts = torch.floor(w / w.sum() * n_lora).long()
    counts[: min(adapters, n_lora)] = counts[: min(adapters, n_lora)].clamp(min=1)
    while counts.sum() > n_lora:  # the clamp may overshoot on tiny batches: take from the largest
        counts[int(torch.argmax(counts))] -= 1
    counts[0] += n_lora - counts.sum()
    slots = torch.cat([torch.full((int(c),), i) for i, c in enumerate(counts)] + [torch.full((n_base,), -1)])
    return slots[torch.randperm(tokens, generator=g)]


def make_problem(tokens: int, adapters: int, d_in: int, d_out: int, max_rank: int, *, layers: int = 1,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    ranks = mixed_ranks(adapters, max_rank, seed)
    lora_a = torch.randn(layers, adapters, max_rank, d_in, generator=g) / math.sqrt(d_in)
    lora_b = torch.randn(layers, adapters, d_out, max_rank, generator=g) / math.sqrt(max_rank)
    for s, r in enumerate(ranks):  # zero beyond the rank: the padded baseline must compute the same thing
        lora_a[:, s, r:] = 0
        lora_b[:, s, :, r:] = 0
    token_slots = skewed_slots(tokens, adapters, seed=seed).to(device)
    slot_ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
    return Problem(
        x=torch.randn(tokens, d_in, generator=g).to(device, dtype), token_slots=token_slots, slot_ranks=slot_ranks,
        scaling=torch.tensor([16.0 / r for r in ranks], device=device), lora_a=lora_a.to(device, dtype),
        lora_b=lora_b.to(device, dtype), info=make_batch_info(token_slots, slot_ranks), ranks=ranks,
    )


@dataclass(frozen=True)
class Grid:
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    hidden: tuple[int, ...]
    ranks: tuple[int, ...]


FULL = Grid((16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), (1, 2, 4, 8, 16, 32), (576, 1536, 4096, 11008),
            (8, 16, 32, 64))
# what `python -m bench lora-op` runs (max rank 64, 8 and 32 adapters, dims 576 and 4096)
QUICK = Grid((16, 256, 1024, 4096, 8192), (8, 32), (576, 4096), (64,))
INTERPRET = Grid((24,), (2,), (32,), (16,))


def candidates(op: str, *, tokens: int, hidden: int, rank: int, quick: bool, interpret: bool = False) -> list[TileConfig]:
    """Tile shapes worth timing for one key (pruned to the shape), the miss default always included."""
    if interpret:
        grid = ([16], [16], [16, 32], [1, 2], [4], [1]) if op == "shrink" else ([16], [16, 32], [16], [1], [4], [1])
    elif op == "shrink":
        grid = ([16, 64] if quick else [16, 32, 64, 128],
                [min(64, max(16, rank))] if quick else sorted({16, min(64, max(16, rank))}),
                [64, 256] if quick else [32, 64, 128, 256], [1, 8] if quick else [1, 4, 8, 16, 32],
                [4] if quick else [4, 8], [2] if quick else [2, 3, 4])
    else:
        grid = ([16, 64] if quick else [16, 32, 64, 128], [64, 128] if quick else [32, 64, 128, 256],
                [16, 32] if quick else [16, 32, 64], [1], [4] if quick else [4, 8], [2] if quick else [2, 3])
    out = [tiling.default_config(op, tokens)]
    for bm, bn, bk, sk, w, st in itertools.product(*grid):
        if bm > max(16, 2 * tokens) or bk > max(16, 2 ** math.ceil(math.log2(hidden if op == "shrink" else rank))):
            continue
        if op == "shrink" and sk * bk > 2 * hidden:
            continue
        if op == "expand" and bn > max(16, 2 ** math.ceil(math.log2(hidden))):
            continue
        c = TileConfig(bm, bn, bk, sk, w, st)
        if c not in out:
            out.append(c)
    return out


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    def cpu_time(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_time


def expected_outputs(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 truth for layer 0: (workspace (T_a, R), its valid-column mask, y delta (T, d_out))."""
    info, a, b = p.info, p.lora_a[0].float(), p.lora_b[0].float()
    ws = torch.zeros(info.num_active, max(info.max_rank, 1), device=p.x.device)
    valid = torch.zeros_like(ws, dtype=torch.bool)
    delta = torch.zeros(p.x.shape[0], b.shape[1], device=p.x.device)
    for s, start, n, r in zip(info.seg_slots_host, info.seg_starts_host, info.seg_lens_host, info.seg_ranks_host,
                              strict=True):
        rows = info.token_order[start:start + n]
        ws[start:start + n, :r] = (p.x[rows].float() @ a[s, :r].T) * p.scaling[s]
        valid[start:start + n, :r] = True
        delta[rows] = ws[start:start + n, :r] @ b[s, :, :r].T
    return ws, valid, delta


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item() if want.numel() else 0.0


def profile(grid: Grid, device: str, *, quick: bool, interpret: bool = False, progress: bool = True) -> list[dict]:
    """Time every candidate of every key of ``grid``; one row per key with the winner and the default's time.

    Every candidate's output is first checked against a float32 torch computation: a tile that computes a
    wrong result raises (a kernel bug) rather than being timed.
    """
    from tqdm import tqdm

    from vision.lora import atmm_triton

    bench = _timer(device)
    dtype = torch.float32 if interpret else torch.bfloat16
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    shapes = list(itertools.product(grid.tokens, grid.adapters, grid.hidden, grid.ranks))
    rows: list[dict] = []
    bar = tqdm(total=len(shapes) * 2, desc="profiling ATMM tiles", unit="key", disable=not progress, file=sys.stderr)
    for tokens, adapters, hidden, rank in shapes:
        p = make_problem(tokens, adapters, hidden, hidden, rank, device=device, dtype=dtype)
        a, b, info = p.lora_a[0], p.lora_b[0], p.info
        ws_ref, valid, delta_ref = expected_outputs(p)
        y = torch.zeros_like(p.x)
        for op in ("shrink", "expand"):
            key = tiling.make_key(op, tokens=info.num_active, adapters=info.num_segments, hidden=hidden,
                                  rank=info.max_rank)
            default = tiling.default_config(op, info.num_active)
            timed: list[tuple[float, TileConfig]] = []
            for cfg in candidates(op, tokens=info.num_active, hidden=hidden, rank=info.max_rank, quick=quick,
                                  interpret=interpret):
                try:
                    if op == "shrink":
                        err = _rel_err(atmm_triton.shrink(p.x, a, p.scaling, info, cfg)[valid],
                                       ws_ref[valid])
                        fn = functools.partial(atmm_triton.shrink, p.x, a, p.scaling, info, cfg)
                    else:
                        info.workspace.copy_(ws_ref)
                        err = _rel_err(atmm_triton.expand(torch.zeros_like(p.x), b, info, cfg), delta_ref)
                        fn = functools.partial(atmm_triton.expand, y, b, info, cfg)
                    if not err < tol:
                        raise RuntimeError(f"ATMM {op} kernel with tiles {cfg.short()} is wrong at {key}: relative "
                                           f"error {err:.2e} > {tol:g}")
                    timed.append((bench(fn), cfg))
                except Exception as e:  # a tile too large for this GPU (shared memory, registers): skip it
                    if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e).lower():
                        raise
            best_ms, best = min(timed, key=lambda t: t[0])
            default_ms = next((ms for ms, c in timed if c == default), float("nan"))
            rows.append({"key": str(key), "config": asdict(best), "ms": best_ms, "default_ms": default_ms,
                         "speedup_vs_default": default_ms / best_ms if best_ms else float("nan"),
                         "candidates": len(timed), "tokens": tokens, "adapters": adapters, "hidden": hidden,
                         "rank": rank})
            bar.update(1)
    bar.close()
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'key':<30}{'best tile (MxNxK/split/warps/stages)':>38}{'ms':>9}{'default ms':>12}{'gain':>7}")
    for r in rows:
        print(f"{r['key']:<30}{TileConfig(**r['config']).short():>38}{r['ms']:>9.4f}{r['default_ms']:>12.4f}"
              f"{r['speedup_vs_default']:>6.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vision.lora.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="only the shapes of `python -m bench lora-op`, fewer tiles")
    p.add_argument("--interpret", action="store_true",
                   help="with --device cpu: run a tiny grid under the Triton interpreter (timings meaningless)")
    p.add_argument("--out", type=Path, help="table to write/merge into (default: the device's table in tile_configs/)")
    p.add_argument("--json", type=Path, help="write every key's timings here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here. The profiler times Triton kernels on the GPU whose table it writes; "
              "run it on that GPU (or use --device cpu --interpret --out PATH to exercise it, timings meaningless).",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and not (args.interpret and args.out):
        print("error: --device cpu needs --interpret and --out PATH (CPU timings would only mislead the GPU table)",
              file=sys.stderr)
        return 2
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when vision.lora.atmm_triton is first imported
        if "vision.lora.atmm_triton" in sys.modules:
            print("error: --interpret must be set before the Triton kernels are imported", file=sys.stderr)
            return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (triton interpreter)"
    grid = INTERPRET if args.interpret else QUICK if args.quick else FULL
    print(f"profiling ATMM tiles on {device_name}: {len(grid.tokens)} token counts x {len(grid.adapters)} adapter "
          f"counts x {len(grid.hidden)} dims x {len(grid.ranks)} ranks, shrink and expand", flush=True)
    t0 = time.perf_counter()
    rows = profile(grid, args.device, quick=args.quick, interpret=args.interpret, progress=not args.no_progress)
    print_rows(rows)
    out = args.out or tiling.table_path(device_name)
    try:
        table = tiling.read_table(out) if out.exists() else tiling.TileTable(device=device_name)
    except ValueError as e:
        print(f"warning: replacing unreadable table: {e}", file=sys.stderr)
        table = tiling.TileTable(device=device_name)
    table.entries.update({tiling.TileKey.parse(r["key"]): TileConfig(**r["config"]) for r in rows})
    import triton

    table.meta = {"triton": triton.__version__, "torch": torch.__version__,
                  "dtype": "float32" if args.interpret else "bfloat16",
                  "timer": "triton.testing.do_bench median" if args.device == "cuda" else "interpreter"}
    tiling.write_table(table, out)
    tiling.clear_cache()
    gains = [r["speedup_vs_default"] for r in rows]
    print(f"\n{len(rows)} keys, every candidate checked against a float32 torch computation, in "
          f"{time.perf_counter() - t0:.0f} s; tuned vs default tiles: geometric mean "
          f"{math.exp(sum(map(math.log, gains)) / len(gains)):.2f}x, best {max(gains):.2f}x; wrote {out} "
          f"({len(table.entries)} entries)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "quick": args.quick, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
