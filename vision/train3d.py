"""Training the 3D LMM on the synthetic scenes (vision/scene3d.py), in two stages, on the CPU.

1. ``encoder`` (minutes, no LM forward): the point-patch encoder learns what each patch is, with small
   per-patch heads predicting the colour, shape and size of the object under the patch centre and whether
   that object stands on another one (labels come free with the synthetic scenes); and the projector learns
   to put each patch near SmolLM2's own input embeddings of the words "<colour> <shape>" of its object
   (mean of the words' token embeddings, MSE over their variance). This is what makes stage 2 affordable
   on a CPU: SmolLM2 first sees spatial tokens that already read like words it knows.
2. ``lm``: SmolLM2-135M-Instruct frozen (bfloat16 on the CPU), LoRA on its q/v projections, the projector and
   (at a lower rate) the encoder learn from the question answering, with cross-entropy on the answer tokens
   and the closing ``<|im_end|>`` only; logits are computed at those positions alone.

``--turns N`` puts N questions about one scene in one training sequence, as follow-up turns of one chat (LLaVA's
multi-turn samples): one LM forward teaches N answers, and the first turn is exactly the prompt served.
``--gate-policy FILE`` (gate-aware fine-tuning, vision/gate_aware.py): a share (``--gate-share``) of the training
sequences is seen through that AdaToken-3D policy, pruned as serving prunes it, so the model learns to answer from
the surviving spatial tokens; validation then scores both ways and keeps the checkpoint with the best mean.
``python -m vision.train3d [--quick]`` runs both; ``--resume`` continues stage 2 from ``OUT/last.pt``, ``--init DIR``
from exported weights (e.g. the shipped ``vision/weights3d``, to fine-tune it further).
``OUT/last.pt`` holds the trainable weights after each stage (``--skip-encoder`` reuses stage 1 from it),
``OUT/log.jsonl`` the losses and validation accuracies, ``OUT/weights/`` the exported files the model loads
(``spatial.safetensors``, ``lora.safetensors``) of the best validation step and ``OUT/weights-last/`` the last
step's; ``--export DIR`` copies the best (e.g. to vision/weights3d/ once held-out accuracy is clearly above the
majority-answer baseline). Validation accuracy here is teacher-forced (every answer token is the argmax) on 96
questions, a noisy choice: compare ``weights/`` and ``weights-last/`` on generated answers before shipping
(``python -m vision.gate3d select --weights DIR``; ``python -m bench.gate3d`` measures the test split).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vision.encoder3d import Encoder3DConfig, SpatialTokenizer
from vision.gate3d import GatePolicy
from vision.model3d import POINTS_PLACEHOLDER, question_messages, save_lora, save_spatial
from vision.scene3d import COLOURS, DEFAULT_OUT, QUICK_OUT, SHAPES, Example, load_split, majority_baseline


@dataclass
class Train3DConfig:
    data: Path = DEFAULT_OUT
    out: Path = Path("runs/train3d")
    encoder_steps: int = 400
    encoder_batch: int = 16
    lm_steps: int = 200
    batch: int = 8
    lr: float = 1e-3
    encoder_lr: float = 2e-4  # stage 2: the pretrained encoder moves slowly
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    dtype: str = "bfloat16"  # the frozen LM on the CPU
    max_minutes: float = 25.0  # stage 2 stops here even if steps remain (the whole run stays under 30)
    turns: int = 3  # questions about one scene per training sequence (follow-up turns of one chat)
    eval_every: int = 50
    eval_examples: int = 96
    seed: int = 0
    n_patches: int = 256  # spatial tokens per cloud (the shipped model)
    patch_size: int = 16
    gate_policy: Path | None = None  # gate-aware fine-tuning: sequences seen through this policy (vision/gate_aware.py)
    gate_share: float = 0.5  # the share of training sequences run through the gate

    def __post_init__(self) -> None:
        if self.batch < 1 or self.turns < 1 or self.lm_steps < 0 or self.encoder_steps < 0:
            raise ValueError("batch >= 1, turns >= 1 and non-negative step counts are required")
        if not 0.0 <= self.gate_share <= 1.0:
            raise ValueError(f"gate_share must be in [0, 1], got {self.gate_share}")


def normalise_scenes(points: np.ndarray) -> np.ndarray:
    """Every scene centred on its bounding box and scaled to unit radius (vision.points.normalise, batched)."""
    xyz = points[..., :3]
    centre = (xyz.min(1, keepdims=True) + xyz.max(1, keepdims=True)) / 2
    scale = np.linalg.norm(xyz - centre, axis=-1).max(1)[:, None, None]
    out = points.copy()
    out[..., :3] = (xyz - centre) / np.maximum(scale, 1e-9)
    return out


# ---------------------------------------------------------------------------------------------- stage 1
class PatchHeads(nn.Module):
    """Per-patch auxiliary classifiers (training only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colour, self.shape = nn.Linear(dim, len(COLOURS)), nn.Linear(dim, len(SHAPES))
        self.size, self.stacked = nn.Linear(dim, 2), nn.Linear(dim, 3)  # stacked: ground / carries one / on one


def patch_targets(scenes: list[dict], labels: np.ndarray) -> np.ndarray:
    """(n_scenes, P, 4) per-point targets: colour, shape, size, stacked-state of the point's object."""
    colours, shapes = list(COLOURS), list(SHAPES)
    out = np.zeros((*labels.shape, 4), np.int64)
    for i, s in enumerate(scenes):
        objs = s["objects"]
        carries = {o["on"] for o in objs if o["on"] >= 0}
        table = np.array([[colours.index(o["colour"]), shapes.index(o["shape"]), int(o["size"] == "large"),
                           2 if o["on"] >= 0 else int(j in carries)] for j, o in enumerate(objs)])
        out[i] = table[labels[i]]
    return out


def word_targets(tokenizer, embed: nn.Embedding) -> Tensor:
    """(n_colours, n_shapes, d): the mean input embedding of the tokens of "<colour> <shape>", times sqrt(2)."""
    out = torch.zeros(len(COLOURS), len(SHAPES), embed.weight.shape[1])
    with torch.no_grad():
        for i, c in enumerate(COLOURS):
            for j, s in enumerate(SHAPES):
                ids = tokenizer(f" {c} {s}", add_special_tokens=False)["input_ids"]
                out[i, j] = embed(torch.tensor(ids)).float().mean(0) * math.sqrt(2)
    return out


def train_encoder(spatial: SpatialTokenizer, points: Tensor, targets: Tensor, cfg: Train3DConfig, log,
                  words: Tensor | None = None) -> None:
    enc = spatial.encoder
    heads = PatchHeads(enc.cfg.dim)
    trained = [*enc.parameters(), *heads.parameters()] + ([*spatial.projector.parameters()] if words is not None else [])
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.01)
    word_var = words.var() if words is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.encoder_steps), desc="stage 1 encoder", unit="step")
    for step in bar:
        idx = torch.randint(0, points.shape[0], (cfg.encoder_batch,), generator=gen)
        x = points[idx]
        x = x + torch.randn(x.shape, generator=gen) * torch.tensor([0.005] * 3 + [0.0] * 3)
        patches = enc.patchify(x)
        centre_idx = (x[..., :3].unsqueeze(1) - patches.centres.unsqueeze(2)).square().sum(-1).argmin(-1)  # (B, M)
        t = torch.gather(targets[idx], 1, centre_idx.unsqueeze(-1).expand(-1, -1, 4))  # (B, M, 4)
        f = enc(patches)
        loss = sum(F.cross_entropy(head(f).flatten(0, 1), t[..., j].flatten())
                   for j, head in enumerate((heads.colour, heads.shape, heads.size, heads.stacked)))
        if words is not None:  # the projector: each patch near the embedding of its object's words
            loss = loss + F.mse_loss(spatial.projector(f), words[t[..., 0], t[..., 1]]) / word_var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.encoder_steps)))
        opt.step()
        if step % 20 == 0 or step == cfg.encoder_steps - 1:
            with torch.no_grad():
                acc = [(head(f).argmax(-1) == t[..., j]).float().mean().item()
                       for j, head in enumerate((heads.colour, heads.shape, heads.size, heads.stacked))]
            bar.set_postfix(loss=f"{loss.item():.3f}", shape_acc=f"{acc[1]:.2f}")
            log({"stage": "encoder", "step": step, "loss": loss.item(), "patch_acc": acc})


