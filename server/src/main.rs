//! `parley-server`: the Parley voice server. Settings come from defaults, then `--config FILE`
//! (TOML), then flags. Offline tools run instead of the server when named: `calibrate-policy`
//! and `eval-voice` (safety), `new-key` (an API key for the `[auth]` configuration).
use anyhow::Context;
use clap::{Parser, Subcommand};
use parley_server::config::{Config, EchoMode, PipelineKind};
use parley_server::models::Manifest;
use parley_server::models::tts::TtsBackend;
use parley_server::safety::tools;
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
    /// The safety policy spec (TOML) [default: the built-in server/policy/default.toml].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The safety audit log (JSON lines, appended).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Reply synthesizer: `piper` (the enrolled voice) or `espeak` (not enrolled: the voice gate
    /// cuts all of its audio).
    #[arg(long, value_enum)]
    tts: Option<TtsBackend>,
    #[command(subcommand)]
    tool: Option<Tool>,
}

#[derive(Subcommand, Debug)]
enum Tool {
    /// Fit the content classifier's per-category thresholds and margin on a labelled set.
    CalibratePolicy {
        /// The policy file to calibrate (and rewrite with --write).
        #[arg(long, default_value = "server/policy/default.toml")]
        policy_file: PathBuf,
        /// JSON lines of {"id","text","expect":"block"|"allow","category"}.
        #[arg(long, default_value = "tests/data/safety/dev.jsonl")]
        set: PathBuf,
        /// Rewrite the thresholds and margin in the policy file.
        #[arg(long)]
        write: bool,
    },
    /// Precision and recall of the voice gate: the enrolled Piper voice vs espeak-ng voices and
    /// human recordings.
    EvalVoice {
        /// Texts spoken by the voices (the `text` of each line).
        #[arg(long, default_value = "tests/data/safety/dev.jsonl")]
        set: PathBuf,
        /// Use only the first N lines.
        #[arg(long, default_value_t = 60)]
        limit: usize,
        /// Check only the last N ms of sound of each utterance, alone (a short reply's case).
        #[arg(long)]
        tail_ms: Option<u32>,
        /// With --tail-ms: check the tail after the end of a Piper reply, in one 1.6 s window
        /// (a reply's short last words are checked with the audio the gate passed before them).
        #[arg(long, requires = "tail_ms")]
        lead: bool,
        /// Where to write the JSON report.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Make a new API key: prints the key (give it to the client; it is not stored) and the
    /// `[[auth.keys]]` entry holding its SHA-256 for the configuration.
    NewKey {
        /// The key's id, named in logs, metrics and the audit log.
        #[arg(long)]
        id: String,
    },
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
        config.safety.policy = self.policy.clone().or(config.safety.policy);
        config.safety.audit_log = self.audit_log.clone().unwrap_or(config.safety.audit_log);
        config.voice.tts = self.tts.unwrap_or(config.voice.tts);
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
    let args = Args::parse();
    let config = args.config()?;
    if let Some(tool) = args.tool {
        return run_tool(tool, &config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        tracing::info!(
            pipeline = config.pipeline.name(),
            "serving http://{0}/ (the page), ws://{0}/v1/voice and ws://{0}/v1/realtime once the models are loaded",
            config.listen
        );
        parley_server::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Runs an offline tool (the safety tools against the provisioned models).
fn run_tool(tool: Tool, config: &Config) -> anyhow::Result<()> {
    let manifest = || -> anyhow::Result<Manifest> {
        let manifest = Manifest::load(&config.models.clone().unwrap_or_else(Manifest::default_dir))?;
        manifest.runtime()?;
        Ok(manifest)
    };
    let result = match tool {
        Tool::CalibratePolicy { policy_file, set, write } => {
            let set = tools::read_set(&set).map_err(anyhow::Error::msg)?;
            tools::calibrate_policy(&manifest()?, &policy_file, &set, write)
        }
        Tool::EvalVoice { set, limit, tail_ms, lead, report } => {
            let mut set = tools::read_set(&set).map_err(anyhow::Error::msg)?;
            set.truncate(limit);
            let tail = tail_ms.map(|ms| tools::Tail { ms, lead });
            tools::eval_voice(&manifest()?, &set, &config.safety, tail, report.as_deref())
        }
        Tool::NewKey { id } => {
            let (key, sha256) = parley_server::auth::new_key();
            let secret = parley_server::auth::new_token_secret();
            println!("API key for {id:?} (give it to the client; the server keeps only its hash):\n  {key}\n");
            println!("For the server's configuration file:\n");
            println!(
                "[[auth.keys]]\nid = {id:?}\nsha256 = \"{sha256}\"\n# max_sessions = 8\n# connections_per_minute = 60\n"
            );
            println!(
                "and once, the same on every instance (it signs client secrets):\n\n[auth]\ntoken_secret = \"{secret}\""
            );
            Ok(())
        }
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
