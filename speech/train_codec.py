"""Train the speech codec: ``python -m speech.train_codec --data data/speech [--quick]``.

The codec must (1) turn the target voice into one token per 40 ms that the speaking channel can
predict and (2) give the listening channel continuous features of any voice over noise. So it trains on
the target voice's utterances (most of the mix) and on the other speakers' interruption clips, with
noise mixed in sometimes. Losses: multi-resolution STFT (spectral convergence + log magnitude), log-mel
L1, a complex-spectrum L1 at the synthesis resolution (it pins the phase the head predicts) and the VQ
commitment; the codebook follows its assignments by EMA, with dead codes restarted from the batch.

``--ctc-weight W`` adds a CTC loss from each quantized latent, through a one-frame head, to the
utterance's phonemes (speech/phone_ctc.py): the tokens must then spell what was said, not only sound
like it (measured at weight 1 from the shipped codec: the round trip got worse, README.md). ``--init CODEC``
starts every part from a trained codec (tokens drift from there, so an LSLM trained on the old ones must
be retrained); ``--extra-data A,B`` pools more target-voice corpora, less the main corpus's held-out
sentences (the generator says some sentences in several corpora).

Resumable: ``--out`` holds the latest checkpoint and the optimizer state; run the same command again.

``--decoder-from CODEC`` trains only the decoder of a trained codec, grown wider with ``--dec-channels`` and
deeper with ``--dec-blocks`` so that it starts out sounding exactly like the source (speech/grow.py): the
encoder and the codebook stay frozen, so every token, and an LSLM trained on them, stays valid.

The decoder synthesises phase like a phase vocoder (see speech/codec.py): with free per-hop phases,
spectral losses alone plateaued (log-magnitude error 2.3 vs 0.9 with phase advances, same steps).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from speech.checkpoints import load_codec, save_codec
from speech.codec import SpeechCodec
from speech.config import CodecConfig
from speech.corpus import Corpus, mixed_batch
from speech.grow import grow_decoder
from speech.phone_ctc import PhoneBatches, PhoneHead, phone_ctc_loss
from speech.recipe import finish_report, parse_recipe_args


@dataclass
class CodecTrainConfig:
    data: str = "data/speech"
    out: str = "runs/codec"
    steps: int = 6000
    batch: int = 16
    crop_frames: int = 25  # 1 s crops
    lr: float = 1e-3
    ema_decay: float = 0.99
    commit_weight: float = 0.25
    vq_start: int = 300  # steps as a plain autoencoder before quantizing (then seed the codebook from latents)
    restart_every: int = 100
    listen_share: float = 0.3  # other speakers' clips in the mix
    noise_prob: float = 0.2
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 500
    decoder_from: str = ""  # a trained codec: train only its decoder (tokens unchanged)
    dec_channels: int = 0  # with decoder_from: a new decoder this wide (0: the source's)
    dec_blocks: int = 0  # with decoder_from: a new decoder this deep (0: the source's)
    init: str = ""  # a trained codec to start every part from (its tokens will move)
    extra_data: str = ""  # more corpora (comma-separated) whose target-voice speech joins the mix
    ctc_weight: float = 0.0  # > 0: the tokens also learn to spell the phonemes (speech/phone_ctc.py)
    ctc_batch: int = 8  # whole utterances per step for the CTC loss

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.crop_frames < 2:
            raise ValueError("steps, batch must be >= 1 and crop_frames >= 2")
        if not 0 <= self.listen_share <= 1 or not 0 <= self.noise_prob <= 1:
            raise ValueError("listen_share and noise_prob are probabilities")
        if self.init and self.decoder_from:
            raise ValueError("--init trains the whole codec, --decoder-from only a decoder: pick one")
        if self.ctc_weight < 0 or self.ctc_batch < 1:
            raise ValueError("ctc_weight must be >= 0 and ctc_batch >= 1")
        if self.ctc_weight and self.decoder_from:
            raise ValueError("--ctc-weight shapes the tokens, which --decoder-from keeps frozen")


# ---------------------------------------------------------------- losses
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (256, 64))


def _mag(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    win = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x, n_fft, hop, window=win, return_complex=True)
    return spec.abs().clamp_min(1e-7)


def spectral_losses(codec: SpeechCodec, recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    sc = lm = 0.0
    for n_fft, hop in STFT_RESOLUTIONS:
        m_r, m_t = _mag(recon, n_fft, hop), _mag(target, n_fft, hop)
        sc = sc + torch.linalg.norm(m_t - m_r) / torch.linalg.norm(m_t)
        lm = lm + (m_t.log() - m_r.log()).abs().mean()
    cfg = codec.cfg
    pad = cfg.n_fft - cfg.hop_length
    mel = (codec.log_mel(F.pad(recon, (pad, 0))) - codec.log_mel(F.pad(target, (pad, 0)))).abs().mean()
    win = torch.hann_window(cfg.synth_n_fft, device=recon.device)
    c_r = torch.stft(recon, cfg.synth_n_fft, cfg.hop_length, window=win, return_complex=True)
    c_t = torch.stft(target, cfg.synth_n_fft, cfg.hop_length, window=win, return_complex=True)
    cplx = (c_r - c_t).abs().mean() / c_t.abs().mean().clamp_min(1e-5)
    n = len(STFT_RESOLUTIONS)
    return {"sc": sc / n, "logmag": lm / n, "mel": mel, "complex": cplx}


# ---------------------------------------------------------------- EMA vector quantization
class EmaCodebook:
    """The codebook's training state: EMA counts and sums, dead-code restarts."""

    def __init__(self, codec: SpeechCodec, decay: float) -> None:
        cb = codec.quantizer.codebook
        self.codec, self.decay = codec, decay
        self.count = torch.zeros(cb.shape[0], device=cb.device)
        self.sum = torch.zeros_like(cb)
        self.initialised = False

    def adopt(self, frames_per_step: int) -> None:
        """Continue from the codec's trained codebook: every code starts with a fair share of use."""
        k = self.count.shape[0]
        self.count.fill_(frames_per_step / k)
        self.sum.copy_(self.codec.quantizer.codebook * self.count[:, None])
        self.initialised = True

    def seed(self, latents: torch.Tensor) -> None:
        """Start the codebook from real (warmed-up) latents, not noise."""
        flat = latents.reshape(-1, latents.shape[-1]).detach()
        k = self.codec.quantizer.codebook.shape[0]
        idx = torch.randperm(flat.shape[0], device=flat.device)[:k]
        if idx.numel() < k:
            idx = torch.randint(0, flat.shape[0], (k,), device=flat.device)
        self.codec.quantizer.codebook.copy_(F.normalize(flat[idx] + 0.01 * torch.randn_like(flat[idx]), dim=-1))
        self.initialised = True

    def quantize(self, z: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit latents z (B, T, D) → straight-through quantized z, commitment loss, codes."""
        flat = z.reshape(-1, z.shape[-1])
        q_mod = self.codec.quantizer
        if train and not self.initialised:
            self.seed(flat)
        codes = q_mod.quantize(flat.detach())
        q = q_mod.lookup(codes)
        if train:
            with torch.no_grad():
                onehot = F.one_hot(codes, q_mod.codebook.shape[0]).type_as(flat)
                self.count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.sum.mul_(self.decay).add_(onehot.t() @ flat.detach(), alpha=1 - self.decay)
                used = self.count > 1e-6  # codes never assigned keep their vector (until restarted)
                q_mod.codebook[used] = F.normalize(self.sum[used], dim=-1)
        commit = F.mse_loss(flat, q.detach())
        q_st = flat + (q - flat).detach()
        return q_st.reshape(z.shape), commit, codes.reshape(z.shape[:-1])

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> int:
        flat = z.reshape(-1, z.shape[-1])
        k = self.count.shape[0]
        dead = (self.count < 0.1 * self.count.sum() / k).nonzero().flatten()  # 10x below a uniform share
        if dead.numel():
            idx = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
            fresh = F.normalize(flat[idx] + 0.01 * torch.randn_like(flat[idx]), dim=-1)
            self.codec.quantizer.codebook[dead] = fresh
            self.count[dead] = self.count.sum() / k  # a fair share, so the fresh code is not restarted at once
            self.sum[dead] = fresh * self.count[dead, None]
        return int(dead.numel())

    def state(self) -> dict:
        return {"count": self.count, "sum": self.sum, "initialised": self.initialised}

    def load(self, s: dict) -> None:
        self.count.copy_(s["count"])
        self.sum.copy_(s["sum"])
        self.initialised = s["initialised"]


def perplexity(codes: torch.Tensor, size: int) -> float:
    p = torch.bincount(codes.flatten(), minlength=size).float()
    p = p / p.sum()
    return float(torch.exp(-(p * (p + 1e-12).log()).sum()))


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(codec: SpeechCodec, corpus: Corpus, split: str = "val", limit: int = 64) -> dict[str, float]:
    """Mel distance (mean |Δ log-mel|) of the round trip on held-out target-voice utterances."""
    codec.eval()
    cfg = codec.cfg
    dists, all_codes = [], []
    for wav in corpus.utterances("speech", split, limit):
        n = wav.shape[0] // cfg.frame_size * cfg.frame_size
        if n == 0:
            continue
        x = torch.from_numpy(wav[:n])[None].to(codec.quantizer.codebook.device)
        codes = codec.encode(x)
        recon = codec.decode(codes)
        pad = cfg.n_fft - cfg.hop_length
        d = (codec.log_mel(F.pad(recon, (pad, 0))) - codec.log_mel(F.pad(x, (pad, 0)))).abs().mean()
        dists.append(float(d))
        all_codes.append(codes.flatten())
    codec.train()
    if not dists:
        raise ValueError(f"no {split} utterances to evaluate on")
    return {"mel_distance": float(np.mean(dists)), "perplexity": perplexity(torch.cat(all_codes), cfg.codebook_size),
            "utterances": len(dists)}


def frame_cost_ms(codec: SpeechCodec, batch: int = 1, reps: int = 30) -> float:
    """Wall time of one streaming encode + decode frame on the codec's device (ms)."""
    dev = codec.quantizer.codebook.device
    state = codec.init_state(batch, dev)
    audio = torch.zeros(batch, codec.cfg.frame_size, device=dev)
    codes = torch.zeros(batch, dtype=torch.long, device=dev)
    with torch.inference_mode():
        for _ in range(3):
            codec.encode_step(audio, state)
            codec.decode_step(codes, state)
        t = time.perf_counter()
        for _ in range(reps):
            codec.encode_step(audio, state)
            codec.decode_step(codes, state)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


# ---------------------------------------------------------------- training loop
def quantize_for_training(codec: SpeechCodec, ema: EmaCodebook, z: torch.Tensor, step: int, tc: CodecTrainConfig,
                          corpus: Corpus, crop: int, rng: np.random.Generator):
    """Unit latents → (quantized latents, commitment loss, codes); a plain autoencoder before ``vq_start``."""
    if step < tc.vq_start and not ema.initialised:  # warm up as a plain autoencoder: latents spread out before codes are placed
        return z, z.new_zeros(()), torch.zeros(1, dtype=torch.long)
    if step == tc.vq_start and not ema.initialised:
        more = torch.from_numpy(corpus.batch(tc.batch * 4, crop, rng)).to(z.device)  # the main corpus
        ema.seed(torch.cat([z.detach(), codec.features_to_latent(codec.encode_features(more)).detach()], 0))
    return ema.quantize(z, train=True)


def decoder_student(tc: CodecTrainConfig) -> SpeechCodec:
    """The source codec with its encoder and codebook frozen and its decoder grown to the asked size
    (speech/grow.py: it starts out sounding exactly like the source, then learns with the new room)."""
    _, src = load_codec(tc.decoder_from)
    codec = grow_decoder(src, tc.dec_channels, tc.dec_blocks)
    for p in codec.parameters():
        p.requires_grad_(False)
    for p in codec.decoder_parameters():
        p.requires_grad_(True)
    return codec


def train(tc: CodecTrainConfig, codec_cfg: CodecConfig | None = None) -> dict[str, float]:
    device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(tc.data)
    held_out = corpus.held_out_texts()  # extra corpora may say them too: keep them out of training
    corpora = [corpus, *(Corpus(d.strip(), held_out) for d in tc.extra_data.split(",") if d.strip())]
    ckpt, state_path = out / "codec.safetensors", out / "train_state.pt"
    if ckpt.is_file() and state_path.is_file():
        codec_cfg, codec = load_codec(ckpt)
    elif tc.decoder_from:
        codec = decoder_student(tc)
    elif tc.init:
        codec_cfg, codec = load_codec(tc.init)
    else:
        codec = SpeechCodec(codec_cfg or CodecConfig())
    codec.to(device).train()
    ema = EmaCodebook(codec, tc.ema_decay)
    if tc.init:
        ema.adopt(tc.batch * tc.crop_frames)
    params = codec.decoder_parameters() if tc.decoder_from else [p for p in codec.parameters() if p.requires_grad]
    head = phones = None
    if tc.ctc_weight:
        phones = PhoneBatches(corpora, codec.cfg.frame_size)
        head = PhoneHead(codec.cfg.latent_dim, phones.vocab_size).to(device)
        params = params + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.8, 0.99), weight_decay=1e-4)
    warmup = max(1, min(200, tc.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, tc.steps) / tc.steps)))
    )
    step = 0
    if state_path.is_file() and ckpt.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        ema.load(st["ema"])
        if head is not None and "phone_head" in st:
            head.load_state_dict(st["phone_head"])
        step = st["step"]
        print(f"resuming from step {step}")
    crop = tc.crop_frames * codec.cfg.frame_size
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=tc.steps, initial=step, desc="codec", unit="step", dynamic_ncols=True)
    while step < tc.steps:
        x = torch.from_numpy(mixed_batch(corpora, tc.batch, crop, rng, tc.listen_share, tc.noise_prob)).to(device)
        if tc.decoder_from:  # frozen tokens: the decoder learns to speak them better
            with torch.no_grad():
                codes = codec.encode(x)
                z = q = codec.quantizer.lookup(codes)
            commit = z.new_zeros(())
        else:
            z = codec.features_to_latent(codec.encode_features(x))
            q, commit, codes = quantize_for_training(codec, ema, z, step, tc, corpus, crop, rng)
        recon = codec.decode_latent(q)
        parts = spectral_losses(codec, recon, x)
        loss = parts["sc"] + parts["logmag"] + 0.5 * parts["mel"] + 0.5 * parts["complex"] + tc.commit_weight * commit
        if head is not None:
            pb = phones.sample(tc.ctc_batch, rng, device)
            zc = codec.features_to_latent(codec.encode_features(pb.audio))
            qc = ema.quantize(zc, train=False)[0] if ema.initialised else zc
            parts["ctc"] = phone_ctc_loss(head, qc, pb)
            loss = loss + tc.ctc_weight * parts["ctc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if not tc.decoder_from and step > tc.vq_start and step % tc.restart_every == 0:
            ema.restart_dead(z.detach())
        if step % tc.log_every == 0 or step == tc.steps:
            rec = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()},
                   "commit": float(commit.detach()), "perplexity": perplexity(codes, codec.cfg.codebook_size)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", mel=f"{rec['mel']:.3f}", ppl=f"{rec['perplexity']:.0f}",
                            **({"ctc": f"{rec['ctc']:.2f}"} if "ctc" in rec else {}))
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_codec(ckpt, codec)
            extra = {"phone_head": head.state_dict()} if head is not None else {}
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "ema": ema.state(), "step": step,
                        **extra}, state_path)
        bar.update(1)
    bar.close()
    log.close()
    report = {**evaluate(codec, corpus, "test"), "frame_ms_b1": frame_cost_ms(codec), "steps": step,
              "device": device}
    (out / "report.json").write_text(json.dumps({"train": asdict(tc), "eval": report}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    tc, quick, json_path = parse_recipe_args(CodecTrainConfig, argv, "python -m speech.train_codec",
                                             __doc__.split("\n\n")[0])
    codec_cfg = None
    if quick:
        tc.steps, tc.batch, tc.log_every, tc.checkpoint_every, tc.vq_start = 30, 4, 10, 30, 10
        codec_cfg = CodecConfig(channels=64, latent_dim=32, codebook_size=128, enc_blocks=2, frame_blocks=1,
                                dec_blocks=2)
    report = train(tc, codec_cfg)
    finish_report(report, ["mel_distance", "perplexity", "frame_ms_b1", "utterances", "steps"], json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
