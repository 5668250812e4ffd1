//! Parley server: a real-time voice conversation server.
//!
//! # Layout
//! - [`models`]: the provisioned-model manifest, ONNX Runtime set-up, and one typed API per model
//!   (VAD, ASR, reply LLM, TTS, speaker and text embedders).
//! - [`server`]: `run(listener, config, shutdown)`: accept loop, HTTP routing (`/healthz`,
//!   `/metrics`, the `/v1/voice` upgrade), session cap, graceful drain. [`http`]: the tiny
//!   HTTP responder it uses.
//! - [`session`]: one WebSocket session: reader, writer, limits, error events, close codes.
//! - [`audio`]: Opus codec, resampling, and the SPSC input ring to the pipeline.
//! - [`pacer`]: reply audio → 20 ms Opus frames, sent with a bounded lead over real time.
//! - [`pipeline`]: the session ↔ pipeline boundary, and the echo (transport-only) pipeline.
//! - [`safety`]: the policy spec, the content classifier and voice gate, the audit log.
//! - [`engine`]: engine threads that own the models; sessions submit jobs through bounded queues.
//! - [`metrics`]: counters and histograms in the Prometheus text format.
//! - [`config`]: defaults, TOML file, validation.
pub mod audio;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod models;
pub mod pacer;
pub mod pipeline;
pub mod safety;
pub mod server;
pub mod session;

pub use config::Config;
pub use server::{ServerError, run, run_with_pipeline};
