//! The reply from an OpenAI-compatible chat endpoint (`[reply] backend = "openai"`): llama.cpp's
//! server, vLLM, Ollama or a hosted API, instead of the embedded model.
//!
//! - **Request**: `POST {base_url}/chat/completions` with the conversation (system prompt first),
//!   `stream: true`, `max_tokens` and `temperature`; the API key, if any, comes from the environment
//!   variable the config names, sent as `Authorization: Bearer …`.
//! - **Response**: server-sent events, one JSON chunk per `data:` line, until `data: [DONE]`; each
//!   chunk's `choices[0].delta.content` is a text delta, handed on as it comes. Everything after
//!   the reply (gates, chunking, synthesis, barge-in, history) is the embedded model's path.
//! - **Never hangs**: the connection, the first byte of the reply and every gap between chunks
//!   each have a timeout, and the whole reply one more. A failure before the first delta (no
//!   connection, a timeout, HTTP 429 or 5xx) is retried a bounded number of times; one after it
//!   ends the reply with what was said. Every failure is an [`ApiError`] whose text says what
//!   went wrong and where, for the session's `error` event.
//! - **Bounded**: an SSE line longer than [`MAX_LINE_BYTES`] or a reply past `max_tokens` × 32
//!   characters ends the reply; the conversation sent keeps the system prompt and the latest
//!   messages up to [`MAX_PROMPT_CHARS`].
use super::llm::{Message, Role};
use serde::Deserialize;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Longest server-sent event line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most characters of conversation sent (the system prompt always goes; older messages are
/// dropped first).
pub const MAX_PROMPT_CHARS: usize = 24_000;
/// Characters of reply allowed per requested token.
const CHARS_PER_TOKEN: usize = 32;

/// Where replies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The provisioned model, in process.
    #[default]
    Embedded,
    /// An OpenAI-compatible `/v1/chat/completions` endpoint, streamed.
    Openai,
}

/// `[reply]`: the reply backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplyConfig {
    pub backend: Backend,
    /// The API's base URL, up to and including `/v1` (e.g. `http://127.0.0.1:8000/v1`).
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// The environment variable holding the API key; empty: no key is sent.
    pub api_key_env: String,
    pub temperature: f32,
    /// Timeout of the TCP (and TLS) connection, in ms.
    pub connect_timeout_ms: u64,
    /// From the request to the reply's first byte, in ms.
    pub first_byte_timeout_ms: u64,
    /// Longest gap between two chunks of the reply, in ms.
    pub idle_timeout_ms: u64,
    /// The whole reply, in ms.
    pub reply_timeout_ms: u64,
    /// Retries of a request that failed before its first delta (no connection, a timeout, HTTP
    /// 429 or 5xx), 250 ms apart and doubling.
    pub retries: u32,
}

impl Default for ReplyConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            base_url: String::new(),
            model: String::new(),
            api_key_env: String::new(),
            temperature: 0.0,
            connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 10_000,
            idle_timeout_ms: 5_000,
            reply_timeout_ms: 30_000,
            retries: 2,
        }
    }
}

/// Why a reply from the endpoint failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reply endpoint {url}: {what}")]
pub struct ApiError {
    pub url: String,
    pub what: String,
    /// Worth another try (nothing of the reply was handed on).
    retry: bool,
}

