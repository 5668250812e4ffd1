//! Parley server: a real-time voice conversation server.
//!
//! # Layout (each layer uses only those below it)
//! - [`server`]: `run(listener, config, shutdown)`: accept loop, HTTP routing (`/healthz`,
//!   `/readyz`, `/metrics`, the `/v1/voice` and `/v1/realtime` upgrades), admission (503 before
//!   the upgrade), graceful drain; [`conn`]: a connection, plain TCP or TLS;
//!   [`http`]: the tiny HTTP responder it uses; [`web`]: the browser page it serves at `/`.
//! - [`auth`]: API keys (stored hashed), signed client secrets, per-key session caps and rates.
//! - [`transport`]: the edge. One WebSocket session's life (writer, limits, close codes) and the
//!   wire protocols that drive the conversation: [`transport::v1`] (Opus frames + JSON events)
//!   and [`transport::realtime`] (the OpenAI Realtime API).
//! - [`conversation`]: the transport-neutral core, PCM in, events and PCM out: the boundary
//!   types, the [`conversation::pacer`], the echo pipeline, and the voice pipeline (turn taking,
//!   reply, speech, safety gates as separate modules).
//! - [`safety`]: the policy spec, the content classifier and voice gate, the audit log.
//! - [`engine`]: engine threads that own the models; sessions submit jobs through bounded queues.
//! - [`models`]: the provisioned-model manifest, ONNX Runtime set-up, and one typed API per model
//!   (VAD, ASR, reply LLM, TTS, speaker and text embedders, the external reply endpoint).
//! - [`audio`]: Opus codec, resampling, and the SPSC input ring.
//! - [`metrics`]: counters and histograms in the Prometheus text format; [`config`]: defaults,
//!   TOML file, validation.
pub mod audio;
pub mod auth;
pub mod config;
pub mod conn;
pub mod conversation;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod models;
pub mod safety;
pub mod server;
pub mod transport;
pub mod web;

pub use config::Config;
pub use server::{ServerError, run, run_with_pipeline, serve};
