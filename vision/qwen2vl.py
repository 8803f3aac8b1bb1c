"""Qwen2-VL-style models (Qwen2-VL, Qwen2.5-VL) from a local Hugging Face folder, served by the packed decoder.

Two things set them apart from LLaVA, and both are handled here rather than in the scheduler:

* **Variable image tokens.** The image processor resizes each image to a multiple of 28 px within its
  pixel budget and cuts it into 14-px patches; the vision transformer merges 2×2 patches into one token,
  so an image costs ``h·w / 4`` tokens (of its patch grid) — known as soon as the prompt is built,
  before the vision tower runs. The prompt carries each image's length.
* **M-RoPE.** Rotary positions have three rows (temporal, height, width). Text tokens use the same index
  in all three; an image's tokens take their grid coordinates from the position where it starts, and
  the text after it continues from that start plus the image's larger side. A prompt therefore carries
  (3, T) positions for its prefill and one ``rope_delta`` (last position + 1 − length): every decoded
  token sits at cache index + delta, in all three rows, which is the packed decoder's ``pos_offset``.

Positions come from the model's own ``get_rope_index`` and image features from its ``get_image_features``,
so the arithmetic is Hugging Face's; the test checks the logits of prefill and of decoding against its
forward and ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from lm.loading import stop_token_ids
from vision.decoder import PackedDecoder
from vision.model import IMAGE_PLACEHOLDER, Prompt, VisionLanguageModel

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class Qwen2VLEncoder:
    """The vision transformer + merger of a Qwen2-VL model; images of any size, a token count each."""

    tokens_per_image = 0  # variable: see :meth:`prepare`

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.merge = model.config.vision_config.spatial_merge_size

    def prepare(self, images: list[Image.Image]) -> tuple[Tensor, Tensor, list[int]]:
        """Pixel patches (N, C·T·P·P), their grids (n, 3) and each image's token count."""
        out = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        grid = out["image_grid_thw"]
        return out["pixel_values"], grid, (grid.prod(-1) // self.merge ** 2).tolist()

    def features(self, pixels: Tensor, grid: Tensor) -> list[Tensor]:
        p = next(self.model.parameters())
        out = self.model.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype), image_grid_thw=grid.to(p.device))
        feats = out if isinstance(out, (list, tuple)) else out.pooler_output
        return list(feats)

    def __call__(self, images: list[Image.Image]) -> list[Tensor]:
        pixels, grid, _ = self.prepare(images)
        return self.features(pixels, grid)


class Qwen2VLLanguageModel(VisionLanguageModel):
    """Prompts with ``<|vision_start|>`` image ``<|vision_end|>`` spans of variable length and M-RoPE positions."""

    def __init__(self, name: str, hf: nn.Module, tokenizer: Any, processor: Any, stop_ids: set[int], note: str) -> None:
        super().__init__(name, PackedDecoder(_TextLM(hf)), tokenizer, Qwen2VLEncoder(hf, processor), stop_ids, note)
        self.hf = hf
        cfg = hf.config
        self.image_token_id = cfg.image_token_id
        self.vision_start_id, self.vision_end_id = cfg.vision_start_token_id, cfg.vision_end_token_id

    def build_prompt(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Prompt:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) != len(images) + 1:
            raise ValueError("image placeholders and images do not match")
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in parts]
        pieces = [([self.vision_end_id] if i else []) + piece + ([self.vision_start_id] if i < len(images) else [])
                  for i, piece in enumerate(ids)]
        lengths: list[int] = []
        pixels = grid = None
        if images:
            pixels, grid, lengths = self.encoder.prepare(images)
        flat: list[int] = []
        for i, piece in enumerate(pieces):
            flat += piece + ([self.image_token_id] * lengths[i] if i < len(images) else [])
        input_ids = torch.tensor([flat])
        positions, delta = self.hf.model.get_rope_index(input_ids, (input_ids == self.image_token_id).int(),
                                                        image_grid_thw=grid)
        return Prompt(pieces, images, 0, image_lengths=lengths, positions=positions[:, 0],
                      rope_delta=int(delta.reshape(-1)[0]), pixels=(pixels, grid) if images else None)

    def embed_prompt(self, prompt: Prompt) -> Tensor:
        embed = self.decoder.embed_tokens
        feats = self.encoder.features(*prompt.pixels) if prompt.images else []
        chunks = []
        for i, ids in enumerate(prompt.pieces):
            if ids:
                chunks.append(embed(torch.tensor(ids, device=self.device)))
            if i < len(feats):
                chunks.append(feats[i].to(self.dtype))
        return torch.cat(chunks)


class _TextLM(nn.Module):
    """The language half of a Qwen2-VL model in the causal-LM shape the packed decoder reads."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.model = hf.model.language_model
        self.lm_head = hf.lm_head
        self.config = hf.config.text_config


def load_qwen2vl(src: str | Path, device: str, dtype: torch.dtype) -> Qwen2VLLanguageModel:
    """A local Qwen2-VL / Qwen2.5-VL folder (weights, tokenizer, image processor); never downloads."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(src), dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
    name = Path(str(src)).name or str(src)
    return Qwen2VLLanguageModel(name, model, tokenizer, processor, stop_token_ids(tokenizer, model.generation_config),
                                f"Hugging Face {model.config.model_type} from {src}")
