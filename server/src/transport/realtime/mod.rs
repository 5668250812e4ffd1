//! The OpenAI Realtime API (GA event set) at `/v1/realtime`: JSON events with base64 audio, so
//! apps and SDKs written for it (the `openai` SDKs, Pipecat, LiveKit Agents) talk to Parley
//! unchanged. This file reads the client events: `session.update`, `input_audio_buffer.*`,
//! `conversation.item.*`, `response.create`/`cancel`; [`state`] turns the core's events into the
//! server events. Parley's additions are events the SDKs ignore: `parley.turn.latency` and
//! `parley.safety.decision`. Every bad client event gets an `error`; the socket stays open (until
//! `max_consecutive_errors` in a row).
mod audio;
mod state;

use super::{Ending, ErrorRun, Protocol};
use crate::audio::PIPELINE_RATE;
use crate::audio::resample::Resampler;
use crate::audio::ring::InputFeed;
use crate::conn::Conn;
use crate::conversation::history::{Item, MAX_ITEM_TEXT};
use crate::conversation::pacer::Transmit;
use crate::conversation::{Command, ReplyControl, Respond, Settings as CoreSettings};
use crate::metrics::{CloseReason, InputError, Metrics};
use crate::models::llm::{Message as ChatMessage, Role};
use audio::Format;
use base64::Engine as _;
use parley_protocol::event::{CancelReason, ErrorCode};
use serde_json::{Map, Value, json};
use state::{Replies, Response, Settings, Shared, State, TurnDetection, item_json};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Where the Realtime API is served.
pub const PATH: &str = "/v1/realtime";
/// Longest client-committed turn, in seconds of audio (Whisper's window).
const MAX_COMMIT_SECONDS: usize = 30;
/// Shortest commit, in ms (as upstream).
const MIN_COMMIT_MS: usize = 100;
/// Longest an append waits for room in the input ring (audio sent faster than real time).
const MAX_APPEND_WAIT: Duration = Duration::from_secs(30);
/// Most tokens a client may ask for in one reply.
const MAX_OUTPUT_TOKENS: usize = 1024;
/// Metadata entries a response may carry (upstream: 16, keys ≤ 64 and values ≤ 512 characters).
const MAX_METADATA: usize = 16;

/// A new session's settings: pcm16 at 24 kHz both ways, server VAD, the server's instructions.
pub fn initial_settings(id: String, model: String, config: &crate::config::Config) -> Settings {
    Settings {
        id,
        model,
        input: Format::Pcm,
        output: Format::Pcm,
        turn_detection: Some(TurnDetection {
            kind: "server_vad".into(),
            create_response: true,
            interrupt_response: true,
        }),
        instructions: None,
        default_instructions: config.voice.system_prompt.clone(),
        audio_out: true,
        max_output_tokens: None,
        voice: "parley".into(),
        // Whisper (tiny.en) under the one Whisper name the 1.x SDKs accept.
        transcription: json!({"model": "whisper-1", "language": "en", "prompt": null}),
    }
}

/// Serves one upgraded `/v1/realtime` connection until it ends. `model`: the `model` query
/// parameter, echoed in the session.
pub async fn serve(ws: WebSocketStream<Conn>, ctx: super::SessionContext, model: String) {
    super::serve(ws, ctx, move |link| {
        let settings = initial_settings(link.session_id.clone(), model, &link.config);
        link.control.output_rate.store(Format::Pcm.rate(), Relaxed);
        let state = Arc::new(Mutex::new(State::new(link.outbox.clone(), settings, link.history.clone())));
        let replies = Replies { state: state.clone(), bytes: Vec::new() };
        let resampler = Resampler::new(Format::Pcm.rate(), PIPELINE_RATE).map_err(|e| e.to_string())?;
        let session = Session {
            state,
            errors: ErrorRun::new(link.config.max_consecutive_errors),
            metrics: link.metrics,
            control: link.control,
            commands: link.commands,
            feed: link.feed,
            resampler,
            decoded: Vec::new(),
            pcm16: Vec::new(),
            buffer: Vec::new(),
            seq: 0,
            next_tag: 1,
            next_item: 1,
        };
        Ok((session, Box::new(replies) as Box<dyn Transmit>))
    })
    .await
}

