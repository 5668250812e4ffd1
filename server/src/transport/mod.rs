//! The edge: wire protocols that drive the conversation core. Each session is one WebSocket; this
//! module runs its life (the writer task with its stall deadline, the pacer, the conversation
//! worker, the idle timeout, shutdown and the close handshake) and hands every client message to
//! the session's [`Protocol`]:
//! - [`v1`]: Parley's own protocol at `/v1/voice`, binary Opus frames plus JSON events;
//! - [`realtime`]: the OpenAI Realtime API (GA) at `/v1/realtime`, JSON with base64 audio.
//!
//! A protocol turns client messages into audio for the input ring and [`Command`]s for the
//! worker, and, through the [`Transmit`] it gives the pacer, turns the core's events and reply
//! frames into its own messages.
pub mod realtime;
pub mod v1;

use crate::audio::PIPELINE_RATE;
use crate::audio::ring::{InputFeed, input_ring};
use crate::config::Config;
use crate::conn::Conn;
use crate::conversation::history::History;
use crate::conversation::pacer::{Pacer, Transmit};
use crate::conversation::{Command, Pipeline, ReplyControl, ReplyOutput, SessionIo};
use crate::metrics::{CloseReason, InputError, Metrics};
use futures_util::{SinkExt, StreamExt};
use parley_protocol::{CloseCode, DEFAULT_SAMPLE_RATE, ErrorCode};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

/// Queue of client commands to the worker (text turns and cancels are rare).
const COMMAND_QUEUE: usize = 16;
/// Queue of conversation outputs to the pacer (items, not bytes: one may hold a whole sentence).
const REPLY_QUEUE: usize = 32;
/// How often a draining session looks whether its turn has finished.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// How long a closing session waits for the close handshake.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How a session ends: the reason counted, and the close frame to send (none when the client
/// closed or is gone).
pub type Ending = (CloseReason, Option<(CloseCode, String)>);

/// One message for the writer; `read_at` stamps an echo with when its original was read, so the
/// writer can time the server's turnaround.
pub(crate) type Outgoing = (Message, Option<Instant>);

/// The bounded queue of messages to the client. Policy when full: drop the newest message and
/// count it; the writer's stall deadline then closes the session.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub(crate) fn new(tx: mpsc::Sender<Outgoing>, metrics: Arc<Metrics>) -> Self {
        Self { tx, metrics }
    }

    pub fn push(&self, message: Message) {
        self.send((message, None));
    }

    /// An echo of a message read at `read_at` (echo `packet` mode).
    pub fn echo(&self, message: Message, read_at: Instant) {
        self.send((message, Some(read_at)));
    }

    fn send(&self, outgoing: Outgoing) {
        if self.tx.try_send(outgoing).is_err() {
            self.metrics.send_queue_dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn text(&self, text: String) {
        self.push(Message::text(text));
    }

    pub fn close(&self, code: CloseCode, reason: &str) {
        self.push(close_message(code, reason));
    }
}

pub fn close_message(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: WsCloseCode::from(code.code()), reason: reason.into() }))
}

/// How the writer task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// It sent a close frame.
    Closed,
    /// Its queue closed.
    Done,
    /// A write did not finish within the deadline: the client stopped reading.
    Stalled,
    /// The socket failed.
    Failed,
}

type Sink = futures_util::stream::SplitSink<WebSocketStream<Conn>, Message>;

async fn write_loop(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Outgoing>,
    deadline: Duration,
    metrics: Arc<Metrics>,
) -> WriterEnd {
    // When the echoes of this flush were read (echo `packet` mode only).
    let mut echoes: Vec<Instant> = Vec::new();
    while let Some((message, read_at)) = rx.recv().await {
        let mut closing = matches!(message, Message::Close(_));
        echoes.extend(read_at);
        let batch = async {
            sink.feed(message).await?;
            // Batch what is already queued into one flush.
            while !closing && let Ok((next, read_at)) = rx.try_recv() {
                closing = matches!(next, Message::Close(_));
                echoes.extend(read_at);
                sink.feed(next).await?;
            }
            sink.flush().await
        };
        match tokio::time::timeout(deadline, batch).await {
            Err(_) => return WriterEnd::Stalled,
            Ok(Err(_)) => return WriterEnd::Failed,
            Ok(Ok(())) if closing => return WriterEnd::Closed,
            Ok(Ok(())) => {}
        }
        for read_at in echoes.drain(..) {
            metrics.echo_turnaround_seconds.observe(read_at.elapsed());
        }
    }
    WriterEnd::Done
}

/// What a session needs from the server.
pub struct SessionContext {
    pub id: u64,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub pipeline: Arc<dyn Pipeline>,
    pub shutdown: broadcast::Receiver<()>,
    /// The API key the session was opened with.
    pub key_id: Option<Arc<str>>,
}

