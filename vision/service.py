"""The vision serving stack assembled: model → LoRA layers → adapter manager → orchestrator → scheduler.

The HTTP layer (vision/api.py) sees only :class:`VisionService`: it turns OpenAI chat messages into a
prompt, submits requests, lists and (un)loads adapters. Models stay plain; LoRA serving is applied as
a transform (``wrap_decoder_layers``) after loading.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision.adapters import AdapterError, AdapterManager
from vision.images import ImageError, ImageLimits, load_image
from vision.lora_linear import LoRAContext, wrap_decoder_layers
from vision.model import DEFAULT_VLM, IMAGE_PLACEHOLDER, WEIGHTS, Prompt, VisionLanguageModel, load_vlm
from vision.orchestrator import Orchestrator, OrchestratorConfig
from vision.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

# issue 6: the adapters generated for the default model (python -m vision.adapters generate), served by default
DEFAULT_ADAPTER_DIR = WEIGHTS / "adapters"


@dataclass
class VisionServiceConfig:
    model: str = DEFAULT_VLM  # "default", a local LLaVA folder, or "none" to serve no vision model
    device: str = "cpu"
    adapter_dir: str | None = None  # every sub-folder holding a peft adapter is loaded at start, by folder name
    lora_slots: int = 8  # adapters resident on the device at once
    max_lora_rank: int = 64
    policy: str = "auto"  # orchestrator: auto | unmerged | merged | mixture
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    images: ImageLimits = field(default_factory=ImageLimits)
    gate: Any = None  # 3D models: the default vision.gate3d.GatePolicy (requests may override it)

    def __post_init__(self) -> None:
        if self.lora_slots < 1 or self.max_lora_rank < 1:
            raise ValueError("lora_slots and max_lora_rank must be at least 1")


class RequestError(ValueError):
    """A user error in a chat request: ``code`` and ``param`` for OpenAI's error shape."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status


