//! One client session over the OpenAI Realtime API (GA event set; `parley bench --protocol
//! realtime`): the same session as [`crate::talk()`] — clips streamed at real-time pace, then
//! silence, each turn's reply waited for — with the audio as base64 PCM16 at 24 kHz in JSON
//! events, so any Realtime-compatible server can be measured with the same report.
//!
//! The server's events are translated into [`ServerEvent`]s (see [`Translator`]), and its reply
//! audio is cut into 20 ms [`ReceivedFrame`]s, so [`crate::report::account`] and the bench
//! summary read a Realtime session exactly as a Parley one. Turns are counted here (one per
//! `input_audio_buffer.speech_started`); a response belongs to the turn current at its
//! `response.created`. Parley's `parley.turn.latency` and `parley.safety.decision` give the
//! server's stages and safety decisions where the server sends them (other servers don't).
use crate::report::Report;
use crate::talk::{Clip, ReceivedFrame, TalkError, TalkOptions, TalkResult, Wire};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use parley_protocol::event::{CancelReason, ErrorCode, ErrorInfo};
use parley_protocol::{ServerEvent, frame_samples};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The Realtime API's audio rate (`audio/pcm`), both ways, Hz.
pub const RATE: u32 = 24_000;
/// Where the Realtime API is served, and the model asked for when the server URL has no path.
pub const DEFAULT_PATH: &str = "/v1/realtime?model=parley";
/// How long the session's setup (`session.created`, `session.updated`) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint URL: `ws://host:port` (no path) gets [`DEFAULT_PATH`]; a URL with a path is used
/// as given.
pub fn realtime_url(server: &str) -> String {
    let after_scheme = server.split_once("://").map_or(server, |(_, rest)| rest);
    match after_scheme.find(['/', '?']) {
        Some(at) if after_scheme[at..] != *"/" => server.to_string(),
        _ => format!("{}{DEFAULT_PATH}", server.trim_end_matches('/')),
    }
}

/// Streams `clips` (one turn each, mono at the stream rate) to a Realtime server and collects
/// the replies; like [`crate::talk()`], with the reply audio at the stream rate.
pub async fn talk_realtime(options: &TalkOptions, clips: &[Clip]) -> Result<TalkResult, TalkError> {
    // The wire's rate throughout: the clips are sent, and their utterances found, at 24 kHz.
    let clips: Vec<Clip> = clips
        .iter()
        .map(|c| {
            let samples = crate::audio::resample(&c.samples, options.sample_rate, RATE)
                .map_err(|e| TalkError::Protocol(e.to_string()))?;
            Ok(Clip { name: c.name.clone(), samples })
        })
        .collect::<Result<_, TalkError>>()?;
    let anchors = crate::talk::anchors(&clips, RATE);
    let url = realtime_url(&options.server);
    let connect_error = |e| TalkError::Connect { url: url.clone(), source: Box::new(e) };
    let mut request = url.as_str().into_client_request().map_err(connect_error)?;
    request.headers_mut().insert("Authorization", "Bearer parley".parse().expect("a valid header value"));
    let mut ws = crate::connect(request).await.map_err(|e| TalkError::connect(&url, e))?;
    let model = tokio::time::timeout(SETUP_TIMEOUT, set_up(&mut ws))
        .await
        .map_err(|_| TalkError::Protocol("no session.created and session.updated in time".into()))??;
    let mut wire = RealtimeWire { translator: Translator::default(), bytes: Vec::new() };
    let result =
        TalkResult { report: Report { server: url, pipeline: model, ..Report::default() }, ..TalkResult::default() };
    let mut result = crate::talk::stream(&mut ws, &mut wire, options, &clips, RATE, &anchors, result).await?;
    result.reply_audio = crate::audio::resample(&result.reply_audio, RATE, options.sample_rate)
        .map_err(|e| TalkError::Protocol(e.to_string()))?;
    Ok(result)
}

/// The `session.update` sent after `session.created`: PCM16 at 24 kHz both ways, server VAD.
pub fn session_update() -> Value {
    let format = json!({"type": "audio/pcm", "rate": RATE});
    json!({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": format, "turn_detection": {"type": "server_vad"}},
        "output": {"format": format},
    }}})
}

