"""The full-duplex voice step alone: sessions per device at real time, batched vs one session at a time.

``bench duplex`` measures the whole server over sockets; this one isolates the model's per-frame step
(listening encoder + speaking decoder + codec decoder for every live session), so it runs on a GPU
machine with nothing but torch. Every session speaks all the time (the worst case; listening-only
sessions are cheaper) and hears noise. Per session count: p50 / p99 step time of one batched step,
and of the same sessions stepped one at a time (the reference Moshi server's shape).
Target (DESIGN.md): 64+ sessions on one H100 with p99 step under half a frame.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from speech.duplex import DEFAULT_WEIGHTS, load_voice_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, n: int, frames: int, batched: bool) -> np.ndarray:
    dev = model.device
    ids = list(range(4, 4 + 40))  # a 40-symbol utterance: the content does not change the cost
    for s in range(n):
        model.reset_slot(s)
        model.start_speaking_ids(s, ids)
    model.set_logit_bias(model.cfg.lslm.eos_id, -1e4)  # keep every session speaking
    model.set_logit_bias(model.cfg.lslm.irq_id, -1e4)
    gen = torch.Generator(device=dev).manual_seed(0)
    audio = 0.05 * torch.randn(n, model.frame_size, device=dev, generator=gen)
    times = []
    for f in range(frames):
        if model.max_speech_frames(0) < 2:  # positions ran out: start the utterances again
            for s in range(n):
                model.start_speaking_ids(s, ids)
        _sync(dev)
        t0 = time.perf_counter()
        if batched:
            model.step(0, n, audio)
        else:
            for s in range(n):
                model.step(s, s + 1, audio[s:s + 1])
        _sync(dev)
        if f >= 3:  # warm-up steps
            times.append((time.perf_counter() - t0) * 1e3)
    model.set_logit_bias(model.cfg.lslm.eos_id, 0.0)
    model.set_logit_bias(model.cfg.lslm.irq_id, 0.0)
    return np.array(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench voice-step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sessions", default="1,8,16,32,64,128,256")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--loop-max", type=int, default=64, help="largest count also run one session at a time")
    p.add_argument("--quick", action="store_true", help="1,4,8 sessions, 15 frames (under a minute on a CPU)")
    p.add_argument("--voice-dir", type=Path, default=DEFAULT_WEIGHTS,
                   help="codec + LSLM weights to time (default: the shipped ones)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.frames, args.loop_max = "1,4,8", 15, 8
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    counts = [int(c) for c in args.sessions.split(",")]
    model = load_voice_model(args.voice_dir, max(counts), device)
    frame_ms = 1e3 / model.frame_rate
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"voice step on {name}, frame {frame_ms:g} ms, {model.weights_note}")
    print(f"{'sessions':>8} {'batched p50':>12} {'p99':>8} {'one-by-one p50':>15} {'p99':>8} {'speedup':>8}")
    time_steps(model, max(counts), 10, batched=True)  # allocator, kernels and thread pools warm up once
    rows = []
    for n in counts:
        b = time_steps(model, n, args.frames, batched=True)
        o = time_steps(model, n, args.frames, batched=False) if n <= args.loop_max else None
        row = {"sessions": n, "batched_p50_ms": float(np.median(b)), "batched_p99_ms": float(np.percentile(b, 99)),
               "loop_p50_ms": float(np.median(o)) if o is not None else None,
               "loop_p99_ms": float(np.percentile(o, 99)) if o is not None else None}
        row["speedup"] = row["loop_p50_ms"] / row["batched_p50_ms"] if o is not None else None
        rows.append(row)
        lp = f"{row['loop_p50_ms']:15.2f} {row['loop_p99_ms']:8.2f} {row['speedup']:7.2f}x" if o is not None else f"{'-':>15} {'-':>8} {'-':>8}"
        print(f"{n:8d} {row['batched_p50_ms']:12.2f} {row['batched_p99_ms']:8.2f} {lp}", flush=True)
    half = frame_ms / 2
    ok_b = max((r["sessions"] for r in rows if r["batched_p99_ms"] < half), default=0)
    ok_l = max((r["sessions"] for r in rows if r["loop_p99_ms"] is not None and r["loop_p99_ms"] < half), default=0)
    print(f"\nmost sessions with p99 step under half a frame ({half:g} ms): batched {ok_b}, one at a time {ok_l}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "frame_ms": frame_ms, "rows": rows,
                                         "max_sessions_half_frame_batched": ok_b,
                                         "max_sessions_half_frame_loop": ok_l}, indent=2))
    return 0
