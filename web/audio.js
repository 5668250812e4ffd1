// The page's audio: the microphone (echo cancellation, noise suppression, auto gain), one audio
// graph holding both worklets (so capture and playback share one clock), and the WebCodecs Opus
// encoder and decoder the v1 protocol uses.

export const FRAME_MS = 20;
/** Reply audio held before playback starts: absorbs network and decoder jitter. */
export const RESERVE_MS = 60;

/** Opens the microphone; rejects with the browser's error (`NotAllowedError`, `NotFoundError`…). */
export function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    const error = new Error("this page needs a secure origin (https:// or localhost) for the microphone");
    error.name = "InsecureContext";
    return Promise.reject(error);
  }
  return navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
}

/** The microphone and the reply player in one AudioContext at `rate` Hz. */
export class AudioGraph {
  static async open(microphone, rate, handlers) {
    const context = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
    try {
      await context.audioWorklet.addModule("/worklets.js");
      await context.resume();
    } catch (error) {
      context.close();
      throw error;
    }
    return new AudioGraph(context, microphone, handlers);
  }

  /** `handlers`: `frame(startFrame, samples)`, `started(turn, atFrame, played)`, `stats({played,
   * buffered, flushed, underruns, playedAtFlush})`; `played`: samples the player played so far. */
  constructor(context, microphone, handlers) {
    this.context = context;
    this.microphone = microphone;
    this.rate = context.sampleRate;
    this.stats = { played: 0, buffered: 0, flushed: 0, underruns: 0 };
    const frameSamples = (this.rate * FRAME_MS) / 1000;
    this.source = context.createMediaStreamSource(microphone);
    this.capture = new AudioWorkletNode(context, "capture", { processorOptions: { frameSamples } });
    this.capture.port.onmessage = ({ data }) => handlers.frame(data.start, data.samples);
    // The capture node's (silent) output keeps it in the rendered graph.
    const sink = new GainNode(context, { gain: 0 });
    this.source.connect(this.capture).connect(sink).connect(context.destination);
    const reserveSamples = (this.rate * RESERVE_MS) / 1000;
    this.player = new AudioWorkletNode(context, "player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { reserveSamples },
    });
    this.player.port.onmessage = ({ data }) => {
      if (data.started !== undefined) handlers.started(data.started, data.at, data.played);
      if (data.flushed !== undefined) {
        this.stats.flushed += data.flushed;
        this.stats.playedAtFlush = data.played;
      }
      if (data.underrun) this.stats.underruns += 1;
      if (data.played !== undefined) this.stats.played = data.played;
      if (data.buffered !== undefined) this.stats.buffered = data.buffered;
      handlers.stats(this.stats);
    };
    this.player.connect(context.destination);
  }

  /** Graph frames to seconds on the graph's clock. */
  seconds(frame) {
    return frame / this.rate;
  }

  play(turn, samples) {
    this.player.port.postMessage({ turn, samples }, [samples.buffer]);
  }

  /** The reply's last audio is in: play what is held even if under the reserve. */
  end() {
    this.player.port.postMessage({ end: true });
  }

  /** Drops every sample held: a cancelled reply is heard to stop now. */
  flush() {
    this.player.port.postMessage({ flush: true });
  }

  close() {
    this.microphone.getTracks().forEach((track) => track.stop());
    this.context.close();
  }
}

/** Whether this browser encodes and decodes raw Opus with WebCodecs at `rate` Hz. */
export async function opusAvailable(rate) {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") return false;
  const config = { codec: "opus", sampleRate: rate, numberOfChannels: 1 };
  try {
    const [encoder, decoder] = await Promise.all([
      AudioEncoder.isConfigSupported({ ...config, bitrate: 32000 }),
      AudioDecoder.isConfigSupported(config),
    ]);
    return encoder.supported && decoder.supported;
  } catch {
    return false;
  }
}

/** 20 ms mono frames in, one raw Opus packet each out: `packet(bytes, timestampUs)`. */
export class OpusEncoder {
  constructor(rate, packet, failed) {
    this.rate = rate;
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const bytes = new Uint8Array(chunk.byteLength);
        chunk.copyTo(bytes);
        packet(bytes, chunk.timestamp);
      },
      error: failed,
    });
    this.encoder.configure({
      codec: "opus",
      sampleRate: rate,
      numberOfChannels: 1,
      bitrate: 32000,
      opus: { format: "opus", frameDuration: FRAME_MS * 1000, complexity: 5 },
    });
  }

  encode(samples, timestampUs) {
    if (this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: this.rate,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: timestampUs,
      data: samples,
    });
    this.encoder.encode(data);
    data.close();
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

/** Raw Opus packets in, PCM out in the same order: `pcm(samples, tag)`, `tag` given with the packet. */
export class OpusDecoder {
  constructor(rate, pcm, failed) {
    this.tags = [];
    this.decoder = new AudioDecoder({
      output: (data) => {
        const samples = new Float32Array(data.numberOfFrames);
        data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
        data.close();
        pcm(samples, this.tags.shift());
      },
      error: failed,
    });
    this.decoder.configure({ codec: "opus", sampleRate: rate, numberOfChannels: 1 });
    this.timestamp = 0;
  }

  decode(bytes, tag) {
    if (this.decoder.state !== "configured") return;
    this.tags.push(tag);
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: bytes }));
    this.timestamp += FRAME_MS * 1000;
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}