# ---------------------------------------------------------------------------------------------- stage 2
@dataclass
class Encoded:
    """One training sequence: the text before the cloud, then question/answer turns about that cloud."""

    prefix: list[int]  # text before the cloud
    turns: list[tuple[list[int], list[int]]]  # (the text after the cloud or the last answer, the answer + <|im_end|>)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(q) + len(a) for q, a in self.turns)


def encode_conversation(tokenizer, examples: list[Example]) -> Encoded:
    """Questions about one scene as one chat: the cloud with the first question, the others as follow-up turns.

    As LLaVA trains on several turns per image: one forward of the LM teaches every answer, and the first turn is
    exactly the single-question prompt served at inference."""
    if not examples or len({e.scene for e in examples}) != 1:
        raise ValueError("a conversation needs one or more questions about the same scene")
    messages = question_messages(examples[0].question)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    render = lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    said, prefix, turns = "", None, []
    for i, e in enumerate(examples):
        if i:
            messages = [*messages, {"role": "user", "content": e.question}]
        asked = render(messages, True)
        messages = [*messages, {"role": "assistant", "content": e.answer}]
        if not asked.startswith(said):
            raise ValueError("the chat template does not render turns as prefixes of each other")
        question = asked[len(said):]
        if prefix is None:
            pre, question = question.split(POINTS_PLACEHOLDER)
            prefix = ids(pre)
        turns.append((ids(question), ids(e.answer + "<|im_end|>")))
        said = asked + e.answer + "<|im_end|>"
    return Encoded(prefix, turns)


