// The page's two ways to talk to Parley, behind one interface: the v1 protocol (20 ms Opus
// packets, encoded in the browser with WebCodecs; `/v1/voice`) and, where WebCodecs is missing,
// the OpenAI Realtime API with 24 kHz pcm16 (`/v1/realtime`). Both report the same events:
//   {kind: "ready", protocol, pipeline}          {kind: "speech_started", turn}
//   {kind: "speech_stopped", turn, endMs}        {kind: "transcript", turn, text, final}
//   {kind: "reply_text", turn, delta}            {kind: "reply_done", turn}
//   {kind: "cancelled", turn, reason}            {kind: "safety", turn, decision}
//   {kind: "latency", turn, marks, totalMs}      {kind: "error", code, message}
// and `audio(turn, samples)`, `closed({code, reason, opened})`. A key (an API key or a client
// secret) travels as the subprotocol `openai-insecure-api-key.<key>`.
import { OpusDecoder, OpusEncoder } from "./audio.js";

/** Frames not sent while the socket's send buffer holds more than this (a stalled network). */
const MAX_BUFFERED_BYTES = 256 * 1024;
/** The v1 binary header: version, kind, seq (u32), timestamp_us (u64), big-endian. */
const HEADER_BYTES = 14;

/** The subprotocols carrying `key` (browsers cannot set headers on a WebSocket), after `first`. */
function protocols(first, key) {
  return key ? [first, `openai-insecure-api-key.${key}`] : [first];
}

function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

/** What the two links share: the socket's life and the handlers. */
class Link {
  constructor(handlers) {
    this.handlers = handlers;
    this.opened = false;
    this.dropped = 0;
  }

  open(url, protocols) {
    this.socket = new WebSocket(url, protocols);
    this.socket.binaryType = "arraybuffer";
    this.socket.onopen = () => (this.opened = true);
    this.socket.onmessage = ({ data }) => {
      if (typeof data === "string") {
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          return;
        }
        this.receive(event);
      } else {
        this.receiveBinary(data);
      }
    };
    this.socket.onclose = ({ code, reason }) => {
      this.shut();
      this.handlers.closed({ code, reason, opened: this.opened });
    };
  }

  emit(event) {
    this.handlers.event(event);
  }

  /** Whether a message may go out now (open, and not backed up). */
  canSend() {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    if (this.socket.bufferedAmount > MAX_BUFFERED_BYTES) {
      this.dropped += 1;
      return false;
    }
    return true;
  }

  sendJson(event) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(event));
  }

  receiveBinary() {}

  shut() {}

  close() {
    this.socket?.close(1000, "bye");
  }
}

/** `/v1/voice`: Opus both ways at 48 kHz. */
export class V1Link extends Link {
  static rate = 48000;

  constructor(handlers, key) {
    super(handlers);
    this.rate = V1Link.rate;
    this.seq = 0;
    this.replyTurn = 0;
    const failed = (error) => this.emit({ kind: "error", code: "codec", message: `Opus codec: ${error.message}` });
    this.encoder = new OpusEncoder(this.rate, (bytes, timestampUs) => this.sendPacket(bytes, timestampUs), failed);
    this.decoder = new OpusDecoder(this.rate, (samples, turn) => this.handlers.audio(turn, samples), failed);
    this.open(socketUrl("/v1/voice"), protocols("parley.v1", key));
  }

  /** One 20 ms frame of microphone audio; `timestampUs` on the page's capture clock. */
  send(samples, timestampUs) {
    if (this.opened) this.encoder.encode(samples, Math.round(timestampUs));
  }

  sendPacket(payload, timestampUs) {
    if (!this.canSend()) return;
    const message = new Uint8Array(HEADER_BYTES + payload.length);
    const view = new DataView(message.buffer);
    view.setUint8(0, 1);
    view.setUint8(1, 1);
    view.setUint32(2, this.seq);
    view.setBigUint64(6, BigInt(Math.max(0, timestampUs)));
    message.set(payload, HEADER_BYTES);
    this.seq = (this.seq + 1) >>> 0;
    this.socket.send(message);
  }

  cancel() {
    this.sendJson({ type: "response.cancel" });
  }

  say(text) {
    this.sendJson({ type: "conversation.item.create", text });
  }

  receiveBinary(data) {
    if (data.byteLength > HEADER_BYTES) this.decoder.decode(new Uint8Array(data, HEADER_BYTES), this.replyTurn);
  }