/// What a protocol gets to drive one session's conversation.
pub struct Link {
    pub session_id: String,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub outbox: Outbox,
    /// Cancels, the reply stream's rate, what is playing.
    pub control: Arc<ReplyControl>,
    pub commands: mpsc::Sender<Command>,
    /// The worker's 16 kHz input ring.
    pub feed: InputFeed,
    /// The conversation, shared with the worker.
    pub history: Arc<History>,
    pub pipeline_name: &'static str,
}

/// One wire protocol's side of a session.
pub trait Protocol: Send {
    /// The first message(s) of the session (`session.created`).
    fn greet(&mut self);
    /// Handles one client message; returns how the session ends, if it must. It may wait (for
    /// room in the input ring): the next message waits with it.
    fn handle(&mut self, message: Message) -> impl std::future::Future<Output = Option<Ending>> + Send;
    /// Tells the client about a problem of the session (before a close), in this protocol's terms.
    fn error(&mut self, code: ErrorCode, message: &str);
}

/// Serves one upgraded connection with the protocol `build` makes (given the session's link, it
/// returns the protocol and the pacer's transmitter) until the session ends; counts how it ended.
pub async fn serve<P, B>(ws: WebSocketStream<Conn>, ctx: SessionContext, build: B)
where
    P: Protocol,
    B: FnOnce(Link) -> Result<(P, Box<dyn Transmit>), String>,
{
    let span = tracing::info_span!("session", id = ctx.id);
    let metrics = ctx.metrics.clone();
    metrics.sessions_total.fetch_add(1, Relaxed);
    metrics.sessions_active.fetch_add(1, Relaxed);
    let reason = run(ws, ctx, build).instrument(span.clone()).await;
    span.in_scope(|| tracing::info!(reason = reason.label(), "session ended"));
    metrics.session_closed(reason);
    if metrics.sessions_active.fetch_sub(1, Relaxed) == 1 {
        // The last session of a burst: hand the memory its sessions freed back to the system.
        tokio::task::spawn_blocking(release_free_memory);
    }
}

/// Returns the memory ended sessions freed to the operating system: glibc keeps it in its
/// per-thread arenas otherwise, and an idle server would stay at the resident size of its busiest
/// moment.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim takes no pointers; it walks glibc's own heaps under their locks.
        unsafe { malloc_trim(0) };
    }
}