/// A client of one endpoint, shared by all sessions.
pub struct ChatApi {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Option<String>,
    config: ReplyConfig,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl ChatApi {
    /// The client of `config`'s endpoint; an error says what in the config is wrong.
    pub fn new(config: &ReplyConfig) -> Result<ChatApi, String> {
        let base = config.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("[reply] base_url must be an http:// or https:// URL, not {:?}", config.base_url));
        }
        if config.model.is_empty() {
            return Err("[reply] model must name the endpoint's model".into());
        }
        let key = match config.api_key_env.as_str() {
            "" => None,
            name => Some(std::env::var(name).map_err(|_| format!("[reply] api_key_env: ${name} is not set"))?),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .build()
            .map_err(|e| format!("[reply] HTTP client: {e}"))?;
        let url = format!("{base}/chat/completions");
        Ok(ChatApi { client, url, model: config.model.clone(), key, config: config.clone() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Streams the reply to `history` (system prompt first), at most `max_tokens` tokens, into
    /// `deltas`; ends early (dropping the connection) once `stopped()` or `deltas` is closed.
    pub async fn stream(
        &self,
        history: &[Message],
        max_tokens: usize,
        deltas: &mpsc::Sender<String>,
        stopped: impl Fn() -> bool,
    ) -> Result<(), ApiError> {
        let body = self.body(history, max_tokens);
        let mut delay = Duration::from_millis(250);
        let mut attempt = 0;
        loop {
            let mut said = false;
            let result = self.attempt(&body, max_tokens, deltas, &stopped, &mut said).await;
            match result {
                Err(e) if e.retry && !said && attempt < self.config.retries && !stopped() => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "reply endpoint failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
    }

    fn error(&self, what: impl Into<String>, retry: bool) -> ApiError {
        ApiError { url: self.url.clone(), what: what.into(), retry }
    }

    fn body(&self, history: &[Message], max_tokens: usize) -> serde_json::Value {
        let role = |r: Role| match r {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let messages: Vec<_> =
            bounded(history).iter().map(|m| serde_json::json!({ "role": role(m.role), "content": m.text })).collect();
        serde_json::json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
            "max_tokens": max_tokens,
            "temperature": self.config.temperature,
        })
    }

    /// One request: its deltas into `deltas` (`said`: some were).
    async fn attempt(
        &self,
        body: &serde_json::Value,
        max_tokens: usize,
        deltas: &mpsc::Sender<String>,
        stopped: &impl Fn() -> bool,
        said: &mut bool,
    ) -> Result<(), ApiError> {
        let cfg = &self.config;
        let deadline = Instant::now() + Duration::from_millis(cfg.reply_timeout_ms);
        let mut request = self.client.post(&self.url).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let first = Duration::from_millis(cfg.first_byte_timeout_ms);
        let mut response = match tokio::time::timeout(first, request.send()).await {
            Err(_) => return Err(self.error(format!("no response in {} ms", cfg.first_byte_timeout_ms), true)),
            Ok(Err(e)) => return Err(self.error(describe(&e), true)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let text = tokio::time::timeout(first, response.text()).await.ok().and_then(Result::ok).unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            let retry = status.as_u16() == 429 || status.is_server_error();
            return Err(self.error(format!("HTTP {status}: {}", text.trim()), retry));
        }
        let (mut line, mut chars) = (Vec::<u8>::new(), 0usize);
        let max_chars = max_tokens.max(1) * CHARS_PER_TOKEN;
        let mut wait = first;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(wait.min(left), response.chunk()).await {
                Err(_) if left <= wait => {
                    return Err(self.error(format!("reply not done in {} ms", cfg.reply_timeout_ms), false));
                }
                Err(_) => return Err(self.error(format!("no data for {} ms", wait.as_millis()), chars == 0)),
                Ok(Err(e)) => return Err(self.error(describe(&e), chars == 0)),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(chunk))) => chunk,
            };
            wait = Duration::from_millis(cfg.idle_timeout_ms);
            for &byte in chunk.iter() {
                if byte != b'\n' {
                    line.push(byte);
                    if line.len() > MAX_LINE_BYTES {
                        return Err(self.error(format!("an event line over {MAX_LINE_BYTES} bytes"), false));
                    }
                    continue;
                }
                let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                line.clear();
                let Some(data) = text.strip_prefix("data:").map(str::trim_start) else { continue };
                if data == "[DONE]" {
                    return Ok(());
                }
                let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
                    self.error(format!("a stream chunk that is not a chat completion chunk ({e})"), chars == 0)
                })?;
                let Some(delta) = chunk.choices.into_iter().next().and_then(|c| c.delta.content) else { continue };
                if delta.is_empty() {
                    continue;
                }
                chars += delta.chars().count();
                *said = true;
                if stopped() || deltas.send(delta).await.is_err() || chars >= max_chars {
                    return Ok(());
                }
            }
        }
    }
}