/// A client event refused: the `error` event's code, message and the field concerned.
struct Reject {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

fn reject(code: &'static str, message: impl Into<String>, param: Option<&'static str>) -> Reject {
    Reject { code, message: message.into(), param }
}

fn invalid(param: &'static str, message: impl Into<String>) -> Reject {
    reject("invalid_value", message, Some(param))
}

fn missing(param: &'static str) -> Reject {
    reject("missing_required_parameter", format!("missing required parameter: {param}"), Some(param))
}

/// The string field `name` of `object` (absent or null: `None`).
fn string<'a>(object: &'a Value, name: &'static str) -> Result<Option<&'a str>, Reject> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(name, format!("{name} must be a string, not {other}"))),
    }
}

struct Session {
    state: Shared,
    errors: ErrorRun,
    metrics: Arc<Metrics>,
    control: Arc<ReplyControl>,
    commands: mpsc::Sender<Command>,
    feed: InputFeed,
    /// Input audio at the format's rate → 16 kHz.
    resampler: Resampler,
    decoded: Vec<f32>,
    pcm16: Vec<f32>,
    /// With turn detection off: the input audio buffer (16 kHz) until the client commits it.
    buffer: Vec<f32>,
    seq: u32,
    next_tag: u64,
    next_item: u64,
}

impl Protocol for Session {
    fn greet(&mut self) {
        let mut state = self.lock();
        let session = state.settings.json();
        state.send(json!({"type": "session.created", "session": session}));
    }

    async fn handle(&mut self, message: Message) -> Option<Ending> {
        let result = match message {
            Message::Text(text) => self.client_event(text.as_str()).await,
            Message::Binary(_) => Err((
                None,
                reject("invalid_value", "binary messages are not part of the Realtime API: send JSON events", None),
            )),
            Message::Close(_) => return Some((CloseReason::ClientClosed, None)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        match result {
            Ok(()) => {
                self.errors.ok();
                None
            }
            Err((event_id, e)) => {
                self.metrics.input_error(InputError::InvalidEvent);
                self.lock().error("invalid_request_error", e.code, &e.message, e.param, event_id.as_deref());
                self.errors.bad()
            }
        }
    }

    fn error(&mut self, code: ErrorCode, message: &str) {
        let code = serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_string));
        self.lock().error("server_error", code.as_deref().unwrap_or("server_error"), message, None, None);
    }
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn command(&self, command: Command) -> Result<(), Reject> {
        self.commands.try_send(command).map_err(|_| reject("rate_limited", "too many requests in flight; retry", None))
    }

    async fn client_event(&mut self, text: &str) -> Result<(), (Option<String>, Reject)> {
        let event: Value = serde_json::from_str(text)
            .map_err(|e| (None, reject("invalid_json", format!("the event is not JSON: {e}"), None)))?;
        if !event.is_object() {
            return Err((None, reject("invalid_json", "an event is a JSON object", None)));
        }
        let event_id = event.get("event_id").and_then(Value::as_str).map(str::to_string);
        let kind = event.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
        let result = match kind.as_str() {
            "session.update" => self.session_update(&event),
            "input_audio_buffer.append" => self.append(&event).await,
            "input_audio_buffer.commit" => self.commit(),
            "input_audio_buffer.clear" => {
                self.buffer.clear();
                self.lock().send(json!({"type": "input_audio_buffer.cleared"}));
                Ok(())
            }
            "conversation.item.create" => self.item_create(&event),
            "conversation.item.retrieve" => self.item_retrieve(&event),
            "conversation.item.delete" => self.item_delete(&event),
            "conversation.item.truncate" => self.item_truncate(&event),
            "response.create" => self.response_create(&event),
            "response.cancel" => self.response_cancel(&event),
            "" => Err(missing("type")),
            "output_audio_buffer.clear" => Err(reject(
                "unsupported",
                "output_audio_buffer.clear is for WebRTC sessions; send response.cancel",
                None,
            )),
            other => Err(invalid("type", format!("unknown event type {other:?}"))),
        };
        result.map_err(|e| (event_id, e))
    }

