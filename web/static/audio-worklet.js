// AudioWorklet processors of the voice-chat page (loaded with audioWorklet.addModule).
//
// "mic-capture": microphone at the context's rate -> 24 kHz PCM16 chunks of 40 ms (960 samples),
//   posted to the page with their RMS level. The microphone is never paused: full duplex.
// "pcm-player":  24 kHz PCM16 chunks from the server -> a ring buffer at the context's rate -> the
//   speakers. A jitter buffer: playback (re)starts once `prebufferMs` is buffered, or at once when the
//   page says the response ended; `clear` drops everything buffered immediately (barge-in).
//
// Both resample with resampler.js, so the pitch is exact at any context rate (44.1, 48, 96 kHz ...).

import { Resampler, WIRE_RATE } from "./resampler.js";

class MicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, WIRE_RATE);
    this.chunk = new Int16Array(960); // 40 ms at 24 kHz: one model frame per message
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no microphone yet: keep the node alive
    let mono = channels[0];
    if (channels.length > 1) {
      mono = new Float32Array(channels[0].length);
      for (const ch of channels) for (let i = 0; i < mono.length; i++) mono[i] += ch[i] / channels.length;
    }
    const out = this.resampler.process(mono);
    for (let i = 0; i < out.length; i++) {
      const s = Math.max(-1, Math.min(1, out[i]));
      this.sumSquares += s * s;
      this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.chunk.length) {
        const rms = Math.sqrt(this.sumSquares / this.chunk.length);
        this.port.postMessage({ pcm: this.chunk.buffer, rms }, [this.chunk.buffer]);
        this.chunk = new Int16Array(960);
        this.filled = 0;
        this.sumSquares = 0;
      }
    }
    return true;
  }
}

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.prebuffer = Math.round(((opts.prebufferMs ?? 120) * sampleRate) / 1000);
    this.ring = new Float32Array(Math.round(sampleRate * (opts.capacitySeconds ?? 20)));
    this.read = 0; // total samples read / written (the ring index is the total modulo its length)
    this.write = 0;
    this.playing = false; // false: filling the jitter buffer
    this.ended = false; // the response ended: play out what is left without waiting to prebuffer
    this.resampler = new Resampler(WIRE_RATE, sampleRate);
    this.held = false;
    this.chunkEnds = []; // write position at which each queued chunk ends
    this.stats = { chunksPlayed: 0, samplesPlayed: 0, underruns: 0, overflows: 0, chunksDropped: 0, samplesDropped: 0 };
    this.blocks = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "chunk") {
      const pcm = new Int16Array(msg.pcm);
      const x = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) x[i] = pcm[i] / 0x8000;
      this.push(this.resampler.process(x));
      this.chunkEnds.push(this.write);
      this.held = true; // the resampler holds back its look-ahead until "end"
      this.ended = false;
    } else if (msg.type === "end") {
      if (this.held) this.push(this.resampler.flush());
      this.resampler.reset();
      this.held = false;
      if (this.chunkEnds.length) this.chunkEnds[this.chunkEnds.length - 1] = this.write;
      this.ended = true;
    } else if (msg.type === "clear") {
      // barge-in: everything buffered goes, now
      const dropped = this.write - this.read;
      this.stats.samplesDropped += dropped;
      this.stats.chunksDropped += this.chunkEnds.length;
      this.chunkEnds = [];
      this.read = this.write;
      this.playing = false;
      this.ended = false;
      this.resampler.reset();
      this.held = false;
      this.port.postMessage({ type: "cleared", droppedMs: (1000 * dropped) / sampleRate, stats: this.snapshot() });
    }
  }

  push(x) {
    const room = this.ring.length - (this.write - this.read);
    if (x.length > room) {
      this.stats.overflows++;
      x = x.subarray(0, room); // keep what is already queued: it plays first
    }
    const n = this.ring.length;
    for (let i = 0; i < x.length; i++) this.ring[(this.write + i) % n] = x[i];
    this.write += x.length;
  }

  snapshot() {
    const ms = (samples) => (1000 * samples) / sampleRate;
    return { ...this.stats, playedMs: ms(this.stats.samplesPlayed), bufferedMs: ms(this.write - this.read), playing: this.playing };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const buffered = this.write - this.read;
    if (!this.playing && buffered > 0 && (buffered >= this.prebuffer || this.ended)) this.playing = true;
    if (this.playing) {
      const n = Math.min(out.length, buffered);
      for (let i = 0; i < n; i++) out[i] = this.ring[(this.read + i) % this.ring.length];
      this.read += n;
      this.stats.samplesPlayed += n;
      while (this.chunkEnds.length && this.chunkEnds[0] <= this.read) {
        this.chunkEnds.shift();
        this.stats.chunksPlayed++;
      }
      if (n < out.length) {
        // ran dry: an underrun mid-response (the network was late), or simply the end of the audio
        if (!this.ended) this.stats.underruns++;
        this.playing = false;
      }
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.blocks % 12 === 0) this.port.postMessage({ type: "stats", stats: this.snapshot() });
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
registerProcessor("pcm-player", PcmPlayer);
