"""Evaluate the full-duplex voice model the LSLM paper's way: ``python -m speech.evaluate [--quick]``.

On the held-out test split (sentences of the target voice, interruption clips of held-out voices,
held-out noise), the serving model runs free — the same batched per-frame step the server runs —
while its listening channel hears one of four scenes:

* ``clean``: half of the utterances are interrupted by the trigger word at a random time;
* ``noisy``: the same, with background noise;
* ``noise``: background noise only (every IRQ is a false interruption);
* ``backchannel``: one other word ("yeah", "stop", ...) and noise at p = 0.5 (must not interrupt).

A hit is an IRQ within [0, 2µ] after the interruption starts (µ = 0.5 s), as in the paper; precision,
recall and F1 follow. Intelligibility is Whisper tiny.en's word error rate on the uninterrupted
generated speech, beside the WER of the target voice's own audio (the ceiling) and of that audio
through the codec (the codec's ceiling). A Silero-VAD barge-in — stop as soon as the VAD hears speech,
as voice products do today — listens to exactly the same scenes as the peer.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from speech.asr import WhisperASR, word_errors
from speech.checkpoints import load_codec, load_irq_policy, load_lslm
from speech.config import VoiceModelConfig
from speech.corpus import Corpus
from speech.duplex import EV_AUDIO, EV_EOS, EV_IRQ, DuplexVoiceModel

SCENES = ("clean", "noisy", "noise", "backchannel")
# speech.calibrate also fits on ``long``: two sentences in one answer, longer than any training
# utterance, over faint noise. IRQ's lead drifts up near the end of such answers, so a policy that
# only ever saw single sentences stops long answers on noise alone.
CALIBRATION_SCENES = SCENES + ("long",)
# The paper's Table 2 (command-based; middle fusion unless named), as fractions.
PAPER = {"f1": 0.9800, "f1_noisy": 0.9738, "wer": 0.0405, "wer_noisy": 0.0451}


@dataclass
class EvalConfig:
    weights: str = "speech/weights"  # codec.safetensors + lslm.safetensors
    lslm: str = ""  # overrides weights/lslm.safetensors (e.g. an ablation run)
    data: str = "data/speech"
    split: str = "test"
    setting: str = "command"
    utterances: int = 150  # per scene
    max_frames: int = 150  # longest reference utterance used (6 s)
    batch: int = 16
    mu_s: float = 0.5
    vad_threshold: float = 0.5
    asr_model: str = ""
    seed: int = 0
    irq_margin: float = float("nan")  # nan: the IRQ decision stored with the checkpoint (speech.calibrate)
    irq_frames: int = 0  # 0: from the checkpoint
    temperature: float = 0.0  # speech-token sampling; 0: greedy, as the server decodes
    top_k: int = 50


@dataclass
class Trial:
    text: str
    ref_audio: np.ndarray  # the target voice saying ``text`` (the WER ceiling)
    listen: np.ndarray  # what the listening channel hears, frame aligned, as long as the model may speak
    ref_frames: int  # how long the target voice takes to say it
    t_int: int | None  # frame at which the interruption starts (None: not interrupted)


@dataclass
class Outcome:
    stop_frame: int | None = None  # frame of the IRQ (model) or of the VAD's first speech (peer)
    eos_frame: int | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    irq_leads: list[float] = field(default_factory=list)  # IRQ's logit lead on every frame spoken (model)


def build_model(weights: str | Path, lslm_path: str | Path | None, capacity: int,
                device: str = "cpu", irq_margin: float = float("nan"), irq_frames: int = 0,
                temperature: float = 0.0, top_k: int = 50) -> DuplexVoiceModel:
    """The serving model from a weights folder (or another LSLM file); the IRQ decision is the
    checkpoint's unless ``irq_margin`` / ``irq_frames`` are given."""
    weights = Path(weights)
    codec_cfg, codec = load_codec(weights / "codec.safetensors")
    lslm_file = Path(lslm_path) if lslm_path else weights / "lslm.safetensors"
    if not lslm_file.is_file():
        raise FileNotFoundError(f"no trained LSLM at {lslm_file}: train one with `python -m speech.train`")
    lslm_cfg, lslm = load_lslm(lslm_file)
    irq = load_irq_policy(lslm_file)
    if not math.isnan(irq_margin):
        irq["irq_margin"] = irq_margin
    if irq_frames:
        irq["irq_frames"] = irq_frames
    cfg = VoiceModelConfig(codec=codec_cfg, lslm=lslm_cfg, temperature=temperature, top_k=top_k, **irq)
    return DuplexVoiceModel(cfg, capacity, device, codec=codec, lslm=lslm, weights_note=str(lslm_file))