class VisionService:
    def __init__(self, model: VisionLanguageModel, cfg: VisionServiceConfig) -> None:
        self.cfg, self.model = cfg, model
        self.ctx = LoRAContext()
        model.decoder.requires_grad_(False)  # serving only; merges write under no_grad
        self.layers = wrap_decoder_layers(model.decoder.layers, self.ctx, cfg.lora_slots, cfg.max_lora_rank)
        self.adapters = AdapterManager(self.layers, cfg.lora_slots, cfg.max_lora_rank)
        self.orchestrator = Orchestrator(self.layers, self.ctx, OrchestratorConfig(policy=cfg.policy))
        self.scheduler = Scheduler(model, self.adapters, self.orchestrator, cfg.scheduler)
        self.created = int(time.time())

    @classmethod
    def load(cls, cfg: VisionServiceConfig) -> VisionService:
        service = cls(load_vlm(cfg.model, cfg.device), cfg)
        if cfg.adapter_dir:
            service.load_adapter_dir(Path(cfg.adapter_dir))
        return service

    def load_adapter_dir(self, folder: Path) -> list[str]:
        """Register every peft adapter under ``folder`` by sub-folder name; bad ones are logged and skipped."""
        if not folder.is_dir():
            log.warning("adapter folder %s does not exist: no adapters loaded at start", folder)
            return []
        loaded = []
        for sub in sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file()):
            try:
                self.adapters.register(sub.name, sub)
                loaded.append(sub.name)
            except AdapterError as e:
                log.warning("adapter %s not loaded: %s", sub.name, e.message)
        return loaded

    def start(self) -> None:
        self.scheduler.calibrate()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # ------------------------------------------------------------------ requests
    def resolve_model(self, name: str) -> str | None:
        """The adapter a ``model`` field names (``None`` = the base model)."""
        if name in (self.model.name, "base", "default"):
            return None
        if name not in self.adapters:
            raise RequestError(f"no model or adapter named {name!r}; GET /v1/models lists them", "model_not_found",
                               "model", 404)
        return name

    def build_prompt(self, messages: list[dict[str, Any]]) -> Prompt:
        """OpenAI chat messages (text or content parts with ``image_url``) → a rendered prompt."""
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        rendered, images = [], []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("system", "user", "assistant", "developer"):
                raise RequestError(f"messages[{i}].role must be system, user or assistant", param=f"messages[{i}].role")
            rendered.append({"role": "system" if role == "developer" else role,
                             "content": self._content(m.get("content"), i, images)})
        if len(images) > self.cfg.images.max_images:
            raise RequestError(f"{len(images)} images; at most {self.cfg.images.max_images} per request",
                               "too_many_images", "messages")
        if images and not self.takes_clouds and getattr(self.model, "encoder", None) is None:
            raise RequestError("this model does not take images", "images_not_supported", "messages")
        return self.model.build_prompt(rendered, images)

    def _content(self, content: Any, i: int, images: list) -> str:
        if isinstance(content, str):
            return _clean(content)
        if content is None:
            return ""
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
        out = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append(_clean(str(part.get("text", ""))))
            elif kind == "point_cloud_url":
                if not self.takes_clouds:
                    raise RequestError(f"{self.model.name} does not take point clouds (point_cloud_url parts): name a 3D "
                                       "model; GET /v1/models lists them", "point_clouds_not_supported",
                                       f"messages[{i}].content[{j}]")
                spec = part.get("point_cloud_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                fmt = spec.get("format") if isinstance(spec, dict) else None
                if len(images) >= self.cfg.images.max_images:
                    raise RequestError(f"at most {self.cfg.images.max_images} point clouds per request",
                                       "too_many_point_clouds", f"messages[{i}].content[{j}]")
                images.append(self._cloud(url, fmt, f"messages[{i}].content[{j}]"))
                out.append(self._cloud_placeholder)
            elif kind == "image_url":
                if self.takes_clouds:
                    raise RequestError(f"{self.model.name} takes point clouds, not images", "images_not_supported",
                                       f"messages[{i}].content[{j}]")
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise RequestError("image_url.url must be a string", param=f"messages[{i}].content[{j}]")
                if len(images) >= self.cfg.images.max_images:
                    raise RequestError(f"at most {self.cfg.images.max_images} images per request", "too_many_images",
                                       f"messages[{i}].content[{j}]")
                try:
                    images.append(load_image(url, self.cfg.images))
                except ImageError as e:
                    raise RequestError(e.message, e.code, f"messages[{i}].content[{j}]") from None
                out.append(IMAGE_PLACEHOLDER)
            else:
                raise RequestError(f"content part type {kind!r} is not supported (text, image_url)",
                                   param=f"messages[{i}].content[{j}]")
        if self.takes_clouds:  # the 3D model was trained on "<cloud>\n<question>": clouds first, in order
            clouds = [p for p in out if p == self._cloud_placeholder]
            out = clouds + [p for p in out if p != self._cloud_placeholder]
        return "\n".join(out)

    @property
    def takes_clouds(self) -> bool:
        return hasattr(self.model, "prepare_cloud")

    @property
    def _cloud_placeholder(self) -> str:
        from vision.model3d import POINTS_PLACEHOLDER

        return POINTS_PLACEHOLDER

    def _cloud(self, url: Any, fmt: str | None, param: str):
        from vision.points import PointCloudError, PointLimits, read_points_bytes

        if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
            raise RequestError("point_cloud_url.url must be a data URL (data:<type>;base64,<PLY, PCD or .npy bytes>)",
                               "invalid_point_cloud_url", param)
        header, _, payload = url.partition(",")
        limits = PointLimits()
        if len(payload) > limits.max_bytes * 4 // 3 + 4:
            raise RequestError(f"point cloud is over {limits.max_bytes // (1024 * 1024)} MB", "point_cloud_too_large", param)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("point cloud data is not valid base64", "invalid_point_cloud", param) from None
        fmt = fmt or _cloud_format(header, raw)
        if fmt is None:
            raise RequestError("unknown point-cloud format: send PLY, PCD or .npy (or give point_cloud_url.format)",
                               "invalid_point_cloud", param)
        try:
            return read_points_bytes(raw, fmt, limits)
        except PointCloudError as e:
            raise RequestError(e.message, e.code, param) from None

    def gate_for(self, name: str | None) -> Any:
        """A 3D request's token gate: the service's default, or ``adatoken`` / ``fastv`` / ``none`` asked for."""
        from vision.gate3d import GatePolicy

        if name is None or name == "adatoken":
            return self.cfg.gate
        if name == "fastv":  # FastV's K=2, R=50%; on a shallower model, the last layer
            return GatePolicy.fastv(k=min(2, len(self.model.decoder.layers) - 1))
        if name == "none":
            return None
        raise RequestError("spatial_gate must be adatoken, fastv or none", param="spatial_gate")

    def models(self) -> list[dict[str, Any]]:
        base = {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "duplex-server",
                "root": self.model.name, "parent": None}
        out = [base]
        for name in self.adapters.names():
            a = self.adapters.get(name)
            out.append({"id": name, "object": "model", "created": self.created, "owned_by": "duplex-server",
                        "root": a.path, "parent": self.model.name, "rank": a.rank, "target_modules": a.target_modules})
        return out

    def stats(self) -> dict[str, Any]:
        return {"model": self.model.describe(), "scheduler": self.scheduler.stats(),
                "adapters": {"registered": len(self.adapters.names()), "resident": self.adapters.resident(),
                             "loads": self.adapters.loads, "evictions": self.adapters.evictions},
                "device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch.")}