  receive(e) {
    const turn = e.turn;
    switch (e.type) {
      case "session.created":
        return this.emit({ kind: "ready", protocol: "v1 · Opus 48 kHz", pipeline: e.session?.pipeline });
      case "input_audio_buffer.speech_started":
        return this.emit({ kind: "speech_started", turn });
      case "input_audio_buffer.speech_stopped":
        return this.emit({ kind: "speech_stopped", turn, endMs: e.audio_end_ms });
      case "conversation.item.input_audio_transcription.delta":
        this.heard = { turn, text: (this.heard?.turn === turn ? this.heard.text : "") + e.delta };
        return this.emit({ kind: "transcript", turn, text: this.heard.text, final: false });
      case "conversation.item.input_audio_transcription.completed":
        return this.emit({ kind: "transcript", turn, text: e.transcript, final: true });
      case "response.text.delta":
        return this.emit({ kind: "reply_text", turn, delta: e.delta });
      case "response.audio.started":
        this.replyTurn = turn;
        return;
      case "response.audio.done":
        return this.emit({ kind: "reply_done", turn });
      case "reply.cancelled":
        return this.emit({ kind: "cancelled", turn, reason: e.reason });
      case "safety.decision":
        return this.emit({ kind: "safety", turn, decision: e });
      case "turn.latency":
        return this.emit({ kind: "latency", turn, marks: e.marks, totalMs: e.total_ms });
      case "error":
        return this.emit({ kind: "error", code: e.error?.code, message: e.error?.message });
    }
  }

  shut() {
    this.encoder.close();
    this.decoder.close();
  }
}

/** The turn number in one of Parley's item ids (`item_u000003`, `item_a000003`). */
function turnOf(itemId) {
  const digits = /^item_[ua](\d+)$/.exec(itemId ?? "");
  return digits ? Number(digits[1]) : 0;
}

const REALTIME_REASONS = { turn_detected: "barge_in", client_cancelled: "client_cancel", content_filter: "safety" };

/** `/v1/realtime`: base64 pcm16 at 24 kHz in JSON events; for browsers without WebCodecs. */
export class RealtimeLink extends Link {
  static rate = 24000;

  constructor(handlers, key) {
    super(handlers);
    this.rate = RealtimeLink.rate;
    this.heard = new Map();
    this.open(socketUrl("/v1/realtime?model=parley"), protocols("realtime", key));
  }

  send(samples) {
    if (!this.opened || !this.canSend()) return;
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32767)));
    const bytes = new Uint8Array(pcm.buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    this.socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: btoa(binary) }));
  }

  cancel() {
    this.sendJson({ type: "response.cancel" });
  }

  say(text) {
    const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
    this.sendJson({ type: "conversation.item.create", item });
    this.sendJson({ type: "response.create" });
  }

  receive(e) {
    switch (e.type) {
      case "session.created": {
        const format = { type: "audio/pcm", rate: this.rate };
        const audio = { input: { format }, output: { format } };
        this.sendJson({ type: "session.update", session: { type: "realtime", output_modalities: ["audio"], audio } });
        return this.emit({ kind: "ready", protocol: "Realtime API · pcm16 24 kHz", pipeline: e.session?.model });
      }
      case "input_audio_buffer.speech_started":
        return this.emit({ kind: "speech_started", turn: turnOf(e.item_id) });
      case "input_audio_buffer.speech_stopped":
        return this.emit({ kind: "speech_stopped", turn: turnOf(e.item_id), endMs: e.audio_end_ms });
      case "conversation.item.input_audio_transcription.delta": {
        const turn = turnOf(e.item_id);
        this.heard.set(turn, (this.heard.get(turn) ?? "") + e.delta);
        return this.emit({ kind: "transcript", turn, text: this.heard.get(turn), final: false });
      }
      case "conversation.item.input_audio_transcription.completed":
        this.heard.delete(turnOf(e.item_id));
        return this.emit({ kind: "transcript", turn: turnOf(e.item_id), text: e.transcript, final: true });
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
        return this.emit({ kind: "reply_text", turn: turnOf(e.item_id), delta: e.delta });
      case "response.output_audio.delta":
        return this.handlers.audio(turnOf(e.item_id), pcmOf(e.delta));
      case "response.output_audio.done":
        return this.emit({ kind: "reply_done", turn: turnOf(e.item_id) });
      case "response.done": {
        const reason = REALTIME_REASONS[e.response?.status_details?.reason];
        const turn = turnOf(e.response?.output?.[0]?.id);
        if (reason && turn) this.emit({ kind: "cancelled", turn, reason });
        return;
      }
      case "parley.safety.decision":
        return this.emit({ kind: "safety", turn: e.turn, decision: e });
      case "parley.turn.latency":
        return this.emit({ kind: "latency", turn: e.turn, marks: e.marks, totalMs: e.total_ms });
      case "error":
        return this.emit({ kind: "error", code: e.error?.code, message: e.error?.message });
    }
  }
}

/** Base64 little-endian pcm16 to samples in [-1, 1). */
function pcmOf(base64) {
  const binary = atob(base64);
  const samples = new Float32Array(binary.length >> 1);
  for (let i = 0; i < samples.length; i++) {
    const value = binary.charCodeAt(2 * i) | (binary.charCodeAt(2 * i + 1) << 8);
    samples[i] = (value >= 0x8000 ? value - 0x10000 : value) / 32768;
  }
  return samples;
}
