//! Parley server: a real-time voice conversation server.
//!
//! # Layout
//! - [`models`]: the provisioned-model manifest, ONNX Runtime set-up, and one typed API per model
//!   (VAD, ASR, reply LLM, TTS, speaker and text embedders).
pub mod models;
