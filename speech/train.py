"""Train the LSLM: ``python -m speech.train --fusion {early,middle,late} --setting {command,voice}``.

The paper's recipe shape (METHODS.md §1): the speaking channel learns to say a sentence (phonemes →
codec tokens of the target voice) while the listening channel hears, independently, noise with
p = 0.5 and an interruption with p = 0.5. When an interruption starts at frame t, the target keeps
speaking for µ = 0.5 s and then emits IRQ; otherwise it ends with EOS. The loss runs to IRQ or EOS.
Distractors (other words in the command setting, back-channels in the voice setting) join the
listening channel with p = 0.25 and must not stop the speech.

The codec is frozen: its tokens are the targets and its encoder's continuous features are the
listening channel. Resumable (``--out`` keeps the checkpoint and optimizer state).
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from speech.checkpoints import load_codec, load_lslm, save_lslm
from speech.codec import SpeechCodec
from speech.config import LSLMConfig
from speech.corpus import Corpus
from speech.guided import GuidedAttention
from speech.lslm import LSLM
from speech.recipe import finish_report, parse_recipe_args
from speech.text import PhonemeTokenizer, phonemize


@dataclass
class LSLMTrainConfig:
    fusion: str = "middle"
    setting: str = "command"  # command: only "Honey" interrupts; voice: any short word does
    data: str = "data/speech"
    # more target-voice corpora (comma-separated roots, e.g. built with another --seed): every split of their
    # speech joins training, less any sentence of the main corpus's val or test split, so held-out text stays out
    extra_data: str = ""
    init: str = ""  # start from these LSLM weights with a fresh optimizer (a fine-tune); a run in --out resumes instead
    codec: str = "speech/weights/codec.safetensors"
    out: str = "runs/lslm"
    steps: int = 5000
    batch: int = 16
    lr: float = 5e-4
    max_frames: int = 150  # longest target utterance (6 s); longer ones are skipped
    max_utterances: int = 0  # 0: all of the split
    mu_s: float = 0.5
    p_noise: float = 0.5
    p_interrupt: float = 0.5
    p_distractor: float = 0.25
    listen_norm: bool = True  # normalised listening features (LSLMConfig.listen_norm), as the shipped model
    control_weight: float = 3.0  # loss weight of the IRQ / EOS targets: one per sequence among ~50 codes
    guided_attention: float = 0.0  # weight of the guided-attention loss (speech.guided); 0: off
    guided_sigma: float = 0.2  # width g of the diagonal prior, as a fraction of the text and the speech
    dropout: float = 0.0  # LSLMConfig.dropout of a new run (residual branches); the shipped model trained without
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.fusion not in ("early", "middle", "late", "none"):
            raise ValueError(f"fusion must be early, middle, late or none, not {self.fusion!r}")
        if self.setting not in ("command", "voice"):
            raise ValueError(f"setting must be command or voice, not {self.setting!r}")


@dataclass
class Utterance:
    phoneme_ids: np.ndarray
    codes: np.ndarray  # (n,) codec tokens of the target voice


def prepare(corpus: Corpus, codec: SpeechCodec, tok: PhonemeTokenizer, split: str, max_frames: int,
            cache: Path, limit: int = 0, exclude: frozenset[str] = frozenset()) -> list[Utterance]:
    """Phonemes and codec tokens of the target-voice utterances (cached: encoding takes a while), less
    those whose text is in ``exclude``."""
    if cache.is_file():
        return [Utterance(np.asarray(p), np.asarray(c)) for p, c in torch.load(cache, weights_only=False)]
    utts = []
    fs = codec.cfg.frame_size
    dev = codec.quantizer.codebook.device
    entries = [e for e in corpus.manifest("speech", split) if e["text"] not in exclude]
    for entry in tqdm(entries[:limit] if limit else entries, desc=f"tokenize {split}", unit="utt"):
        wav = corpus.audio("speech", entry)
        n = wav.shape[0] // fs
        if n == 0 or n > max_frames:
            continue
        with torch.no_grad():
            codes = codec.encode(torch.from_numpy(wav[: n * fs])[None].to(dev))[0].cpu().numpy()
        ids = np.asarray(tok.encode_phonemes(phonemize(entry["text"])), dtype=np.int64)
        utts.append(Utterance(ids, codes))
    torch.save([(u.phoneme_ids, u.codes) for u in utts], cache)
    return utts


def extra_utterances(tc: LSLMTrainConfig, main: Corpus, codec: SpeechCodec, tok: PhonemeTokenizer,
                     out: Path) -> list[Utterance]:
    """The target-voice speech of ``--extra-data`` corpora, every split, without the main corpus's held-out
    sentences. Each corpus must speak the main corpus's target voice: it is what the model learns to say."""
    roots = [r.strip() for r in tc.extra_data.split(",") if r.strip()]
    if not roots:
        return []
    held_out = main.held_out_texts()
    voices = {e.get("voice") for e in main.manifest("speech", "train")}
    utts: list[Utterance] = []
    for root in roots:
        extra = Corpus(root)
        key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]  # a resumed run reuses its tokens
        for split in ("train", "val", "test"):
            other = {e.get("voice") for e in extra.manifest("speech", split)} - voices
            if other:
                raise ValueError(f"{root}: speech/{split} is spoken by {sorted(map(str, other))}, "
                                 f"not the target voice {sorted(map(str, voices))}")
            utts += prepare(extra, codec, tok, split, tc.max_frames, out / f"prep_extra_{key}_{split}.pt",
                            exclude=held_out)
    return utts


