"""The 3D large multimodal model: point clouds → spatial tokens spliced into SmolLM2's prompt (LLaVA-3D's shape).

    cloud ──► normalise, resample (vision/points.py) ──► SpatialTokenizer (vision/encoder3d.py) ──► M tokens (M, d)
    chat messages with POINTS_PLACEHOLDER ──► chat template ──► text pieces ──► [text][M spatial tokens][text]
                                                                           ──► PackedDecoder (vision/decoder.py)

:class:`PointLanguageModel` has the interface the vision scheduler reads from :class:`vision.model.VisionLanguageModel`
(``decoder``, ``tokenizer``, ``stop_ids``, ``device``, ``dtype``, ``build_prompt``, ``embed_prompt``,
``embed_tokens``, ``describe``); its :class:`PointPrompt` has ``length`` and, for the token gate,
``spatial_spans()``. The LoRA trained by ``vision/train3d.py`` is *merged* into this model's own copy of
SmolLM2 at load time (a transform after building; serving then runs the plain decoder).

Weights (``vision/weights3d/``): ``spatial.safetensors`` (encoder + projector, its config in the metadata) and
``lora.safetensors`` (A/B per projection, rank and alpha in the metadata). Without them the spatial tokenizer
is a seeded random initialisation and ``describe()`` says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lm.loading import DEFAULT_LM, load_causal_lm, resolve_dtype
from vision.decoder import PackedDecoder
from vision.encoder3d import Encoder3DConfig, SpatialTokenizer
from vision.points import Cloud, cloud_to_tensor

log = logging.getLogger(__name__)

WEIGHTS3D = Path(__file__).parent / "weights3d"
POINTS_PLACEHOLDER = "\ue000points\ue000"  # private-use characters, like the image placeholder
SYSTEM_3D = "Answer the question about the 3D scene in one or two words."


@dataclass
class PointPrompt:
    """A rendered chat prompt: text pieces between point clouds, and the clouds ((n_points, 6) tensors) in order."""

    pieces: list[list[int]]  # len(clouds) + 1 token-id lists
    clouds: list[Tensor]
    tokens_per_cloud: int

    @property
    def length(self) -> int:
        return sum(len(p) for p in self.pieces) + len(self.clouds) * self.tokens_per_cloud

    def spatial_spans(self) -> list[tuple[int, int]]:
        """``[start, end)`` prompt positions of each cloud's spatial tokens."""
        spans, pos = [], 0
        for ids in self.pieces[:-1]:
            pos += len(ids)
            spans.append((pos, pos + self.tokens_per_cloud))
            pos += self.tokens_per_cloud
        return spans


def question_messages(question: str) -> list[dict[str, str]]:
    """The chat the model was trained on: our system line, the cloud, then the question."""
    return [{"role": "system", "content": SYSTEM_3D}, {"role": "user", "content": f"{POINTS_PLACEHOLDER}\n{question}"}]


class PointLanguageModel:
    def __init__(self, name: str, decoder: PackedDecoder, tokenizer: Any, spatial: SpatialTokenizer,
                 stop_ids: set[int], note: str = "") -> None:
        self.name, self.decoder, self.tokenizer, self.spatial = name, decoder, tokenizer, spatial
        self.stop_ids = frozenset(stop_ids)
        self.note = note
        self.device = decoder.embed_tokens.weight.device
        self.dtype = decoder.embed_tokens.weight.dtype

    @property
    def tokens_per_cloud(self) -> int:
        return self.spatial.tokens_per_cloud

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "points": True, "spatial_tokens": self.tokens_per_cloud,
                "max_positions": self.decoder.max_positions}

    def prepare_cloud(self, cloud: Cloud | Tensor, seed: int = 0) -> Tensor:
        """A raw :class:`Cloud` → its normalised, resampled (n_points, 6) tensor; tensors pass through."""
        if isinstance(cloud, Tensor):
            return cloud
        return cloud_to_tensor(cloud, self.spatial.cfg.n_points, seed)

    def build_prompt(self, messages: list[dict[str, Any]], clouds: list[Cloud | Tensor]) -> PointPrompt:
        """``messages``: role + text where each cloud is :data:`POINTS_PLACEHOLDER`; ``clouds`` in order."""
        if not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": SYSTEM_3D}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(POINTS_PLACEHOLDER)
        if len(parts) != len(clouds) + 1:
            raise ValueError("point-cloud placeholders and point clouds do not match")
        pieces = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in parts]
        return PointPrompt(pieces, [self.prepare_cloud(c) for c in clouds], self.tokens_per_cloud)

    def question_prompt(self, question: str, cloud: Cloud | Tensor) -> PointPrompt:
        return self.build_prompt(question_messages(question), [cloud])

    @torch.no_grad()
    def encode_clouds(self, clouds: list[Tensor]) -> Tensor:
        """(n, M, d) spatial tokens in the LM's dtype."""
        p = next(self.spatial.parameters())
        x = torch.stack(clouds).to(p.device, p.dtype)
        return self.spatial(x).to(self.dtype)

    def embed_prompt(self, prompt: PointPrompt) -> Tensor:
        """(T, d) input embeddings, spatial tokens spliced in at their places."""
        embed = self.decoder.embed_tokens
        sp = self.encode_clouds(prompt.clouds) if prompt.clouds else None
        chunks = []
        for i, ids in enumerate(prompt.pieces):
            if ids:
                chunks.append(embed(torch.tensor(ids, device=self.device)))
            if sp is not None and i < len(prompt.clouds):
                chunks.append(sp[i])
        return torch.cat(chunks)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(ids)