def build_point_service(settings: Any, device: str) -> VisionService:
    """The 3D model the settings name (``point_model``: ``default`` = the committed ``vision/weights3d``, or a
    folder of the same files), with its token gate (``policy_*.json`` there, chosen by ``vision.gate3d select``) on by default."""
    from vision.gate3d import GatePolicy
    from vision.model3d import WEIGHTS3D, load_point_lm

    folder = WEIGHTS3D if settings.point_model == "default" else Path(settings.point_model)
    if settings.point_model != "default" and not folder.is_dir():
        raise FileNotFoundError(f"3D model folder not found: {folder}")
    model = load_point_lm(folder, device)
    found = sorted(folder.glob("policy_*.json")) if folder.is_dir() else []  # chosen by vision.gate3d select
    policy = found[0] if found else folder / "policy.json"
    gate = GatePolicy.load(policy) if policy.is_file() else None
    if gate is None:
        log.warning("no gate policy at %s: 3D prompts are prefilled ungated", policy)
    cfg = VisionServiceConfig(model=str(folder), device=device, lora_slots=1, max_lora_rank=8, gate=gate,
                              scheduler=_scheduler_config(settings))
    return VisionService(model, cfg)


def _scheduler_config(settings: Any) -> SchedulerConfig:
    """The scheduler part of the server settings (``vision_cuda_graphs`` may be absent: auto)."""
    return SchedulerConfig(max_running=settings.vision_max_running,
                           cuda_graphs=getattr(settings, "vision_cuda_graphs", "auto"))


def _clean(text: str) -> str:
    """User text never contains our image placeholder characters."""
    return text.replace("\ue000", "")


def _cloud_format(header: str, raw: bytes) -> str | None:
    """PLY / PCD / npy from the data URL's type, else from the file's first bytes."""
    mime = header[5:].split(";")[0].lower()
    for fmt in ("ply", "pcd", "npy"):
        if mime.endswith(fmt):
            return fmt
    head = raw[:64]
    if head.startswith(b"ply"):
        return "ply"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.lstrip().startswith((b"# .PCD", b"VERSION", b"FIELDS")):
        return "pcd"
    return None


def build_vision_service(settings: Any, device: str) -> VisionService:
    """The service the server's settings describe (``realtime.config.Settings``'s vision fields).

    Without an ``adapter_dir`` the default model comes with its generated adapters (vision/weights/adapters);
    ``adapter_dir="none"`` serves no adapters at start."""
    adapter_dir = settings.adapter_dir or None
    if adapter_dir is None and settings.vision_model == DEFAULT_VLM and DEFAULT_ADAPTER_DIR.is_dir():
        adapter_dir = str(DEFAULT_ADAPTER_DIR)
    cfg = VisionServiceConfig(
        model=settings.vision_model, device=device, adapter_dir=None if adapter_dir == "none" else adapter_dir,
        lora_slots=settings.lora_slots, max_lora_rank=settings.max_lora_rank, policy=settings.lora_policy,
        scheduler=_scheduler_config(settings),
    )
    return VisionService.load(cfg)