class LengthBuckets:
    """Draws batches of utterances of similar length: padding would otherwise cost a third of each step."""

    def __init__(self, utts: list[Utterance], batch: int, spread: int = 4) -> None:
        self.order = np.argsort([len(u.codes) + len(u.phoneme_ids) for u in utts], kind="stable")
        self.window = min(len(utts), batch * spread)
        self.batch = batch

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        start = rng.integers(0, len(self.order) - self.window + 1)
        return self.order[start + rng.choice(self.window, size=self.batch, replace=self.window < self.batch)]


class SampleMaker:
    """Builds one training example: packed ids, targets, and the listening channel's waveform."""

    def __init__(self, tc: LSLMTrainConfig, cfg: LSLMConfig, corpus: Corpus, frame_size: int, frame_rate: float,
                 split: str = "train") -> None:
        self.tc, self.cfg, self.corpus, self.fs = tc, cfg, corpus, frame_size
        self.mu = max(1, round(tc.mu_s * frame_rate))
        listen = corpus.manifest("listen", split)
        if tc.setting == "command":
            self.triggers = [e for e in listen if e.get("kind") == "command" and e.get("text", "").lower() == "honey"]
            # Every other word, the other command words included, must not stop the speech.
            trigger_ids = {e["id"] for e in self.triggers}
            self.distractors = [e for e in listen if e["id"] not in trigger_ids]
        else:
            self.triggers = [e for e in listen if e.get("kind") in ("word", "command")]
            self.distractors = [e for e in listen if e.get("kind") == "backchannel"]
        self.noise = corpus.manifest("noise", split)
        if not self.triggers:
            raise ValueError(f"the corpus has no {tc.setting} interruption clips in listen/{split}")

    def make(self, u: Utterance, rng: np.random.Generator) -> dict:
        tc, cfg = self.tc, self.cfg
        n = len(u.codes)
        listen = np.zeros((n + 1) * self.fs, dtype=np.float32)  # one extra frame: the EOS position hears too
        if self.noise and rng.random() < tc.p_noise:
            nz = self.corpus.audio("noise", self.noise[rng.integers(len(self.noise))])
            reps = int(np.ceil(listen.shape[0] / max(1, nz.shape[0])))
            start = rng.integers(0, max(1, nz.shape[0]))
            listen += np.tile(np.roll(nz, -start), reps)[: listen.shape[0]] * 10 ** (rng.uniform(-30, -10) / 20)
        if self.distractors and rng.random() < tc.p_distractor:
            self._place(listen, self.distractors[rng.integers(len(self.distractors))], rng.integers(0, n), rng)
        t_int = None
        if n > self.mu + 3 and rng.random() < tc.p_interrupt:
            t_int = int(rng.integers(2, n - self.mu))
            self._place(listen, self.triggers[rng.integers(len(self.triggers))], t_int, rng)
        if t_int is None:
            targets = np.concatenate([u.codes, [cfg.eos_id]])
        else:
            k = t_int + self.mu
            targets = np.concatenate([u.codes[:k], [cfg.irq_id]])
        m = len(targets)
        speech_in = np.concatenate([[cfg.speech_bos_id], u.codes[: m - 1]])
        return {"text": u.phoneme_ids, "speech_in": speech_in, "targets": targets,
                "listen": listen[: m * self.fs], "t_int": t_int, "n_frames": n + 1}

    def _place(self, listen: np.ndarray, entry: dict, frame: int, rng: np.random.Generator) -> None:
        clip = self.corpus.audio("listen", entry) * 10 ** (rng.uniform(-10, 0) / 20)
        start = frame * self.fs
        end = min(listen.shape[0], start + clip.shape[0])
        listen[start:end] += clip[: end - start]