    fn session_update(&mut self, event: &Value) -> Result<(), Reject> {
        let session = event.get("session").filter(|s| s.is_object()).ok_or_else(|| missing("session"))?;
        let mut next = self.lock().settings.clone();
        if let Some(kind) = string(session, "type")?
            && kind != "realtime"
        {
            return Err(invalid("session.type", format!("session type {kind:?} is not supported: only \"realtime\"")));
        }
        let audio = session.get("audio").cloned().unwrap_or(Value::Null);
        let input = audio.get("input").cloned().unwrap_or(Value::Null);
        let output = audio.get("output").cloned().unwrap_or(Value::Null);
        // The GA fields, then the flat beta-style ones.
        if let Some(format) = input.get("format").or(session.get("input_audio_format")) {
            next.input = Format::parse(format).map_err(|e| invalid("session.audio.input.format", e))?;
        }
        if let Some(format) = output.get("format").or(session.get("output_audio_format")) {
            next.output = Format::parse(format).map_err(|e| invalid("session.audio.output.format", e))?;
        }
        if let Some(detection) = input.get("turn_detection").or(session.get("turn_detection")) {
            next.turn_detection = turn_detection(detection, next.turn_detection.as_ref())?;
        }
        if let Some(transcription) = input.get("transcription").or(session.get("input_audio_transcription")) {
            next.transcription = transcription.clone();
        }
        if let Some(voice) = output.get("voice").or(session.get("voice")) {
            next.voice = match voice {
                Value::String(v) => v.clone(),
                Value::Object(o) => o.get("id").and_then(Value::as_str).unwrap_or("parley").to_string(),
                _ => return Err(invalid("session.audio.output.voice", "voice must be a string")),
            };
        }
        if session.get("instructions").is_some() {
            next.instructions = string(session, "instructions")?.map(str::to_string);
            if next.instructions.as_ref().is_some_and(|i| i.len() > MAX_ITEM_TEXT) {
                return Err(invalid("session.instructions", format!("instructions longer than {MAX_ITEM_TEXT} bytes")));
            }
        }
        if let Some(modalities) = session.get("output_modalities").or(session.get("modalities")) {
            next.audio_out = audio_out(modalities).map_err(|e| invalid("session.output_modalities", e))?;
        }
        if let Some(max) = session.get("max_output_tokens").or(session.get("max_response_output_tokens")) {
            next.max_output_tokens = max_tokens(max).map_err(|e| invalid("session.max_output_tokens", e))?;
        }
        if session.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty()) {
            return Err(reject("unsupported", "function and MCP tools are not supported", Some("session.tools")));
        }
        if next.input != self.lock().settings.input {
            self.resampler =
                Resampler::new(next.input.rate(), PIPELINE_RATE).map_err(|e| invalid("session", e.to_string()))?;
        }
        self.control.output_rate.store(next.output.rate(), Relaxed);
        let core = CoreSettings {
            detect_turns: next.turn_detection.is_some(),
            create_response: next.turn_detection.as_ref().is_none_or(|t| t.create_response),
            interrupt_response: next.turn_detection.as_ref().is_none_or(|t| t.interrupt_response),
            instructions: next.instructions.clone(),
            max_tokens: next.max_output_tokens,
        };
        if core.detect_turns {
            self.buffer.clear();
        }
        self.command(Command::Configure(core))?;
        let mut state = self.lock();
        state.settings = next;
        let session = state.settings.json();
        state.send(json!({"type": "session.updated", "session": session}));
        Ok(())
    }

    async fn append(&mut self, event: &Value) -> Result<(), Reject> {
        let encoded = string(event, "audio")?.ok_or_else(|| missing("audio"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| invalid("audio", format!("audio is not base64: {e}")))?;
        let (format, manual) = {
            let state = self.lock();
            (state.settings.input, state.settings.turn_detection.is_none())
        };
        // 100 ms at a time, so a large append needs no large buffers.
        let piece = format.rate() as usize / 10 * format.width();
        let deadline = Instant::now() + MAX_APPEND_WAIT;
        for part in bytes.chunks(piece) {
            self.decoded.clear();
            format.decode(part, &mut self.decoded);
            self.pcm16.clear();
            self.resampler.process(&self.decoded, &mut self.pcm16).map_err(|e| invalid("audio", e.to_string()))?;
            if manual {
                let room = (MAX_COMMIT_SECONDS * PIPELINE_RATE as usize).saturating_sub(self.buffer.len());
                if room < self.pcm16.len() {
                    let message =
                        format!("the input audio buffer holds at most {MAX_COMMIT_SECONDS} s: commit or clear it");
                    return Err(reject("input_audio_buffer_full", message, Some("audio")));
                }
                self.buffer.extend_from_slice(&self.pcm16);
            } else {
                self.feed_ring(deadline).await?;
            }
        }
        Ok(())
    }

    /// Hands the resampled audio to the worker's input ring, waiting (up to `deadline`) while it
    /// is full: a client may send audio faster than real time.
    async fn feed_ring(&mut self, deadline: Instant) -> Result<(), Reject> {
        let mut at = 0;
        while at < self.pcm16.len() {
            let n = self.feed.free().min(self.pcm16.len() - at).min(PIPELINE_RATE as usize / 50);
            if n == 0 {
                if Instant::now() > deadline {
                    self.metrics.input_overflow_samples.fetch_add((self.pcm16.len() - at) as u64, Relaxed);
                    return Err(reject("input_audio_buffer_full", "input audio dropped: the server fell behind", None));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            self.seq = self.seq.wrapping_add(1);
            self.feed.push(&self.pcm16[at..at + n], self.seq, 0, Instant::now());
            at += n;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Reject> {
        if self.lock().settings.turn_detection.is_some() {
            let message = "turn detection is on: the server commits each turn; set turn_detection to null to commit";
            return Err(reject("invalid_value", message, Some("turn_detection")));
        }
        let ms = self.buffer.len() * 1000 / PIPELINE_RATE as usize;
        if ms < MIN_COMMIT_MS {
            let message = format!("buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, got {ms} ms");
            return Err(reject("input_audio_buffer_commit_empty", message, None));
        }
        let request = self.tag();
        let audio = std::mem::take(&mut self.buffer);
        self.lock().commits.insert(request, ms as f64 / 1000.0);
        self.command(Command::Commit { audio, request })
    }

    fn item_create(&mut self, event: &Value) -> Result<(), Reject> {
        let item = event.get("item").filter(|i| i.is_object()).ok_or_else(|| missing("item"))?;
        let previous = string(event, "previous_item_id")?;
        let item = self.parse_item(item)?;
        let mut state = self.lock();
        let after = previous.map(str::to_string).or_else(|| state.history.last_id());
        let json = item_json(&item);
        state.history.insert(item, previous).map_err(|e| reject("invalid_value", e.to_string(), Some("item.id")))?;
        state.send(json!({"type": "conversation.item.added", "item": json, "previous_item_id": after}));
        state.send(json!({"type": "conversation.item.done", "item": json, "previous_item_id": after}));
        Ok(())
    }

    /// A message item of the client's: its role and text (`input_text`, `text`, `output_text`
    /// parts, or an audio part's transcript).
    fn parse_item(&mut self, item: &Value) -> Result<Item, Reject> {
        let kind = string(item, "type")?.unwrap_or("message");
        if kind != "message" {
            return Err(reject(
                "unsupported",
                format!("items of type {kind:?} are not supported: only messages"),
                Some("item.type"),
            ));
        }
        let role = match string(item, "role")?.ok_or_else(|| missing("item.role"))? {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            other => return Err(invalid("item.role", format!("unknown role {other:?}"))),
        };
        let parts = item.get("content").and_then(Value::as_array).ok_or_else(|| missing("item.content"))?;
        let mut text = String::new();
        for part in parts {
            let piece = string(part, "text")?.or(string(part, "transcript")?).ok_or_else(|| {
                let message = "a content part needs its text (or an audio part its transcript): audio goes to input_audio_buffer.append";
                reject("unsupported", message, Some("item.content"))
            })?;
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(piece);
        }
        if text.len() > MAX_ITEM_TEXT {
            return Err(invalid("item.content", format!("item text longer than {MAX_ITEM_TEXT} bytes")));
        }
        let id = match string(item, "id")? {
            Some(id) if id.is_empty() || id.len() > 64 => {
                return Err(invalid("item.id", "an item id has 1 to 64 characters"));
            }
            Some(id) => id.to_string(),
            None => {
                self.next_item += 1;
                format!("item_c{:06}", self.next_item)
            }
        };
        Ok(Item::new(id, role, text))
    }

    fn item_id(event: &Value) -> Result<&str, Reject> {
        string(event, "item_id")?.ok_or_else(|| missing("item_id"))
    }

    fn item_retrieve(&mut self, event: &Value) -> Result<(), Reject> {
        let id = Self::item_id(event)?;
        let mut state = self.lock();
        let item = state.history.get(id).ok_or_else(|| invalid("item_id", format!("no item with id {id:?}")))?;
        state.send(json!({"type": "conversation.item.retrieved", "item": item_json(&item)}));
        Ok(())
    }

    fn item_delete(&mut self, event: &Value) -> Result<(), Reject> {
        let id = Self::item_id(event)?;
        let mut state = self.lock();
        state.history.delete(id).map_err(|e| invalid("item_id", e.to_string()))?;
        state.send(json!({"type": "conversation.item.deleted", "item_id": id}));
        Ok(())
    }

    fn item_truncate(&mut self, event: &Value) -> Result<(), Reject> {
        let id = Self::item_id(event)?;
        let end_ms = event.get("audio_end_ms").and_then(Value::as_u64).ok_or_else(|| missing("audio_end_ms"))?;
        if event.get("content_index").and_then(Value::as_u64).unwrap_or(0) != 0 {
            return Err(invalid("content_index", "items have one content part: content_index 0"));
        }
        let mut state = self.lock();
        state.history.truncate(id, end_ms).map_err(|e| invalid("item_id", e.to_string()))?;
        state.send(
            json!({"type": "conversation.item.truncated", "item_id": id, "content_index": 0, "audio_end_ms": end_ms}),
        );
        Ok(())
    }

    fn response_create(&mut self, event: &Value) -> Result<(), Reject> {
        let empty = json!({});
        let params = event.get("response").filter(|r| !r.is_null()).unwrap_or(&empty);
        if !params.is_object() {
            return Err(invalid("response", "response must be an object"));
        }
        if self.lock().response.is_some() {
            let message = "Conversation already has an active response in progress: wait for response.done";
            return Err(reject("conversation_already_has_active_response", message, None));
        }
        let settings = self.lock().settings.clone();
        let audio = match params.get("output_modalities").or(params.get("modalities")) {
            Some(m) => audio_out(m).map_err(|e| invalid("response.output_modalities", e))?,
            None => settings.audio_out,
        };
        let in_conversation = match string(params, "conversation")? {
            None | Some("auto") => true,
            Some("none") => false,
            Some(other) => {
                return Err(invalid(
                    "response.conversation",
                    format!("conversation is \"auto\" or \"none\", not {other:?}"),
                ));
            }
        };
        let metadata = match params.get("metadata") {
            None | Some(Value::Null) => Value::Null,
            Some(Value::Object(m)) => metadata(m).map_err(|e| invalid("response.metadata", e))?,
            Some(_) => return Err(invalid("response.metadata", "metadata is an object of strings")),
        };
        let max_tokens = match params.get("max_output_tokens") {
            Some(max) => max_tokens(max).map_err(|e| invalid("response.max_output_tokens", e))?,
            None => settings.max_output_tokens,
        };
        let input = match params.get("input") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(self.input_messages(items)?),
            Some(_) => return Err(invalid("response.input", "input is an array of items")),
        };
        let instructions = string(params, "instructions")?.map(str::to_string);
        let request = self.tag();
        let mut response = Response::new(format!("resp_c{request:06}"), Some(request), audio, in_conversation);
        response.metadata = metadata;
        response.max_output_tokens = max_tokens.map_or(json!("inf"), |n| json!(n));
        let respond = Respond { request, instructions, audio, in_conversation, input, max_tokens };
        // In place before the core can answer (its notices go to the response in progress).
        {
            let mut state = self.lock();
            state.send(json!({"type": "response.created", "response": response.json("in_progress")}));
            state.response = Some(response);
        }
        if let Err(e) = self.command(Command::Respond(respond)) {
            let mut state = self.lock();
            if let Some(response) = state.response.as_mut() {
                response.error = Some(json!({"type": "server_error", "code": e.code, "message": e.message}));
            }
            state.finish(true);
        }
        Ok(())
    }

    /// A response's own input: message items, or references to the conversation's.
    fn input_messages(&mut self, items: &[Value]) -> Result<Vec<ChatMessage>, Reject> {
        let mut messages = Vec::with_capacity(items.len());
        for item in items.iter().take(crate::conversation::history::MAX_ITEMS) {
            let item = if string(item, "type")? == Some("item_reference") {
                let id = string(item, "id")?.ok_or_else(|| missing("response.input.id"))?;
                self.lock()
                    .history
                    .get(id)
                    .ok_or_else(|| invalid("response.input", format!("no item with id {id:?}")))?
            } else {
                self.parse_item(item)?
            };
            messages.push(ChatMessage { role: item.role, text: item.text });
        }
        Ok(messages)
    }

    fn response_cancel(&mut self, event: &Value) -> Result<(), Reject> {
        let asked = string(event, "response_id")?;
        let mut state = self.lock();
        let Some(response) = state.response.as_mut().filter(|r| asked.is_none_or(|id| id == r.id)) else {
            let message = "Cancellation failed: no active response found";
            return Err(reject("response_cancel_not_active", message, None));
        };
        response.cancelling = true;
        drop(state);
        self.control.cancel_current(CancelReason::ClientCancel);
        self.command(Command::Cancel)
    }
}

/// Turn detection from `session.update`: `null` (off), `server_vad` or `semantic_vad`.
fn turn_detection(value: &Value, current: Option<&TurnDetection>) -> Result<Option<TurnDetection>, Reject> {
    if value.is_null() {
        return Ok(None);
    }
    let kind = string(value, "type")?.or(current.map(|c| c.kind.as_str())).unwrap_or("server_vad");
    if kind != "server_vad" && kind != "semantic_vad" {
        return Err(invalid("session.audio.input.turn_detection.type", format!("unknown turn detection {kind:?}")));
    }
    let flag = |name: &'static str| match value.get(name) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid("session.audio.input.turn_detection", format!("{name} must be true or false"))),
    };
    Ok(Some(TurnDetection {
        kind: kind.to_string(),
        create_response: flag("create_response")?,
        interrupt_response: flag("interrupt_response")?,
    }))
}

/// Whether output modalities ask for audio: `["audio"]` or `["text"]` (the beta's
/// `["text", "audio"]` is audio).
fn audio_out(value: &Value) -> Result<bool, String> {
    let names: Vec<&str> = value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    match names.as_slice() {
        [] => Err("output_modalities is [\"audio\"] or [\"text\"]".into()),
        n if n.contains(&"audio") => Ok(true),
        n if n.iter().all(|m| *m == "text") => Ok(false),
        other => Err(format!("unknown output modalities {other:?}")),
    }
}

fn max_tokens(value: &Value) -> Result<Option<usize>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s == "inf" => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(n @ 1..) => Ok(Some((n as usize).min(MAX_OUTPUT_TOKENS))),
            _ => Err("max_output_tokens is a positive integer or \"inf\"".into()),
        },
        _ => Err("max_output_tokens is a positive integer or \"inf\"".into()),
    }
}

fn metadata(map: &Map<String, Value>) -> Result<Value, String> {
    if map.len() > MAX_METADATA {
        return Err(format!("at most {MAX_METADATA} metadata entries"));
    }
    for (key, value) in map {
        let ok = key.chars().count() <= 64 && value.as_str().is_some_and(|v| v.chars().count() <= 512);
        if !ok {
            return Err(format!("metadata {key:?}: keys up to 64 characters, string values up to 512"));
        }
    }
    Ok(Value::Object(map.clone()))
}
