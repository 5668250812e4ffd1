//! The listener: accepts connections (at most `max_sessions` + a small margin at once), routes
//! each request (`/healthz`, `/metrics`, the page at `/`, the WebSocket upgrades at `/v1/voice`
//! and `/v1/realtime`), refuses sessions beyond `max_sessions` with close code 1013, and on
//! shutdown tells every session to close and waits for them to drain.
use crate::config::Config;
use crate::conversation::{self, Pipeline};
use crate::http::{self, Request};
use crate::metrics::Metrics;
use crate::transport::{self, SessionContext, close_message};
use futures_util::SinkExt;
use parley_protocol::{CloseCode, ErrorCode, ServerEvent, WS_PATH};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

/// Connections beyond `max_sessions` served at once: health checks, metrics scrapes and refusals.
const EXTRA_CONNECTIONS: usize = 64;
/// Longest back-off after repeated accept errors (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(2);

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
    pipeline: Arc<dyn Pipeline>,
    sessions: Arc<Semaphore>,
    next_id: AtomicU64,
    shutdown: broadcast::Sender<()>,
    /// Dropped by each connection task when it ends; `run` waits for all of them.
    _drain: mpsc::Sender<()>,
}

/// Runs the server with the pipeline the configuration names until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future) -> Result<(), ServerError> {
    let pipeline = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || pipeline_from_config(&config))
            .await
            .map_err(|e| ServerError::PipelineUnavailable(e.to_string()))??
    };
    run_with_pipeline(listener, config, pipeline, Arc::new(Metrics::default()), shutdown).await
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

/// Runs the server with a given pipeline and metrics registry until `shutdown` completes, then
/// closes every session (1001) and waits up to `drain_timeout_ms` for them to end.
pub async fn run_with_pipeline(
    listener: TcpListener,
    config: Config,
    pipeline: Arc<dyn Pipeline>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    config.validate()?;
    let (shutdown_tx, _) = broadcast::channel(1);
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    let drain_timeout = Duration::from_millis(config.drain_timeout_ms);
    let shared = Arc::new(Shared {
        sessions: Arc::new(Semaphore::new(config.max_sessions)),
        config: Arc::new(config),
        metrics,
        pipeline,
        next_id: AtomicU64::new(1),
        shutdown: shutdown_tx,
        _drain: drain_tx,
    });
    let connections = Arc::new(Semaphore::new(shared.config.max_sessions + EXTRA_CONNECTIONS));
    tracing::info!(addr = ?listener.local_addr().ok(), pipeline = shared.pipeline.name(), "listening");
    tokio::select! {
        _ = accept_loop(&listener, &shared, &connections) => {}
        _ = shutdown => tracing::info!("shutting down: draining sessions"),
    }
    drop(listener);
    let _ = shared.shutdown.send(());
    drop(shared);
    if tokio::time::timeout(drain_timeout, drain_rx.recv()).await.is_err() {
        tracing::warn!("sessions still open after the drain timeout");
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

async fn handle_connection(mut stream: TcpStream, shared: &Arc<Shared>) {
    let config = &shared.config;
    let _ = stream.set_nodelay(true);
    if let Some(bytes) = config.socket_send_buffer {
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(bytes);
    }
    let head_timeout = Duration::from_millis(config.handshake_timeout_ms);
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
        ("GET", "/metrics") => {
            metrics.http_requests.fetch_add(1, Relaxed);
            let mut text = metrics.render();
            shared.pipeline.render_metrics(&mut text);
            http::respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &text).await
        }
        ("GET", WS_PATH | transport::realtime::PATH) if request.is_websocket_upgrade() => {
            return upgrade(stream, request, shared).await;
        }
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
        _ => http::respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await,
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

async fn upgrade(mut stream: TcpStream, request: Request, shared: &Arc<Shared>) {
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
    let offered = request.header("sec-websocket-protocol").unwrap_or_default();
    let subprotocol = match endpoint {
        Endpoint::Realtime { .. } if offered.split(',').any(|p| p.trim() == "realtime") => Some("realtime"),
        _ => None,
    };
    let response = match http::upgrade_response(&request, subprotocol) {
        Ok(response) => response,
        Err(status) => {
            let _ = http::respond(&mut stream, status, "text/plain", "bad WebSocket upgrade request\n").await;
            return;
        }
    };
    // Take the session slot before answering, so a refusal is a clean close and not a timeout.
    let permit = shared.sessions.clone().try_acquire_owned().ok();
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
    match (permit, endpoint) {
        (_, Endpoint::Realtime { beta: true, .. }) => {
            let message = "the beta Realtime protocol (OpenAI-Beta: realtime=v1) was shut down upstream and is not served: \
                           connect without the OpenAI-Beta header to use the GA protocol";
            let error = serde_json::json!({"type": "error", "event_id": "event_000000", "error": {
                "type": "invalid_request_error", "code": "beta_protocol_unsupported", "message": message,
                "param": null, "event_id": null}});
            goodbye(&mut ws, error.to_string(), CloseCode::PolicyViolation, "beta protocol not supported").await;
        }
        (Some(permit), endpoint) => run_session(ws, shared, permit, endpoint).await,
        (None, _) => refuse(ws, shared).await,
    }
}

async fn run_session(
    ws: WebSocketStream<TcpStream>,
    shared: &Arc<Shared>,
    _permit: OwnedSemaphorePermit,
    endpoint: Endpoint,
) {
    let ctx = SessionContext {
        id: shared.next_id.fetch_add(1, Relaxed),
        config: shared.config.clone(),
        metrics: shared.metrics.clone(),
        pipeline: shared.pipeline.clone(),
        shutdown: shared.shutdown.subscribe(),
    };
    match endpoint {
        Endpoint::V1 => transport::v1::serve(ws, ctx).await,
        Endpoint::Realtime { model, .. } => transport::realtime::serve(ws, ctx, model).await,
    }
}

/// Over `max_sessions`: an `error` event, then close 1013 with the reason.
async fn refuse(mut ws: WebSocketStream<TcpStream>, shared: &Arc<Shared>) {
    shared.metrics.sessions_refused.fetch_add(1, Relaxed);
    let max = shared.config.max_sessions;
    let reason = format!("server full: {max} of {max} sessions in use; retry later");
    tracing::info!("refusing a session: {reason}");
    let event = ServerEvent::error(ErrorCode::ServerFull, reason.clone());
    goodbye(&mut ws, event.to_json(), CloseCode::TryAgainLater, &reason).await;
}

/// Sends `text`, then closes with `code` and waits (2 s at most) for the client's close answer.
async fn goodbye(ws: &mut WebSocketStream<TcpStream>, text: String, code: CloseCode, reason: &str) {
    let goodbye = async {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await?;
        ws.send(close_message(code, reason)).await?;
        while let Some(Ok(_)) = futures_util::StreamExt::next(ws).await {}
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), goodbye).await;
}
