"""Checkpoints as safetensors with the config in the metadata: the codec and the LSLM apart.

Kept apart so that a trained codec can ship before the LSLM trained on its tokens, and so that the
LSLM's config is checked against the codec it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from speech.codec import SpeechCodec
from speech.config import CodecConfig, LSLMConfig
from speech.lslm import LSLM


def save_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary name: a crash mid-write never leaves a truncated
    checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _save(path: str | Path, module, kind: str, cfg) -> None:
    from dataclasses import asdict

    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_atomic(path, sd, {"kind": kind, "config": json.dumps(asdict(cfg))})


def _load(path: str | Path, kind: str) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several kinds for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    if meta.get("kind") != kind or "config" not in meta:
        raise ValueError(f"{path} is not a {kind} checkpoint (metadata kind={meta.get('kind')!r})")
    return json.loads(meta["config"]), sd


def save_codec(path: str | Path, codec: SpeechCodec) -> None:
    _save(path, codec, "codec", codec.cfg)


def load_codec(path: str | Path) -> tuple[CodecConfig, SpeechCodec]:
    cfg_d, sd = _load(path, "codec")
    cfg = CodecConfig(**cfg_d)
    codec = SpeechCodec(cfg)
    codec.load_state_dict(sd)
    return cfg, codec


def save_lslm(path: str | Path, lslm: LSLM) -> None:
    _save(path, lslm, "lslm", lslm.cfg)


def load_irq_policy(path: str | Path) -> dict[str, float]:
    """The IRQ decision fitted for an LSLM checkpoint (``irq_margin``, ``irq_frames``); {} when none was."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    policy = json.loads(meta.get("irq_policy", "{}"))
    return {k: policy[k] for k in ("irq_margin", "irq_frames") if k in policy}


def write_irq_policy(path: str | Path, margin: float, frames: int, note: str) -> None:
    """Store the fitted IRQ decision in an LSLM checkpoint's metadata; the tensors are kept as they are."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != "lslm":
        raise ValueError(f"{path} is not an lslm checkpoint")
    meta["irq_policy"] = json.dumps({"irq_margin": margin, "irq_frames": frames, "fitted_on": note})
    save_atomic(path, load_file(str(path)), meta)


def load_lslm(path: str | Path) -> tuple[LSLMConfig, LSLM]:
    cfg_d, sd = _load(path, "lslm")
    cfg_d.setdefault("listen_norm", False)  # saved before the field existed: raw listening features
    cfg = LSLMConfig(**cfg_d)
    lslm = LSLM(cfg)
    lslm.load_state_dict(sd)
    return cfg, lslm
