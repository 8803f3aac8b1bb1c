"""vision.openmp: freeing the calling thread's OpenMP workers, seen as OS threads leaving the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import os, time, torch
from vision.openmp import release_thread_pool
def tasks():
    return len(os.listdir("/proc/self/task"))
a = torch.randn(512, 512)
before = tasks()
(a @ a).sum()                      # a parallel region: this thread's pool of workers starts
with_pool = tasks()
freed = release_thread_pool()
for _ in range(100):               # the workers exit asynchronously
    if tasks() < with_pool:
        break
    time.sleep(0.01)
after = tasks()
ok = torch.allclose(a @ a, (a.double() @ a.double()).float(), atol=1e-3)  # torch still computes, a new pool
print(before, with_pool, after, freed, ok, tasks())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and an OpenMP pool of at least 2 threads")
def test_release_frees_the_calling_threads_openmp_workers():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, with_pool, after, freed, ok, again = out.stdout.split()
    assert freed == "True" and ok == "True"
    assert int(with_pool) > int(before)  # the workers were there
    assert int(after) == int(before)     # and are gone
    assert int(again) == int(with_pool)  # the next parallel op brought a new pool


def test_release_is_safe_to_call_twice_in_process():
    from vision.openmp import release_thread_pool

    first, second = release_thread_pool(), release_thread_pool()
    assert isinstance(first, bool) and isinstance(second, bool)
    a = torch.randn(64, 64)
    torch.testing.assert_close(a @ a, (a.double() @ a.double()).float(), atol=1e-4, rtol=1e-4)


SERVING_PROBE = """
import copy, os, threading, time, torch
from bench.lora_serve import build, _CountTokenizer
from vision.decoder import PackedDecoder
from vision.model import Prompt, VisionLanguageModel
from vision.scheduler import GenRequest, SamplingParams, SchedulerConfig
from vision.service import VisionService, VisionServiceConfig
def tasks():
    return len(os.listdir("/proc/self/task"))
def settle(want, timeout=5.0):
    end = time.monotonic() + timeout
    while tasks() != want and time.monotonic() < end:
        time.sleep(0.02)
    return tasks()
lm, adapters = build("smollm2-135m", 1, 2, 8, "cpu", torch.float32, 0)  # big enough for parallel GEMMs
model = VisionLanguageModel("probe", PackedDecoder(lm), _CountTokenizer(), None, set())
svc = VisionService(model, VisionServiceConfig(device="cpu", lora_slots=2, max_lora_rank=8,
                    scheduler=SchedulerConfig(max_running=4, max_len=256, cuda_graphs="off")))
for a in adapters:
    svc.adapters.add(a)
svc.start()                    # calibrates on this thread, frees this thread's pool, starts the scheduler
time.sleep(0.3)
idle = tasks()                 # the scheduler thread, no OpenMP workers anywhere yet
busy = []
done = threading.Event()
def emit(ev):
    busy.append(tasks())       # on the scheduler thread, mid-answer: its pool is up
    if ev.kind == "done":
        done.set()
svc.scheduler.submit(GenRequest("r0", "lora-0", Prompt([list(range(10, 200))], [], 0),
                                SamplingParams(max_tokens=8, ignore_eos=True), emit))
assert done.wait(60)
after = settle(idle)           # the scheduler went idle and freed its workers
svc.stop()
print(idle, max(busy), after)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and an OpenMP pool of at least 2 threads")
def test_the_scheduler_thread_frees_its_workers_when_it_goes_idle():
    out = subprocess.run([sys.executable, "-c", SERVING_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    idle, busy, after = map(int, out.stdout.split())
    assert busy > idle   # the scheduler's steps brought OpenMP workers
    assert after == idle  # and they left when it went idle