/// The system prompt (if first) and the latest messages that fit [`MAX_PROMPT_CHARS`].
fn bounded(history: &[Message]) -> Vec<Message> {
    let (system, rest) = match history.first() {
        Some(m) if m.role == Role::System => (Some(m), &history[1..]),
        _ => (None, history),
    };
    let mut budget = MAX_PROMPT_CHARS.saturating_sub(system.map_or(0, |m| m.text.len()));
    let mut kept: Vec<Message> = Vec::new();
    for m in rest.iter().rev() {
        if m.text.len() > budget && !kept.is_empty() {
            break;
        }
        budget = budget.saturating_sub(m.text.len());
        kept.push(m.clone());
    }
    kept.extend(system.cloned());
    kept.reverse();
    kept
}

/// A transport error in words (reqwest's own text hides the cause).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_prompt_and_the_latest_messages_are_kept() {
        let long = "x".repeat(MAX_PROMPT_CHARS / 2);
        let history = vec![
            Message::system("be brief"),
            Message::user(long.clone()),
            Message::assistant(long.clone()),
            Message::user("and now?"),
        ];
        let kept = bounded(&history);
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert_eq!(kept[0], history[0]);
        assert_eq!(kept[2], history[3]);
    }

    #[test]
    fn a_bad_config_says_what_is_wrong() {
        let config = ReplyConfig { backend: Backend::Openai, ..Default::default() };
        assert!(ChatApi::new(&config).err().unwrap().contains("base_url"));
        let config = ReplyConfig { base_url: "http://127.0.0.1:1/v1".into(), ..config };
        assert!(ChatApi::new(&config).err().unwrap().contains("model"));
        let config = ReplyConfig { model: "m".into(), api_key_env: "PARLEY_TEST_NO_SUCH_KEY".into(), ..config };
        assert!(ChatApi::new(&config).err().unwrap().contains("PARLEY_TEST_NO_SUCH_KEY"));
    }

    fn config(base_url: String) -> ReplyConfig {
        ReplyConfig { backend: Backend::Openai, base_url, model: "m".into(), ..Default::default() }
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_fails_after_bounded_retries() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let api = ChatApi::new(&ReplyConfig { retries: 2, ..config(format!("http://127.0.0.1:{port}/v1")) }).unwrap();
        let (tx, _rx) = mpsc::channel(4);
        let started = Instant::now();
        let e = api.stream(&[Message::user("hi")], 8, &tx, || false).await.unwrap_err();
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}/v1/chat/completions")), "{e}");
        // Two retries, 250 + 500 ms apart: the session gets its error, not a hang.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_endpoint_that_never_answers_times_out_and_is_retried_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (count_tx, mut count_rx) = mpsc::unbounded_channel();
        // Accepts every connection and holds it open without a byte of reply.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                let _ = count_tx.send(());
            }
        });
        let cfg = ReplyConfig { first_byte_timeout_ms: 300, retries: 1, ..config(format!("http://{addr}/v1")) };
        let api = ChatApi::new(&cfg).unwrap();
        let (tx, _rx) = mpsc::channel(4);
        let e = api.stream(&[Message::user("hi")], 8, &tx, || false).await.unwrap_err();
        assert!(e.to_string().contains("no response in 300 ms"), "{e}");
        let mut connections = 0;
        while count_rx.try_recv().is_ok() {
            connections += 1;
        }
        assert_eq!(connections, 2, "one request and one retry");
    }
}
