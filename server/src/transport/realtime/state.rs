//! What one Realtime session knows, shared by its reader (client events) and its pacer's
//! transmitter ([`Replies`]): the session's settings, the events' ids, the response in progress.
//! The transmitter turns the conversation core's events, notices and frames into the GA server
//! events: a response's items, content parts, audio and transcript deltas and its `response.done`.
use super::audio::Format;
use crate::conversation::Notice;
use crate::conversation::history::{self, History, Item};
use crate::conversation::pacer::{PacerError, Transmit};
use crate::models::llm::Role;
use crate::transport::Outbox;
use base64::Engine as _;
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, ErrorCode};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The session's settings, as `session.update` left them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: String,
    pub model: String,
    pub input: Format,
    pub output: Format,
    /// `None`: turn detection off (the client commits).
    pub turn_detection: Option<TurnDetection>,
    /// `None`: the server's own.
    pub instructions: Option<String>,
    pub default_instructions: String,
    pub audio_out: bool,
    pub max_output_tokens: Option<usize>,
    pub voice: String,
    pub transcription: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnDetection {
    /// `server_vad` or `semantic_vad` (both: Parley's VAD, endpointing and end-of-turn models).
    pub kind: String,
    pub create_response: bool,
    pub interrupt_response: bool,
}

impl Settings {
    /// The session object of `session.created` and `session.updated`.
    pub fn json(&self) -> Value {
        let turn_detection = match &self.turn_detection {
            None => Value::Null,
            Some(t) if t.kind == "semantic_vad" => json!({
                "type": "semantic_vad", "eagerness": "auto",
                "create_response": t.create_response, "interrupt_response": t.interrupt_response,
            }),
            Some(t) => json!({
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 256, "silence_duration_ms": 480,
                "idle_timeout_ms": null, "create_response": t.create_response, "interrupt_response": t.interrupt_response,
            }),
        };
        json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": [if self.audio_out { "audio" } else { "text" }],
            "instructions": self.instructions.as_deref().unwrap_or(&self.default_instructions),
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": self.max_output_tokens.map_or(json!("inf"), |n| json!(n)),
            "tracing": null,
            "truncation": "auto",
            "prompt": null,
            "include": null,
            "audio": {
                "input": {
                    "format": self.input.json(),
                    "transcription": self.transcription,
                    "noise_reduction": null,
                    "turn_detection": turn_detection,
                },
                "output": { "format": self.output.json(), "voice": self.voice, "speed": 1.0 },
            },
        })
    }
}

/// A response from `response.created` to `response.done`.
#[derive(Debug)]
pub struct Response {
    pub id: String,
    /// The conversation turn that makes it, once known.
    pub turn: Option<u64>,
    /// Asked for with `response.create` (tagged so), or made for a detected turn.
    pub request: Option<u64>,
    pub audio: bool,
    pub in_conversation: bool,
    pub metadata: Value,
    pub max_output_tokens: Value,
    /// The output item, once the reply began.
    pub item: Option<String>,
    pub transcript: String,
    /// Why it stopped early: `status`, `reason`.
    pub stopped: Option<(&'static str, &'static str)>,
    pub error: Option<Value>,
    pub usage: (u64, u64),
    /// All its audio was sent (or it was cancelled), and the core's turn is over.
    pub audio_done: bool,
    pub turn_done: bool,
    /// The client asked to cancel it.
    pub cancelling: bool,
    /// Cut by the user's speech, whose `speech_started` is still on its way (the core cuts the
    /// reply at once, and tells of the speech after the reply's queued output): it ends after.
    pub awaiting_speech: bool,
}

impl Response {
    pub fn new(id: String, request: Option<u64>, audio: bool, in_conversation: bool) -> Self {
        Response {
            id,
            turn: None,
            request,
            audio,
            in_conversation,
            metadata: Value::Null,
            max_output_tokens: json!("inf"),
            item: None,
            transcript: String::new(),
            stopped: None,
            error: None,
            usage: (0, 0),
            audio_done: false,
            turn_done: false,
            cancelling: false,
            awaiting_speech: false,
        }
    }

