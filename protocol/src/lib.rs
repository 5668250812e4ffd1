//! Parley wire protocol, shared by the server and the client: the binary audio-frame header,
//! the JSON events (named after the OpenAI Realtime API where a counterpart exists), the
//! WebSocket close codes, and the constants both ends must agree on.
//!
//! The protocol is specified in `docs/protocol.md`; this crate is its executable form.
//!
//! # Layout
//! - [`frame`]: the 14-byte header in front of every binary (Opus) message.
//! - [`event`]: client → server and server → client JSON events, tagged by `type`.
//! - [`close`]: WebSocket close codes and what each means.
//! - [`resample`]: the streaming resampler between stream and pipeline rates (20 ms chunks), so
//!   both ends convert audio the same way.
pub mod close;
pub mod event;
pub mod frame;
pub mod resample;

pub use close::CloseCode;
pub use event::{ClientEvent, ErrorCode, EventError, ServerEvent};
pub use frame::{FrameError, FrameHeader, FrameKind};

/// Protocol version carried in every frame header and announced in `session.created`.
/// Bumped on any incompatible change to the header or the events.
pub const PROTOCOL_VERSION: u8 = 1;

/// WebSocket endpoint path; the version is part of the path so a v2 can live beside v1.
pub const WS_PATH: &str = "/v1/voice";

/// Duration of one Opus frame in ms: the client's clock tick and the server's pacing unit.
pub const FRAME_MS: u32 = 20;

/// Default stream sample rate in Hz (Opus' native rate; no resampling inside libopus).
pub const DEFAULT_SAMPLE_RATE: u32 = 48_000;

/// Sample rates accepted for the audio streams in Hz (Opus also supports 8 and 12 kHz, which are
/// too narrow-band for speech recognition).
pub const SUPPORTED_SAMPLE_RATES: [u32; 3] = [16_000, 24_000, 48_000];

/// Largest Opus packet for one frame, in bytes (RFC 6716 §3.4, R5).
pub const MAX_OPUS_PACKET_BYTES: usize = 1275;

/// Largest well-formed binary message: header + one maximal Opus packet.
pub const MAX_AUDIO_MESSAGE_BYTES: usize = frame::HEADER_LEN + MAX_OPUS_PACKET_BYTES;

/// Socket read size for WebSocket peers (tungstenite's `read_buffer_size`). Messages here are
/// ~100 bytes every 20 ms, and tungstenite zero-fills this much before every read: its 128 KiB
/// default was 39 % of the server's CPU with 1,000 echo streams. A larger message still arrives
/// whole (the buffer grows for it).
pub const WS_READ_BUFFER_BYTES: usize = 4096;

/// Samples in one frame at `sample_rate` Hz.
pub const fn frame_samples(sample_rate: u32) -> usize {
    (sample_rate / 1000 * FRAME_MS) as usize
}

/// Whether `rate` is an accepted stream sample rate.
pub fn is_supported_rate(rate: u32) -> bool {
    SUPPORTED_SAMPLE_RATES.contains(&rate)
}
