//! The listener: accepts connections (at most `max_sessions` + a small margin at once), routes
//! each request (`/healthz` liveness, `/readyz` readiness, `/metrics`, the page at `/`, the
//! WebSocket upgrades at `/v1/voice` and `/v1/realtime`), answers 503 with `Retry-After` before
//! the upgrade when it cannot take a session (loading, full or draining), and on shutdown lets
//! every session finish its turn before closing it.
use crate::auth::{self, Auth, Denied, Identity, KeySession};
use crate::config::Config;
use crate::conn::{Conn, TlsAcceptor};
use crate::conversation::{self, Pipeline};
use crate::http::{self, Request};
use crate::metrics::{Metrics, Refusal};
use crate::transport::{self, SessionContext, close_message};
use futures_util::SinkExt;
use parley_protocol::{CloseCode, WS_PATH};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

/// Connections beyond `max_sessions` served at once: health checks, metrics scrapes and refusals.
const EXTRA_CONNECTIONS: usize = 64;
/// Longest back-off after repeated accept errors (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(2);
/// The subprotocol a browser may offer on `/v1/voice` (to carry its key in another one).
const V1_SUBPROTOCOL: &str = "parley.v1";
/// Where browsers' client secrets are minted (OpenAI's path).
pub const CLIENT_SECRETS_PATH: &str = "/v1/realtime/client_secrets";
/// Largest client-secret request body.
const CLIENT_SECRET_BODY_BYTES: usize = 64 * 1024;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("pipeline unavailable: {0}")]
    PipelineUnavailable(String),
    #[error(transparent)]
    Models(#[from] crate::models::ModelError),
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
}

struct Shared {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Set once the pipeline has loaded: until then `/readyz` says `loading` and upgrades get 503.
    pipeline: OnceLock<Arc<dyn Pipeline>>,
    sessions: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Set by the shutdown signal: `/readyz` fails and upgrades get 503 while sessions finish.
    draining: AtomicBool,
    auth: Auth,
    /// Set when the configuration names a certificate: every connection is TLS.
    tls: Option<TlsAcceptor>,
    shutdown: broadcast::Sender<()>,
}

/// What `/readyz` and the 503 before an upgrade say of a refusal.
fn refusal_message(refusal: Refusal, max_sessions: usize) -> String {
    match refusal {
        Refusal::Loading => "the server is still loading its models; retry later".into(),
        Refusal::Draining => "the server is shutting down; connect to another instance".into(),
        Refusal::Full => format!("server full: {max_sessions} of {max_sessions} sessions in use; retry later"),
    }
}

impl Shared {
    /// The pipeline a new session would get, or why there is none now.
    fn readiness(&self) -> Result<Arc<dyn Pipeline>, Refusal> {
        if self.draining.load(Relaxed) {
            return Err(Refusal::Draining);
        }
        let pipeline = self.pipeline.get().ok_or(Refusal::Loading)?;
        if self.sessions.available_permits() == 0 {
            return Err(Refusal::Full);
        }
        Ok(pipeline.clone())
    }
}

/// Runs the server with the pipeline the configuration names until `shutdown` completes. The port
/// answers (`/healthz`, `/readyz`, the page) while the models load.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future) -> Result<(), ServerError> {
    let load = {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || pipeline_from_config(&config))
                .await
                .map_err(|e| ServerError::PipelineUnavailable(e.to_string()))?
                .map_err(ServerError::from)
        }
    };
    serve(listener, config, load, Arc::new(Metrics::default()), shutdown).await
}

/// Builds the pipeline the configuration names. The voice pipeline loads every model from the
/// provisioned cache first (seconds: call it off the async runtime, e.g. in `spawn_blocking`).
pub fn pipeline_from_config(config: &Config) -> Result<Arc<dyn Pipeline>, crate::models::ModelError> {
    match config.pipeline {
        crate::config::PipelineKind::Echo => Ok(Arc::new(conversation::echo::EchoPipeline::new(config.echo.clone()))),
        crate::config::PipelineKind::Voice => {
            let dir = config.models.clone().unwrap_or_else(crate::models::Manifest::default_dir);
            let manifest = crate::models::Manifest::load(&dir)?;
            Ok(Arc::new(conversation::voice::VoicePipeline::load(
                manifest,
                config.voice.clone(),
                &config.safety,
                &config.reply,
            )?))
        }
    }
}

