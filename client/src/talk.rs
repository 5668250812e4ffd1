//! One client session: streams clips at real-time pace as 20 ms Opus frames (then silence),
//! receives events and reply audio, decodes it, and measures each turn.
use crate::report::Report;
use futures_util::{SinkExt, StreamExt};
use parley_protocol::event::SessionUpdate;
use parley_protocol::{ClientEvent, FRAME_MS, FrameHeader, MAX_OPUS_PACKET_BYTES, ServerEvent, frame_samples};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// What to stream and how long to wait.
#[derive(Debug, Clone)]
pub struct TalkOptions {
    /// `ws://host:port` or the full endpoint URL.
    pub server: String,
    /// Stream sample rate (both directions), Hz.
    pub sample_rate: u32,
    /// Silence streamed between one turn's reply and the next clip, ms.
    pub pause_ms: u32,
    /// Wait for each turn's reply (`response.audio.done` / `reply.cancelled`) before the pause.
    pub wait_for_reply: bool,
    /// Give up waiting for a reply after this long, ms after the clip ends.
    pub reply_timeout_ms: u32,
    /// When no speech is detected by the server within this long after a clip, move on, ms.
    pub turn_start_timeout_ms: u32,
    /// Opus bitrate of the uploaded frames, bit/s.
    pub bitrate: i32,
    /// Barge in: start the next clip this long after the reply's audio starts, without waiting
    /// for the reply to end or pausing (needs `wait_for_reply`), ms.
    pub barge_in_ms: Option<u32>,
}

impl Default for TalkOptions {
    fn default() -> Self {
        Self {
            server: "ws://127.0.0.1:8080".into(),
            sample_rate: parley_protocol::DEFAULT_SAMPLE_RATE,
            pause_ms: 1000,
            wait_for_reply: true,
            reply_timeout_ms: 20_000,
            turn_start_timeout_ms: 3_000,
            bitrate: 32_000,
            barge_in_ms: None,
        }
    }
}

