"""Free the calling thread's OpenMP worker pool, so that a serving thread's small ops stay fast on a CPU.

libgomp (the OpenMP runtime of torch's Linux wheels) keeps one pool of worker threads per thread that
ran a parallel region. While the workers of all pools outnumber the CPUs, its workers stop spinning
between regions ("throttled" spinning) and every parallel op pays a futex wake-up instead. A server
loads its models on the main thread (one pool) and steps them on a scheduler thread (a second pool):
on a 2-core CPU the scheduler's ops then ran 3-4x slower (one token through a 576x1536 linear: 135 µs
against 38 µs; a whole 8-layer decode step of the serving bench: 24 ms against 9 ms). Freeing the main
thread's pool when the serving thread starts leaves that thread the only pool, spinning as it should.

An idle thread's pool throttles just the same (a second thread's one-token linear: 160 µs while the
first thread idled with its pool, 37 µs after it freed it), so the vision scheduler also frees its own
pool when it goes idle. Two threads busy at once on a 2-core CPU still throttle each other. (The voice
engine does not call this: measured in the real duplex server, its step got slower; docs/vision.md.)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the threads, not only park them


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch has already loaded (never a second one), or None."""
    import torch  # here, so that importing this module stays light

    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    bundled = sorted(str(p) for p in (Path(torch.__file__).parent / "lib").glob("lib*omp*"))
    for name in [*bundled, "libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib"]:
        try:
            lib = ctypes.CDLL(name, mode=mode)  # RTLD_NOLOAD: only a runtime that is loaded already
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers (OpenMP 5's ``omp_pause_resource_all``); the next parallel
    op on this thread starts a new pool. Call it on the thread that loaded the model, when a serving
    thread takes over the compute. Returns whether the runtime did it (False: no OpenMP runtime found,
    or called inside a parallel region)."""
    lib = _runtime()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
    if not ok:
        log.debug("omp_pause_resource_all refused: the OpenMP pool of this thread stays")
    return ok