class SceneMaker:
    """Builds the trials of one scene, deterministically from the seed."""

    def __init__(self, corpus: Corpus, ec: EvalConfig, frame_size: int, frame_rate: float) -> None:
        self.corpus, self.ec, self.fs = corpus, ec, frame_size
        self.mu = max(1, round(ec.mu_s * frame_rate))
        listen = corpus.manifest("listen", ec.split)
        if ec.setting == "command":
            self.triggers = [e for e in listen if e.get("kind") == "command" and e.get("text", "").lower() == "honey"]
        else:
            self.triggers = [e for e in listen if e.get("kind") in ("word", "command")]
        trigger_ids = {e["id"] for e in self.triggers}
        kinds = ("backchannel",) if ec.setting == "voice" else ("backchannel", "word", "command")
        self.others = [e for e in listen if e["id"] not in trigger_ids and e.get("kind") in kinds]
        self.noise = corpus.manifest("noise", ec.split)
        if not self.triggers or not self.noise:
            raise ValueError(f"the corpus at {ec.data} has no {ec.setting} interruption clips or noise in {ec.split}")
        self.sentences = [e for e in corpus.manifest("speech", ec.split)
                          if self.mu + 3 < round(e["seconds"] * frame_rate) <= ec.max_frames]
        if not self.sentences:
            raise ValueError(f"no {ec.split} sentences of at most {ec.max_frames} frames in {ec.data}")

    def trials(self, scene: str, n: int) -> list[Trial]:
        rng = np.random.default_rng([self.ec.seed, CALIBRATION_SCENES.index(scene)])
        out = []
        for i in range(n):
            entry = self.sentences[i % len(self.sentences)]
            ref = self.corpus.audio("speech", entry)
            text = entry["text"]
            if scene == "long":  # this sentence and the next, said as one answer
                second = self.sentences[(i + 1) % len(self.sentences)]
                text = f"{text} {second['text']}"
                ref = np.concatenate([ref, self.corpus.audio("speech", second)])
            ref_frames = ref.shape[0] // self.fs
            frames = ref_frames * 3 // 2 + 10  # room to speak slower than the reference, bounded
            listen = np.zeros(frames * self.fs, dtype=np.float32)
            if scene in ("noisy", "noise", "long") or (scene == "backchannel" and rng.random() < 0.5):
                self._add_noise(listen, rng)
            t_int = None
            if scene in ("clean", "noisy") and i % 2 == 0:  # half of them interrupted
                t_int = int(rng.integers(2, ref_frames - self.mu))
                self._place(listen, self.triggers[rng.integers(len(self.triggers))], t_int, rng)
            elif scene == "backchannel":
                self._place(listen, self.others[rng.integers(len(self.others))], int(rng.integers(2, ref_frames)), rng)
            out.append(Trial(text, ref, listen, ref_frames, t_int))
        return out

    def _add_noise(self, listen: np.ndarray, rng: np.random.Generator) -> None:
        nz = self.corpus.audio("noise", self.noise[rng.integers(len(self.noise))])
        reps = int(np.ceil(listen.shape[0] / max(1, nz.shape[0])))
        start = rng.integers(0, max(1, nz.shape[0]))
        listen += np.tile(np.roll(nz, -start), reps)[: listen.shape[0]] * 10 ** (rng.uniform(-30, -10) / 20)

    def _place(self, listen: np.ndarray, entry: dict, frame: int, rng: np.random.Generator) -> None:
        clip = self.corpus.audio("listen", entry) * 10 ** (rng.uniform(-10, 0) / 20)
        start = frame * self.fs
        end = min(listen.shape[0], start + clip.shape[0])
        listen[start:end] += clip[: end - start]


