"""Training the default vision-language model: the projector (stage 1), then LaVIN's MM-Adapters (stage 2).

``python -m vision.train --stage projector`` — LLaVA's stage 1: EfficientNet-Lite0 and SmolLM2 frozen,
only the two-layer projector learns, from the synthetic image questions (vision/data.py), with
cross-entropy on the answer tokens (and the closing ``<|im_end|>``) alone. The frozen image features
are read from the data folder's cache, so a step runs the projector and SmolLM2 only.

``python -m vision.train --stage mma`` — the MM-Adapters and their router (vision/mma.py) in every
SmolLM2 layer, with the modality tokens, and the visual adapter on the image features, on a mix of
image questions and text-only instructions; both backbones and (by default) the stage-1 projector stay
frozen. The loss is the answer cross-entropy plus ``--route-loss`` times the auxiliary routing loss
(text → path 0, image → path 1; see vision/mma.py for why). ``--paths 1`` trains the paper's baseline,
one shared adapter without a router (and the same visual adapter).

Every run keeps ``OUT/last.pt`` (trainable weights, optimiser, step; ``--resume`` goes on from it),
logs to ``OUT/log.jsonl`` and writes the trained weights as safetensors (``OUT/projector.safetensors``
or ``OUT/mma.safetensors``; ``--export PATH`` copies them, e.g. into vision/weights/). Frozen weights run in
bfloat16 on the CPU by default (``--dtype``), the trained ones in float32 with AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.data import DEFAULT_OUT, QUICK_OUT, DataConfig, Example, build, load_features, load_split
from vision.mma import IMAGE, TEXT, MixtureOfModalityAdapters, MMAConfig, apply_mma, attach_visual
from vision.model import IMAGE_PLACEHOLDER, PROJECTOR_FILE

STAGES = ("projector", "mma")


@dataclass
class TrainConfig:
    stage: str = "projector"
    data: Path = DEFAULT_OUT
    out: Path = Path("runs/vision-projector")
    steps: int = 400
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    dtype: str = "bfloat16"  # of the frozen LM on the CPU: about 2x faster than float32 here
    text_fraction: float = 0.35  # share of text-only instructions in a stage-2 batch
    paths: int = 2  # stage 2: up-projections (1 = a single shared adapter, no router)
    temperature: float = 10.0
    route_loss: float = 1.0  # stage 2: weight of the auxiliary routing loss (0 = answer loss only)
    route_layer: int | None = 0  # stage 2: the router reads the modality token's state at this layer
    visual_rank: int = 128  # stage 2: the adapter on the image features (0 = none)
    gain_scaled: bool = True  # stage 2: adapters' outputs times the layernorm gain (vision/mma.py)
    projector: Path = PROJECTOR_FILE  # stage 2 starts from this projector
    train_projector: bool = False  # stage 2: let the projector learn too (LaVIN trains its visual adapter)
    eval_every: int = 100
    eval_examples: int = 64
    ckpt_every: int = 50
    minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    resume: bool = False  # go on from OUT/last.pt
    export: Path | None = None  # copy the trained weights here at the end

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps, batch and lr must be positive")
        if not 0.0 <= self.text_fraction < 1.0:
            raise ValueError("text_fraction must be in [0, 1)")
        if self.route_loss < 0 or self.visual_rank < 0:
            raise ValueError("route_loss and visual_rank must be >= 0")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be bfloat16 or float32")
        self.data, self.out, self.projector = Path(self.data), Path(self.out), Path(self.projector)
        if self.export is not None:
            self.export = Path(self.export)


# ---------------------------------------------------------------------- examples → token pieces
@dataclass
class Encoded:
    """One example as the serving prompt builds it, plus its target tokens."""

    pieces: list[list[int]]  # 1 piece (text) or 2 (before and after the image)
    target: list[int]  # the answer's tokens and the end-of-turn token
    feature_row: int  # row in the split's feature cache, -1 for text
    modality: int


def encode(examples: list[Example], tokenizer: Any, rows: dict[str, int] | None) -> list[Encoded]:
    end = "<|im_end|>" if tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id else tokenizer.eos_token
    out = []
    for ex in examples:
        text = tokenizer.apply_chat_template(ex.messages(IMAGE_PLACEHOLDER), tokenize=False, add_generation_prompt=True)
        parts = text.split(IMAGE_PLACEHOLDER)
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in parts]
        target = tokenizer(ex.answer + end, add_special_tokens=False)["input_ids"]
        row = rows[ex.image] if ex.image is not None and rows is not None else -1
        out.append(Encoded(pieces, target, row, IMAGE if ex.image is not None else TEXT))
    return out


class Batcher:
    """Packs encoded examples into a right-padded batch of input embeddings with target positions.

    With a ``prefix`` (the frozen LM's keys and values of the tokens every prompt starts with — the chat
    template's system turn), those tokens are not recomputed: stage 1 saves a quarter of its work.
    """

    def __init__(self, embed: nn.Embedding, projector: nn.Module, features: Tensor | None, dtype: torch.dtype,
                 prefix: Prefix | None = None) -> None:
        self.embed, self.projector, self.features, self.dtype, self.prefix = embed, projector, features, dtype, prefix

    def __call__(self, items: list[Encoded]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """→ embeds (B, S, d), attention mask (B, P + S), target rows (N,), target cols (N,), targets (N,)."""
        dev = self.embed.weight.device
        skip = len(self.prefix.ids) if self.prefix is not None else 0
        img = None
        rows = [it.feature_row for it in items if it.feature_row >= 0]
        if rows:
            feats = self.features[torch.tensor(rows)].to(dev, torch.float32)  # (n, 49, 1280)
            img = self.projector(feats).to(self.dtype)  # (n, 49, d)
        seqs, tr, tc, tt = [], [], [], []
        k = 0
        for b, it in enumerate(items):
            chunks = []
            for i, ids in enumerate(it.pieces):
                if i == 0 and skip:
                    assert ids[:skip] == self.prefix.ids, "every prompt must start with the cached prefix"
                    ids = ids[skip:]
                if ids:
                    chunks.append(self.embed(torch.tensor(ids, device=dev)).to(self.dtype))
                if i == 0 and it.feature_row >= 0:
                    chunks.append(img[k])
                    k += 1
            start = sum(c.shape[0] for c in chunks)
            chunks.append(self.embed(torch.tensor(it.target, device=dev)).to(self.dtype))
            seq = torch.cat(chunks)
            seqs.append(seq)
            n = len(it.target)
            tr += [b] * n
            tc += list(range(start - 1, start - 1 + n))  # the row predicting each target token
            tt += it.target
        S = max(s.shape[0] for s in seqs)
        x = torch.zeros(len(seqs), S, seqs[0].shape[1], dtype=self.dtype, device=dev)
        mask = torch.zeros(len(seqs), skip + S, dtype=torch.long, device=dev)
        mask[:, :skip] = 1
        for b, s in enumerate(seqs):
            x[b, :s.shape[0]] = s
            mask[b, skip:skip + s.shape[0]] = 1
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
        return x, mask, as_long(tr), as_long(tc), as_long(tt)


@dataclass
class Prefix:
    """The frozen LM's keys and values (per layer, (1, Hkv, P, D)) of the ``ids`` every prompt starts with."""

    ids: list[int]
    kv: list[tuple[Tensor, Tensor]]

    @staticmethod
    def compute(lm: nn.Module, ids: list[int], dtype: torch.dtype) -> Prefix:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x = lm.model.embed_tokens(torch.tensor([ids])).to(dtype)
            cache = lm.model(inputs_embeds=x, use_cache=True).past_key_values
        return Prefix(list(ids), [(layer.keys, layer.values) for layer in cache.layers])

    def cache(self, config: Any, batch: int) -> Any:
        from transformers import DynamicCache

        c = DynamicCache(config=config)
        for i, (k, v) in enumerate(self.kv):
            c.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return c


def common_prefix(items: list[Encoded]) -> list[int]:
    """The tokens every example's prompt starts with (stopping before the shortest first piece ends)."""
    first = [it.pieces[0] for it in items]
    n = min(len(f) for f in first) - 1
    ref = first[0]
    for i in range(max(0, n)):
        if any(f[i] != ref[i] for f in first):
            return ref[:i]
    return ref[:max(0, n)]


def answer_loss(lm: nn.Module, items: list[Encoded], batcher: Batcher, mma: MixtureOfModalityAdapters | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over the answer tokens; also per-token hits and row ids (teacher-forced argmax)."""
    x, mask, rows, cols, targets = batcher(items)
    if mma is not None and mma.cfg.routed:
        mma.set_batch(torch.tensor([it.modality for it in items], device=x.device))
    cache = batcher.prefix.cache(lm.config, x.shape[0]) if batcher.prefix is not None else None
    h = lm.model(inputs_embeds=x, attention_mask=mask, cache=cache).last_hidden_state  # (B, S, d)
    logits = lm.lm_head(h[rows, cols]).float()  # (N, vocab): only the rows that predict answer tokens
    loss = F.cross_entropy(logits, targets)
    return loss, logits.argmax(-1) == targets, rows


def batch_loss(lm: nn.Module, items: list[Encoded], batcher: Batcher, mma: MixtureOfModalityAdapters | None) -> Tensor:
    """Mean cross-entropy over every answer token of ``items``, one forward per modality (text-only prompts
    are half as long as image ones: padding them to the image length would waste a fifth of a step)."""
    total, n = 0.0, 0
    for m in (IMAGE, TEXT):
        group = [it for it in items if it.modality == m]
        if group:
            k = sum(len(it.target) for it in group)
            total = total + answer_loss(lm, group, batcher, mma)[0] * k
            n += k
    return total / n


def exact_match(hits: Tensor, rows: Tensor, batch: int) -> Tensor:
    """(B,) whether every answer token of each example is the argmax: greedy decoding would produce it."""
    wrong = torch.zeros(batch, dtype=torch.long, device=hits.device).index_add_(0, rows, (~hits).long())
    return wrong == 0


# ---------------------------------------------------------------------- the run
def fit_router(mma: MixtureOfModalityAdapters, steps: int = 100, lr: float = 1e-2) -> float:
    """Before the adapters learn: fit the routers to the auxiliary routing loss alone (text → path 0,
    image → path 1). Without it the routing starts at 0.5/0.5, so in the first steps both up-projections
    take the text instructions' gradients (much larger than the image questions', whose loss the stage-1
    projector already made small) and the image path starts out as a text adapter: the first run lost a
    third of its train-image exact match by step 50, with the image path alone (hard routing) as bad.
    It needs no LM forward (the router reads the modality token's state at ``route_layer``): a second or
    two. Returns the mean weight of each modality's own path after fitting."""
    params = [p for a in mma.adapters for p in a.router.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = mma.routing_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mma.zero_grad(set_to_none=True)
    with torch.no_grad():
        w = mma.route(torch.arange(mma.cfg.modalities, device=mma.modality.device))
    return float(w[:, [TEXT, IMAGE], [TEXT, IMAGE]].mean())


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine to a tenth. With a time limit, progress is whichever of steps and
    minutes is further along, so a run cut short by a busy CPU still ends at the low rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.minutes > 0:
        p = max(p, seconds / (60 * cfg.minutes))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(idx)
    return idx


class Sampler:
    """Deterministic batches from a seed and a step (so a resumed run sees what the first run would have)."""

    def __init__(self, images: list[Encoded], texts: list[Encoded], cfg: TrainConfig) -> None:
        self.images, self.texts, self.cfg = images, texts, cfg
        self.n_text = round(cfg.batch * cfg.text_fraction) if (cfg.stage == "mma" and texts) else 0
        self.n_image = cfg.batch - self.n_text

    def _take(self, pool: list[Encoded], per_step: int, step: int, tag: int) -> list[Encoded]:
        out = []
        for j in range(per_step):
            k = step * per_step + j
            epoch, pos = divmod(k, len(pool))
            out.append(pool[_order(len(pool), self.cfg.seed * 1000 + tag, epoch)[pos]])
        return out

    def batch(self, step: int) -> list[Encoded]:
        return self._take(self.images, self.n_image, step, 1) + (
            self._take(self.texts, self.n_text, step, 2) if self.n_text else [])


def run(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from lm.loading import load_causal_lm
    from vision.model import EfficientNetEncoder

    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    lm, tokenizer = load_causal_lm("smollm2", "cpu", torch.float32)
    lm.requires_grad_(False)
    lm.to(dtype)
    encoder = EfficientNetEncoder(lm.config.hidden_size)  # its seeded projector init is the serving default's
    projector = encoder.projector
    mma = None
    if cfg.stage == "projector":
        params = list(projector.parameters())
    else:
        if not cfg.projector.is_file():
            raise FileNotFoundError(f"{cfg.projector} not found: train the projector first (--stage projector)")
        encoder.load_projector(cfg.projector)
        projector.requires_grad_(cfg.train_projector)
        mma = apply_mma(lm.model.layers, MMAConfig(paths=cfg.paths, temperature=cfg.temperature,
                                                   route_layer=cfg.route_layer, visual_rank=cfg.visual_rank,
                                                   gain_scaled=cfg.gain_scaled,
                                                   feature_dim=encoder.feature_dim),
                        embed_std=float(lm.model.embed_tokens.weight.float().std()))
        attach_visual(mma, projector)
        params = list(mma.parameters()) + (list(projector.parameters()) if cfg.train_projector else [])
    n_params = sum(p.numel() for p in params)

    splits = {}
    for split in ("train", "val"):
        examples = load_split(cfg.data, split)
        feats, rows = load_features(cfg.data, split)
        enc = encode(examples, tokenizer, rows)
        splits[split] = (enc, feats)
    train_enc, train_feats = splits["train"]
    images = [e for e in train_enc if e.modality == IMAGE]
    texts = [e for e in train_enc if e.modality == TEXT]
    sampler = Sampler(images, texts, cfg)
    val_enc, val_feats = splits["val"]
    prefix = None
    if mma is None:  # stage 1: the LM is frozen before the image, so its keys and values there are constants
        prefix = Prefix.compute(lm, common_prefix(images + [e for e in val_enc if e.modality == IMAGE]), dtype)
    batcher = Batcher(lm.model.embed_tokens, projector, train_feats, dtype, prefix)
    val_batcher = Batcher(lm.model.embed_tokens, projector, val_feats, dtype, prefix)
    val_items = [e for e in val_enc if e.modality == IMAGE][:cfg.eval_examples]
    if cfg.stage == "mma":
        val_items += [e for e in val_enc if e.modality == TEXT][:cfg.eval_examples // 2]

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step, t_used = 0, 0.0
    ckpt = cfg.out / "last.pt"
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        _trainable(cfg, projector, mma).load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        step, t_used = state["step"], state.get("seconds", 0.0)
    log = open(cfg.out / "log.jsonl", "a")

    def save() -> None:
        torch.save({"weights": _trainable(cfg, projector, mma).state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "seconds": t_used + time.monotonic() - t0, "config": _jsonable(asdict(cfg))},
                   cfg.out / "last.tmp")
        (cfg.out / "last.tmp").rename(ckpt)

    def evaluate() -> dict[str, float]:
        projector.eval()
        if mma is not None:
            mma.eval()
        losses, hits_by = [], {IMAGE: [], TEXT: []}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for i in range(0, len(val_items), cfg.batch):
                items = val_items[i:i + cfg.batch]
                loss, hits, rows = answer_loss(lm, items, val_batcher, mma)
                losses.append(float(loss))
                for it, ok in zip(items, exact_match(hits, rows, len(items)).tolist(), strict=True):
                    hits_by[it.modality].append(ok)
        projector.train(cfg.stage == "projector" or cfg.train_projector)
        if mma is not None:
            mma.train()
        out = {"val_loss": sum(losses) / len(losses)}
        if mma is not None and mma.cfg.routed and mma.cfg.paths >= mma.cfg.modalities:
            with torch.no_grad():  # mean weight of each modality's own path (text → 0, image → 1)
                w = mma.route(torch.arange(mma.cfg.modalities))
            out["route_own_weight"] = float(w[:, [TEXT, IMAGE], [TEXT, IMAGE]].mean())
        for m, name in ((IMAGE, "val_image_match"), (TEXT, "val_text_match")):
            if hits_by[m]:
                out[name] = sum(hits_by[m]) / len(hits_by[m])
        return out

    if mma is not None and mma.cfg.routed and cfg.route_loss > 0 and step == 0:
        own = fit_router(mma)
        print(f"routers fitted first: mean weight of each modality's own path {own:.3f}")
    print(f"stage {cfg.stage}: {n_params:,} trainable parameters; {len(images)} image / {len(texts)} text train "
          f"examples; {cfg.steps} steps of {cfg.batch} from step {step}")
    t0 = time.monotonic()
    projector.train(cfg.stage == "projector" or cfg.train_projector)
    if mma is not None:
        mma.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.stage}", disable=not progress)
    ema = None
    metrics: dict[str, Any] = {}
    if step == 0:
        metrics = {"step": 0, **evaluate()}
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        bar.write(json.dumps(metrics))
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, t_used + time.monotonic() - t0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = batch_loss(lm, sampler.batch(step), batcher, mma)
            if mma is not None and mma.cfg.routed and cfg.route_loss > 0:
                loss = loss + cfg.route_loss * mma.routing_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        timed_out = cfg.minutes > 0 and (t_used + time.monotonic() - t0) / 60 >= cfg.minutes
        if step % cfg.eval_every == 0 or step == cfg.steps or timed_out:
            metrics = {"step": step, "train_loss": ema, **evaluate(), "seconds": round(t_used + time.monotonic() - t0)}
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.write(json.dumps(metrics))
        if step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out:
            save()
        if timed_out:
            bar.write(f"stopping at step {step}: the {cfg.minutes} minute limit")
            break
    bar.close()
    log.close()
    path = export(cfg, projector, mma)
    if cfg.export is not None:
        cfg.export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, cfg.export)
        print(f"exported {path} → {cfg.export}")
    return {"step": step, "seconds": round(t_used + time.monotonic() - t0), "trainable_parameters": n_params,
            "weights": str(path), **metrics}


def _trainable(cfg: TrainConfig, projector: nn.Module, mma: nn.Module | None) -> nn.Module:
    if mma is None:
        return projector
    return nn.ModuleDict({"mma": mma, "projector": projector}) if cfg.train_projector else mma


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def export(cfg: TrainConfig, projector: nn.Module, mma: MixtureOfModalityAdapters | None) -> Path:
    """The trained weights as safetensors: the projector in float16, the MM-Adapters in float32."""
    from safetensors.torch import save_file

    if mma is None:
        path = cfg.out / "projector.safetensors"
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in projector.state_dict().items()}, str(path),
                  metadata={"trained_by": "python -m vision.train --stage projector", "config": json.dumps(_jsonable(asdict(cfg)))})
        return path
    path = cfg.out / "mma.safetensors"
    mma.save(path)
    if cfg.train_projector:
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in projector.state_dict().items()},
                  str(cfg.out / "projector.safetensors"))
    return path


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vision.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=STAGES, default="projector")
    p.add_argument("--quick", action="store_true", help="tiny data (built if missing) and a few steps")
    p.add_argument("--data", type=Path, default=None, help=f"data folder (default {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/vision-STAGE[-quick])")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (both stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the frozen LM's dtype")
    p.add_argument("--paths", type=int, default=2, help="stage mma: 2 = router over two up-projections, 1 = one shared adapter")
    p.add_argument("--temperature", type=float, default=10.0,
                   help="stage mma: the router's softmax temperature (the paper: 10 for 7B, 5 for 13B; see vision/mma.py)")
    p.add_argument("--route-loss", type=float, default=1.0, help="stage mma: weight of the auxiliary routing loss")
    p.add_argument("--route-layer", type=int, default=0,
                   help="stage mma: the router reads the modality token's state at this layer (-1: each layer's own)")
    p.add_argument("--visual-rank", type=int, default=128, help="stage mma: the adapter on the image features (0 = none)")
    p.add_argument("--gain-scaled", action=argparse.BooleanOptionalAction, default=True,
                   help="stage mma: scale the adapters' outputs by each layer's norm gain (see vision/mma.py)")
    p.add_argument("--text-fraction", type=float, default=0.35)
    p.add_argument("--projector", type=Path, default=PROJECTOR_FILE, help="stage mma: the stage-1 projector")
    p.add_argument("--train-projector", action="store_true", help="stage mma: train the projector as well")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-time limit (saves and exports when reached)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="go on from OUT/last.pt")
    p.add_argument("--export", type=Path, default=None, help="copy the trained weights here (e.g. vision/weights/)")
    args = p.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    data = args.data or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if not (data / "train.jsonl").is_file():
        if not args.quick:
            raise SystemExit(f"{data}/train.jsonl not found: run python -m vision.data build --out {data}")
        build(DataConfig.quick(), data)
    steps = args.steps or (30 if args.quick else 400)
    cfg = TrainConfig(
        stage=args.stage, data=data, out=args.out or Path(f"runs/vision-{args.stage}{'-quick' if args.quick else ''}"),
        steps=steps, batch=args.batch, lr=args.lr or 1e-3, seed=args.seed,
        dtype=args.dtype, text_fraction=args.text_fraction, paths=args.paths, temperature=args.temperature,
        route_loss=args.route_loss, route_layer=None if args.route_layer < 0 else args.route_layer,
        visual_rank=args.visual_rank, gain_scaled=args.gain_scaled, projector=args.projector,
        train_projector=args.train_projector, eval_every=args.eval_every or (10 if args.quick else 100),
        eval_examples=16 if args.quick else 64, minutes=args.minutes, resume=args.resume, export=args.export)
    result = run(cfg)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