def encode_examples(tokenizer, examples: list[Example]) -> list[Encoded]:
    """One single-question sequence per example (validation: the prompt as served)."""
    return [encode_conversation(tokenizer, [e]) for e in examples]


def lm_batch(lm, spatial: SpatialTokenizer, clouds: Tensor, encs: list[Encoded], dtype: torch.dtype
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded inputs_embeds (B, T, d), attention mask, the rows predicting answer tokens, the targets."""
    embed = lm.get_input_embeddings()
    sp = spatial(clouds).to(dtype)  # (B, M, d)
    seqs, pred_rows, targets = [], [], []
    for b, e in enumerate(encs):
        text = [tok for q, a in e.turns for tok in q + a][:-1]  # the last <|im_end|> is only a target
        seqs.append(torch.cat([embed(torch.tensor(e.prefix)), sp[b], embed(torch.tensor(text))]))
        pos = len(e.prefix) + sp.shape[1]
        for q, a in e.turns:
            pos += len(q)
            pred_rows += [(b, pos - 1 + j) for j in range(len(a))]  # the row whose next input is a[j]
            targets += a
            pos += len(a)
    T = max(s.shape[0] for s in seqs)
    d = seqs[0].shape[1]
    x = torch.zeros(len(seqs), T, d, dtype=dtype)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, :s.shape[0]], mask[b, :s.shape[0]] = s, 1
    return x, mask, torch.tensor(pred_rows), torch.tensor(targets)


def lm_loss(lm, x: Tensor, mask: Tensor, rows: Tensor, targets: Tensor, gate=None) -> tuple[Tensor, Tensor]:
    """Cross-entropy on the answer rows; with ``gate`` (a selected ``GateMasks``, :func:`gate_masks`), the
    sequences it draws are seen through the AdaToken-3D gate."""
    from contextlib import nullcontext

    from vision.gate_aware import gate_hooks

    with gate_hooks(lm, gate, x.shape[1], x.dtype) if gate is not None else nullcontext():
        h = lm.base_model.model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state  # (B, T, d)
    logits = lm.base_model.model.lm_head(h[rows[:, 0], rows[:, 1]]).float()  # (n_answer_tokens, V)
    return F.cross_entropy(logits, targets), logits.argmax(-1) == targets


def gate_masks(lm, policy: GatePolicy, encs: list[Encoded], x: Tensor, mask: Tensor, n_spatial: int, gated: Tensor):
    """The gate's survivors for the ``gated`` sequences of an ``lm_batch`` (vision/gate_aware.py), chosen by a
    no-gradient pass over the prompts; ``None`` when no sequence is drawn."""
    from vision.gate_aware import GateBatch, GateMasks, decoder_layers

    if not bool(gated.any()):
        return None
    if len({len(e.prefix) for e in encs}) != 1:
        raise ValueError("gate-aware training needs one prefix length across the batch")
    s = len(encs[0].prefix)
    last = torch.tensor([s + n_spatial + len(e.turns[0][0]) - 1 for e in encs], device=x.device)
    masks = GateMasks(policy, GateBatch(mask.sum(1), (s, s + n_spatial), last, gated), len(decoder_layers(lm)))
    masks.select(lm, x)
    return masks


def teacher_forced_accuracy(lm, spatial, clouds: Tensor, encs: list[Encoded], idx: list[int], scene_of: list[int],
                            dtype: torch.dtype, batch: int, gate: GatePolicy | None = None) -> float:
    """Share of questions whose every answer token is the argmax; ``gate``: a policy every sequence is seen
    through (the served gated model)."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(idx), batch):
            chunk = idx[i:i + batch]
            ce = [encs[j] for j in chunk]
            x, mask, rows, tgt = lm_batch(lm, spatial, clouds[[scene_of[j] for j in chunk]], ce, dtype)
            masks = None if gate is None else gate_masks(lm, gate, ce, x, mask, spatial.tokens_per_cloud,
                                                         torch.ones(len(chunk), dtype=torch.bool))
            _, ok = lm_loss(lm, x, mask, rows, tgt, masks)
            owner = rows[:, 0]
            correct += sum(bool(ok[owner == b].all()) for b in range(len(chunk)))
    return correct / max(1, len(idx))


def lora_weights(lm) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for name, mod in lm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (mod.lora_A["default"].weight.detach().float(), mod.lora_B["default"].weight.detach().float())
    return out


# ---------------------------------------------------------------------------------------------- driver
def schedule(step: int, steps: int, minutes: float, max_minutes: float, warmup: int = 10) -> float:
    """Warm-up, then a cosine to zero over the run's steps or its time budget, whichever ends first, so a run cut
    by ``max_minutes`` still ends at a low learning rate."""
    progress = min(1.0, max(step / max(1, steps), minutes / max_minutes if max_minutes > 0 else 0.0))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def scene_batches(examples: list[Example], batch: int, turns: int, seed: int):
    """Endless batches of ``batch`` scenes, each with up to ``turns`` of its questions in a random order; every
    scene once per epoch."""
    by_scene: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_scene.setdefault(e.scene, []).append(i)
    scenes = sorted(by_scene)
    rng = random.Random(seed)
    while True:
        rng.shuffle(scenes)
        for k in range(0, len(scenes) - batch + 1, batch):
            yield [rng.sample(by_scene[s], min(turns, len(by_scene[s]))) for s in scenes[k:k + batch]]


def init_state(folder: Path, cfg: Train3DConfig) -> dict:
    """A stage-2 starting point from exported weights (``spatial.safetensors`` + ``lora.safetensors``), checked
    against the run's config so that a mismatch fails here and not as a shape error deep in training."""
    from vision.model3d import load_lora, load_spatial

    files = [folder / "spatial.safetensors", folder / "lora.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--init needs exported weights; missing: {', '.join(missing)}")
    spatial = load_spatial(files[0])
    if (spatial.cfg.n_patches, spatial.cfg.patch_size) != (cfg.n_patches, cfg.patch_size):
        raise ValueError(f"{files[0]} has {spatial.cfg.n_patches} patches of {spatial.cfg.patch_size} points; "
                         f"the run asks for {cfg.n_patches} of {cfg.patch_size} (--patches, --patch-size)")
    lora, rank, alpha = load_lora(files[1])
    if (rank, alpha) != (cfg.lora_rank, cfg.lora_alpha):
        raise ValueError(f"{files[1]} is rank {rank}, alpha {alpha}; the run trains rank {cfg.lora_rank}, "
                         f"alpha {cfg.lora_alpha}")
    return {"spatial": spatial.state_dict(), "lora": lora, "stage": "lm"}


def run(cfg: Train3DConfig, skip_encoder: bool = False, resume: bool = False, init: Path | None = None) -> dict:
    from peft import LoraConfig, get_peft_model

    from lm.loading import load_causal_lm

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    logf = open(cfg.out / "log.jsonl", "a")

    def log(rec: dict) -> None:
        logf.write(json.dumps({"t": round(time.time(), 1), **rec}) + "\n")
        logf.flush()

    t0 = time.time()
    pts, labels, scenes, train = load_split(cfg.data, "train")
    vpts, _, _, val = load_split(cfg.data, "val")
    clouds, vclouds = torch.from_numpy(normalise_scenes(pts)), torch.from_numpy(normalise_scenes(vpts))
    dtype = getattr(torch, cfg.dtype)
    hf_lm, tok = load_causal_lm("smollm2", "cpu", dtype)
    ecfg = Encoder3DConfig(n_points=pts.shape[1], n_patches=cfg.n_patches, patch_size=cfg.patch_size,
                           lm_dim=hf_lm.config.hidden_size)
    spatial = SpatialTokenizer(ecfg)
    ckpt = cfg.out / "last.pt"
    if init is not None and (skip_encoder or resume):
        raise ValueError("--init starts from exported weights: it does not combine with --resume or --skip-encoder")
    state = torch.load(ckpt) if (skip_encoder or resume) and ckpt.is_file() else None
    if (skip_encoder or resume) and state is None:
        raise FileNotFoundError(f"{ckpt} does not exist: nothing to reuse or resume")
    if init is not None:
        state, resume = init_state(init, cfg), True
    if state is not None:
        spatial.load_state_dict(state["spatial"])
    else:
        train_encoder(spatial, clouds, torch.from_numpy(patch_targets(scenes, labels)), cfg, log,
                      word_targets(tok, hf_lm.get_input_embeddings()))
        torch.save({"spatial": spatial.state_dict(), "stage": "encoder"}, ckpt)
    t_enc = time.time() - t0

    hf_lm.requires_grad_(False)
    lm = get_peft_model(hf_lm, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                          target_modules=list(cfg.lora_targets)))
    if resume:
        if "lora" not in state:
            raise ValueError(f"{ckpt} holds stage 1 only: use --skip-encoder, not --resume")
        load_lora_weights(lm, state["lora"])
    venc = encode_examples(tok, val)
    val_idx = list(range(min(cfg.eval_examples, len(val))))
    vscene = [e.scene for e in val]
    params = [{"params": [p for p in lm.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": spatial.projector.parameters(), "lr": cfg.lr},
              {"params": spatial.encoder.parameters(), "lr": cfg.encoder_lr}]
    for g in params:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    batches = scene_batches(train, cfg.batch, cfg.turns, cfg.seed)
    gate = GatePolicy.load(cfg.gate_policy) if cfg.gate_policy is not None else None
    draw = torch.Generator().manual_seed(cfg.seed + 1)
    best = {"val_acc": -1.0}
    history = []
    t_lm = time.time()
    bar = tqdm(range(cfg.lm_steps), desc="stage 2 LM", unit="step")
    step = 0
    for step in bar:
        chats = next(batches)
        encs = [encode_conversation(tok, [train[j] for j in chat]) for chat in chats]
        x, mask, rows, tgt = lm_batch(lm, spatial, clouds[[train[chat[0]].scene for chat in chats]], encs, dtype)
        masks = None
        if gate is not None:
            gated = torch.rand(len(encs), generator=draw) < cfg.gate_share
            masks = gate_masks(lm, gate, encs, x, mask, cfg.n_patches, gated)
        loss, _ = lm_loss(lm, x, mask, rows, tgt, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        warm = schedule(step, cfg.lm_steps, (time.time() - t_lm) / 60, cfg.max_minutes)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warm
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log({"stage": "lm", "step": step, "loss": loss.item()})
        out_of_time = (time.time() - t_lm) / 60 > cfg.max_minutes
        if (step + 1) % cfg.eval_every == 0 or step == cfg.lm_steps - 1 or out_of_time:
            spatial.eval()
            acc = teacher_forced_accuracy(lm, spatial, vclouds, venc, val_idx, vscene, dtype, cfg.batch)
            rec = {"step": step + 1, "val_acc": acc}
            if gate is not None:  # the served model is gated: the best checkpoint is the best mean of the two
                rec["val_acc_ungated"] = acc
                rec["val_acc_gated"] = teacher_forced_accuracy(lm, spatial, vclouds, venc, val_idx, vscene, dtype,
                                                               cfg.batch, gate)
                rec["val_acc"] = acc = (acc + rec["val_acc_gated"]) / 2
            spatial.train()
            history.append(rec)
            log({"stage": "lm", "step": step, **{k: v for k, v in rec.items() if k != "step"}})
            tqdm.write(f"step {step + 1}: val teacher-forced accuracy {acc:.3f} ({len(val_idx)} questions)"
                       + (f"; ungated {rec['val_acc_ungated']:.3f}, gated {rec['val_acc_gated']:.3f}"
                          if gate is not None else ""))
            if acc > best["val_acc"]:
                best = {"val_acc": acc, "step": step + 1}
                export(cfg.out / "weights", spatial, lm, cfg)
            torch.save({"spatial": spatial.state_dict(), "lora": lora_weights(lm), "step": step + 1, "stage": "lm"}, ckpt)
        if out_of_time:
            tqdm.write(f"stopping at step {step + 1}: the {cfg.max_minutes} min budget is spent")
            break
    export(cfg.out / "weights-last", spatial, lm, cfg)  # 96 teacher-forced questions choose "best" noisily
    summary = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "encoder_s": round(t_enc, 1),
               "lm_s": round(time.time() - t_lm, 1), "lm_steps_done": step + 1, "best": best, "history": history,
               "majority_baseline_val": majority_baseline(train, val[:len(val_idx)])}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_lora_weights(lm, weights: dict[str, tuple[Tensor, Tensor]]) -> None:
    """The inverse of :func:`lora_weights` (resuming a run)."""
    mods = dict(lm.named_modules())
    for key, (a, b) in weights.items():
        mod = mods[f"base_model.model.{key}"]
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)


def export(folder: Path, spatial: SpatialTokenizer, lm, cfg: Train3DConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_spatial(folder / "spatial.safetensors", spatial)
    save_lora(folder / "lora.safetensors", lora_weights(lm), cfg.lora_rank, cfg.lora_alpha)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vision.train3d", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick data set and a few steps (a smoke run)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--encoder-steps", type=int, default=None)
    ap.add_argument("--lm-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=25.0, help="wall-clock cap of stage 2")
    ap.add_argument("--skip-encoder", action="store_true", help="reuse stage 1 from OUT/last.pt")
    ap.add_argument("--resume", action="store_true",
                    help="continue stage 2 from OUT/last.pt (encoder, projector and LoRA), with a fresh schedule")
    ap.add_argument("--init", type=Path, default=None,
                    help="start stage 2 from exported weights (a folder like vision/weights3d) instead of OUT/last.pt")
    ap.add_argument("--turns", type=int, default=Train3DConfig.turns,
                    help="questions about one scene per training sequence, as follow-up turns of one chat")
    ap.add_argument("--lr", type=float, default=Train3DConfig.lr, help="peak learning rate (stage 1; LoRA and projector in stage 2)")
    ap.add_argument("--export", type=Path, default=None, help="copy the best weights here (e.g. vision/weights3d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patches", type=int, default=Train3DConfig.n_patches, help="spatial tokens per cloud")
    ap.add_argument("--patch-size", type=int, default=Train3DConfig.patch_size, help="points per patch")
    ap.add_argument("--gate-policy", type=Path, default=None,
                    help="gate-aware fine-tuning: a share of sequences pruned by this AdaToken-3D policy file")
    ap.add_argument("--gate-share", type=float, default=Train3DConfig.gate_share,
                    help="the share of training sequences seen through --gate-policy")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Train3DConfig(
        data=a.data or (QUICK_OUT if a.quick else DEFAULT_OUT),
        out=a.out or Path("runs/train3d-quick" if a.quick else "runs/train3d"),
        encoder_steps=a.encoder_steps if a.encoder_steps is not None else (20 if a.quick else 400),
        lm_steps=a.lm_steps if a.lm_steps is not None else (4 if a.quick else 400),
        batch=a.batch, max_minutes=a.max_minutes, seed=a.seed, n_patches=a.patches, patch_size=a.patch_size,
        turns=a.turns, lr=a.lr, gate_policy=a.gate_policy, gate_share=a.gate_share,
        eval_every=2 if a.quick else 50, eval_examples=8 if a.quick else 96,
    )
    summary = run(cfg, a.skip_encoder, a.resume, a.init)
    print(json.dumps({k: summary[k] for k in ("encoder_s", "lm_s", "lm_steps_done", "best", "majority_baseline_val")}))
    if a.export is not None:
        a.export.mkdir(parents=True, exist_ok=True)
        for f in ("spatial.safetensors", "lora.safetensors"):
            shutil.copy(cfg.out / "weights" / f, a.export / f)
        print(f"exported to {a.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