/// One clip to say: its name (for the report) and mono audio at the stream rate.
#[derive(Debug, Clone)]
pub struct Clip {
    pub name: String,
    pub samples: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TalkError {
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: Box<tokio_tungstenite::tungstenite::Error> },
    /// The server answered the upgrade with an HTTP error (503 full, loading or draining; 401…).
    #[error("{url} refused the session: {status} {message}{}", retry_after.as_ref().map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Refused { url: String, status: u16, retry_after: Option<String>, code: Option<String>, message: String },
    #[error("WebSocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("the server closed the session: {code} {reason}")]
    Closed { code: u16, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

impl TalkError {
    /// A failed connection to `url`: an HTTP refusal with the server's own message, else as is.
    pub fn connect(url: &str, error: tokio_tungstenite::tungstenite::Error) -> Self {
        let tokio_tungstenite::tungstenite::Error::Http(response) = &error else {
            return TalkError::Connect { url: url.into(), source: Box::new(error) };
        };
        let body = response.body().as_deref().unwrap_or_default();
        let error = serde_json::from_slice::<serde_json::Value>(body).ok().map(|v| v["error"].clone());
        let field = |name: &str| error.as_ref().and_then(|e| e[name].as_str()).map(str::to_string);
        let message = field("message").unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        TalkError::Refused {
            url: url.into(),
            status: response.status().as_u16(),
            retry_after: header("retry-after"),
            code: field("code"),
            message,
        }
    }
}

/// A reply audio frame as received.
#[derive(Debug, Clone, Copy)]
pub struct ReceivedFrame {
    pub seq: u32,
    /// Header timestamp (the client timestamp the server echoes), µs.
    pub timestamp_us: u64,
    /// Client clock when it arrived, µs since the session start.
    pub received_us: u64,
}

/// Everything a session produced.
#[derive(Debug, Default)]
pub struct TalkResult {
    pub report: Report,
    /// Decoded reply audio at the stream rate, frames concatenated in arrival order.
    pub reply_audio: Vec<f32>,
    pub frames: Vec<ReceivedFrame>,
    /// Every event received, with its arrival time (µs since the session start).
    pub events: Vec<(u64, ServerEvent)>,
    /// Send time of each uploaded frame (index = seq), µs since the session start.
    pub sent_us: Vec<u64>,
    /// Reply frames whose sequence number was not the previous one + 1.
    pub seq_gaps: u32,
    /// The close code and reason, when the server closed the session.
    pub close: Option<(u16, String)>,
}

impl TalkResult {
    /// Round trip per echoed frame: arrival − the send time the header echoes, µs (the per-frame
    /// transport overhead with the echo pipeline in frame mode, plus the frame's 20 ms of buffering).
    pub fn frame_round_trips_us(&self) -> Vec<u64> {
        self.frames
            .iter()
            .filter(|f| f.timestamp_us > 0)
            .map(|f| f.received_us.saturating_sub(f.timestamp_us))
            .collect()
    }
}

/// The wire half of a session, one per protocol: how 20 ms of audio goes out, and what a
/// message from the server means. [`stream`] does the rest, the same for every protocol.
pub(crate) trait Wire {
    /// The message carrying `samples` (20 ms at the clips' rate), the `seq`-th sent, at `sent_us`.
    fn audio(&mut self, samples: &[f32], seq: u32, sent_us: u64) -> Result<Message, TalkError>;
    /// Takes in a text or binary message that arrived at `received_us`: its events, frames and
    /// reply audio go into `result`.
    fn receive(&mut self, message: Message, received_us: u64, result: &mut TalkResult) -> Result<(), TalkError>;
}

/// The reference utterances of each clip (mono at `rate`): computed before the stream's clock
/// starts, as this takes a few ms per second of audio.
pub(crate) fn anchors(clips: &[Clip], rate: u32) -> Vec<(String, Vec<crate::anchor::Utterance>)> {
    clips.iter().map(|c| (c.name.clone(), crate::anchor::utterances(&c.samples, rate))).collect()
}

/// Streams `clips` (one turn each) to the server and collects the replies.
pub async fn talk(options: &TalkOptions, clips: &[Clip]) -> Result<TalkResult, TalkError> {
    let rate = options.sample_rate;
    let anchors = anchors(clips, rate);
    let url = crate::endpoint_url(&options.server);
    let mut ws = crate::connect(&url).await.map_err(|e| TalkError::connect(&url, e))?;
    let update = ClientEvent::SessionUpdate {
        session: SessionUpdate { input_sample_rate: Some(rate), output_sample_rate: Some(rate) },
    };
    ws.send(Message::text(update.to_json())).await.map_err(Box::new)?;
    let mut wire = OpusWire::new(rate, options.bitrate)?;
    let result = TalkResult { report: Report { server: url, ..Report::default() }, ..TalkResult::default() };
    stream(&mut ws, &mut wire, options, clips, rate, &anchors, result).await
}

/// Parley's own protocol (`/v1/voice`): binary 20 ms Opus frames both ways, JSON events.
struct OpusWire {
    encoder: opus::Encoder,
    decoder: opus::Decoder,
    packet: Vec<u8>,
    frame: usize,
    last_reply_seq: Option<u32>,
}

impl OpusWire {
    fn new(rate: u32, bitrate: i32) -> Result<Self, TalkError> {
        let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
        encoder.set_bitrate(opus::Bitrate::Bits(bitrate))?;
        Ok(Self {
            encoder,
            decoder: opus::Decoder::new(rate, opus::Channels::Mono)?,
            packet: vec![0u8; MAX_OPUS_PACKET_BYTES],
            frame: frame_samples(rate),
            last_reply_seq: None,
        })
    }
}

impl Wire for OpusWire {
    fn audio(&mut self, samples: &[f32], seq: u32, sent_us: u64) -> Result<Message, TalkError> {
        let n = self.encoder.encode_float(samples, &mut self.packet)?;
        Ok(Message::Binary(Bytes::from(FrameHeader::audio(seq, sent_us).encode(&self.packet[..n]))))
    }

    fn receive(&mut self, message: Message, received_us: u64, result: &mut TalkResult) -> Result<(), TalkError> {
        match message {
            Message::Binary(data) => {
                let (header, payload) = FrameHeader::decode(&data).map_err(|e| TalkError::Protocol(e.to_string()))?;
                if self.last_reply_seq.is_some_and(|last| header.seq != last.wrapping_add(1)) {
                    result.seq_gaps += 1;
                }
                self.last_reply_seq = Some(header.seq);
                let mut out = vec![0f32; self.frame];
                let n = self.decoder.decode_float(payload, &mut out, false)?;
                result.reply_audio.extend_from_slice(&out[..n]);
                result.frames.push(ReceivedFrame { seq: header.seq, timestamp_us: header.timestamp_us, received_us });
            }
            Message::Text(text) => {
                // Unknown (newer) server events are ignored, as the protocol asks.
                let Ok(event) = ServerEvent::parse(text.as_str()) else {
                    tracing::warn!(%text, "unparsed server event");
                    return Ok(());
                };
                if let ServerEvent::SessionCreated { session, .. } = &event {
                    result.report.pipeline = session.pipeline.clone();
                }
                result.events.push((received_us, event));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Where a session is in its clips. Each 20 ms tick asks it what to send: the next 20 ms of the
/// clip being spoken, or silence while it waits for the clip's reply and then pauses.
struct Script<'a> {
    options: &'a TalkOptions,
    clips: &'a [Clip],
    /// Samples per 20 ms at the clips' rate.
    frame: usize,
    clip_index: usize,
    /// The next 20 ms of the clip to send.
    frame_index: usize,
    /// The sequence number of each clip's first 20 ms.
    first_seq: Vec<Option<usize>>,
    phase: Phase,
    phase_started: Instant,
    /// Where the events since the current clip began start: for deciding when its reply is over.
    clip_first_event: usize,
}

enum Phase {
    Speaking,
    Waiting,
    Pausing,
}

impl<'a> Script<'a> {
    fn new(options: &'a TalkOptions, clips: &'a [Clip], rate: u32) -> Self {
        Self {
            options,
            clips,
            frame: frame_samples(rate),
            clip_index: 0,
            frame_index: 0,
            first_seq: vec![None; clips.len()],
            phase: if clips.is_empty() { Phase::Pausing } else { Phase::Speaking },
            phase_started: Instant::now(),
            clip_first_event: 0,
        }
    }

    /// Fills `out` (20 ms) with what the tick sending `seq` carries, given the `events` received
    /// so far; `false` once every clip is done (nothing to send).
    fn tick(&mut self, events: &[(u64, ServerEvent)], now_us: u64, seq: usize, out: &mut [f32]) -> bool {
        out.fill(0.0);
        let ms = |ms: u32| Duration::from_millis(ms.into());
        loop {
            match self.phase {
                Phase::Speaking => {
                    let clip = &self.clips[self.clip_index].samples;
                    let begin = self.frame_index * self.frame;
                    if begin < clip.len() {
                        let end = (begin + self.frame).min(clip.len());
                        out[..end - begin].copy_from_slice(&clip[begin..end]);
                        if self.frame_index == 0 {
                            self.first_seq[self.clip_index] = Some(seq);
                        }
                        self.frame_index += 1;
                    } else {
                        self.phase = if self.options.wait_for_reply { Phase::Waiting } else { Phase::Pausing };
                        self.phase_started = Instant::now();
                    }
                }
                Phase::Waiting => {
                    let waited = self.phase_started.elapsed();
                    let events = &events[self.clip_first_event.min(events.len())..];
                    let started = events.iter().any(|(_, e)| {
                        matches!(e, ServerEvent::SpeechStarted { .. } | ServerEvent::ResponseAudioStarted { .. })
                    });
                    let finished = events.iter().rev().find_map(|(_, e)| match e {
                        ServerEvent::ResponseAudioDone { .. } | ServerEvent::ReplyCancelled { .. } => Some(true),
                        ServerEvent::SpeechStarted { .. } => Some(false),
                        _ => None,
                    }) == Some(true);
                    let audio_started_us = events
                        .iter()
                        .find_map(|(at, e)| matches!(e, ServerEvent::ResponseAudioStarted { .. }).then_some(*at));
                    let barge_in = self
                        .options
                        .barge_in_ms
                        .zip(audio_started_us)
                        .is_some_and(|(ms, at)| now_us >= at + u64::from(ms) * 1000);
                    if finished
                        || barge_in
                        || waited > ms(self.options.reply_timeout_ms)
                        || (!started && waited > ms(self.options.turn_start_timeout_ms))
                    {
                        self.phase = Phase::Pausing;
                        self.phase_started = Instant::now();
                        if barge_in {
                            // No pause: the next clip starts over the reply.
                            let pause = ms(self.options.pause_ms);
                            self.phase_started = Instant::now().checked_sub(pause).unwrap_or(self.phase_started);
                        }
                    }
                }
                Phase::Pausing => {
                    if self.phase_started.elapsed() >= ms(self.options.pause_ms) {
                        self.clip_index += 1;
                        if self.clip_index >= self.clips.len() {
                            return false;
                        }
                        self.frame_index = 0;
                        self.clip_first_event = events.len();
                        self.phase = Phase::Speaking;
                        // The clip's first 20 ms go out on this tick.
                        continue;
                    }
                }
            }
            return true;
        }
    }
}

/// Streams `clips` (mono at `rate`, the rate the wire sends) at real-time pace over `ws`, one
/// 20 ms message per tick, through `wire`; collects what comes back into `result` and accounts
/// each turn from the reference utterances `anchors` (at `rate`). Shared by every protocol.
pub(crate) async fn stream(
    ws: &mut crate::Socket,
    wire: &mut impl Wire,
    options: &TalkOptions,
    clips: &[Clip],
    rate: u32,
    anchors: &[(String, Vec<crate::anchor::Utterance>)],
    mut result: TalkResult,
) -> Result<TalkResult, TalkError> {
    let start = Instant::now();
    let now_us = || start.elapsed().as_micros() as u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(FRAME_MS as u64));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut script = Script::new(options, clips, rate);
    let mut pcm = vec![0f32; script.frame];
    let mut seq: u32 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if !script.tick(&result.events, now_us(), seq as usize, &mut pcm) {
                    break;
                }
                let sent = now_us();
                let message = wire.audio(&pcm, seq, sent)?;
                ws.send(message).await.map_err(Box::new)?;
                result.sent_us.push(sent);
                seq += 1;
            }
            message = ws.next() => {
                let received = now_us();
                match message {
                    None => break,
                    Some(Err(e)) => return Err(TalkError::Ws(Box::new(e))),
                    Some(Ok(Message::Close(frame))) => {
                        result.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                        break;
                    }
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        wire.receive(message, received, &mut result)?;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    let _ = ws.close(None).await;
    let streamed = crate::report::streamed(anchors, &script.first_seq, &result.sent_us, rate);
    result.report = Report {
        server: result.report.server,
        pipeline: result.report.pipeline,
        ..crate::report::account(&streamed, &result.events, &result.frames)
    };
    if let Some((code, reason)) = &result.close
        && *code != 1000
    {
        return Err(TalkError::Closed { code: *code, reason: reason.clone() });
    }
    Ok(result)
}
