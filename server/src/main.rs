//! `parley-server`: the Parley voice server. Settings come from defaults, then `--config FILE`
//! (TOML), then flags.
use anyhow::Context;
use clap::Parser;
use parley_server::config::{Config, EchoMode, PipelineKind};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "parley-server", version, about = "Parley real-time voice conversation server")]
struct Args {
    /// TOML configuration file (see `Config` for the keys).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Maximum concurrent voice sessions.
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long)]
    max_message_bytes: Option<usize>,
    /// Close a session idle this long, in seconds.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Close a session whose client stops reading for this long, in ms.
    #[arg(long)]
    write_timeout_ms: Option<u64>,
    /// How far reply audio may run ahead of real time, in ms.
    #[arg(long)]
    max_lead_ms: Option<u32>,
    /// Pipeline: `echo` (transport only, no models) or `voice`.
    #[arg(long, value_enum)]
    pipeline: Option<PipelineKind>,
    /// Provisioned model cache (the directory holding manifest.json).
    #[arg(long)]
    models: Option<PathBuf>,
    /// Echo pipeline mode: `frame` (every frame back) or `utterance` (turns with VAD).
    #[arg(long, value_enum)]
    echo_mode: Option<EchoMode>,
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.listen = self.listen.unwrap_or(config.listen);
        config.max_sessions = self.max_sessions.unwrap_or(config.max_sessions);
        config.max_message_bytes = self.max_message_bytes.unwrap_or(config.max_message_bytes);
        config.idle_timeout_s = self.idle_timeout_s.unwrap_or(config.idle_timeout_s);
        config.write_timeout_ms = self.write_timeout_ms.unwrap_or(config.write_timeout_ms);
        config.max_lead_ms = self.max_lead_ms.unwrap_or(config.max_lead_ms);
        config.pipeline = self.pipeline.unwrap_or(config.pipeline);
        config.echo.mode = self.echo_mode.unwrap_or(config.echo.mode);
        config.models = self.models.clone().or(config.models);
        config.validate()?;
        Ok(config)
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = Args::parse().config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        // The voice pipeline loads every model (seconds): off the async runtime.
        let pipeline = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || parley_server::pipeline::from_config(&config)).await??
        };
        tracing::info!(pipeline = config.pipeline.name(), "serving ws://{}/v1/voice", config.listen);
        let metrics = std::sync::Arc::new(parley_server::metrics::Metrics::default());
        parley_server::run_with_pipeline(listener, config, pipeline, metrics, shutdown_signal()).await?;
        Ok(())
    })
}