/// Waits for `session.created`, sends [`session_update`] and waits for `session.updated`; the
/// session's model (the report's `pipeline`).
async fn set_up(ws: &mut crate::Socket) -> Result<String, TalkError> {
    let mut model = String::new();
    let mut updated = false;
    while !updated {
        let message = match ws.next().await {
            None => return Err(TalkError::Protocol("the server closed the session during its setup".into())),
            Some(Err(e)) => return Err(TalkError::Ws(Box::new(e))),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                return Err(TalkError::Closed { code, reason });
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
        };
        let Ok(event) = serde_json::from_str::<Value>(message.as_str()) else { continue };
        match event["type"].as_str().unwrap_or_default() {
            "session.created" => {
                model = event["session"]["model"].as_str().unwrap_or("realtime").to_string();
                ws.send(Message::text(session_update().to_string())).await.map_err(Box::new)?;
            }
            "session.updated" => updated = true,
            "error" => return Err(TalkError::Protocol(format!("session setup refused: {}", event["error"]))),
            _ => {}
        }
    }
    Ok(model)
}

/// The Realtime wire: `input_audio_buffer.append` out, JSON events in.
struct RealtimeWire {
    translator: Translator,
    bytes: Vec<u8>,
}

impl Wire for RealtimeWire {
    fn audio(&mut self, samples: &[f32], _seq: u32, _sent_us: u64) -> Result<Message, TalkError> {
        self.bytes.clear();
        for s in samples {
            self.bytes.extend_from_slice(&((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes());
        }
        let audio = base64::engine::general_purpose::STANDARD.encode(&self.bytes);
        Ok(Message::text(json!({"type": "input_audio_buffer.append", "audio": audio}).to_string()))
    }

    fn receive(&mut self, message: Message, received_us: u64, result: &mut TalkResult) -> Result<(), TalkError> {
        if let Message::Text(text) = message {
            match serde_json::from_str::<Value>(text.as_str()) {
                Ok(event) => self.translator.event(&event, received_us, result),
                Err(e) => tracing::warn!(%text, "unparsed server event: {e}"),
            }
        }
        Ok(())
    }
}

/// A response from `response.created` on.
#[derive(Debug, Default)]
struct Response {
    turn: u64,
    /// When its first audio arrived.
    first_audio_us: Option<u64>,
    /// Audio received, samples at 24 kHz.
    samples: usize,
    frames: u32,
}

/// Translates Realtime server events into Parley's [`ServerEvent`]s, and reply audio deltas
/// into 20 ms frames (pure: no socket; unknown events are ignored).
#[derive(Debug, Default)]
pub struct Translator {
    /// User turns heard so far (`speech_started`).
    turn: u64,
    /// The turn of each user item, by item id.
    items: HashMap<String, u64>,
    /// Every response created, by id (kept after its end: Parley's events may name it later).
    responses: HashMap<String, Response>,
    /// The response created last.
    last_response: Option<String>,
    framer: Framer,
}

impl Translator {
    /// Takes in one server event that arrived at `at_us`: what it means goes into `result`
    /// (`events`; for audio, `reply_audio` at 24 kHz and `frames`).
    pub fn event(&mut self, event: &Value, at_us: u64, result: &mut TalkResult) {
        let text = |name: &str| event[name].as_str().unwrap_or_default().to_string();
        let ms = |name: &str| event[name].as_u64().unwrap_or_default();
        let mut push = |e: ServerEvent| result.events.push((at_us, e));
        match event["type"].as_str().unwrap_or_default() {
            "input_audio_buffer.speech_started" => {
                self.turn += 1;
                self.items.insert(text("item_id"), self.turn);
                push(ServerEvent::SpeechStarted { turn: self.turn, audio_start_ms: ms("audio_start_ms") });
            }
            "input_audio_buffer.speech_stopped" => {
                push(ServerEvent::SpeechStopped { turn: self.item_turn(event), audio_end_ms: ms("audio_end_ms") });
            }
            "conversation.item.input_audio_transcription.delta" => {
                push(ServerEvent::TranscriptionDelta { turn: self.item_turn(event), delta: text("delta") });
            }
            "conversation.item.input_audio_transcription.completed" => {
                push(ServerEvent::TranscriptionCompleted {
                    turn: self.item_turn(event),
                    transcript: text("transcript"),
                });
            }
            "response.created" => {
                let id = event["response"]["id"].as_str().unwrap_or_default().to_string();
                self.responses.insert(id.clone(), Response { turn: self.turn, ..Response::default() });
                self.last_response = Some(id);
            }
            "response.output_audio.delta" | "response.audio.delta" => self.audio(event, at_us, result),
            "response.output_audio_transcript.delta"
            | "response.audio_transcript.delta"
            | "response.output_text.delta"
            | "response.text.delta" => {
                push(ServerEvent::ResponseTextDelta { turn: self.response(event).turn, delta: text("delta") });
            }
            "response.output_audio_transcript.done" | "response.audio_transcript.done" => {
                push(ServerEvent::ResponseTextDone { turn: self.response(event).turn, text: text("transcript") });
            }
            "response.output_text.done" | "response.text.done" => {
                push(ServerEvent::ResponseTextDone { turn: self.response(event).turn, text: text("text") });
            }
            "response.output_audio.done" | "response.audio.done" => {
                result.frames.extend(self.framer.flush());
            }
            "response.done" => {
                result.frames.extend(self.framer.flush());
                let done = self.done(&event["response"], at_us);
                result.events.push((at_us, done));
            }
            kind @ ("parley.turn.latency" | "parley.safety.decision") => {
                // Its response's turn; else (no response yet, or no longer: an input decision, a
                // turn without reply) the server's turn number, which counts the same turns.
                let turn = self.known_response(event).map(|id| self.responses[id].turn);
                let turn = turn.or(event["turn"].as_u64()).unwrap_or(self.turn);
                push_parley(event, kind.trim_start_matches("parley."), turn, &mut push);
            }
            "error" => push(error_event(&event["error"])),
            _ => {}
        }
    }

    /// The turn of the user item an event names, or else the current turn.
    fn item_turn(&self, event: &Value) -> u64 {
        event["item_id"].as_str().and_then(|id| self.items.get(id)).copied().unwrap_or(self.turn)
    }

    /// The id of the response an event names (`response_id`), if it was created.
    fn known_response<'a>(&self, event: &'a Value) -> Option<&'a str> {
        event["response_id"].as_str().filter(|id| self.responses.contains_key(*id))
    }