    /// The response object, `status` as given.
    pub fn json(&self, status: &str) -> Value {
        let output: Vec<Value> = self.item.iter().map(|id| self.item_json(id, status_of_item(status))).collect();
        let status_details = match (status, self.stopped, &self.error) {
            ("in_progress" | "completed", _, _) => Value::Null,
            (_, Some((kind, reason)), _) => json!({"type": kind, "reason": reason, "error": null}),
            (_, None, Some(error)) => json!({"type": "failed", "reason": null, "error": error}),
            (kind, None, None) => json!({"type": kind, "reason": null, "error": null}),
        };
        let (input, output_tokens) = self.usage;
        json!({
            "object": "realtime.response",
            "id": self.id,
            "status": status,
            "status_details": status_details,
            "output": output,
            "conversation_id": if self.in_conversation { json!("conv_default") } else { Value::Null },
            "output_modalities": [if self.audio { "audio" } else { "text" }],
            "max_output_tokens": self.max_output_tokens,
            "audio": { "output": { "format": null, "voice": null } },
            "metadata": self.metadata,
            "usage": {
                "total_tokens": input + output_tokens,
                "input_tokens": input,
                "output_tokens": output_tokens,
                "input_token_details": {
                    "text_tokens": input, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0,
                    "cached_tokens_details": { "text_tokens": 0, "audio_tokens": 0, "image_tokens": 0 },
                },
                "output_token_details": {
                    "text_tokens": output_tokens,
                    "audio_tokens": 0,
                },
            },
        })
    }

    /// The assistant item as it stands.
    pub fn item_json(&self, id: &str, status: &str) -> Value {
        let part = match self.audio {
            true => json!({"type": "output_audio", "transcript": self.transcript, "audio": null}),
            false => json!({"type": "output_text", "text": self.transcript}),
        };
        let content = if status == "in_progress" && self.transcript.is_empty() { json!([]) } else { json!([part]) };
        json!({"id": id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status, "content": content})
    }

    fn part_json(&self) -> Value {
        match self.audio {
            true => json!({"type": "audio", "transcript": self.transcript, "audio": null, "text": null}),
            false => json!({"type": "text", "text": self.transcript, "audio": null, "transcript": null}),
        }
    }
}

fn status_of_item(response_status: &str) -> &'static str {
    match response_status {
        "in_progress" => "in_progress",
        "completed" => "completed",
        _ => "incomplete",
    }
}

/// A history item as the GA API shows it.
pub fn item_json(item: &Item) -> Value {
    let (role, kind) = match item.role {
        Role::User if item.audio => ("user", "input_audio"),
        Role::User => ("user", "input_text"),
        Role::System => ("system", "input_text"),
        Role::Assistant if item.audio => ("assistant", "output_audio"),
        Role::Assistant => ("assistant", "output_text"),
    };
    let part = match kind {
        "input_audio" => json!({"type": kind, "transcript": item.text, "audio": null}),
        "output_audio" => json!({"type": kind, "transcript": item.text, "audio": null}),
        _ => json!({"type": kind, "text": item.text}),
    };
    json!({"id": item.id, "object": "realtime.item", "type": "message", "role": role, "status": "completed", "content": [part]})
}

/// What one Realtime session knows (behind one lock: events go out in the order they are made).
pub struct State {
    outbox: Outbox,
    next_event: u64,
    pub settings: Settings,
    pub history: Arc<History>,
    pub response: Option<Response>,
    /// Client commits sent to the core, by request tag: the audio's length in seconds.
    pub commits: HashMap<u64, f64>,
    /// Where the current detected speech started, ms in the input stream.
    pub speech_start_ms: u64,
    /// Seconds of input audio of each committed turn, for the transcription's usage.
    pub seconds: HashMap<u64, f64>,
    /// Transcript text sent in deltas so far, by turn (the recognizer's settled partial words).
    heard: HashMap<u64, String>,
}

