"""Server settings: one dataclass, filled from defaults, then ``RT_*`` environment variables, then CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    capacity: int = 16  # concurrent voice sessions; more are refused
    engine_mode: str = "batched"  # batched | sequential (one session per model call: the baseline)
    voice_dir: str = ""  # a folder with codec.safetensors / lslm.safetensors; empty: the embedded default
    # The dialogue brain (python -m realtime serve; create_app uses it only when given a Dialogue):
    chat_model: str = "smollm2"  # smollm2 | echo | a local Hugging Face folder | a hub name in the local cache
    asr_model: str = ""  # empty: Whisper tiny.en; none: voice turns are not heard; else a folder or hub name
    max_turn_s: float = 30.0  # audio kept per user voice turn (the newest part)
    max_message_bytes: int = 2 * 1024 * 1024  # websocket frame limit (larger frames close with 1009)
    max_audio_bytes: int = 512 * 1024  # decoded PCM per append event (~10 s at 24 kHz)
    max_text_chars: int = 4000
    events_per_second: float = 200.0
    event_burst: int = 400
    send_queue_max: int = 1024  # server events buffered for a slow reader before it is closed
    max_errors_per_minute: int = 120  # a client past this is closed (1008)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.engine_mode not in ("batched", "sequential"):
            raise ValueError(f"engine_mode must be batched or sequential, not {self.engine_mode!r}")
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if not self.chat_model:
            raise ValueError("chat_model must not be empty: smollm2, echo, a folder or a hub name")
        if not 1.0 <= self.max_turn_s <= 600.0:
            raise ValueError(f"max_turn_s must be within 1..600 seconds, not {self.max_turn_s}")

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
        """Defaults ← ``RT_<NAME>`` environment variables ← ``overrides`` (CLI flags that were given)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"RT_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        return self.device


def _parse(type_name: Any, raw: str, name: str) -> Any:
    t = str(type_name)
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t.startswith("list"):
            return [p.strip() for p in raw.split(",") if p.strip()]
        return raw
    except ValueError:
        raise ValueError(f"environment variable RT_{name.upper()}={raw!r} is not a valid {t}") from None