    /// The response an event names (`response_id`); one it names but was never created belongs
    /// to the current turn.
    fn response(&mut self, event: &Value) -> &mut Response {
        let id = event["response_id"].as_str().or(self.last_response.as_deref()).unwrap_or_default().to_string();
        let turn = self.turn;
        self.responses.entry(id).or_insert_with(|| Response { turn, ..Response::default() })
    }

    /// A `response.output_audio.delta`: its audio, its frames, and for a response's first audio
    /// `ResponseAudioStarted` (before the frames, as Parley's `response.audio.started`).
    fn audio(&mut self, event: &Value, at_us: u64, result: &mut TalkResult) {
        let bytes = match base64::engine::general_purpose::STANDARD.decode(event["delta"].as_str().unwrap_or_default())
        {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!("undecodable audio delta: {e}");
                return;
            }
        };
        let samples = decode_pcm16(&bytes);
        let first = self.response(event).first_audio_us.is_none();
        if first {
            // A new reply starts on a frame of its own.
            result.frames.extend(self.framer.flush());
        }
        let first_seq = self.framer.next_seq;
        let frames = self.framer.push(samples.len(), at_us);
        let response = self.response(event);
        if first {
            response.first_audio_us = Some(at_us);
            result.events.push((at_us, ServerEvent::ResponseAudioStarted { turn: response.turn, first_seq }));
        }
        response.samples += samples.len();
        // Frames are counted when complete: the last, partial one at the response's end.
        response.frames += u32::try_from(frames.len()).unwrap_or(u32::MAX);
        result.reply_audio.extend_from_slice(&samples);
        result.frames.extend(frames);
    }

    /// The event ending a response (`response.done`): `cancelled` (and `incomplete` by the
    /// content filter) → `ReplyCancelled`; any other status (`completed`, `incomplete` for
    /// tokens, `failed`) → `ResponseAudioDone`: either way the turn's reply is over.
    fn done(&self, response: &Value, at_us: u64) -> ServerEvent {
        let unknown = Response { turn: self.turn, ..Response::default() };
        let r = response["id"].as_str().and_then(|id| self.responses.get(id)).unwrap_or(&unknown);
        let audio_ms = (r.samples as u64 * 1000) / u64::from(RATE);
        let reason = match (response["status"].as_str(), response["status_details"]["reason"].as_str()) {
            (Some("cancelled"), Some("turn_detected")) => Some(CancelReason::BargeIn),
            (Some("cancelled"), _) => Some(CancelReason::ClientCancel),
            (Some("incomplete"), Some("content_filter")) => Some(CancelReason::Safety),
            _ => None,
        };
        match reason {
            // A real-time player has played the audio since its first arrived, up to all of it.
            Some(reason) => {
                let played_ms = r.first_audio_us.map_or(0, |first| (at_us.saturating_sub(first) / 1000).min(audio_ms));
                ServerEvent::ReplyCancelled { turn: r.turn, reason, played_ms, sent_ms: audio_ms }
            }
            None => {
                let frames = r.frames + u32::from(!r.samples.is_multiple_of(frame_samples(RATE)));
                ServerEvent::ResponseAudioDone { turn: r.turn, frames, audio_ms }
            }
        }
    }
}