# ---------------------------------------------------------------------------------------------- weights
def save_spatial(path: Path, spatial: SpatialTokenizer, half: bool = True) -> None:
    from safetensors.torch import save_file

    sd = {k: (v.half() if half else v).contiguous() for k, v in spatial.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps(asdict(spatial.cfg))})


def load_spatial(path: Path) -> SpatialTokenizer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        cfg = Encoder3DConfig(**json.loads(f.metadata()["config"]))
    spatial = SpatialTokenizer(cfg)
    spatial.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    spatial.trained = True
    return spatial


def save_lora(path: Path, lora: dict[str, tuple[Tensor, Tensor]], rank: int, alpha: float) -> None:
    """``lora``: module path inside the causal LM (e.g. ``model.layers.3.self_attn.q_proj``) → (A (r, in), B (out, r))."""
    from safetensors.torch import save_file

    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{name}.A"], sd[f"{name}.B"] = a.half().contiguous(), b.half().contiguous()
    save_file(sd, str(path), metadata={"rank": str(rank), "alpha": str(alpha)})


def load_lora(path: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float]:
    """The inverse of :func:`save_lora`: (module path → (A, B) in float32, rank, alpha)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        lora = {n: (f.get_tensor(f"{n}.A").float(), f.get_tensor(f"{n}.B").float()) for n in names}
    return lora, int(meta["rank"]), float(meta["alpha"])


@torch.no_grad()
def merge_lora(hf_lm: nn.Module, path: Path) -> int:
    """W += (alpha / r) · B A for every projection in the file; returns how many were merged."""
    lora, rank, alpha = load_lora(path)
    for name, (a, b) in lora.items():
        lin = hf_lm.get_submodule(name)
        w = lin.weight.data
        lin.weight.data = (w.float() + alpha / rank * (b @ a).to(w.device)).to(w.dtype)
    return len(lora)


def stop_ids(tokenizer: Any, hf_lm: nn.Module) -> frozenset[int]:
    from lm.loading import stop_token_ids

    return stop_token_ids(tokenizer, hf_lm.generation_config)


def load_point_lm(weights: Path | None = WEIGHTS3D, device: str = "cpu", dtype: torch.dtype | None = None,
                  lm: str | Path = DEFAULT_LM, cfg: Encoder3DConfig | None = None, seed: int = 0) -> PointLanguageModel:
    """The serving 3D LMM (eval mode, on ``device``): SmolLM2 with the trained LoRA merged, and the spatial
    tokenizer from ``weights`` (a folder with ``spatial.safetensors`` [+ ``lora.safetensors``]); a seeded random
    spatial tokenizer (config ``cfg``) when there is none."""
    dtype = resolve_dtype(device, dtype)
    hf_lm, tokenizer = load_causal_lm(lm, device, dtype)
    spatial_file = Path(weights) / "spatial.safetensors" if weights is not None else None
    lora_file = Path(weights) / "lora.safetensors" if weights is not None else None
    if spatial_file is not None and spatial_file.is_file():
        spatial = load_spatial(spatial_file)
        note = f"spatial tokenizer {spatial_file.parent.name}/{spatial_file.name}"
        if lora_file.is_file():
            n = merge_lora(hf_lm, lora_file)
            note += f", LoRA merged into {n} projections"
    else:
        torch.manual_seed(seed)
        spatial = SpatialTokenizer(cfg or Encoder3DConfig(lm_dim=hf_lm.config.hidden_size))
        note = "spatial tokenizer untrained (random): answers about clouds are meaningless until vision.train3d has run"
    spatial.to(device=device).eval()  # the small encoder stays float32 (its max-pools and LayerNorms)
    return PointLanguageModel("point-smollm2", PackedDecoder(hf_lm), tokenizer, spatial, stop_ids(tokenizer, hf_lm), note)