def collate(samples: list[dict], codec: SpeechCodec, device) -> dict[str, torch.Tensor]:
    """Pack [text, speech] per row, right-pad; run the frozen codec encoder over the listening channel."""
    fs = codec.cfg.frame_size
    lengths = [len(s["text"]) + len(s["speech_in"]) for s in samples]
    t = max(lengths)
    b = len(samples)
    ids = torch.zeros(b, t, dtype=torch.long)
    is_speech = torch.zeros(b, t, dtype=torch.bool)
    targets = torch.full((b, t), -100, dtype=torch.long)
    s_max = max(len(s["speech_in"]) for s in samples)
    waves = torch.zeros(b, s_max * fs)
    for i, s in enumerate(samples):
        lt, ls = len(s["text"]), len(s["speech_in"])
        ids[i, :lt] = torch.from_numpy(s["text"])
        ids[i, lt : lt + ls] = torch.from_numpy(s["speech_in"])
        is_speech[i, lt : lt + ls] = True
        targets[i, lt : lt + ls] = torch.from_numpy(s["targets"])
        waves[i, : s["listen"].shape[0]] = torch.from_numpy(s["listen"])
    with torch.no_grad():
        feats_s = codec.encode_features(waves.to(device))  # (B, s_max, C)
    feats = torch.zeros(b, t, feats_s.shape[-1], device=device)
    for i, s in enumerate(samples):
        lt, ls = len(s["text"]), len(s["speech_in"])
        feats[i, lt : lt + ls] = feats_s[i, :ls]
    n_frames = torch.tensor([s["n_frames"] for s in samples], device=device)
    return {"ids": ids.to(device), "is_speech": is_speech.to(device), "targets": targets.to(device), "feats": feats,
            "n_frames": n_frames}


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LSLMConfig, control_weight: float) -> torch.Tensor:
    """Cross-entropy over the speech positions, the control targets (IRQ, EOS) weighted up."""
    flat_t = targets.reshape(-1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, ignore_index=-100, reduction="none")
    valid = flat_t != -100
    weights = torch.where(flat_t >= cfg.eos_id, control_weight, 1.0) * valid
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def control_accuracy(logits: torch.Tensor, targets: torch.Tensor, cfg: LSLMConfig) -> dict[str, float]:
    """Teacher-forced: at IRQ / EOS targets, how often is the argmax that token; elsewhere, how often is
    it a false IRQ."""
    pred = logits.argmax(-1)
    valid = targets != -100
    irq, eos = targets == cfg.irq_id, targets == cfg.eos_id
    codes = valid & ~irq & ~eos
    return {
        "irq_hit": float((pred[irq] == cfg.irq_id).float().mean()) if irq.any() else float("nan"),
        "eos_hit": float((pred[eos] == cfg.eos_id).float().mean()) if eos.any() else float("nan"),
        "false_irq": float((pred[codes] == cfg.irq_id).float().mean()) if codes.any() else float("nan"),
        "code_acc": float((pred[codes] == targets[codes]).float().mean()) if codes.any() else float("nan"),
    }


