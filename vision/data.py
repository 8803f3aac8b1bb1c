"""Synthetic instruction data for the default vision-language model: rendered images and text-only tasks.

``python -m vision.data build [--quick] [--seed N] [--out data/vision]`` writes, deterministically from
the seed::

    OUT/manifest.json                 seed, sizes, tasks
    OUT/{train,val,test}.jsonl        one Example per line
    OUT/images/{split}/NNNNN.png      224×224 RGB (vision/data_render.py)
    OUT/features/{split}.safetensors  the frozen EfficientNet-Lite0 features of every image, (N, 49, 1280)
                                      float16, computed once (``--no-features`` skips them)

Every example has a ``task``: ``colour``, ``shape``, ``count``, ``grounding``, ``reading``, ``scene``
(``modality`` "image") or ``arithmetic``, ``word``, ``fact`` (``modality`` "text"). Answers are one or
two words, so accuracy is exact match after :func:`normalize_answer`. Training images carry all their
questions; validation and test images one each. Text questions are split by a hash of their text, so
no test question is ever trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vision.data_render import MIX, NUMBER_WORDS, render
from vision.data_text import text_instruction

SPLITS = ("train", "val", "test")
IMAGE_TASKS = ("colour", "shape", "count", "grounding", "reading", "scene")
TEXT_TASKS = ("arithmetic", "word", "fact")
DEFAULT_OUT = Path("data/vision")
QUICK_OUT = Path("data/vision-quick")


@dataclass(frozen=True)
class DataConfig:
    """How many images / text questions each split gets."""

    images: tuple[int, int, int] = (3000, 150, 300)  # train, val, test
    texts: tuple[int, int, int] = (2000, 100, 150)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.images) < 1 or min(self.texts) < 1:
            raise ValueError("every split needs at least one image and one text question")

    @classmethod
    def quick(cls, seed: int = 0) -> DataConfig:
        return cls(images=(96, 24, 24), texts=(64, 24, 24), seed=seed)


@dataclass
class Example:
    id: str
    split: str
    task: str
    modality: str  # "image" | "text"
    question: str
    answer: str
    image: str | None = None  # path relative to the data folder
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self, placeholder: str) -> list[dict[str, str]]:
        """The chat messages the server renders for this question: the image part, then the text part
        (vision/service.py joins content parts with a newline)."""
        content = self.question if self.image is None else f"{placeholder}\n{self.question}"
        return [{"role": "user", "content": content}]


_ARTICLES = re.compile(r"^(the|a|an)\s+")


def normalize_answer(text: str) -> str:
    """Lower case, first line, no surrounding punctuation or article, number words as digits, one spelling."""
    t = text.strip().split("\n")[0].strip().lower()
    t = re.sub(r"[\"'`*]", "", t).strip(" .!?,:;")
    t = _ARTICLES.sub("", t)
    t = t.replace("center", "centre").replace("gray", "grey").strip()
    words = [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in t.split()]
    return " ".join(words)


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def _text_split(question: str) -> str:
    h = int(hashlib.sha1(question.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def generate(cfg: DataConfig, out: Path | None = None, progress: bool = True) -> dict[str, list[Example]]:
    """All splits; images are written under ``out`` when it is given (else kept only in memory order)."""
    from tqdm import tqdm

    splits: dict[str, list[Example]] = {}
    kinds, weights = list(MIX), list(MIX.values())
    for si, split in enumerate(SPLITS):
        rng = random.Random(f"vision-data-{cfg.seed}-{split}")
        examples: list[Example] = []
        if out is not None:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(cfg.images[si]), desc=f"{split} images", disable=not progress, leave=False):
            kind = rng.choices(kinds, weights=weights)[0]
            image, qas = render(kind, rng)
            rel = f"images/{split}/{i:05d}.png"
            if out is not None:
                image.save(out / rel, optimize=False)
            if split != "train":
                qas = [rng.choice(qas)]
            for j, qa in enumerate(qas):
                examples.append(Example(f"{split}-i{i:05d}-{j}", split, qa.task, "image", qa.question, qa.answer,
                                        rel, qa.meta))
        seen: set[str] = set()
        n, tries = 0, 0
        while n < cfg.texts[si] and tries < 200 * cfg.texts[si]:
            tries += 1
            task, q, a = text_instruction(rng)
            if _text_split(q) != split or (split != "train" and q in seen):
                continue
            seen.add(q)
            examples.append(Example(f"{split}-t{n:05d}", split, task, "text", q, a))
            n += 1
        splits[split] = examples
    return splits


def build(cfg: DataConfig, out: Path, features: bool = True, progress: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(cfg, out, progress)
    for split, examples in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for ex in examples:
                f.write(json.dumps(asdict(ex)) + "\n")
    manifest = {"seed": cfg.seed, "images": list(cfg.images), "texts": list(cfg.texts),
                "examples": {s: len(e) for s, e in splits.items()},
                "tasks": {s: dict(sorted(Counter(e.task for e in ex).items())) for s, ex in splits.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if features:
        from vision.model import EfficientNetEncoder

        encoder = EfficientNetEncoder(lm_dim=8).eval()  # its projector is unused here
        for split in SPLITS:
            cache_features(out, split, progress=progress, encoder=encoder)
    return manifest


def load_split(folder: Path, split: str) -> list[Example]:
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python -m vision.data build --out {folder}")
    with open(path) as f:
        return [Example(**json.loads(line)) for line in f]


# ---------------------------------------------------------------------- frozen image features
def features_path(folder: Path, split: str) -> Path:
    return Path(folder) / "features" / f"{split}.safetensors"


def cache_features(folder: Path, split: str, batch: int = 32, progress: bool = True, encoder: Any = None) -> Path:
    """EfficientNet-Lite0 features (the serving encoder's ``features``) of every image of ``split``, once."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from tqdm import tqdm

    path = features_path(folder, split)
    images = sorted({ex.image for ex in load_split(folder, split) if ex.image is not None})
    if path.is_file():
        return path
    if encoder is None:
        from vision.model import EfficientNetEncoder

        encoder = EfficientNetEncoder(lm_dim=8).eval()  # the projector is unused here
    chunks = []
    for i in tqdm(range(0, len(images), batch), desc=f"{split} features", disable=not progress, leave=False):
        ims = [Image.open(Path(folder) / p).convert("RGB") for p in images[i:i + batch]]
        chunks.append(encoder.features(ims).to(torch.float16))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": torch.cat(chunks).contiguous()}, str(tmp), metadata={"images": json.dumps(images)})
    tmp.rename(path)
    return path


def load_features(folder: Path, split: str) -> tuple[Any, dict[str, int]]:
    """(N, 49, 1280) float16 features and the row of each image path."""
    from safetensors import safe_open

    path = features_path(folder, split)
    if not path.is_file():
        cache_features(folder, split)
    with safe_open(str(path), "pt") as f:
        images = json.loads(f.metadata()["images"])
        feats = f.get_tensor("features")
    return feats, {p: i for i, p in enumerate(images)}


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vision.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="render images and questions, write the splits and cache the image features")
    b.add_argument("--quick", action="store_true", help="a few hundred examples (tests, --quick runs)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT} ({QUICK_OUT} with --quick)")
    b.add_argument("--no-features", action="store_true", help="skip the EfficientNet feature cache")
    args = p.parse_args(argv)
    cfg = DataConfig.quick(args.seed) if args.quick else DataConfig(seed=args.seed)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    manifest = build(cfg, out, features=not args.no_features)
    print(f"wrote {out}: " + ", ".join(f"{s} {n}" for s, n in manifest["examples"].items()) + " examples")
    for s, tasks in manifest["tasks"].items():
        print(f"  {s:5s} " + " ".join(f"{t}={n}" for t, n in tasks.items()))


if __name__ == "__main__":
    main()
