"""Server settings: one dataclass, filled from defaults, then ``RT_*`` environment variables, then CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    api_keys: list[str] = field(default_factory=list)  # empty (and no keys file): no authentication
    api_keys_file: str = ""  # one key per line, optionally "KEY max_sessions=N rpm=N" (realtime.auth)
    key_max_sessions: int = 0  # concurrent sessions per key, for keys without their own limit (0: unlimited)
    key_rpm: int = 0  # new sessions + API requests per minute per key, likewise (0: unlimited)
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
    max_session_seconds: float = 3600.0  # a session this old gets session_expired and is closed (0: no limit)
    max_pending_turns: int = 2  # voice turns waiting for speech recognition per session; more are dropped
    drain_seconds: float = 10.0  # on SIGTERM: how long live sessions may finish their response
    db: str = ""  # SQLite file of transcripts and usage; empty or none: no records (`serve` fills in resolved_db())
    data_dir: str = ""  # where `serve` keeps its records; empty: $XDG_DATA_HOME/duplex-server
    # Vision (python -m realtime serve builds it; create_app serves it only when given a VisionService):
    vision_model: str = "default"  # default (EfficientNet-Lite0 + SmolLM2) | a local LLaVA folder | none
    adapter_dir: str = ""  # LoRA adapters in peft's format, one sub-folder each, loaded at start
    lora_slots: int = 8  # adapters resident on the device at once (more stay on the host, LRU)
    max_lora_rank: int = 64
    lora_policy: str = "auto"  # auto | unmerged | merged | mixture (the orchestrator's mode)
    vision_max_running: int = 16  # chat requests decoding at once; more wait in the queue
    vision_cuda_graphs: str = "auto"  # auto: serving steps replayed from CUDA graphs on a GPU; off: eager
    point_model: str = "default"  # the 3D model: default (vision/weights3d) | a folder of the same files | none
    demo: bool = False  # the Gradio demos at /demo (web/demo.py); `serve` turns them on unless RT_DEMO=0 / --no-demo
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
        for name in ("key_max_sessions", "key_rpm", "max_session_seconds", "drain_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.lora_policy not in ("auto", "unmerged", "merged", "mixture"):
            raise ValueError(f"lora_policy must be auto, unmerged, merged or mixture, not {self.lora_policy!r}")
        if self.lora_slots < 1 or self.max_lora_rank < 1 or self.vision_max_running < 1:
            raise ValueError("lora_slots, max_lora_rank and vision_max_running must be at least 1")
        if self.vision_cuda_graphs not in ("auto", "off"):
            raise ValueError(f"vision_cuda_graphs must be auto or off, not {self.vision_cuda_graphs!r}")
        if self.max_pending_turns < 1:
            raise ValueError("max_pending_turns must be at least 1")

    def resolved_db(self) -> str:
        """The records file ``serve`` uses: ``db``, else ``<data_dir>/realtime.db``; ``none`` turns it off."""
        if self.db.lower() == "none":
            return ""
        if self.db:
            return self.db
        from realtime.store import default_data_dir

        return str((Path(self.data_dir) if self.data_dir else default_data_dir()) / "realtime.db")

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
        if t == "bool":
            if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if t == "float":
            return float(raw)
        if t.startswith("list"):
            return [p.strip() for p in raw.split(",") if p.strip()]
        return raw
    except ValueError:
        raise ValueError(f"environment variable RT_{name.upper()}={raw!r} is not a valid {t}") from None
