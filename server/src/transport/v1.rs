//! Parley's own protocol (`/v1/voice`): binary Opus frames with a sequence/timestamp header
//! in both directions (decoded, concealed across losses and resampled to 16 kHz into the input
//! ring; reply frames encoded by [`OpusFrames`]) and JSON events (`parley_protocol::event`).
//! Answers every bad input with an `error` event and, past the limit, a close.
use super::{Ending, ErrorRun, Outbox, Protocol};
use crate::audio::PIPELINE_RATE;
use crate::audio::codec::{OpusDecoder, OpusEncoder};
use crate::audio::resample::Resampler;
use crate::audio::ring::InputFeed;
use crate::config::Config;
use crate::conn::Conn;
use crate::conversation::pacer::{PacerError, Transmit};
use crate::conversation::{Command, ReplyControl};
use crate::metrics::{CloseReason, InputError, Metrics};
use parley_protocol::event::{CancelReason, SessionInfo, SessionLimits};
use parley_protocol::{
    ClientEvent, DEFAULT_SAMPLE_RATE, ErrorCode, FRAME_MS, FrameHeader, MAX_OPUS_PACKET_BYTES, PROTOCOL_VERSION,
    ServerEvent, frame::HEADER_LEN, frame_samples, is_supported_rate,
};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Lost frames concealed by the decoder per gap; a longer gap is skipped (timing resumes).
const MAX_CONCEALED_FRAMES: u32 = 5;

/// Serves one upgraded `/v1/voice` connection until it ends.
pub async fn serve(ws: WebSocketStream<Conn>, ctx: super::SessionContext) {
    super::serve(ws, ctx, |link| {
        // The pipeline the session runs decides (a test may hand the server an echo pipeline
        // whatever `config.pipeline` says).
        let passthrough = link.pipeline_name == "echo" && link.config.echo.mode == crate::config::EchoMode::Packet;
        let transmit = OpusFrames::new(link.outbox.clone(), &link.config).map_err(|e| e.to_string())?;
        let session = Session {
            errors: ErrorRun::new(link.config.max_consecutive_errors),
            metrics: link.metrics,
            outbox: link.outbox,
            control: link.control,
            commands: link.commands,
            feed: link.feed,
            pipeline_name: link.pipeline_name,
            session_id: link.session_id,
            input_rate: DEFAULT_SAMPLE_RATE,
            decoder: OpusDecoder::new(DEFAULT_SAMPLE_RATE).map_err(|e| e.to_string())?,
            resampler: Resampler::new(DEFAULT_SAMPLE_RATE, PIPELINE_RATE).map_err(|e| e.to_string())?,
            pcm: vec![0.0; frame_samples(48_000)],
            pcm16: Vec::with_capacity(frame_samples(48_000)),
            last_seq: None,
            overflowing: false,
            passthrough,
            config: link.config,
        };
        Ok((session, Box::new(transmit) as Box<dyn Transmit>))
    })
    .await
}

/// Reply frames as v1 binary messages: Opus packets behind the frame header.
pub struct OpusFrames {
    outbox: Outbox,
    encoder: OpusEncoder,
    rate: u32,
    bitrate: i32,
    complexity: i32,
    packet: Vec<u8>,
}

impl OpusFrames {
    pub fn new(outbox: Outbox, config: &Config) -> Result<Self, crate::audio::codec::CodecError> {
        Ok(OpusFrames {
            outbox,
            encoder: OpusEncoder::new(DEFAULT_SAMPLE_RATE, config.opus_bitrate, config.opus_complexity)?,
            rate: DEFAULT_SAMPLE_RATE,
            bitrate: config.opus_bitrate,
            complexity: config.opus_complexity,
            packet: vec![0; HEADER_LEN + MAX_OPUS_PACKET_BYTES],
        })
    }
}

impl Transmit for OpusFrames {
    fn event(&mut self, event: &ServerEvent) {
        self.outbox.text(event.to_json());
    }

    fn frame(&mut self, _turn: u64, pcm: &[f32], rate: u32, seq: u32, ref_ts_us: u64) -> Result<(), PacerError> {
        if rate != self.rate {
            self.encoder = OpusEncoder::new(rate, self.bitrate, self.complexity)?;
            self.rate = rate;
        }
        let n = self.encoder.encode(pcm, &mut self.packet[HEADER_LEN..])?;
        FrameHeader::audio(seq, ref_ts_us).write(&mut self.packet);
        self.outbox.push(Message::Binary(Bytes::copy_from_slice(&self.packet[..HEADER_LEN + n])));
        Ok(())
    }
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
    errors: ErrorRun,
    overflowing: bool,
    /// Echo `packet` mode: audio messages go straight back, undecoded.
    passthrough: bool,
}

impl Protocol for Session {
    fn greet(&mut self) {
        let created = self.created();
        self.event(&created);
    }

    /// Handles one message; returns how the session ends, if it must.
    async fn handle(&mut self, message: Message) -> Option<Ending> {
        let outcome = match message {
            Message::Binary(data) => self.audio_frame(&data),
            Message::Text(text) => self.text_event(text.as_str()),
            Message::Close(_) => return Some((CloseReason::ClientClosed, None)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        match outcome {
            Ok(()) => {
                self.errors.ok();
                None
            }
            Err((kind, event)) => {
                self.metrics.input_error(kind);
                self.event(&event);
                self.errors.bad()
            }
        }
    }

    fn error(&mut self, code: ErrorCode, message: &str) {
        self.event(&ServerEvent::error(code, message));
    }
}

impl Session {
    fn event(&self, event: &ServerEvent) {
        self.outbox.text(event.to_json());
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
            self.event(&ServerEvent::frame_error(ErrorCode::FramesLost, seq, message));
        }
        if self.passthrough {
            // Validated (header, order, size), counted, and sent back as it came.
            self.last_seq = Some(seq);
            self.metrics.frames_received.fetch_add(1, Relaxed);
            self.outbox.echo(Message::Binary(Bytes::copy_from_slice(data)), arrived);
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
                self.event(&ServerEvent::frame_error(ErrorCode::InputOverflow, seq, message));
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
                self.event(&ServerEvent::SessionUpdated { session: self.info() });
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