async fn run<P, B>(ws: WebSocketStream<Conn>, mut ctx: SessionContext, build: B) -> CloseReason
where
    P: Protocol,
    B: FnOnce(Link) -> Result<(P, Box<dyn Transmit>), String>,
{
    let config = ctx.config.clone();
    let (sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::channel(config.send_queue);
    let writing = write_loop(sink, out_rx, config.write_timeout(), ctx.metrics.clone());
    let mut writer = tokio::spawn(writing.in_current_span());
    let outbox = Outbox::new(out_tx, ctx.metrics.clone());

    let control = Arc::new(ReplyControl::new(DEFAULT_SAMPLE_RATE));
    let capacity = (PIPELINE_RATE * config.input_buffer_ms / 1000) as usize;
    let (feed, audio) = input_ring(capacity);
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
    let session_id = format!("sess_{}", ctx.id);
    let history = Arc::new(History::default());
    let link = Link {
        history: history.clone(),
        session_id: session_id.clone(),
        config: config.clone(),
        metrics: ctx.metrics.clone(),
        outbox: outbox.clone(),
        control: control.clone(),
        commands: command_tx,
        feed,
        pipeline_name: ctx.pipeline.name(),
    };
    let (mut protocol, transmit) = match build(link) {
        Ok(built) => built,
        Err(e) => {
            tracing::error!(error = %e, "session set-up failed");
            outbox.close(CloseCode::InternalError, "server audio set-up failed");
            return CloseReason::Internal;
        }
    };
    let lead = Duration::from_millis(config.max_lead_ms as u64);
    let pacer = Pacer::new(reply_rx, control.clone(), transmit, ctx.metrics.clone(), lead);
    let mut pacer = tokio::spawn(
        async move {
            if let Err(e) = pacer.run().await {
                tracing::error!(error = %e, "pacer failed");
            }
        }
        .in_current_span(),
    );
    let worker = ctx.pipeline.start(SessionIo {
        session_id: session_id.clone(),
        key_id: ctx.key_id.clone(),
        audio,
        commands: command_rx,
        output: ReplyOutput::new(reply_tx, control.clone()),
        history,
    });
    protocol.greet();
    tracing::info!(%session_id, "session started");

    let idle = tokio::time::sleep(config.idle_timeout());
    tokio::pin!(idle);
    let budget = Budget::new(&config);
    let lifetime = tokio::time::sleep(budget.time);
    tokio::pin!(lifetime);
    let mut received: u64 = 0;
    let mut ping = tokio::time::interval(Duration::from_secs(config.ping_interval_s.max(1)));
    ping.tick().await;
    // After the shutdown signal: the turn under way finishes, then the session closes (1001), or
    // at this deadline.
    let drain = tokio::time::sleep(Duration::from_millis(config.drain_timeout_ms));
    tokio::pin!(drain);
    let mut draining = false;
    let mut drain_check = tokio::time::interval(DRAIN_CHECK);
    let going_away = || (CloseReason::Shutdown, Some((CloseCode::GoingAway, "server shutting down".to_string())));
    let mut writer_end = None;
    let (reason, close): Ending = loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.recv(), if !draining => {
                draining = true;
                drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(config.drain_timeout_ms));
            }
            _ = drain_check.tick(), if draining => {
                if !control.turn_in_flight() {
                    protocol.error(ErrorCode::ShuttingDown, "the server is shutting down");
                    break going_away();
                }
            }
            _ = &mut drain, if draining => {
                protocol.error(ErrorCode::ShuttingDown, "the server is shutting down (the turn under way was cut short)");
                break going_away();
            }
            end = &mut writer => {
                let end = end.unwrap_or(WriterEnd::Failed);
                writer_end = Some(end);
                break match end {
                    WriterEnd::Stalled => {
                        tracing::warn!("client stopped reading; closing");
                        (CloseReason::SlowConsumer, None)
                    }
                    _ => (CloseReason::ClientGone, None),
                };
            }
            _ = &mut pacer => {
                break (CloseReason::Internal, Some((CloseCode::InternalError, "reply audio path failed".into())));
            }
            _ = &mut idle => {
                protocol.error(ErrorCode::IdleTimeout, "no message within the idle timeout");
                break (CloseReason::IdleTimeout, Some((CloseCode::IdleTimeout, "idle timeout".into())));
            }
            _ = &mut lifetime => {
                let text = format!("the session reached its time limit ({} s)", budget.time.as_secs());
                protocol.error(ErrorCode::SessionLimit, &text);
                break (CloseReason::Budget, Some((CloseCode::SessionLimit, "session time limit".into())));
            }
            _ = ping.tick(), if config.ping_interval_s > 0 => outbox.push(Message::Ping(Default::default())),
            message = stream.next() => {
                if !matches!(message, Some(Ok(Message::Pong(_)))) {
                    idle.as_mut().reset(tokio::time::Instant::now() + config.idle_timeout());
                }
                match message {
                    None => break (CloseReason::ClientGone, None),
                    Some(Ok(message)) => {
                        received += message.len() as u64;
                        if received > budget.bytes {
                            let text = format!("the session sent more than its {} bytes", budget.bytes);
                            protocol.error(ErrorCode::SessionLimit, &text);
                            break (CloseReason::Budget, Some((CloseCode::SessionLimit, "session byte limit".into())));
                        }
                        if let Some(end) = protocol.handle(message).await {
                            break end;
                        }
                    }
                    Some(Err(WsError::Capacity(e))) => {
                        ctx.metrics.input_error(InputError::MessageTooBig);
                        protocol.error(ErrorCode::MessageTooBig, &e.to_string());
                        let reason = format!("message larger than {} bytes", config.max_message_bytes);
                        break (CloseReason::MessageTooBig, Some((CloseCode::MessageTooBig, reason)));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        break (CloseReason::ClientGone, None);
                    }
                }
            }
        }
    };

    // Stop producing, then say goodbye.
    worker.abort();
    pacer.abort();
    if let Some((code, text)) = close
        && writer_end.is_none()
    {
        outbox.close(code, &text);
    }
    drop(protocol);
    drop(outbox);
    if writer_end.is_none() {
        match tokio::time::timeout(CLOSE_GRACE, &mut writer).await {
            Ok(Ok(WriterEnd::Stalled)) if reason != CloseReason::SlowConsumer => {}
            Ok(_) => {}
            Err(_) => writer.abort(),
        }
        // Read until the client answers the close (or the grace period ends).
        let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = stream.next().await {} }).await;
    } else {
        writer.abort();
    }
    reason
}

/// A session's budgets: its longest life and the most bytes it may send (`u64::MAX`: none).
struct Budget {
    time: Duration,
    bytes: u64,
}

impl Budget {
    fn new(config: &Config) -> Self {
        // A century stands for "no limit" (a far deadline, not an overflowing one).
        let time = match config.max_session_s {
            0 => Duration::from_secs(100 * 365 * 24 * 3600),
            s => Duration::from_secs(s),
        };
        Self { time, bytes: if config.max_session_bytes == 0 { u64::MAX } else { config.max_session_bytes } }
    }
}

/// Counts malformed messages in a row: past the configured limit the session is closed (1008).
pub struct ErrorRun {
    count: u32,
    limit: u32,
}

impl ErrorRun {
    pub fn new(limit: u32) -> Self {
        Self { count: 0, limit }
    }

    pub fn ok(&mut self) {
        self.count = 0;
    }

    /// One more bad message: the ending once there were too many in a row.
    pub fn bad(&mut self) -> Option<Ending> {
        self.count += 1;
        (self.count >= self.limit).then(|| {
            let reason = format!("{} malformed messages in a row", self.count);
            (CloseReason::TooManyErrors, Some((CloseCode::PolicyViolation, reason)))
        })
    }
}
