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
    #[error("WebSocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("the server closed the session: {code} {reason}")]
    Closed { code: u16, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
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

/// Streams `clips` (one turn each) to the server and collects the replies.
pub async fn talk(options: &TalkOptions, clips: &[Clip]) -> Result<TalkResult, TalkError> {
    let rate = options.sample_rate;
    // Before the stream's clock starts: this takes a few ms per second of audio.
    let anchors: Vec<_> = clips.iter().map(|c| (c.name.clone(), crate::anchor::utterances(&c.samples, rate))).collect();
    let url = crate::endpoint_url(&options.server);
    let mut ws =
        crate::connect(&url).await.map_err(|e| TalkError::Connect { url: url.clone(), source: Box::new(e) })?;
    let frame = frame_samples(rate);
    let update = ClientEvent::SessionUpdate {
        session: SessionUpdate { input_sample_rate: Some(rate), output_sample_rate: Some(rate) },
    };
    ws.send(Message::text(update.to_json())).await.map_err(Box::new)?;

    let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
    encoder.set_bitrate(opus::Bitrate::Bits(options.bitrate))?;
    let mut decoder = opus::Decoder::new(rate, opus::Channels::Mono)?;
    let mut packet = vec![0u8; MAX_OPUS_PACKET_BYTES];
    let mut pcm = vec![0f32; frame];
    let silence = vec![0f32; frame];

    let start = Instant::now();
    let now_us = || start.elapsed().as_micros() as u64;
    let mut result =
        TalkResult { report: Report { server: url.clone(), ..Report::default() }, ..TalkResult::default() };
    // Where the events since the current clip began start: for deciding when its reply is over.
    let mut clip_first_event = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(FRAME_MS as u64));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);

    // Position: which clip, which frame in it; then the wait/pause phase.
    let mut clip_index = 0;
    let mut frame_index = 0;
    let mut first_seq: Vec<Option<usize>> = vec![None; clips.len()];
    let mut phase_started = Instant::now();
    enum Phase {
        Speaking,
        Waiting,
        Pausing,
    }
    let mut phase = if clips.is_empty() { Phase::Pausing } else { Phase::Speaking };
    let mut seq: u32 = 0;
    let mut last_reply_seq: Option<u32> = None;

    loop {
        tokio::select! {
            _ = ticker.tick() => {
                // Decide what this tick sends.
                let samples: &[f32] = match phase {
                    Phase::Speaking => {
                        let clip = &clips[clip_index].samples;
                        let begin = frame_index * frame;
                        if begin < clip.len() {
                            let end = (begin + frame).min(clip.len());
                            pcm[..end - begin].copy_from_slice(&clip[begin..end]);
                            pcm[end - begin..].fill(0.0);
                            &pcm
                        } else {
                            phase = if options.wait_for_reply { Phase::Waiting } else { Phase::Pausing };
                            phase_started = Instant::now();
                            &silence
                        }
                    }
                    Phase::Waiting => {
                        let waited = phase_started.elapsed();
                        let events = &result.events[clip_first_event..];
                        let started = events.iter().any(|(_, e)| matches!(e, ServerEvent::SpeechStarted { .. } | ServerEvent::ResponseAudioStarted { .. }));
                        let finished = events.iter().rev().find_map(|(_, e)| match e {
                            ServerEvent::ResponseAudioDone { .. } | ServerEvent::ReplyCancelled { .. } => Some(true),
                            ServerEvent::SpeechStarted { .. } => Some(false),
                            _ => None,
                        }) == Some(true);
                        let audio_started_us = events.iter().find_map(|(at, e)| matches!(e, ServerEvent::ResponseAudioStarted { .. }).then_some(*at));
                        let barge_in = options.barge_in_ms.zip(audio_started_us).is_some_and(|(ms, at)| now_us() >= at + ms as u64 * 1000);
                        if finished
                            || barge_in
                            || waited > Duration::from_millis(options.reply_timeout_ms as u64)
                            || (!started && waited > Duration::from_millis(options.turn_start_timeout_ms as u64))
                        {
                            phase = Phase::Pausing;
                            phase_started = Instant::now();
                            if barge_in {
                                // No pause: the next clip starts over the reply.
                                let pause = Duration::from_millis(options.pause_ms as u64);
                                phase_started = Instant::now().checked_sub(pause).unwrap_or(phase_started);
                            }
                        }
                        &silence
                    }
                    Phase::Pausing => {
                        if phase_started.elapsed() >= Duration::from_millis(options.pause_ms as u64) {
                            clip_index += 1;
                            if clip_index >= clips.len() {
                                break;
                            }
                            frame_index = 0;
                            clip_first_event = result.events.len();
                            phase = Phase::Speaking;
                        }
                        &silence
                    }
                };
                let n = encoder.encode_float(samples, &mut packet)?;
                let sent = now_us();
                let message = FrameHeader::audio(seq, sent).encode(&packet[..n]);
                ws.send(Message::Binary(Bytes::from(message))).await.map_err(Box::new)?;
                result.sent_us.push(sent);
                if matches!(phase, Phase::Speaking) {
                    if frame_index == 0 {
                        first_seq[clip_index] = Some(seq as usize);
                    }
                    frame_index += 1;
                }
                seq += 1;
            }
            message = ws.next() => {
                let received = now_us();
                match message {
                    None => break,
                    Some(Err(e)) => return Err(TalkError::Ws(Box::new(e))),
                    Some(Ok(Message::Binary(data))) => {
                        let (header, payload) = FrameHeader::decode(&data).map_err(|e| TalkError::Protocol(e.to_string()))?;
                        if last_reply_seq.is_some_and(|last| header.seq != last.wrapping_add(1)) {
                            result.seq_gaps += 1;
                        }
                        last_reply_seq = Some(header.seq);
                        let mut out = vec![0f32; frame];
                        let n = decoder.decode_float(payload, &mut out, false)?;
                        result.reply_audio.extend_from_slice(&out[..n]);
                        result.frames.push(ReceivedFrame { seq: header.seq, timestamp_us: header.timestamp_us, received_us: received });
                    }
                    Some(Ok(Message::Text(text))) => {
                        // Unknown (newer) server events are ignored, as the protocol asks.
                        let Ok(event) = ServerEvent::parse(text.as_str()) else {
                            tracing::warn!(%text, "unparsed server event");
                            continue;
                        };
                        if let ServerEvent::SessionCreated { session, .. } = &event {
                            result.report.pipeline = session.pipeline.clone();
                        }
                        result.events.push((received, event));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        result.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                        break;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    let _ = ws.close(None).await;
    let streamed = crate::report::streamed(&anchors, &first_seq, &result.sent_us, rate);
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