/// Runs the server with a loaded pipeline and a metrics registry until `shutdown` completes.
pub async fn run_with_pipeline(
    listener: TcpListener,
    config: Config,
    pipeline: Arc<dyn Pipeline>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    serve(listener, config, async { Ok(pipeline) }, metrics, shutdown).await
}

/// Serves `listener` at once, and sessions once `load` yields the pipeline (a failed load ends the
/// server with its error). When `shutdown` completes: readiness fails and new sessions get 503
/// while every session finishes the turn it is in (closed with 1001 when it has, or after
/// `drain_timeout_ms`); returns when the last session has ended or the deadline has passed.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    load: impl Future<Output = Result<Arc<dyn Pipeline>, ServerError>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    config.validate()?;
    let (shutdown_tx, _) = broadcast::channel(1);
    let drain_deadline = Duration::from_millis(config.drain_timeout_ms) + 2 * transport::CLOSE_GRACE;
    let auth = Auth::new(&config.auth).map_err(crate::config::ConfigError::Invalid)?;
    if auth.enabled() && config.auth.token_secret.is_none() {
        tracing::warn!("auth.token_secret is not set: client secrets minted here work only on this instance");
    }
    let tls = config.tls.as_ref().map(TlsAcceptor::new).transpose().map_err(crate::config::ConfigError::Invalid)?;
    let shared = Arc::new(Shared {
        auth,
        tls,
        sessions: Arc::new(Semaphore::new(config.max_sessions)),
        config: Arc::new(config),
        metrics,
        pipeline: OnceLock::new(),
        next_id: AtomicU64::new(1),
        draining: AtomicBool::new(false),
        shutdown: shutdown_tx,
    });
    let connections = Arc::new(Semaphore::new(shared.config.max_sessions + EXTRA_CONNECTIONS));
    tracing::info!(addr = ?listener.local_addr().ok(), tls = shared.tls.is_some(), "listening");
    let serving = accept_loop(&listener, &shared, &connections);
    tokio::pin!(serving, load, shutdown);
    let mut loading = true;
    loop {
        tokio::select! {
            _ = &mut serving => {}
            pipeline = &mut load, if loading => {
                let pipeline = pipeline?;
                tracing::info!(pipeline = pipeline.name(), "ready");
                let _ = shared.pipeline.set(pipeline);
                loading = false;
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: sessions finish their turns; new ones are refused");
    shared.draining.store(true, Relaxed);
    let _ = shared.shutdown.send(());
    // Every session holds a permit until it ends: all of them back means the last one has ended.
    let ended = shared.sessions.acquire_many(u32::try_from(shared.config.max_sessions).unwrap_or(u32::MAX));
    tokio::select! {
        _ = &mut serving => {}
        _ = ended => tracing::info!("every session has ended"),
        _ = tokio::time::sleep(drain_deadline) => tracing::warn!("sessions still open after the drain deadline"),
    }
    Ok(())
}

async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, connections: &Arc<Semaphore>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = connections.clone().acquire_owned().await.expect("semaphore never closed");
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let shared = shared.clone();
                let span = tracing::debug_span!("conn", %peer);
                tokio::spawn(
                    async move {
                        handle_connection(stream, &shared).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

async fn handle_connection(tcp: TcpStream, shared: &Arc<Shared>) {
    let config = &shared.config;
    let _ = tcp.set_nodelay(true);
    if let Some(bytes) = config.socket_send_buffer {
        let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(bytes);
    }
    let head_timeout = Duration::from_millis(config.handshake_timeout_ms);
    let mut stream = match &shared.tls {
        None => Conn::Plain(tcp),
        Some(tls) => match tokio::time::timeout(head_timeout, tls.accept(tcp)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                shared.metrics.tls_handshake_failures.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    let request = match tokio::time::timeout(head_timeout, http::read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err(http::HttpError::Eof)) | Ok(Err(http::HttpError::Io(_))) => return,
        Ok(Err(e)) => {
            let _ = http::respond(&mut stream, "400 Bad Request", "text/plain", &format!("{e}\n")).await;
            return;
        }
        Err(_) => {
            let _ = http::respond(&mut stream, "408 Request Timeout", "text/plain", "request head timed out\n").await;
            return;
        }
    };
    let path = request.path.split('?').next().unwrap_or_default().to_string();
    let metrics = &shared.metrics;
    // Everything but liveness, readiness and the page's files (public code, no data) needs a key.
    let identity = if path == "/metrics" || path.starts_with("/v1/") {
        match shared.auth.identify(request.credential()) {
            Ok(identity) => identity,
            Err(denied) => return deny(&mut stream, shared, &denied).await,
        }
    } else {
        Identity::Anonymous
    };
    let result = match (request.method.as_str(), path.as_str()) {
        ("GET", "/healthz") => {
            metrics.http_requests.fetch_add(1, Relaxed);
            let body = format!(
                "{{\"status\":\"ok\",\"sessions\":{},\"max_sessions\":{}}}\n",
                metrics.sessions_active.load(Relaxed),
                config.max_sessions
            );
            http::respond(&mut stream, "200 OK", "application/json", &body).await
        }
        ("GET", "/readyz") => {
            metrics.http_requests.fetch_add(1, Relaxed);
            let mut body = serde_json::json!({"sessions": metrics.sessions_active.load(Relaxed),
                "max_sessions": config.max_sessions, "auth": shared.auth.enabled()});
            match shared.readiness() {
                Ok(_) => {
                    body["status"] = "ready".into();
                    http::respond_json(&mut stream, "200 OK", &[], &body).await
                }
                Err(refusal) => {
                    body["status"] = refusal.label().into();
                    body["message"] = refusal_message(refusal, config.max_sessions).into();
                    unavailable(&mut stream, config, &body).await
                }
            }
        }
        ("GET", "/metrics") => {
            metrics.http_requests.fetch_add(1, Relaxed);
            let mut text = metrics.render();
            if let Some(pipeline) = shared.pipeline.get() {
                pipeline.render_metrics(&mut text);
            }
            http::respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &text).await
        }
        ("GET", WS_PATH | transport::realtime::PATH) if request.is_websocket_upgrade() => {
            return upgrade(stream, request, shared, identity).await;
        }
        ("POST", CLIENT_SECRETS_PATH) => client_secret(&mut stream, &request, shared, &identity).await,
        ("GET", WS_PATH | transport::realtime::PATH) => {
            http::respond(&mut stream, "426 Upgrade Required", "text/plain", "use a WebSocket client\n").await
        }
        ("GET", path) => match crate::web::find(path) {
            Some(asset) => {
                metrics.http_requests.fetch_add(1, Relaxed);
                http::respond_with(&mut stream, "200 OK", asset.content_type, crate::web::HEADERS, asset.body).await
            }
            None => http::respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        },
        _ => http::respond(&mut stream, "405 Method Not Allowed", "text/plain", "method not allowed\n").await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "response failed");
    }
}

/// Which protocol an upgraded connection speaks.
enum Endpoint {
    V1,
    /// The Realtime API, for `model`; `beta`: the client asked for the shut-down beta protocol.
    Realtime {
        model: String,
        beta: bool,
    },
}

async fn upgrade(mut stream: Conn, request: Request, shared: &Arc<Shared>, identity: Identity) {
    let config = &shared.config;
    let (path, query) = request.path.split_once('?').unwrap_or((request.path.as_str(), ""));
    let endpoint = match path {
        transport::realtime::PATH => Endpoint::Realtime {
            model: query
                .split('&')
                .find_map(|p| p.strip_prefix("model="))
                .map(|m| m.chars().take(64).filter(|c| c.is_ascii_graphic()).collect())
                .unwrap_or_else(|| "parley".into()),
            beta: request.header("openai-beta").is_some_and(|v| v.contains("realtime=v1")),
        },
        _ => Endpoint::V1,
    };
    // The Realtime API's browser clients offer `realtime` (and their key as another subprotocol,
    // which is never echoed).
    // Browsers on v1 offer `parley.v1` beside their key (a browser fails a socket whose offered
    // subprotocols got no answer).
    let offers = |name: &str| request.tokens("sec-websocket-protocol").any(|p| p == name);
    let subprotocol = match endpoint {
        Endpoint::Realtime { .. } if offers("realtime") => Some("realtime"),
        Endpoint::V1 if offers(V1_SUBPROTOCOL) => Some(V1_SUBPROTOCOL),
        _ => None,
    };
    let response = match http::upgrade_response(&request, subprotocol) {
        Ok(response) => response,
        Err(status) => {
            let _ = http::respond(&mut stream, status, "text/plain", "bad WebSocket upgrade request\n").await;
            return;
        }
    };
    // The session slot is taken before the answer: a server that cannot take the session says so
    // with a 503 and `Retry-After` (a load balancer retries elsewhere), never after the upgrade.
    let admitted = shared.readiness().and_then(|pipeline| {
        let permit = shared.sessions.clone().try_acquire_owned().map_err(|_| Refusal::Full)?;
        Ok((pipeline, permit))
    });
    let (pipeline, permit) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(stream, shared, refusal).await,
    };
    let key_session = match shared.auth.admit(&identity) {
        Ok(key_session) => key_session,
        Err(denied) => return deny(&mut stream, shared, &denied).await,
    };
    if tokio::io::AsyncWriteExt::write_all(&mut stream, response.as_bytes()).await.is_err() {
        return;
    }
    let max_message = match endpoint {
        Endpoint::V1 => config.max_message_bytes,
        Endpoint::Realtime { .. } => config.realtime_max_message_bytes,
    };
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(parley_protocol::WS_READ_BUFFER_BYTES)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let mut ws = WebSocketStream::from_partially_read(stream, request.rest, Role::Server, Some(ws_config)).await;
    match endpoint {
        Endpoint::Realtime { beta: true, .. } => {
            let message = "the beta Realtime protocol (OpenAI-Beta: realtime=v1) was shut down upstream and is not served: \
                           connect without the OpenAI-Beta header to use the GA protocol";
            let error = serde_json::json!({"type": "error", "event_id": "event_000000", "error": {
                "type": "invalid_request_error", "code": "beta_protocol_unsupported", "message": message,
                "param": null, "event_id": null}});
            goodbye(&mut ws, error.to_string(), CloseCode::PolicyViolation, "beta protocol not supported").await;
        }
        endpoint => run_session(ws, shared, pipeline, (permit, key_session), identity, endpoint).await,
    }
}

async fn run_session(
    ws: WebSocketStream<Conn>,
    shared: &Arc<Shared>,
    pipeline: Arc<dyn Pipeline>,
    _held: (OwnedSemaphorePermit, KeySession),
    identity: Identity,
    endpoint: Endpoint,
) {
    let ctx = SessionContext {
        id: shared.next_id.fetch_add(1, Relaxed),
        config: shared.config.clone(),
        metrics: shared.metrics.clone(),
        pipeline,
        shutdown: shared.shutdown.subscribe(),
        key_id: identity.key_id().map(Into::into),
    };
    match endpoint {
        Endpoint::V1 => transport::v1::serve(ws, ctx).await,
        Endpoint::Realtime { model, .. } => transport::realtime::serve(ws, ctx, model).await,
    }
}

/// 401 (with `WWW-Authenticate`) or 429 (with `Retry-After`), with an OpenAI-style error body.
async fn deny(stream: &mut Conn, shared: &Arc<Shared>, denied: &Denied) {
    shared.metrics.auth_denied(denied.code());
    tracing::info!(code = denied.code(), "request denied: {denied}");
    let kind = if denied.retry_after_s().is_some() { "rate_limit_error" } else { "invalid_request_error" };
    let body = api_error(kind, denied.code(), &denied.to_string());
    let retry = denied.retry_after_s().map(|s| s.to_string());
    let headers = match &retry {
        Some(retry) => vec![("Retry-After", retry.as_str())],
        None => vec![("WWW-Authenticate", "Bearer realm=\"parley\"")],
    };
    let _ = http::respond_json(stream, denied.status(), &headers, &body).await;
}

/// `POST /v1/realtime/client_secrets`: a short-lived secret for a browser, minted with an API key
/// (OpenAI's request and response shape; the `session` asked for is not stored: the secret opens
/// a session with the defaults, which `session.update` changes).
async fn client_secret(
    stream: &mut Conn,
    request: &Request,
    shared: &Arc<Shared>,
    identity: &Identity,
) -> std::io::Result<()> {
    let bad = |message: String| api_error("invalid_request_error", "invalid_value", &message);
    if request.credential().is_some_and(|c| c.starts_with(auth::SECRET_PREFIX)) {
        let body = bad("a client secret cannot mint another: use an API key".into());
        return http::respond_json(stream, "403 Forbidden", &[], &body).await;
    }
    let parsed = match http::read_body(stream, request, CLIENT_SECRET_BODY_BYTES).await {
        Ok(body) if body.iter().all(u8::is_ascii_whitespace) => Ok(serde_json::json!({})),
        Ok(body) => {
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| format!("the body is not JSON: {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    let ttl = parsed.and_then(|body| {
        let expires = &body["expires_after"];
        if !(expires["anchor"].is_null() || expires["anchor"] == "created_at") {
            return Err("expires_after.anchor must be \"created_at\"".to_string());
        }
        let seconds = match &expires["seconds"] {
            serde_json::Value::Null => auth::DEFAULT_SECRET_TTL_S,
            value => value
                .as_u64()
                .filter(|s| auth::SECRET_TTL_S.contains(s))
                .ok_or_else(|| format!("expires_after.seconds must be an integer in {:?}", auth::SECRET_TTL_S))?,
        };
        let model = body["session"]["model"].as_str().unwrap_or("parley").to_string();
        Ok((Duration::from_secs(seconds), model))
    });
    let (ttl, model) = match ttl {
        Ok(ttl) => ttl,
        Err(message) => return http::respond_json(stream, "400 Bad Request", &[], &bad(message)).await,
    };
    shared.metrics.http_requests.fetch_add(1, Relaxed);
    let (value, expires_at) = shared.auth.mint(identity.key_id().unwrap_or_default(), ttl);
    let session = transport::realtime::initial_settings("sess_client_secret".into(), model, &shared.config).json();
    let body = serde_json::json!({"value": value, "expires_at": expires_at, "session": session});
    http::respond_json(stream, "200 OK", &[("Cache-Control", "no-store")], &body).await
}

/// No session now: 503 with `Retry-After` and an OpenAI-style error body, before any upgrade.
async fn refuse(mut stream: Conn, shared: &Arc<Shared>, refusal: Refusal) {
    shared.metrics.session_refused(refusal);
    let message = refusal_message(refusal, shared.config.max_sessions);
    tracing::info!(reason = refusal.label(), "refusing a session");
    let code = match refusal {
        Refusal::Loading => "server_loading",
        Refusal::Draining => "server_shutting_down",
        Refusal::Full => "server_full",
    };
    let _ = unavailable(&mut stream, &shared.config, &api_error("server_error", code, &message)).await;
}

/// An OpenAI-style HTTP error body: `{"error": {"type", "code", "message"}}`.
fn api_error(kind: &str, code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"type": kind, "code": code, "message": message}})
}

/// `503 Service Unavailable` with `Retry-After` and a JSON `body`.
async fn unavailable(stream: &mut Conn, config: &Config, body: &serde_json::Value) -> std::io::Result<()> {
    let retry = config.retry_after_s.to_string();
    let headers = [("Retry-After", retry.as_str()), ("Cache-Control", "no-store")];
    http::respond_json(stream, "503 Service Unavailable", &headers, body).await
}

/// Sends `text`, then closes with `code` and waits (2 s at most) for the client's close answer.
async fn goodbye(ws: &mut WebSocketStream<Conn>, text: String, code: CloseCode, reason: &str) {
    let goodbye = async {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await?;
        ws.send(close_message(code, reason)).await?;
        while let Some(Ok(_)) = futures_util::StreamExt::next(ws).await {}
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), goodbye).await;
}
