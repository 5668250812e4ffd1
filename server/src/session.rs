//! One voice session: the WebSocket reader (frames → Opus decode → 16 kHz → input ring; JSON
//! events → commands), the writer task (bounded send queue → socket, with a stall deadline), the
//! pacer task and the pipeline worker. Enforces the per-session limits and answers every bad
//! input with an `error` event and, when fatal, a close code.
use crate::audio::PIPELINE_RATE;
use crate::audio::codec::OpusDecoder;
use crate::audio::resample::Resampler;
use crate::audio::ring::{InputFeed, input_ring};
use crate::config::Config;
use crate::metrics::{CloseReason, InputError, Metrics};
use crate::pacer::Pacer;
use crate::pipeline::{Command, Pipeline, ReplyControl, ReplyOutput, SessionIo};
use futures_util::{SinkExt, StreamExt};
use parley_protocol::event::{CancelReason, SessionInfo, SessionLimits};
use parley_protocol::{
    ClientEvent, CloseCode, DEFAULT_SAMPLE_RATE, ErrorCode, FRAME_MS, FrameHeader, PROTOCOL_VERSION, ServerEvent,
    frame_samples, is_supported_rate,
};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tracing::Instrument;

/// Lost frames concealed by the decoder per gap; a longer gap is skipped (timing resumes).
const MAX_CONCEALED_FRAMES: u32 = 5;
/// Queue of client commands to the pipeline (text turns and cancels are rare).
const COMMAND_QUEUE: usize = 16;
/// Queue of pipeline outputs to the pacer (items, not bytes: one may hold a whole TTS sentence).
const REPLY_QUEUE: usize = 32;
/// How long a closing session waits for the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The bounded queue of messages to the client. Policy when full: drop the newest message and
/// count it; the writer's stall deadline then closes the session.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub(crate) fn new(tx: mpsc::Sender<Message>, metrics: Arc<Metrics>) -> Self {
        Self { tx, metrics }
    }

    fn push(&self, message: Message) {
        if self.tx.try_send(message).is_err() {
            self.metrics.send_queue_dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn event(&self, event: &ServerEvent) {
        self.push(Message::text(event.to_json()));
    }

    pub fn audio(&self, message: &[u8]) {
        self.push(Message::Binary(Bytes::copy_from_slice(message)));
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

type Sink = futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>;

async fn write_loop(mut sink: Sink, mut rx: mpsc::Receiver<Message>, deadline: Duration) -> WriterEnd {
    while let Some(message) = rx.recv().await {
        let mut closing = matches!(message, Message::Close(_));
        let batch = async {
            sink.feed(message).await?;
            // Batch what is already queued into one flush.
            while !closing && let Ok(next) = rx.try_recv() {
                closing = matches!(next, Message::Close(_));
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
}

/// Serves one upgraded connection until it ends; counts how it ended.
pub async fn serve(ws: WebSocketStream<TcpStream>, ctx: SessionContext) {
    let span = tracing::info_span!("session", id = ctx.id);
    let metrics = ctx.metrics.clone();
    metrics.sessions_total.fetch_add(1, Relaxed);
    metrics.sessions_active.fetch_add(1, Relaxed);
    let reason = Session::run(ws, ctx).instrument(span.clone()).await;
    span.in_scope(|| tracing::info!(reason = reason.label(), "session ended"));
    metrics.session_closed(reason);
    metrics.sessions_active.fetch_sub(1, Relaxed);
}

struct Session {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    control: Arc<ReplyControl>,
    commands: mpsc::Sender<Command>,
    feed: InputFeed,
    pipeline_name: &'static str,
    session_id: String,
    input_rate: u32,
    decoder: OpusDecoder,
    resampler: Resampler,
    pcm: Vec<f32>,
    pcm16: Vec<f32>,
    last_seq: Option<u32>,
    consecutive_errors: u32,
    overflowing: bool,
    /// Echo `packet` mode: audio messages go straight back, undecoded.
    passthrough: bool,
}

impl Session {
    async fn run(ws: WebSocketStream<TcpStream>, mut ctx: SessionContext) -> CloseReason {
        let config = ctx.config.clone();
        let (sink, mut stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(config.send_queue);
        let mut writer = tokio::spawn(write_loop(sink, out_rx, config.write_timeout()).in_current_span());
        let outbox = Outbox::new(out_tx, ctx.metrics.clone());

        let control = Arc::new(ReplyControl::new(DEFAULT_SAMPLE_RATE));
        let capacity = (PIPELINE_RATE * config.input_buffer_ms / 1000) as usize;
        let (feed, audio) = input_ring(capacity);
        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
        let session_id = format!("sess_{}", ctx.id);
        let pacer = match Pacer::new(reply_rx, control.clone(), outbox.clone(), ctx.metrics.clone(), &config) {
            Ok(pacer) => pacer,
            Err(e) => {
                tracing::error!(error = %e, "pacer set-up failed");
                outbox.close(CloseCode::InternalError, "server audio set-up failed");
                return CloseReason::Internal;
            }
        };
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
            audio,
            commands: command_rx,
            output: ReplyOutput::new(reply_tx, control.clone()),
        });

        let mut session = Session {
            metrics: ctx.metrics.clone(),
            outbox,
            control,
            commands: command_tx,
            feed,
            pipeline_name: ctx.pipeline.name(),
            session_id,
            input_rate: DEFAULT_SAMPLE_RATE,
            decoder: OpusDecoder::new(DEFAULT_SAMPLE_RATE).expect("default rate is supported"),
            resampler: Resampler::new(DEFAULT_SAMPLE_RATE, PIPELINE_RATE).expect("default rates resample"),
            pcm: vec![0.0; frame_samples(48_000)],
            pcm16: Vec::with_capacity(frame_samples(48_000)),
            last_seq: None,
            consecutive_errors: 0,
            overflowing: false,
            passthrough: config.pipeline == crate::config::PipelineKind::Echo
                && config.echo.mode == crate::config::EchoMode::Packet,
            config: config.clone(),
        };
        session.outbox.event(&session.created());
        tracing::info!(session_id = %session.session_id, "session started");

        let idle = tokio::time::sleep(config.idle_timeout());
        tokio::pin!(idle);
        let mut writer_end = None;
        let (reason, close): (CloseReason, Option<(CloseCode, String)>) = loop {
            tokio::select! {
                biased;
                _ = ctx.shutdown.recv() => {
                    session.outbox.event(&ServerEvent::error(ErrorCode::ShuttingDown, "the server is shutting down"));
                    break (CloseReason::Shutdown, Some((CloseCode::GoingAway, "server shutting down".into())));
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
                    session.outbox.event(&ServerEvent::error(ErrorCode::IdleTimeout, "no message within the idle timeout"));
                    break (CloseReason::IdleTimeout, Some((CloseCode::IdleTimeout, "idle timeout".into())));
                }
                message = stream.next() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + config.idle_timeout());
                    match message {
                        None => break (CloseReason::ClientGone, None),
                        Some(Ok(message)) => {
                            if let Some(end) = session.handle(message) {
                                break end;
                            }
                        }
                        Some(Err(WsError::Capacity(e))) => {
                            session.metrics.input_error(InputError::MessageTooBig);
                            session.outbox.event(&ServerEvent::error(ErrorCode::MessageTooBig, e.to_string()));
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
            session.outbox.close(code, &text);
        }
        drop(session);
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

    fn created(&self) -> ServerEvent {
        ServerEvent::SessionCreated {
            session_id: self.session_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            session: self.info(),
            limits: SessionLimits {
                max_message_bytes: self.config.max_message_bytes,
                max_consecutive_errors: self.config.max_consecutive_errors,
                idle_timeout_s: self.config.idle_timeout_s,
            },
        }
    }

    fn info(&self) -> SessionInfo {
        SessionInfo {
            input_sample_rate: self.input_rate,
            output_sample_rate: self.control.output_rate.load(Relaxed),
            frame_ms: FRAME_MS,
            pipeline: self.pipeline_name.into(),
        }
    }

    /// Handles one message; returns how the session ends, if it must.
    fn handle(&mut self, message: Message) -> Option<(CloseReason, Option<(CloseCode, String)>)> {
        let outcome = match message {
            Message::Binary(data) => self.audio_frame(&data),
            Message::Text(text) => self.text_event(text.as_str()),
            Message::Close(_) => return Some((CloseReason::ClientClosed, None)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        match outcome {
            Ok(()) => {
                self.consecutive_errors = 0;
                None
            }
            Err((kind, event)) => {
                self.metrics.input_error(kind);
                self.outbox.event(&event);
                self.consecutive_errors += 1;
                (self.consecutive_errors >= self.config.max_consecutive_errors).then(|| {
                    let reason = format!("{} malformed messages in a row", self.consecutive_errors);
                    (CloseReason::TooManyErrors, Some((CloseCode::PolicyViolation, reason)))
                })
            }
        }
    }

    fn audio_frame(&mut self, data: &[u8]) -> Result<(), (InputError, ServerEvent)> {
        let arrived = Instant::now();
        let (header, payload) = FrameHeader::decode(data)
            .map_err(|e| (InputError::BadFrame, ServerEvent::error(ErrorCode::BadFrame, e.to_string())))?;
        let seq = header.seq;
        let mut lost = 0;
        if let Some(last) = self.last_seq {
            if seq <= last {
                let message = format!("frame {seq} arrived after frame {last}; dropped");
                return Err((
                    InputError::OutOfOrder,
                    ServerEvent::frame_error(ErrorCode::FrameOutOfOrder, seq, message),
                ));
            }
            lost = seq - last - 1;
        }
        if lost > 0 {
            self.metrics.frames_lost.fetch_add(lost as u64, Relaxed);
            let handled = if self.passthrough { "passed on without them" } else { "concealed" };
            let message = format!("{lost} frame(s) before {seq} missing; {handled}");
            self.outbox.event(&ServerEvent::frame_error(ErrorCode::FramesLost, seq, message));
        }
        if self.passthrough {
            // Validated (header, order, size), counted, and sent back as it came.
            self.last_seq = Some(seq);
            self.metrics.frames_received.fetch_add(1, Relaxed);
            self.outbox.audio(data);
            self.metrics.input_frame_seconds.observe(arrived.elapsed());
            return Ok(());
        }
        let frame = self.decoder.frame_len();
        if lost > 0 {
            // Decoder packet-loss concealment keeps the stream's timing across short gaps.
            let mut plc = [0.0f32; 960];
            for _ in 0..lost.min(MAX_CONCEALED_FRAMES) {
                if self.decoder.conceal(&mut plc).is_ok() {
                    self.push_pcm_slice(&plc[..frame], seq, header.timestamp_us, arrived);
                }
            }
        }
        let n = self
            .decoder
            .decode(payload, &mut self.pcm)
            .map_err(|e| (InputError::BadAudio, ServerEvent::frame_error(ErrorCode::BadAudio, seq, e.to_string())))?;
        self.last_seq = Some(seq);
        let mut pcm = std::mem::take(&mut self.pcm);
        self.push_pcm_slice(&pcm[..n], seq, header.timestamp_us, arrived);
        std::mem::swap(&mut self.pcm, &mut pcm);
        self.metrics.frames_received.fetch_add(1, Relaxed);
        self.metrics.input_frame_seconds.observe(arrived.elapsed());
        Ok(())
    }

    fn push_pcm_slice(&mut self, pcm: &[f32], seq: u32, ts: u64, arrived: Instant) {
        self.pcm16.clear();
        if self.resampler.process(pcm, &mut self.pcm16).is_err() {
            return;
        }
        let dropped = self.feed.push(&self.pcm16, seq, ts, arrived);
        if dropped > 0 {
            self.metrics.input_overflow_samples.fetch_add(dropped as u64, Relaxed);
            if !self.overflowing {
                let message = "input buffer full (audio faster than real time?); newest audio dropped";
                self.outbox.event(&ServerEvent::frame_error(ErrorCode::InputOverflow, seq, message));
            }
        }
        self.overflowing = dropped > 0;
    }

    fn text_event(&mut self, text: &str) -> Result<(), (InputError, ServerEvent)> {
        let event = ClientEvent::parse(text).map_err(|e| {
            let kind = match e.code() {
                ErrorCode::UnknownEvent => InputError::UnknownEvent,
                ErrorCode::InvalidEvent => InputError::InvalidEvent,
                _ => InputError::InvalidJson,
            };
            (kind, ServerEvent::error(e.code(), e.to_string()))
        })?;
        let invalid =
            |message: String| (InputError::InvalidEvent, ServerEvent::error(ErrorCode::InvalidEvent, message));
        match event {
            ClientEvent::SessionUpdate { session } => {
                for rate in [session.input_sample_rate, session.output_sample_rate].into_iter().flatten() {
                    if !is_supported_rate(rate) {
                        return Err(invalid(format!("unsupported sample rate {rate} Hz (16000, 24000 or 48000)")));
                    }
                }
                if let Some(rate) = session.input_sample_rate.filter(|&r| r != self.input_rate) {
                    if self.last_seq.is_some() {
                        return Err(invalid("the input rate can change only before the first audio frame".into()));
                    }
                    let decoder = OpusDecoder::new(rate).map_err(|e| invalid(e.to_string()))?;
                    let resampler = Resampler::new(rate, PIPELINE_RATE).map_err(|e| invalid(e.to_string()))?;
                    self.decoder = decoder;
                    self.resampler = resampler;
                    self.input_rate = rate;
                }
                if let Some(rate) = session.output_sample_rate {
                    self.control.output_rate.store(rate, Relaxed);
                }
                self.outbox.event(&ServerEvent::SessionUpdated { session: self.info() });
            }
            ClientEvent::ConversationItemCreate { text } => {
                if self.commands.try_send(Command::Text(text)).is_err() {
                    return Err(invalid("too many pending text turns".into()));
                }
            }
            ClientEvent::ResponseCancel => {
                self.control.cancel_current(CancelReason::ClientCancel);
                let _ = self.commands.try_send(Command::Cancel);
            }
        }
        Ok(())
    }
}