/// A Parley event on the Realtime endpoint (`parley.turn.latency`, `parley.safety.decision`)
/// as the Parley event `kind` of `turn` (same fields; unparsable ones are dropped).
fn push_parley(event: &Value, kind: &str, turn: u64, push: &mut impl FnMut(ServerEvent)) {
    let mut event = event.clone();
    event["type"] = json!(kind);
    event["turn"] = json!(turn);
    match serde_json::from_value::<ServerEvent>(event) {
        Ok(e) => push(e),
        Err(e) => tracing::warn!("unparsed parley.{kind} event: {e}"),
    }
}

/// An `error` event: its code as Parley's where it is one, else by its type (the Realtime code
/// then heads the message).
fn error_event(error: &Value) -> ServerEvent {
    let message = error["message"].as_str().unwrap_or_default();
    let code = error["code"].as_str();
    let known = code.and_then(|c| serde_json::from_value::<ErrorCode>(json!(c)).ok());
    let (code, message) = match (known, code) {
        (Some(known), _) => (known, message.to_string()),
        (None, code) => {
            let by_type = if error["type"].as_str() == Some("server_error") {
                ErrorCode::Internal
            } else {
                ErrorCode::InvalidEvent
            };
            (by_type, code.map_or_else(|| message.to_string(), |c| format!("{c}: {message}")))
        }
    };
    ServerEvent::Error { error: ErrorInfo { code, message, seq: None } }
}

/// Little-endian PCM16 as f32 in [-1, 1).
fn decode_pcm16(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0).collect()
}

/// Cuts reply audio arriving in deltas of any length into 20 ms frames at 24 kHz, numbered on
/// from 0: a frame arrives with the delta that completes it (several frames in one delta arrive
/// together); what is left over waits for the next delta, or [`Framer::flush`].
#[derive(Debug, Default)]
struct Framer {
    next_seq: u32,
    /// Samples received past the last whole frame, and when the last of them arrived.
    pending: usize,
    pending_us: u64,
}

impl Framer {
    /// The frames that `samples` more samples, arriving at `at_us`, complete.
    fn push(&mut self, samples: usize, at_us: u64) -> Vec<ReceivedFrame> {
        let frame = frame_samples(RATE);
        let total = self.pending + samples;
        self.pending = total % frame;
        self.pending_us = at_us;
        (0..total / frame).map(|_| self.frame(at_us)).collect()
    }

    /// The partial frame left over (a reply's end), if any.
    fn flush(&mut self) -> Option<ReceivedFrame> {
        (std::mem::take(&mut self.pending) > 0).then(|| self.frame(self.pending_us))
    }

