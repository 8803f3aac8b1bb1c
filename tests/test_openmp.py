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