def run_model(model: DuplexVoiceModel, trials: list[Trial], desc: str) -> list[Outcome]:
    """Free-running generation, ``capacity`` trials at a time, through the serving step."""
    fs, cap = model.frame_size, model.capacity
    outcomes = [Outcome() for _ in trials]
    for lo in tqdm(range(0, len(trials), cap), desc=desc, unit="batch", leave=False):
        chunk = trials[lo : lo + cap]
        n = len(chunk)
        for i, t in enumerate(chunk):
            model.reset_slot(i)
            model.start_speaking(i, t.text)
        frames = max(t.listen.shape[0] // fs for t in chunk)
        listen = np.zeros((n, frames * fs), dtype=np.float32)
        for i, t in enumerate(chunk):
            listen[i, : t.listen.shape[0]] = t.listen
        listen_t = torch.from_numpy(listen).to(model.device)
        for f in range(frames):
            if not model.speaking[:n].any():
                break
            speaking = model.speaking[:n].copy()
            out = model.step(0, n, listen_t[:, f * fs : (f + 1) * fs])
            audio = out.audio.cpu().numpy()
            leads = model.irq_lead[:n].tolist()
            for i in np.flatnonzero(speaking):
                o, ev = outcomes[lo + i], out.events[i]
                o.irq_leads.append(leads[i])
                if ev == EV_AUDIO:
                    o.audio.append(audio[i].copy())
                elif ev == EV_IRQ:
                    o.stop_frame = f
                elif ev == EV_EOS:
                    o.eos_frame = f
        for i in range(n):
            model.stop_speaking(i)
    return outcomes


def run_vad(trials: list[Trial], frame_size: int, threshold: float, sample_rate: int = 16000) -> list[Outcome]:
    """Silero VAD over each scene's listening channel during the reference's speaking time: the first
    32 ms chunk with speech probability ≥ threshold stops the speech (the barge-in of today's products)."""
    from silero_vad import load_silero_vad

    vad = load_silero_vad()
    chunk = 512
    outcomes = [Outcome() for _ in trials]
    spans = [t.ref_frames * frame_size // chunk for t in trials]
    x = np.zeros((len(trials), max(spans) * chunk), dtype=np.float32)
    for i, t in enumerate(trials):
        n = min(spans[i] * chunk, t.listen.shape[0])
        x[i, :n] = t.listen[:n]
    vad.reset_states()
    with torch.no_grad():
        for c in range(max(spans)):
            probs = vad(torch.from_numpy(x[:, c * chunk : (c + 1) * chunk]), sample_rate)[:, 0].numpy()
            for i in np.flatnonzero(probs >= threshold):
                if outcomes[i].stop_frame is None and c < spans[i]:
                    end_sample = (c + 1) * chunk  # the decision is made once the chunk is heard
                    outcomes[i].stop_frame = (end_sample - 1) // frame_size
    return outcomes


def interruption_scores(trials: list[Trial], outcomes: list[Outcome], mu: int, frame_ms: float) -> dict[str, float]:
    """The paper's precision / recall / F1 (a hit: a stop within [0, 2µ] after the interruption starts),
    the false-stop rate on uninterrupted trials, and the mean reaction time of the hits."""
    tp = fp = 0
    reactions = []
    for t, o in zip(trials, outcomes, strict=True):
        if o.stop_frame is None:
            continue
        if t.t_int is not None and 0 <= o.stop_frame - t.t_int <= 2 * mu:
            tp += 1
            reactions.append((o.stop_frame + 1 - t.t_int) * frame_ms)
        else:
            fp += 1
    positives = sum(t.t_int is not None for t in trials)
    negatives = len(trials) - positives
    false_stops = sum(o.stop_frame is not None for t, o in zip(trials, outcomes, strict=True) if t.t_int is None)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "false_stop_rate": false_stops / negatives if negatives else float("nan"),
            "reaction_ms": float(np.mean(reactions)) if reactions else float("nan")}


def transcribe_all(asr: WhisperASR, audios: list[np.ndarray], desc: str) -> list[str]:
    return [asr.transcribe(a) if a.size else "" for a in tqdm(audios, desc=desc, unit="utt", leave=False)]


def evaluate(ec: EvalConfig, model: DuplexVoiceModel | None = None, asr: WhisperASR | None = None,
             with_vad: bool = True) -> dict:
    corpus = Corpus(ec.data)
    model = model or build_model(ec.weights, ec.lslm or None, ec.batch, irq_margin=ec.irq_margin,
                                 irq_frames=ec.irq_frames, temperature=ec.temperature, top_k=ec.top_k)
    asr = asr or WhisperASR(ec.asr_model or None)
    maker = SceneMaker(corpus, ec, model.frame_size, model.frame_rate)
    frame_ms = 1000.0 / model.frame_rate
    config = {k: (None if isinstance(v, float) and math.isnan(v) else v)  # nan (from the checkpoint): null
              for k, v in asdict(ec).items()}
    report: dict = {"config": config, "model": model.weights_note, "scenes": {},
                    "irq_policy": {"irq_margin": model.cfg.irq_margin, "irq_frames": model.cfg.irq_frames}}
    wer_inputs: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    ref_trials: list[Trial] = []
    for scene in SCENES:
        trials = maker.trials(scene, ec.utterances)
        model_out = run_model(model, trials, f"model {scene}")
        row = {"model": interruption_scores(trials, model_out, maker.mu, frame_ms)}
        if with_vad:
            row["vad"] = interruption_scores(trials, run_vad(trials, model.frame_size, ec.vad_threshold),
                                             maker.mu, frame_ms)
        interrupted = [(t, o) for t, o in zip(trials, model_out, strict=True) if t.t_int is not None]
        row["model"]["ended_early"] = float(np.mean([o.eos_frame is not None and o.eos_frame < t.t_int
                                                     for t, o in interrupted])) if interrupted else float("nan")
        report["scenes"][scene] = row
        if scene in ("clean", "noisy"):
            keep = [(t, o) for t, o in zip(trials, model_out, strict=True) if t.t_int is None]
            wer_inputs[scene] = ([t.text for t, _ in keep],
                                 [np.concatenate(o.audio) if o.audio else np.zeros(0, np.float32) for _, o in keep])
            if scene == "clean":
                ref_trials = [t for t, _ in keep]
    for scene, (texts, audios) in wer_inputs.items():
        e, w = word_errors(texts, transcribe_all(asr, audios, f"whisper {scene}"))
        report["scenes"][scene]["model"]["wer"] = e / max(w, 1)
    texts = [t.text for t in ref_trials]
    e, w = word_errors(texts, transcribe_all(asr, [t.ref_audio for t in ref_trials], "whisper reference"))
    report["wer_original"] = e / max(w, 1)
    codec, fs = model.codec, model.frame_size
    with torch.no_grad():
        round_trips = [codec.decode(codec.encode(torch.from_numpy(t.ref_audio[: t.ref_audio.shape[0] // fs * fs])[None]
                                                 .to(model.device)))[0].cpu().numpy() for t in ref_trials]
    e, _ = word_errors(texts, transcribe_all(asr, round_trips, "whisper codec"))
    report["wer_codec"] = e / max(w, 1)
    report["words"] = w
    s = report["scenes"]
    report.update(
        f1=s["clean"]["model"]["f1"], f1_noisy=s["noisy"]["model"]["f1"],
        precision=s["clean"]["model"]["precision"], recall=s["clean"]["model"]["recall"],
        wer=s["clean"]["model"]["wer"], wer_noisy=s["noisy"]["model"]["wer"],
        false_interruption_rate=s["noise"]["model"]["false_stop_rate"],
        false_interruption_rate_backchannel=s["backchannel"]["model"]["false_stop_rate"],
        reaction_ms=s["clean"]["model"]["reaction_ms"],
    )
    if with_vad:
        report.update(
            vad_f1=s["clean"]["vad"]["f1"], vad_f1_noisy=s["noisy"]["vad"]["f1"],
            vad_false_interruption_rate=s["noise"]["vad"]["false_stop_rate"],
            vad_false_interruption_rate_backchannel=s["backchannel"]["vad"]["false_stop_rate"],
            vad_reaction_ms=s["clean"]["vad"]["reaction_ms"],
        )
    report["paper"] = PAPER
    return report


def _pct(v: float) -> str:
    return "   n/a" if v != v else f"{100 * v:6.1f}"


def print_table(report: dict) -> None:
    s = report["scenes"]
    has_vad = "vad" in s["clean"]
    irq = report["irq_policy"]
    print(f"\nvoice model: {report['model']}   (IRQ when its logit leads by {irq['irq_margin']:g} for "
          f"{irq['irq_frames']} frame{'s' * (irq['irq_frames'] > 1)}; {report['config']['setting']}-based, "
          f"{report['config']['utterances']} utterances per scene, {report['words']} reference words)")
    print(f"{'':34}{'ours (LSLM IRQ)':>18}{'Silero-VAD barge-in':>22}{'paper (middle)':>16}")
    rows = [
        ("interruption F1, clean (%)", s["clean"], "f1", "f1"),
        ("interruption F1, noisy (%)", s["noisy"], "f1", "f1_noisy"),
        ("precision, clean (%)", s["clean"], "precision", None),
        ("recall, clean (%)", s["clean"], "recall", None),
        ("false interruptions, noise (%)", s["noise"], "false_stop_rate", None),
        ("false interruptions, words (%)", s["backchannel"], "false_stop_rate", None),
    ]
    for label, scene, key, paper_key in rows:
        vad = _pct(scene["vad"][key]) if has_vad else "   n/a"
        paper = _pct(PAPER[paper_key]) if paper_key else "      "
        print(f"{label:34}{_pct(scene['model'][key]):>18}{vad:>22}{paper:>16}")
    for label, scene in (("reaction time, clean (ms)", s["clean"]), ("reaction time, noisy (ms)", s["noisy"])):
        vad = f"{scene['vad']['reaction_ms']:6.0f}" if has_vad else "   n/a"
        print(f"{label:34}{scene['model']['reaction_ms']:>18.0f}{vad:>22}{'':>16}")
    print(f"{'WER generated, clean (%)':34}{_pct(report['wer']):>18}{'':>22}{_pct(PAPER['wer']):>16}")
    print(f"{'WER generated, noisy (%)':34}{_pct(report['wer_noisy']):>18}{'':>22}{_pct(PAPER['wer_noisy']):>16}")
    print(f"{'WER target voice itself (%)':34}{_pct(report['wer_original']):>18}")
    print(f"{'WER target voice via codec (%)':34}{_pct(report['wer_codec']):>18}")
    print(f"{'stopped before the interruption (%)':34}{_pct(s['clean']['model']['ended_early']):>18}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.evaluate", description=__doc__.split("\n\n")[0])
    defaults = EvalConfig()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--no-vad", action="store_true", help="skip the Silero-VAD peer")
    p.add_argument("--quick", action="store_true", help="16 utterances per scene (under a minute)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = vars(p.parse_args(argv))
    quick, json_path, no_vad = args.pop("quick"), args.pop("json"), args.pop("no_vad")
    ec = EvalConfig(**args)
    if ec.setting not in ("command", "voice"):
        p.error("--setting must be command or voice")
    if quick:
        ec.utterances = 16
    torch.set_grad_enabled(False)
    report = evaluate(ec, with_vad=not no_vad)
    print_table(report)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
