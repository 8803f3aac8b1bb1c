"""Benchmarks: ``python -m bench NAME [--quick] [--json PATH]``. Each compares against a baseline in the same run."""

from __future__ import annotations

import sys

BENCHMARKS = {
    "duplex": "bench.duplex",
    "voice-step": "bench.voice_step",
    "lora-op": "bench.lora_op",
    "lora-serving": "bench.lora_serve",
    "lora-serve": "bench.lora_serve",  # short name
    "gate3d": "bench.gate3d",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [--quick] [--json PATH] [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
