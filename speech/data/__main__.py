"""`python -m speech.data build`: the command line for the synthetic speech corpus.

Kept to argument parsing: everything it does is `speech.data.build(BuildConfig(...))`, so tests and
notebooks use the same path without a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .build import build
from .plan import BuildConfig
from .synth import PiperSettings, SynthError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speech.data",
                                     description="Synthetic speech corpus for the LSLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="synthesize the corpus (Piper target voice, espeak-ng speakers, noise)")
    b.add_argument("--out", default="data/speech", help="corpus root (default: data/speech)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sentences", type=int, help="target-voice sentences (default 3000; --quick: 20)")
    b.add_argument("--listen", type=int, help="listening-channel clips (default 2000; --quick: 30; 0: target-voice speech only)")
    b.add_argument("--noise", type=int, help="noise clips (default 300; --quick: 8; 0: none)")
    b.add_argument("--quick", action="store_true", help="a tiny corpus, for smoke tests (seconds)")
    b.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    b.add_argument("--deterministic-audio", action="store_true",
                   help="Piper noise off: bit-identical audio per seed, flatter prosody")
    b.add_argument("--espeak", default="espeak-ng", help="espeak-ng executable (default: from PATH)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    piper = PiperSettings(noise_scale=0.0, noise_w=0.0) if args.deterministic_audio else PiperSettings()
    values = dict(out=args.out, seed=args.seed, workers=args.workers, piper=piper,
                  espeak_binary=args.espeak, overwrite=args.overwrite, progress=not args.no_progress)
    sizes = {"sentences": args.sentences, "listen_clips": args.listen, "noise_clips": args.noise}
    values.update({k: v for k, v in sizes.items() if v is not None})
    try:
        cfg = BuildConfig.quick(**values) if args.quick else BuildConfig(**values)
        meta = build(cfg)
    except (SynthError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": cfg.out, "counts": meta["counts"], "seconds": meta["seconds"],
                      "build_seconds": meta["build_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
