//! The audio path's building blocks: Opus codec wrappers, fixed-ratio resampling, and the input
//! ring that carries 16 kHz audio from the network reader to the session's pipeline.
//!
//! # Layout
//! - [`codec`]: Opus decode (with loss concealment) and encode of 20 ms mono frames.
//! - [`resample`]: the streaming resampler (shared with the client, from `parley-protocol`).
//! - [`ring`]: the SPSC ring (ringbuf) of 16 kHz samples plus per-frame arrival stamps.
pub mod codec;
pub use parley_protocol::resample;
pub mod ring;

/// Sample rate of the pipeline side of the session, in Hz (what VAD and Whisper take).
pub const PIPELINE_RATE: u32 = 16_000;
