"""LoRA adapters by name: peft-format files checked on load, host staging, device slots with LRU eviction.

Three tiers, as vLLM and S-LoRA keep them: files on disk (an adapter directory, shared storage in a
deployment), a *host* copy of every registered adapter (pinned memory on CUDA, so a slot fills with an
asynchronous copy), and a few *device slots* in every wrapped layer. A request acquires its adapter's
slot before it runs and releases it when it ends; an adapter with requests in flight is never evicted,
the least recently used idle one is. Everything a user can get wrong (an unknown name, a corrupt file,
shapes that do not fit the base model, a rank over the limit) raises :class:`AdapterError` with a code.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vision.lora_linear import LoRALinear

_KEY = re.compile(r"(layers\.\d+\.[\w.]+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_VISION_PART = re.compile(r"vision|visual|image|projector|mm_")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class AdapterError(Exception):
    """A user-facing adapter problem: ``code`` is stable, ``status`` the HTTP status it maps to."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class LoRAAdapter:
    """One adapter on the host: per layer key, ``A`` (r, d_in) and ``B`` (d_out, r)."""

    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    target_modules: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


def read_peft_adapter(path: str | Path, name: str, layers: dict[str, LoRALinear], max_rank: int,
                      dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read and validate a peft LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder = Path(path)
    cfg_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir():
        raise AdapterError("adapter_not_found", f"adapter directory not found: {folder}", 404)
    if not cfg_file.is_file() or not weights_file.is_file():
        raise AdapterError("adapter_invalid", f"{folder} needs adapter_config.json and adapter_model.safetensors "
                           "(peft's save_pretrained format)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError("adapter_invalid", f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA").upper() != "LORA":
        raise AdapterError("adapter_invalid", f"not a LoRA adapter config (peft_type={cfg.get('peft_type')!r})")
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(unsupported):
            raise AdapterError("adapter_unsupported", f"LoRA option {unsupported!r} is not supported by the batched server")
    if cfg.get("bias", "none") != "none":
        raise AdapterError("adapter_unsupported", "LoRA adapters with trained biases are not supported")
    try:
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (KeyError, TypeError, ValueError):
        raise AdapterError("adapter_invalid", "adapter_config.json needs an integer 'r' and a number 'lora_alpha'") from None
    if rank < 1:
        raise AdapterError("adapter_invalid", f"rank must be positive, got {rank}")
    if rank > max_rank:
        raise AdapterError("adapter_rank_too_large", f"adapter rank {rank} is over the server's limit of {max_rank} "
                           "(start the server with a larger --max-lora-rank)")
    scaling = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError("adapter_invalid", f"adapter_model.safetensors cannot be read: {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError("adapter_invalid", f"unexpected tensor {key!r}: only lora_A / lora_B weights of decoder "
                               "layers are served")
        if _VISION_PART.search(key[:m.start()]):
            raise AdapterError("adapter_unsupported", f"{key!r}: LoRA on the vision encoder or projector is not "
                               "served; adapt the language model's layers")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, ab in pairs.items():
        layer = _find_layer(layers, key)
        if layer is None:
            raise AdapterError("adapter_incompatible", f"the base model has no LoRA-capable layer {key!r}")
        if set(ab) != {"A", "B"}:
            raise AdapterError("adapter_invalid", f"{key}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if cfg.get("fan_in_fan_out"):
            a, b = a.T, b.T
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError("adapter_incompatible", f"{key}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                               f"not fit the base model (expected {want_a} / {want_b} for rank {rank})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError("adapter_invalid", f"{key}: weights contain NaN or infinity")
        weights[key] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    if not weights:
        raise AdapterError("adapter_invalid", "the adapter holds no LoRA weights")
    targets = sorted({k.rsplit(".", 1)[-1] for k in weights})
    return LoRAAdapter(name, str(folder), rank, scaling, weights, targets)


def _find_layer(layers: dict[str, LoRALinear], key: str) -> LoRALinear | None:
    if key in layers:
        return layers[key]
    # peft names the module path inside the layer; tolerate a wrapper module in between
    layer_idx, _, rest = key.partition(".")[2].partition(".")
    tail = rest.rsplit(".", 1)[-1]
    for k, lin in layers.items():
        if k.startswith(f"layers.{layer_idx}.") and k.endswith(f".{tail}"):
            return lin
    return None


class AdapterManager:
    """Registered adapters (host) and the device slots they occupy. Thread-safe."""

    def __init__(self, layers: dict[str, LoRALinear], slots: int, max_rank: int, max_adapters: int = 256) -> None:
        self.layers, self.num_slots, self.max_rank, self.max_adapters = layers, slots, max_rank, max_adapters
        first = next(iter(layers.values()))
        self.device, self.dtype = first.lora_a.device, first.lora_a.dtype
        self._lock = threading.Lock()
        self._adapters: dict[str, LoRAAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: least recent first
        self._free = list(range(slots))
        self._refs: dict[str, int] = {}
        self.loads = self.evictions = 0  # counters for metrics

    # ------------------------------------------------------------------ registry
    def register(self, name: str, path: str | Path) -> LoRAAdapter:
        if not NAME.fullmatch(name):
            raise AdapterError("invalid_adapter_name", "adapter names are 1-128 letters, digits and ._:/- characters")
        with self._lock:
            if name in self._adapters:
                raise AdapterError("adapter_exists", f"an adapter named {name!r} is already loaded", 409)
            if len(self._adapters) >= self.max_adapters:
                raise AdapterError("too_many_adapters", f"the server holds at most {self.max_adapters} adapters; "
                                   "unload one first", 409)
        adapter = read_peft_adapter(path, name, self.layers, self.max_rank, self.dtype)  # slow part, unlocked
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        with self._lock:
            if name in self._adapters:
                raise AdapterError("adapter_exists", f"an adapter named {name!r} is already loaded", 409)
            self._adapters[name] = adapter
        return adapter

    def add(self, adapter: LoRAAdapter) -> None:
        """Register an adapter built in memory (benchmarks, the generator); shapes as ``read_peft_adapter``."""
        for key, (a, b) in adapter.weights.items():
            layer = self.layers.get(key)
            if layer is None or a.shape != (adapter.rank, layer.in_features) or b.shape != (layer.out_features, adapter.rank):
                raise AdapterError("adapter_incompatible", f"{key}: does not fit the base model")
        if adapter.rank > self.max_rank:
            raise AdapterError("adapter_rank_too_large", f"adapter rank {adapter.rank} is over {self.max_rank}")
        with self._lock:
            if adapter.name in self._adapters:
                raise AdapterError("adapter_exists", f"an adapter named {adapter.name!r} is already loaded", 409)
            self._adapters[adapter.name] = adapter

    def unregister(self, name: str) -> None:
        with self._lock:
            self._get(name)
            if self._refs.get(name, 0) > 0:
                raise AdapterError("adapter_in_use", f"adapter {name!r} has requests in flight; retry when they end", 409)
            del self._adapters[name]
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                self._clear(slot)
                self._free.append(slot)

    def get(self, name: str) -> LoRAAdapter:
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> LoRAAdapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise AdapterError("model_not_found", f"no model or adapter named {name!r}; GET /v1/models lists them", 404)
        return adapter

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    # ------------------------------------------------------------------ device slots
    def acquire(self, name: str) -> int | None:
        """The adapter's device slot, loading it if needed; ``None`` if every slot is held by running requests."""
        with self._lock:
            adapter = self._get(name)
            slot = self._slot_of.get(name)
            if slot is None:
                if self._free:
                    slot = self._free.pop()
                else:
                    victim = next((n for n in self._slot_of if self._refs.get(n, 0) == 0), None)
                    if victim is None:
                        return None
                    slot = self._slot_of.pop(victim)
                    self.evictions += 1
                self._fill(slot, adapter)
                self._slot_of[name] = slot
                self.loads += 1
            self._slot_of.move_to_end(name)
            self._refs[name] = self._refs.get(name, 0) + 1
            return slot

    def release(self, name: str) -> None:
        with self._lock:
            n = self._refs.get(name, 0)
            if n <= 0:
                raise RuntimeError(f"release of {name!r} without acquire")
            self._refs[name] = n - 1

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._slot_of.get(name)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        ctx = next(iter(self.layers.values())).ctx
        if ctx.slot_ranks is not None:
            ctx.slot_ranks[slot] = adapter.rank
            ctx.slot_ranks_host[slot] = adapter.rank
        for key, layer in self.layers.items():
            ab = adapter.weights.get(key)
            if ab is None:
                layer.reset_lora(slot)
            else:
                layer.set_lora(slot, ab[0], ab[1], adapter.scaling, adapter.rank)

    def _clear(self, slot: int) -> None:
        ctx = next(iter(self.layers.values())).ctx
        if ctx.slot_ranks is not None:
            ctx.slot_ranks[slot] = 0
            ctx.slot_ranks_host[slot] = 0
        for layer in self.layers.values():
            layer.reset_lora(slot)


if __name__ == "__main__":  # python -m vision.adapters generate | evaluate (the generator: vision/adapter_gen.py)
    from vision.adapter_gen import main

    main()