def train(tc: LSLMTrainConfig, model_cfg: LSLMConfig | None = None) -> dict[str, float]:
    device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(tc.data)
    codec_cfg, codec = load_codec(tc.codec)
    codec.to(device).eval().requires_grad_(False)
    tok = PhonemeTokenizer()
    ckpt, state_path = out / "lslm.safetensors", out / "train_state.pt"
    if ckpt.is_file() and state_path.is_file():
        cfg, model = load_lslm(ckpt)
    elif tc.init:
        cfg, model = load_lslm(tc.init)
        if cfg.fusion != tc.fusion or cfg.codebook_size != codec_cfg.codebook_size:
            raise ValueError(f"--init {tc.init} is a {cfg.fusion}-fusion model over {cfg.codebook_size} codes; "
                             f"this run asks for {tc.fusion} fusion over the codec's {codec_cfg.codebook_size}")
    else:
        cfg = model_cfg or LSLMConfig()
        cfg = LSLMConfig(**{**asdict(cfg), "fusion": tc.fusion, "tokenizer": "phonemes", "listen_norm": tc.listen_norm,
                            "codebook_size": codec_cfg.codebook_size, "listen_dim": codec_cfg.channels,
                            "dropout": tc.dropout or cfg.dropout})
        model = LSLM(cfg)
    model.to(device).train()
    lim = tc.max_utterances
    train_utts = prepare(corpus, codec, tok, "train", tc.max_frames, out / f"prep_train_{lim}.pt", lim)
    val_utts = prepare(corpus, codec, tok, "val", tc.max_frames, out / f"prep_val_{lim}.pt", lim)
    extra = extra_utterances(tc, corpus, codec, tok, out)
    if extra:
        print(f"{len(train_utts)} training utterances from {tc.data}, {len(extra)} from {tc.extra_data}")
    train_utts += extra
    if not train_utts:
        raise ValueError("no training utterances short enough; raise --max-frames")
    maker = SampleMaker(tc, cfg, corpus, codec_cfg.frame_size, codec_cfg.frame_rate)
    val_maker = SampleMaker(tc, cfg, corpus, codec_cfg.frame_size, codec_cfg.frame_rate, "val")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(500, tc.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, tc.steps) / tc.steps))
    )
    step = 0
    if state_path.is_file() and ckpt.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step = st["step"]
        print(f"resuming from step {step}")
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=tc.steps, initial=step, desc=f"lslm {tc.fusion}/{tc.setting}", unit="step", dynamic_ncols=True)
    buckets = LengthBuckets(train_utts, tc.batch)
    guide = GuidedAttention(model, sigma=tc.guided_sigma) if tc.guided_attention > 0 else None
    while step < tc.steps:
        batch = collate([maker.make(train_utts[i], rng) for i in buckets.draw(rng)], codec, device)
        with guide.recording() if guide else nullcontext():
            logits = model.forward_packed(batch["ids"], batch["is_speech"], batch["feats"])
            loss = weighted_loss(logits, batch["targets"], cfg, tc.control_weight)
            if guide:
                guided = guide.loss(batch["is_speech"], batch["targets"], batch["n_frames"])
                loss = loss + tc.guided_attention * guided
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % tc.log_every == 0 or step == tc.steps:
            rec = {"step": step, "loss": float(loss.detach()), **control_accuracy(logits.detach(), batch["targets"], cfg)}
            if guide:
                rec["guided"] = float(guided.detach())
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", irq=f"{rec['irq_hit']:.2f}", acc=f"{rec['code_acc']:.2f}")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_lslm(ckpt, model)
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, state_path)
        bar.update(1)
    bar.close()
    log.close()
    report = evaluate_teacher_forced(model, val_utts, val_maker, codec, device, np.random.default_rng(tc.seed + 1))
    report.update(steps=step, device=device, fusion=tc.fusion, setting=tc.setting)
    (out / "report.json").write_text(json.dumps({"train": asdict(tc), "eval": report}, indent=2))
    return report


@torch.no_grad()
def evaluate_teacher_forced(model: LSLM, utts: list[Utterance], maker: SampleMaker, codec: SpeechCodec, device,
                            rng: np.random.Generator, n: int = 64) -> dict[str, float]:
    """Held-out loss and control-token accuracies under teacher forcing (the free-running metrics —
    interruption F1, WER — are speech.evaluate's)."""
    if not utts:
        return {"val_loss": float("nan")}
    model.eval()
    batch = collate([maker.make(utts[i % len(utts)], rng) for i in range(min(n, 4 * len(utts)))], codec, device)
    guide = GuidedAttention(model)
    with guide.recording():
        logits = model.forward_packed(batch["ids"], batch["is_speech"], batch["feats"])
        alignment = guide.best_head_cost(batch["is_speech"], batch["targets"], batch["n_frames"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)
    model.train()
    return {"val_loss": float(loss), **control_accuracy(logits, batch["targets"], model.cfg),
            "alignment_cost": alignment}


def main(argv: list[str] | None = None) -> int:
    tc, quick, json_path = parse_recipe_args(
        LSLMTrainConfig, argv, "python -m speech.train", __doc__.split("\n\n")[0],
        choices={"fusion": ["early", "middle", "late", "none"], "setting": ["command", "voice"]},
    )
    model_cfg = None
    if quick:
        tc.steps, tc.batch, tc.log_every, tc.checkpoint_every, tc.max_frames = 20, 4, 5, 20, 100
        tc.max_utterances = 48
        model_cfg = LSLMConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, max_text_len=256, max_speech_len=200)
    report = train(tc, model_cfg)
    finish_report(report, ["val_loss", "irq_hit", "eos_hit", "false_irq", "code_acc", "alignment_cost", "steps"],
                  json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