    fn frame(&mut self, received_us: u64) -> ReceivedFrame {
        self.next_seq += 1;
        ReceivedFrame { seq: self.next_seq - 1, timestamp_us: 0, received_us }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::event::{SafetyAction, SafetyStage};

    fn delta(response: &str, samples: usize, value: i16) -> Value {
        let bytes: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), samples).flatten().collect();
        let delta = base64::engine::general_purpose::STANDARD.encode(bytes);
        json!({"type": "response.output_audio.delta", "response_id": response, "item_id": "item_r",
            "output_index": 0, "content_index": 0, "delta": delta})
    }

    fn translate(events: &[(u64, Value)]) -> TalkResult {
        let mut translator = Translator::default();
        let mut result = TalkResult::default();
        for (at, event) in events {
            translator.event(event, *at, &mut result);
        }
        result
    }

    #[test]
    fn urls_get_the_realtime_path_only_without_one() {
        assert_eq!(realtime_url("ws://127.0.0.1:8091"), "ws://127.0.0.1:8091/v1/realtime?model=parley");
        assert_eq!(realtime_url("ws://host:80/"), "ws://host:80/v1/realtime?model=parley");
        assert_eq!(realtime_url("ws://host:80/v1/realtime"), "ws://host:80/v1/realtime");
        assert_eq!(
            realtime_url("wss://api.openai.com/v1/realtime?model=gpt-realtime"),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime"
        );
    }

    #[test]
    fn deltas_are_cut_into_20_ms_frames() {
        // 480 samples a frame: 1000 → two frames and 40 left; 440 more complete the third; a
        // big delta gives several frames at once; the end flushes the partial last one.
        let mut framer = Framer::default();
        let at = |frames: &[ReceivedFrame]| frames.iter().map(|f| (f.seq, f.received_us)).collect::<Vec<_>>();
        assert_eq!(at(&framer.push(1000, 10)), [(0, 10), (1, 10)]);
        assert_eq!(at(&framer.push(100, 20)), []);
        assert_eq!(at(&framer.push(340, 30)), [(2, 30)]);
        assert_eq!(at(&framer.push(480 * 3 + 7, 40)), [(3, 40), (4, 40), (5, 40)]);
        assert_eq!(framer.flush().map(|f| (f.seq, f.received_us, f.timestamp_us)), Some((6, 40, 0)));
        assert!(framer.flush().is_none());
        assert_eq!(at(&framer.push(480, 50)), [(7, 50)]);
    }

    #[test]
    fn a_session_translates_into_parley_events_and_frames() {
        let marks = json!([{"stage": "speech_end", "at_ms": 0.0}, {"stage": "endpoint", "at_ms": 300.0}]);
        let result = translate(&[
            (1, json!({"type": "session.updated", "session": {}})),
            (100, json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 40, "item_id": "item_u1"})),
            (900, json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 800, "item_id": "item_u1"})),
            (910, json!({"type": "input_audio_buffer.committed", "item_id": "item_u1"})),
            (950, json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})),
            (1000, delta("resp_1", 480, 16384)),
            (
                1000,
                json!({"type": "parley.turn.latency", "turn": 7, "response_id": "resp_1", "marks": marks, "total_ms": 320.0}),
            ),
            (1010, json!({"type": "response.output_audio_transcript.delta", "response_id": "resp_1", "delta": "Hi"})),
            (1020, delta("resp_1", 960 + 100, 0)),
            (
                1030,
                json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u1", "transcript": "hello"}),
            ),
            (1040, json!({"type": "response.output_audio.done", "response_id": "resp_1"})),
            (
                1041,
                json!({"type": "response.output_audio_transcript.done", "response_id": "resp_1", "transcript": "Hi."}),
            ),
            (1050, json!({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})),
            (2000, json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1900, "item_id": "item_u2"})),
            (
                2001,
                json!({"type": "parley.safety.decision", "turn": 2, "response_id": null, "stage": "input",
                "action": "refuse", "rule_id": "r1", "category": "harm", "score": 0.9, "elapsed_ms": 1.5, "detail": null}),
            ),
            (2100, json!({"type": "response.created", "response": {"id": "resp_2"}})),
            (2200, delta("resp_2", 480 * 10, 0)),
            (
                2300,
                json!({"type": "response.done", "response": {"id": "resp_2", "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": "turn_detected"}}}),
            ),
            (
                2400,
                json!({"type": "error", "error": {"type": "server_error", "code": "busy", "message": "queue full"}}),
            ),
            (
                2500,
                json!({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "bad"}}),
            ),
            (2600, json!({"type": "rate_limits.updated"})),
        ]);
        let events: Vec<(u64, ServerEvent)> = result.events;
        let latency =
            ServerEvent::TurnLatency { turn: 1, marks: serde_json::from_value(marks).unwrap(), total_ms: 320.0 };
        let safety = ServerEvent::SafetyDecision {
            turn: 2,
            stage: SafetyStage::Input,
            action: SafetyAction::Refuse,
            rule_id: Some("r1".into()),
            category: Some("harm".into()),
            score: Some(0.9),
            elapsed_ms: Some(1.5),
            detail: None,
        };
        let error =
            |code, message: &str| ServerEvent::Error { error: ErrorInfo { code, message: message.into(), seq: None } };
        assert_eq!(
            events,
            [
                (100, ServerEvent::SpeechStarted { turn: 1, audio_start_ms: 40 }),
                (900, ServerEvent::SpeechStopped { turn: 1, audio_end_ms: 800 }),
                (1000, ServerEvent::ResponseAudioStarted { turn: 1, first_seq: 0 }),
                (1000, latency),
                (1010, ServerEvent::ResponseTextDelta { turn: 1, delta: "Hi".into() }),
                (1030, ServerEvent::TranscriptionCompleted { turn: 1, transcript: "hello".into() }),
                (1041, ServerEvent::ResponseTextDone { turn: 1, text: "Hi.".into() }),
                // 480 + 1060 samples: 3 whole frames and a partial one, 64 ms.
                (1050, ServerEvent::ResponseAudioDone { turn: 1, frames: 4, audio_ms: 64 }),
                (2000, ServerEvent::SpeechStarted { turn: 2, audio_start_ms: 1900 }),
                (2001, safety),
                (2200, ServerEvent::ResponseAudioStarted { turn: 2, first_seq: 4 }),
                (
                    2300,
                    ServerEvent::ReplyCancelled { turn: 2, reason: CancelReason::BargeIn, played_ms: 0, sent_ms: 200 }
                ),
                (2400, error(ErrorCode::Busy, "queue full")),
                (2500, error(ErrorCode::InvalidEvent, "invalid_value: bad")),
            ]
        );
        let frames: Vec<(u32, u64)> = result.frames.iter().map(|f| (f.seq, f.received_us)).collect();
        let mut expected = vec![(0, 1000), (1, 1020), (2, 1020), (3, 1020)];
        expected.extend((4..14).map(|seq| (seq, 2200)));
        assert_eq!(frames, expected);
        assert_eq!(result.reply_audio.len(), 480 + 1060 + 4800);
        assert_eq!(result.reply_audio[0], 0.5);
        // The report reads it as a Parley session: turn 1 answered 1000 − 900 after its end.
        let utterances = [crate::report::Streamed {
            input: "clip".into(),
            start_ms: 0.0,
            end_ms: 800.0,
            start_sent_us: 0,
            end_sent_us: 900,
        }];
        let report = crate::report::account(&utterances, &events, &result.frames);
        assert_eq!(report.turns[0].latency_ms.voice_to_voice, Some(0.1));
        assert_eq!((report.turns[0].transcript.as_str(), report.turns[0].reply_text.as_str()), ("hello", "Hi."));
        assert_eq!(report.turns[0].latency_ms.server_stages, [("endpoint".to_string(), 300.0)]);
        assert_eq!((report.turns[0].reply_audio_ms, report.turns[1].reply_audio_ms), (64, 200));
        assert_eq!(report.turns[1].safety.len(), 1);
    }

    #[test]
    fn other_endings_end_the_turn_too() {
        let done = |status: &str, reason: Value| {
            let result = translate(&[
                (0, json!({"type": "input_audio_buffer.speech_started", "item_id": "u"})),
                (10, json!({"type": "response.created", "response": {"id": "r"}})),
                (20, delta("r", 480, 0)),
                (
                    5_020,
                    json!({"type": "response.done", "response": {"id": "r", "status": status,
                    "status_details": {"type": status, "reason": reason}}}),
                ),
            ]);
            result.events.last().unwrap().1.clone()
        };
        assert_eq!(
            done("cancelled", json!("client_cancelled")),
            ServerEvent::ReplyCancelled { turn: 1, reason: CancelReason::ClientCancel, played_ms: 5, sent_ms: 20 }
        );
        assert!(matches!(
            done("incomplete", json!("content_filter")),
            ServerEvent::ReplyCancelled { reason: CancelReason::Safety, .. }
        ));
        let audio_done = ServerEvent::ResponseAudioDone { turn: 1, frames: 1, audio_ms: 20 };
        assert_eq!(done("incomplete", json!("max_output_tokens")), audio_done);
        assert_eq!(done("failed", Value::Null), audio_done);
    }

    #[test]
    fn appends_carry_pcm16_at_24_khz() {
        let mut wire = RealtimeWire { translator: Translator::default(), bytes: Vec::new() };
        let samples = vec![0.5f32; frame_samples(RATE)];
        let Message::Text(text) = wire.audio(&samples, 0, 0).unwrap() else { panic!("a text message") };
        let event: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(event["type"], "input_audio_buffer.append");
        let bytes = base64::engine::general_purpose::STANDARD.decode(event["audio"].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len(), 960);
        assert_eq!(i16::from_le_bytes([bytes[0], bytes[1]]), 16383);
        assert_eq!(session_update()["session"]["audio"]["output"]["format"]["rate"], 24_000);
    }
}
