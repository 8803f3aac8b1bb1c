"""Ship a trained checkpoint: ``python -m speech.export RUN/lslm.safetensors [--out speech/weights/lslm.safetensors]``.

Stored in float16 to halve what the repository carries; loading casts back to the model's float32
(``load_state_dict`` copies into the parameters' dtype), so serving and evaluation are unchanged
beyond float16 rounding of the weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from speech.checkpoints import save_atomic


def export_half(src: str | Path, dst: str | Path) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` with float tensors in float16, metadata kept. Returns the two sizes in bytes."""
    src, dst = Path(src), Path(dst)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
    if "kind" not in meta:
        raise ValueError(f"{src} has no checkpoint metadata; is it one of ours?")
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()}
    save_atomic(dst, tensors, {**meta, "stored_dtype": "float16"})
    return src.stat().st_size, dst.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("speech/weights/lslm.safetensors"))
    args = p.parse_args(argv)
    a, b = export_half(args.checkpoint, args.out)
    with safe_open(str(args.out), framework="pt") as f:
        kind = f.metadata()["kind"]
    print(f"wrote {args.out} ({kind}, {a / 1e6:.1f} MB -> {b / 1e6:.1f} MB, float16)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
