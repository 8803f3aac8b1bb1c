// A streaming windowed-sinc resampler (Blackman window, table lookup with linear interpolation).
// State carries across calls, so a stream cut into any chunks resamples to the same samples (within
// rounding) as in one piece; the low-pass sits below both rates, so 48 -> 24 kHz does not alias. Used by the worklets
// (audio-worklet.js) and tested on its own in a real browser (tests/test_web_page.py).

export const WIRE_RATE = 24000; // the server's audio rate, both ways

/** `new Resampler(48000, 24000).process(chunk)` -> the output samples that are ready. */
export class Resampler {
  constructor(inRate, outRate, halfTaps = 12) {
    this.step = inRate / outRate; // input samples per output sample
    this.cutoff = Math.min(1, outRate / inRate) * 0.92; // of the input's Nyquist: below both rates
    this.half = Math.ceil(halfTaps / Math.min(1, outRate / inRate)); // kernel half-width, input samples
    this.identity = inRate === outRate;
    const res = 128; // table points per input sample
    this.res = res;
    this.table = new Float32Array(this.half * res + 2);
    for (let i = 0; i < this.table.length; i++) {
      const x = i / res;
      const w = x >= this.half ? 0 : 0.42 + 0.5 * Math.cos((Math.PI * x) / this.half) + 0.08 * Math.cos((2 * Math.PI * x) / this.half);
      const s = x === 0 ? 1 : Math.sin(Math.PI * this.cutoff * x) / (Math.PI * this.cutoff * x);
      this.table[i] = this.cutoff * s * w;
    }
    this.reset();
  }

  reset() {
    this.buf = new Float32Array(4096);
    this.len = this.half; // zeros of history, so the first output sample is centred on input 0
    this.pos = this.half; // time of the next output sample, in input samples from buf[0]
  }

  /** Resample `input` (Float32Array); returns the output samples that are ready. */
  process(input) {
    if (this.identity) return Float32Array.from(input);
    if (this.len + input.length > this.buf.length) {
      const bigger = new Float32Array(2 * (this.len + input.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const n = Math.max(0, Math.ceil((this.len - this.half - this.pos) / this.step));
    const out = new Float32Array(n);
    const { buf, half, res, table } = this;
    for (let k = 0; k < n; k++) {
      const t = this.pos;
      const centre = Math.floor(t);
      let acc = 0;
      for (let j = centre - half + 1; j <= centre + half; j++) {
        const d = Math.abs(t - j) * res;
        const i = d | 0;
        const f = d - i;
        acc += buf[j] * (table[i] + f * (table[i + 1] - table[i]));
      }
      out[k] = acc;
      this.pos += this.step;
    }
    // keep only the history the next call needs
    const keep = Math.floor(this.pos) - half;
    if (keep > 0) {
      this.buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.pos -= keep;
    }
    return out;
  }

  /** The samples still held back for the kernel's look-ahead (padded with silence). */
  flush() {
    return this.identity ? new Float32Array(0) : this.process(new Float32Array(this.half + 1));
  }
}
