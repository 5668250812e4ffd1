// The page's two audio worklet processors, on the audio graph's own clock (`currentFrame`):
// `capture` cuts the microphone into 20 ms frames; `player` is the reply's jitter buffer.

/** Posts `{start, samples}`: each frame of `frameSamples` samples and the graph frame of its first. */
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.frameSamples;
    this.frame = new Float32Array(this.size);
    this.filled = 0;
    this.start = 0;
  }

  process(inputs) {
    const input = inputs[0][0];
    const n = input ? input.length : 128;
    for (let i = 0; i < n; i++) {
      if (this.filled === 0) this.start = currentFrame + i;
      this.frame[this.filled++] = input ? input[i] : 0;
      if (this.filled === this.size) {
        this.port.postMessage({ start: this.start, samples: this.frame }, [this.frame.buffer]);
        this.frame = new Float32Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

/**
 * Plays reply audio: `{turn, samples}` appends, `{end}` says the reply's last audio is in,
 * `{flush}` drops everything held (a cancelled reply stops at once). Playback starts once
 * `reserveSamples` are held (or the reply ended), and again after running dry.
 * Posts `{started, at, played}` when a turn's first sample plays (`at`: its graph frame),
 * `{flushed, played}` (samples dropped), `{underrun}`, and every 100 ms `{played, buffered}`
 * (`played`: samples played since the start).
 */
class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.reserve = options.processorOptions.reserveSamples;
    this.chunks = [];
    this.buffered = 0;
    this.playing = false;
    this.ending = false;
    this.turn = 0;
    this.played = 0;
    this.lastReport = 0;
    this.port.onmessage = ({ data }) => {
      if (data.samples) {
        this.chunks.push({ turn: data.turn, samples: data.samples, offset: 0 });
        this.buffered += data.samples.length;
      } else if (data.end) {
        this.ending = this.buffered > 0;
      } else if (data.flush) {
        const dropped = this.buffered;
        this.chunks = [];
        this.buffered = 0;
        this.playing = false;
        this.ending = false;
        this.port.postMessage({ flushed: dropped, played: this.played });
      }
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.reserve || this.ending)) this.playing = true;
    let i = 0;
    while (this.playing && i < out.length && this.chunks.length > 0) {
      const chunk = this.chunks[0];
      if (chunk.turn !== this.turn) {
        this.turn = chunk.turn;
        this.port.postMessage({ started: chunk.turn, at: currentFrame + i, played: this.played });
      }
      const n = Math.min(out.length - i, chunk.samples.length - chunk.offset);
      out.set(chunk.samples.subarray(chunk.offset, chunk.offset + n), i);
      chunk.offset += n;
      i += n;
      this.buffered -= n;
      this.played += n;
      if (chunk.offset === chunk.samples.length) this.chunks.shift();
    }
    if (this.playing && this.buffered === 0) {
      this.playing = false;
      if (this.ending) this.ending = false;
      else this.port.postMessage({ underrun: true });
    }
    if (currentFrame - this.lastReport >= sampleRate / 10) {
      this.lastReport = currentFrame;
      this.port.postMessage({ played: this.played, buffered: this.buffered });
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
