//! Server configuration: defaults, an optional TOML file, and command-line overrides (in
//! `main.rs`) on top. Every limit the server enforces on clients lives here.
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Which pipeline serves sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PipelineKind {
    /// Transport only: returns the user's audio (no models). For tests and overhead benchmarks.
    Echo,
    /// The speech-to-speech model pipeline.
    Voice,
}

impl PipelineKind {
    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::Echo => "echo",
            PipelineKind::Voice => "voice",
        }
    }
}

pub use crate::conversation::echo::{EchoConfig, EchoMode};

/// Everything `run` needs to know.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Concurrent voice sessions; upgrades beyond it get 503 with `Retry-After`.
    pub max_sessions: usize,
    /// Largest WebSocket message accepted, in bytes (audio frames are at most 1289 bytes; this
    /// bounds JSON events). Larger ones close the session with 1009.
    pub max_message_bytes: usize,
    /// Largest message of a Realtime API session (`/v1/realtime`), in bytes: an
    /// `input_audio_buffer.append` may carry up to 15 MiB of audio, 20 MiB in base64.
    pub realtime_max_message_bytes: usize,
    /// Malformed messages in a row after which the session is closed with 1008.
    pub max_consecutive_errors: u32,
    /// A session with no client message for this long is closed with 4001, in seconds.
    pub idle_timeout_s: u64,
    /// A WebSocket ping every this many seconds keeps proxies from closing a quiet tunnel (the
    /// client's pongs do not count as activity for the idle timeout); 0: none.
    pub ping_interval_s: u64,
    /// Longest session, in seconds; then it is closed with 4002. 0: no limit.
    pub max_session_s: u64,
    /// Most bytes a session may send, in all its messages; then it is closed with 4002. 0: no limit.
    pub max_session_bytes: u64,
    /// A write blocked for this long means the client stopped reading: close with 4000, in ms.
    pub write_timeout_ms: u64,
    /// Outgoing messages queued per session before new ones are dropped (≈ 20 ms of audio each).
    pub send_queue: usize,
    /// How far reply audio may run ahead of real time, in ms.
    pub max_lead_ms: u32,
    /// Input ring capacity per session, in ms of 16 kHz audio.
    pub input_buffer_ms: u32,
    /// Time allowed for the HTTP request head / WebSocket handshake, in ms.
    pub handshake_timeout_ms: u64,
    /// After a shutdown signal, how long sessions get to finish the turn they are in before they
    /// are closed (1001), in ms.
    pub drain_timeout_ms: u64,
    /// The `Retry-After` of a 503 (loading, full, draining), in seconds.
    pub retry_after_s: u64,
    /// Reply Opus bitrate, in bit/s.
    pub opus_bitrate: i32,
    /// Reply Opus encoder complexity (0–10; 5 costs about half of 10 at nearly the same quality).
    pub opus_complexity: i32,
    /// Kernel send buffer per connection (SO_SNDBUF), in bytes; `None` keeps the OS default.
    pub socket_send_buffer: Option<usize>,
    pub pipeline: PipelineKind,
    pub echo: EchoConfig,
    /// The provisioned model cache (holding `manifest.json`); `None`: `$PARLEY_MODELS`, else the
    /// cache this build expects (`~/.cache/parley/models/<key>`).
    pub models: Option<std::path::PathBuf>,
    pub voice: crate::conversation::voice::VoiceConfig,
    pub safety: crate::safety::SafetyConfig,
    pub reply: crate::models::chat_api::ReplyConfig,
    pub auth: crate::auth::AuthConfig,
    /// TLS for every connection (`wss://`, `https://`); `None`: plain TCP.
    pub tls: Option<crate::conn::TlsConfig>,
    /// Serve plain TCP on a non-loopback address (behind a proxy that terminates TLS).
    pub allow_plaintext: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_sessions: 64,
            max_message_bytes: 16 * 1024,
            realtime_max_message_bytes: 21 * 1024 * 1024,
            max_consecutive_errors: 50,
            idle_timeout_s: 30,
            ping_interval_s: 20,
            max_session_s: 4 * 3600,
            max_session_bytes: 1 << 30,
            write_timeout_ms: 2_000,
            send_queue: 64,
            max_lead_ms: 100,
            input_buffer_ms: 2_000,
            handshake_timeout_ms: 5_000,
            drain_timeout_ms: 10_000,
            retry_after_s: 2,
            opus_bitrate: 32_000,
            opus_complexity: 5,
            socket_send_buffer: None,
            pipeline: PipelineKind::Voice,
            echo: EchoConfig::default(),
            models: None,
            voice: Default::default(),
            safety: Default::default(),
            reply: Default::default(),
            auth: Default::default(),
            tls: None,
            allow_plaintext: false,
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; absent keys keep their defaults, unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.display().to_string(), source },
            other => other,
        })
    }

    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: "<config>".into(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.max_sessions == 0 {
            return invalid("max_sessions must be at least 1");
        }
        if self.realtime_max_message_bytes < 64 * 1024 {
            return invalid("realtime_max_message_bytes must be at least 64 KiB");
        }
        if self.max_message_bytes < parley_protocol::MAX_AUDIO_MESSAGE_BYTES {
            return invalid("max_message_bytes must hold one audio frame (1289 bytes)");
        }
        if self.send_queue < 2 || self.input_buffer_ms < 100 || self.max_lead_ms < parley_protocol::FRAME_MS {
            return invalid("send_queue >= 2, input_buffer_ms >= 100 and max_lead_ms >= 20 are required");
        }
        if !(0..=10).contains(&self.opus_complexity) || !(6_000..=510_000).contains(&self.opus_bitrate) {
            return invalid("opus_complexity must be 0..=10 and opus_bitrate 6000..=510000");
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.allow_plaintext {
            return invalid(
                "listening beyond loopback needs TLS ([tls] cert and key) or allow_plaintext = true \
                 (behind a proxy that terminates TLS)",
            );
        }
        if !self.listen.ip().is_loopback() && self.auth.keys.is_empty() && !self.auth.allow_anonymous {
            return invalid(
                "listening beyond loopback needs API keys ([[auth.keys]], see `parley-server new-key`) \
                 or auth.allow_anonymous = true",
            );
        }
        crate::auth::Auth::new(&self.auth).map_err(ConfigError::Invalid)?;
        let (full, short) = (self.safety.voice_threshold, self.safety.voice_threshold_short);
        if !(full > 0.0 && full < 1.0 && short > 0.0 && short <= full) {
            return invalid(
                "safety.voice_threshold must be in (0, 1), and voice_threshold_short in (0, voice_threshold]",
            );
        }
        Ok(())
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let config = Config::from_toml(
            "listen = \"0.0.0.0:9000\"\nallow_plaintext = true\nmax_sessions = 3\npipeline = \"echo\"\n[echo]\nmode = \"utterance\"\n[auth]\nallow_anonymous = true\n",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.max_sessions, 3);
        assert_eq!(config.echo.mode, EchoMode::Utterance);
        assert_eq!(config.max_lead_ms, 100);
        assert!(matches!(Config::from_toml("max_sesions = 3"), Err(ConfigError::Parse { .. })));
        assert!(matches!(Config::from_toml("max_sessions = 0"), Err(ConfigError::Invalid(_))));
    }
}