pub type Shared = Arc<Mutex<State>>;

impl State {
    pub fn new(outbox: Outbox, settings: Settings, history: Arc<History>) -> Self {
        State {
            outbox,
            next_event: 1,
            settings,
            history,
            response: None,
            commits: HashMap::new(),
            speech_start_ms: 0,
            seconds: HashMap::new(),
            heard: HashMap::new(),
        }
    }

    /// Sends a server event, giving it the next `event_id`.
    pub fn send(&mut self, mut event: Value) {
        event["event_id"] = json!(format!("event_{:06}", self.next_event));
        self.next_event += 1;
        self.outbox.text(event.to_string());
    }

    /// An `error` event: `code` and `message`, about the client event `event_id` if it had one.
    pub fn error(&mut self, kind: &str, code: &str, message: &str, param: Option<&str>, event_id: Option<&str>) {
        let error = json!({"type": kind, "code": code, "message": message, "param": param, "event_id": event_id});
        self.send(json!({"type": "error", "error": error}));
    }

    /// A user item was added to the conversation (a committed turn).
    fn user_item_added(&mut self, turn: u64) {
        let id = history::user_item_id(turn);
        let previous = self.history.last_id();
        self.send(json!({"type": "input_audio_buffer.committed", "item_id": id, "previous_item_id": previous}));
        let item = json!({"id": id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": null, "audio": null}]});
        self.send(json!({"type": "conversation.item.added", "item": item, "previous_item_id": previous}));
    }

    /// The response made by `turn`, if it is the one in progress.
    fn response_of(&mut self, turn: u64) -> Option<&mut Response> {
        self.response.as_mut().filter(|r| r.turn == Some(turn))
    }

    /// Turn `turn`'s reply begins: its response (made now for a detected turn) gets its item.
    fn reply_begins(&mut self, turn: u64, audio: bool) {
        if self.response_of(turn).is_none() {
            if self.response.is_some() {
                // The one in progress is finishing (cancelled by this turn's speech).
                self.finish(true);
            }
            let mut response = Response::new(format!("resp_{turn:06}"), None, audio, true);
            response.turn = Some(turn);
            self.send(json!({"type": "response.created", "response": response.json("in_progress")}));
            self.response = Some(response);
        }
        let previous = self.history.last_id();
        let response = self.response.as_mut().expect("set above");
        let id = history::reply_item_id(turn);
        response.item = Some(id.clone());
        let (rid, in_conversation) = (response.id.clone(), response.in_conversation);
        let item = response.item_json(&id, "in_progress");
        let part = response.part_json();
        self.send(json!({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item}));
        if in_conversation {
            self.send(json!({"type": "conversation.item.added", "item": item, "previous_item_id": previous}));
        }
        self.send(json!({"type": "response.content_part.added", "response_id": rid, "item_id": id,
            "output_index": 0, "content_index": 0, "part": part}));
    }

    /// Ends the response in progress once its audio and its turn are over (or at once, `now`).
    pub fn finish(&mut self, now: bool) {
        let Some(response) = self.response.as_ref() else { return };
        let over = response.turn_done && (response.audio_done || response.item.is_none()) && !response.awaiting_speech;
        if !now && !over {
            return;
        }
        let response = self.response.take().expect("checked above");
        let status = response.stopped.map_or(if response.error.is_some() { "failed" } else { "completed" }, |s| s.0);
        if let Some(id) = response.item.clone() {
            let base = json!({"response_id": response.id, "item_id": id, "output_index": 0, "content_index": 0});
            let with = |mut event: Value, extra: Value| {
                for (k, v) in extra.as_object().into_iter().flatten() {
                    event[k] = v.clone();
                }
                event
            };
            if response.audio {
                self.send(with(base.clone(), json!({"type": "response.output_audio.done"})));
                let done = json!({"type": "response.output_audio_transcript.done", "transcript": response.transcript});
                self.send(with(base.clone(), done));
            } else {
                self.send(with(
                    base.clone(),
                    json!({"type": "response.output_text.done", "text": response.transcript}),
                ));
            }
            let done = json!({"type": "response.content_part.done", "part": response.part_json()});
            self.send(with(base, done));
            let item = response.item_json(&id, status_of_item(status));
            let done = json!({"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item});
            self.send(done);
            if response.in_conversation {
                // As the history keeps it: only what the user heard.
                let item = self.history.get(&id).map_or(item, |kept| item_json(&kept));
                let previous = self.history.previous_id(&id);
                self.send(json!({"type": "conversation.item.done", "item": item, "previous_item_id": previous}));
            }
        }
        self.send(json!({"type": "response.done", "response": response.json(status)}));
    }

    /// One of the core's events.
    fn event(&mut self, event: &ServerEvent) {
        match event {
            ServerEvent::SpeechStarted { turn, audio_start_ms } => {
                self.speech_start_ms = *audio_start_ms;
                self.heard.retain(|heard, _| heard + 1 >= *turn);
                let item_id = history::user_item_id(*turn);
                self.send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": audio_start_ms, "item_id": item_id}));
                if let Some(response) = self.response.as_mut().filter(|r| r.awaiting_speech) {
                    response.awaiting_speech = false;
                    self.finish(false);
                }
            }
            ServerEvent::SpeechStopped { turn, audio_end_ms } => {
                let item_id = history::user_item_id(*turn);
                let seconds = audio_end_ms.saturating_sub(self.speech_start_ms) as f64 / 1000.0;
                self.seconds.insert(*turn, seconds);
                self.send(json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": audio_end_ms, "item_id": item_id}));
                self.user_item_added(*turn);
            }
            ServerEvent::TranscriptionCompleted { turn, transcript } => {
                let item_id = history::user_item_id(*turn);
                let seconds = self.seconds.remove(turn).unwrap_or(0.0);
                // The deltas spell the final text where the partial words agree with it; the
                // rest of it comes as one last delta (the final recognition can differ: then
                // `completed` alone is the truth).
                let heard = self.heard.remove(turn).unwrap_or_default();
                if let Some(rest) = transcript.strip_prefix(heard.as_str()).filter(|r| !r.is_empty()) {
                    self.transcription_delta(&item_id, rest);
                }
                self.send(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                    "content_index": 0, "transcript": transcript, "logprobs": null,
                    "usage": {"type": "duration", "seconds": seconds}}));
                let item = json!({"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                    "content": [{"type": "input_audio", "transcript": transcript, "audio": null}]});
                let previous = self.history.last_id();
                self.send(json!({"type": "conversation.item.done", "item": item, "previous_item_id": previous}));
            }
            ServerEvent::TranscriptionDelta { turn, delta } => {
                self.heard.entry(*turn).or_default().push_str(delta);
                self.transcription_delta(&history::user_item_id(*turn), delta);
            }
            ServerEvent::ResponseTextDelta { turn, delta } => {
                let Some(response) = self.response_of(*turn).filter(|r| r.item.is_some()) else { return };
                response.transcript.push_str(delta);
                let kind = if response.audio {
                    "response.output_audio_transcript.delta"
                } else {
                    "response.output_text.delta"
                };
                let (rid, id) = (response.id.clone(), response.item.clone());
                self.send(json!({"type": kind, "response_id": rid, "item_id": id, "output_index": 0, "content_index": 0, "delta": delta}));
            }
            ServerEvent::ReplyCancelled { turn, reason, .. } => {
                let Some(response) = self.response_of(*turn) else { return };
                response.stopped = Some(match reason {
                    CancelReason::BargeIn => ("cancelled", "turn_detected"),
                    CancelReason::ClientCancel => ("cancelled", "client_cancelled"),
                    CancelReason::Safety => ("incomplete", "content_filter"),
                });
                response.audio_done = true;
                response.awaiting_speech = *reason == CancelReason::BargeIn;
                self.finish(false);
            }
            ServerEvent::SafetyDecision { turn, stage, action, rule_id, category, score, elapsed_ms, detail } => {
                let response = self.response_of(*turn).map(|r| r.id.clone());
                self.send(json!({"type": "parley.safety.decision", "turn": turn, "response_id": response,
                    "stage": stage, "action": action, "rule_id": rule_id, "category": category, "score": score,
                    "elapsed_ms": elapsed_ms, "detail": detail}));
            }
            ServerEvent::TurnLatency { turn, marks, total_ms } => {
                let response = self.response_of(*turn).map(|r| r.id.clone());
                self.send(json!({"type": "parley.turn.latency", "turn": turn, "response_id": response,
                    "item_id": history::reply_item_id(*turn), "marks": marks, "total_ms": total_ms}));
            }
            ServerEvent::Error { error } => {
                let kind = match error.code {
                    ErrorCode::Busy | ErrorCode::Internal | ErrorCode::ShuttingDown => "server_error",
                    _ => "invalid_request_error",
                };
                let code = serde_json::to_value(error.code).ok();
                let code = code.as_ref().and_then(Value::as_str).unwrap_or("server_error").to_string();
                if kind == "server_error"
                    && let Some(response) = self.response.as_mut()
                {
                    response.error = Some(json!({"type": kind, "code": code, "message": error.message}));
                }
                self.error(kind, &code, &error.message, None, None);
            }
            // Implicit in the GA events: the audio's start and end, the reply text as a whole, the
            // session's v1 settings.
            _ => {}
        }
    }

    fn transcription_delta(&mut self, item_id: &str, delta: &str) {
        self.send(json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
            "content_index": 0, "delta": delta, "logprobs": null}));
    }

    fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::Started { turn, request } => {
                if let Some(seconds) = self.commits.remove(&request) {
                    self.seconds.insert(turn, seconds);
                    self.user_item_added(turn);
                } else if let Some(response) = self.response.as_mut().filter(|r| r.request == Some(request)) {
                    response.turn = Some(turn);
                }
            }
            Notice::Reply { turn, audio } => self.reply_begins(turn, audio),
            Notice::Usage { turn, input_tokens, output_tokens } => {
                if let Some(response) = self.response_of(turn) {
                    response.usage = (input_tokens, output_tokens);
                }
            }
            Notice::Done { turn } => {
                if let Some(response) = self.response_of(turn) {
                    response.turn_done = true;
                    if response.cancelling && response.stopped.is_none() {
                        response.stopped = Some(("cancelled", "client_cancelled"));
                    }
                    self.finish(false);
                }
            }
        }
    }
}

/// The pacer's transmitter of a Realtime session: reply audio as `response.output_audio.delta`.
pub struct Replies {
    pub state: Shared,
    pub bytes: Vec<u8>,
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transmit for Replies {
    fn event(&mut self, event: &ServerEvent) {
        self.lock().event(event);
    }

    fn frame(&mut self, turn: u64, pcm: &[f32], _rate: u32, _seq: u32, _ref_ts_us: u64) -> Result<(), PacerError> {
        let mut bytes = std::mem::take(&mut self.bytes);
        let mut state = self.lock();
        let format = state.settings.output;
        if let Some(response) = state.response_of(turn).filter(|r| r.item.is_some() && r.audio) {
            bytes.clear();
            format.encode(pcm, &mut bytes);
            let delta = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let (rid, id) = (response.id.clone(), response.item.clone());
            state.send(json!({"type": "response.output_audio.delta", "response_id": rid, "item_id": id,
                "output_index": 0, "content_index": 0, "delta": delta}));
        }
        drop(state);
        self.bytes = bytes;
        Ok(())
    }

    fn turn_end(&mut self, turn: u64) {
        let mut state = self.lock();
        if let Some(response) = state.response_of(turn) {
            response.audio_done = true;
            state.finish(false);
        }
    }

    fn notice(&mut self, notice: Notice) {
        self.lock().notice(notice);
    }
}
