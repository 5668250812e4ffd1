//! JSON events: every text WebSocket message is one JSON object with a `type` field. Names follow
//! the OpenAI Realtime API where a counterpart exists (`session.update`, `session.created`,
//! `input_audio_buffer.speech_started`, `conversation.item.input_audio_transcription.completed`,
//! `response.text.delta`, `response.cancel`, `error`, …); Parley's own are `reply.cancelled`,
//! `safety.decision` and `turn.latency`.
use serde::{Deserialize, Serialize};

/// Audio stream settings a client may ask for in `session.update` (absent fields are unchanged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionUpdate {
    /// Sample rate of the client's Opus frames in Hz (16000, 24000 or 48000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_sample_rate: Option<u32>,
    /// Sample rate of the reply's Opus frames in Hz (16000, 24000 or 48000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sample_rate: Option<u32>,
}

/// Client → server events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientEvent {
    /// Changes stream settings. Rates can change only before the first audio frame.
    #[serde(rename = "session.update")]
    SessionUpdate { session: SessionUpdate },
    /// A typed user message: a turn without speech recognition.
    #[serde(rename = "conversation.item.create")]
    ConversationItemCreate { text: String },
    /// Asks the server to stop the current reply (same effect as a barge-in).
    #[serde(rename = "response.cancel")]
    ResponseCancel,
}

/// The stream settings in force, announced in `session.created` and `session.updated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub input_sample_rate: u32,
    pub output_sample_rate: u32,
    /// Audio per binary message in ms.
    pub frame_ms: u32,
    /// Name of the server pipeline: `"echo"` or `"voice"`.
    pub pipeline: String,
}

/// Limits the server enforces on this session, so a client can stay inside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionLimits {
    /// Largest message accepted, in bytes; larger ones close the session with 1009.
    pub max_message_bytes: usize,
    /// Malformed messages in a row after which the session is closed with 1008.
    pub max_consecutive_errors: u32,
    /// Seconds without any client message after which the session is closed with 4001.
    pub idle_timeout_s: u64,
}

/// Why a reply stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The user started speaking during the reply.
    BargeIn,
    /// The client sent `response.cancel`.
    ClientCancel,
    /// A safety gate cut the reply.
    Safety,
}

/// Which safety gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyStage {
    /// The user's transcript, before any reply starts.
    Input,
    /// A reply text chunk, before it is synthesized.
    Output,
    /// Synthesized audio, before it leaves the server.
    Voice,
}

/// What a safety gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyAction {
    Allow,
    /// Answer with a supportive, safe completion instead of the literal request.
    SafeCompletion,
    Refuse,
    /// Audio or text was cut before reaching the client.
    Block,
}

/// One stamped stage boundary of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyMark {
    /// Stage boundary name, e.g. [`mark::ENDPOINT`].
    pub stage: String,
    /// Milliseconds since the turn's anchor ([`mark::SPEECH_END`], the server receiving the frame
    /// holding the user's last voiced sample).
    pub at_ms: f64,
}

/// Stage boundary names used in `turn.latency`, in pipeline order. Each stage's duration is the
/// difference between its mark and the previous one.
pub mod mark {
    /// The frame holding the user's last voiced sample arrived (the anchor, at 0 ms).
    pub const SPEECH_END: &str = "speech_end";
    /// The endpointer judged the user's turn (tentatively) over and the reply started.
    pub const ENDPOINT: &str = "endpoint";
    /// Final transcript ready.
    pub const ASR_FINAL: &str = "asr_final";
    /// The user's words passed the input safety gate.
    pub const INPUT_SAFE: &str = "input_safe";
    /// First reply token generated.
    pub const FIRST_TOKEN: &str = "first_token";
    /// First reply chunk passed the output safety gate.
    pub const FIRST_CHUNK_SAFE: &str = "first_chunk_safe";
    /// First synthesized reply audio available.
    pub const FIRST_AUDIO: &str = "first_audio";
    /// The first reply audio passed the voice safety gate.
    pub const FIRST_AUDIO_SAFE: &str = "first_audio_safe";
    /// A reply started ahead of the endpoint could go out: the endpoint was confirmed (stamped no
    /// earlier than the mark before, so the stage is the time ready audio waited for it).
    pub const ENDPOINT_CONFIRMED: &str = "endpoint_confirmed";
    /// First reply audio frame handed to the socket.
    pub const FIRST_FRAME_SENT: &str = "first_frame_sent";
}

/// Machine-readable error codes of the `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A text message was not JSON, or had no string `type`.
    InvalidJson,
    /// The `type` is not a client event of this protocol version.
    UnknownEvent,
    /// A known event with missing or malformed fields, or not valid now.
    InvalidEvent,
    /// A binary message with a bad header (too short, wrong version or kind, bad payload size).
    BadFrame,
    /// The payload is not a decodable Opus packet of one 20 ms frame.
    BadAudio,
    /// A frame arrived with a sequence number at or below one already received; it was dropped.
    FrameOutOfOrder,
    /// Frames were missing (a gap in sequence numbers); the decoder concealed the loss.
    FramesLost,
    /// The client sent audio faster than real time and the input buffer overflowed.
    InputOverflow,
    /// The request is valid but this pipeline cannot serve it.
    Unsupported,
    /// A message exceeded the size limit.
    MessageTooBig,
    /// The server is at its session limit.
    ServerFull,
    /// The client did not read the server's messages.
    SlowConsumer,
    /// The session was idle too long.
    IdleTimeout,
    /// The session used up its time or byte budget (`max_session_s`, `max_session_bytes`).
    SessionLimit,
    /// The server is shutting down.
    ShuttingDown,
    /// The server is overloaded (a model's job queue is full); the turn was dropped. Try again.
    Busy,
    /// The server failed.
    Internal,
}

/// Body of the `error` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    /// Sequence number of the binary frame concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
}

/// Server → client events. `turn` numbers the user's turns in this session from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerEvent {
    /// First message of every session.
    #[serde(rename = "session.created")]
    SessionCreated { session_id: String, protocol_version: u8, session: SessionInfo, limits: SessionLimits },
    /// Answer to `session.update`.
    #[serde(rename = "session.updated")]
    SessionUpdated { session: SessionInfo },
    /// The VAD heard the user start speaking (`audio_start_ms`: position in the input stream).
    #[serde(rename = "input_audio_buffer.speech_started")]
    SpeechStarted { turn: u64, audio_start_ms: u64 },
    /// The user's turn ended (`audio_end_ms`: position of the last voiced sample).
    #[serde(rename = "input_audio_buffer.speech_stopped")]
    SpeechStopped { turn: u64, audio_end_ms: u64 },
    /// Partial transcript text.
    #[serde(rename = "conversation.item.input_audio_transcription.delta")]
    TranscriptionDelta { turn: u64, delta: String },
    /// Final transcript of the user's turn.
    #[serde(rename = "conversation.item.input_audio_transcription.completed")]
    TranscriptionCompleted { turn: u64, transcript: String },
    /// The next chunk of reply text, sent once the chunk passed the safety gates (with its audio).
    #[serde(rename = "response.text.delta")]
    ResponseTextDelta { turn: u64, delta: String },
    /// The complete reply text (only what passed the output gate).
    #[serde(rename = "response.text.done")]
    ResponseTextDone { turn: u64, text: String },
    /// The first reply audio frame (sequence `first_seq`) follows this event.
    #[serde(rename = "response.audio.started")]
    ResponseAudioStarted { turn: u64, first_seq: u32 },
    /// The reply's audio is complete: `frames` frames, `audio_ms` of audio.
    #[serde(rename = "response.audio.done")]
    ResponseAudioDone { turn: u64, frames: u32, audio_ms: u64 },
    /// The reply stopped early. `played_ms`: audio a real-time player has played by now;
    /// `sent_ms`: audio sent (≥ played, by at most the pacing lead); unsent audio was dropped.
    #[serde(rename = "reply.cancelled")]
    ReplyCancelled { turn: u64, reason: CancelReason, played_ms: u64, sent_ms: u64 },
    /// A safety gate's decision, citing the rule it applied.
    #[serde(rename = "safety.decision")]
    SafetyDecision {
        turn: u64,
        stage: SafetyStage,
        action: SafetyAction,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        category: Option<String>,
        /// The classifier's score for `category` (cosine similarity for content, to the enrolled
        /// voice for the voice gate).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        score: Option<f32>,
        /// Time the gate took, ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        elapsed_ms: Option<f64>,
        /// What was judged or why (e.g. the flagged text), for people.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Stage boundaries of a finished turn and the server-side total (anchor → first frame sent).
    #[serde(rename = "turn.latency")]
    TurnLatency { turn: u64, marks: Vec<LatencyMark>, total_ms: f64 },
    /// Something the client sent, or the server, went wrong. Fatal errors are followed by a close.
    #[serde(rename = "error")]
    Error { error: ErrorInfo },
}

impl ServerEvent {
    /// An `error` event.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerEvent::Error { error: ErrorInfo { code, message: message.into(), seq: None } }
    }

    /// An `error` event about the binary frame `seq`.
    pub fn frame_error(code: ErrorCode, seq: u32, message: impl Into<String>) -> Self {
        ServerEvent::Error { error: ErrorInfo { code, message: message.into(), seq: Some(seq) } }
    }

    /// The `type` string of this event.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerEvent::SessionCreated { .. } => "session.created",
            ServerEvent::SessionUpdated { .. } => "session.updated",
            ServerEvent::SpeechStarted { .. } => "input_audio_buffer.speech_started",
            ServerEvent::SpeechStopped { .. } => "input_audio_buffer.speech_stopped",
            ServerEvent::TranscriptionDelta { .. } => "conversation.item.input_audio_transcription.delta",
            ServerEvent::TranscriptionCompleted { .. } => "conversation.item.input_audio_transcription.completed",
            ServerEvent::ResponseTextDelta { .. } => "response.text.delta",
            ServerEvent::ResponseTextDone { .. } => "response.text.done",
            ServerEvent::ResponseAudioStarted { .. } => "response.audio.started",
            ServerEvent::ResponseAudioDone { .. } => "response.audio.done",
            ServerEvent::ReplyCancelled { .. } => "reply.cancelled",
            ServerEvent::SafetyDecision { .. } => "safety.decision",
            ServerEvent::TurnLatency { .. } => "turn.latency",
            ServerEvent::Error { .. } => "error",
        }
    }

    /// The JSON text of this event.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server events always serialize")
    }

    /// Parses a server event (client side).
    pub fn parse(text: &str) -> Result<Self, EventError> {
        parse_tagged(text, SERVER_EVENT_TYPES)
    }
}

/// Why a text message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON object: {0}")]
    InvalidJson(String),
    #[error("the event has no string `type` field")]
    MissingType,
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("invalid {event_type:?} event: {message}")]
    InvalidFields { event_type: String, message: String },
}

impl EventError {
    /// The `error` event code a server answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            EventError::InvalidJson(_) | EventError::MissingType => ErrorCode::InvalidJson,
            EventError::UnknownType(_) => ErrorCode::UnknownEvent,
            EventError::InvalidFields { .. } => ErrorCode::InvalidEvent,
        }
    }
}

/// Client event `type` strings of this protocol version.
pub const CLIENT_EVENT_TYPES: &[&str] = &["session.update", "conversation.item.create", "response.cancel"];

const SERVER_EVENT_TYPES: &[&str] = &[
    "session.created",
    "session.updated",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "response.text.delta",
    "response.text.done",
    "response.audio.started",
    "response.audio.done",
    "reply.cancelled",
    "safety.decision",
    "turn.latency",
    "error",
];

impl ClientEvent {
    /// Parses a client event, telling malformed JSON, unknown types and bad fields apart.
    pub fn parse(text: &str) -> Result<Self, EventError> {
        parse_tagged(text, CLIENT_EVENT_TYPES)
    }

    /// The JSON text of this event.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("client events always serialize")
    }
}

fn parse_tagged<T: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<T, EventError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| EventError::InvalidJson(e.to_string()))?;
    let Some(event_type) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(if value.is_object() {
            EventError::MissingType
        } else {
            EventError::InvalidJson("expected an object".into())
        });
    };
    if !known.contains(&event_type) {
        return Err(EventError::UnknownType(event_type.chars().take(64).collect()));
    }
    let event_type = event_type.to_string();
    serde_json::from_value(value).map_err(|e| EventError::InvalidFields { event_type, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_events_round_trip_with_realtime_names() {
        let events = [
            ClientEvent::SessionUpdate {
                session: SessionUpdate { input_sample_rate: Some(16_000), output_sample_rate: None },
            },
            ClientEvent::ConversationItemCreate { text: "hello".into() },
            ClientEvent::ResponseCancel,
        ];
        for event in events {
            let json = event.to_json();
            assert_eq!(ClientEvent::parse(&json).unwrap(), event, "{json}");
        }
        assert_eq!(
            ClientEvent::parse(r#"{"type":"session.update","session":{"input_sample_rate":24000}}"#).unwrap(),
            ClientEvent::SessionUpdate {
                session: SessionUpdate { input_sample_rate: Some(24_000), output_sample_rate: None }
            }
        );
        assert_eq!(ClientEvent::ResponseCancel.to_json(), r#"{"type":"response.cancel"}"#);
    }

    #[test]
    fn server_events_round_trip() {
        let events = [
            ServerEvent::SessionCreated {
                session_id: "s1".into(),
                protocol_version: 1,
                session: SessionInfo {
                    input_sample_rate: 48_000,
                    output_sample_rate: 48_000,
                    frame_ms: 20,
                    pipeline: "echo".into(),
                },
                limits: SessionLimits { max_message_bytes: 4096, max_consecutive_errors: 50, idle_timeout_s: 30 },
            },
            ServerEvent::SpeechStarted { turn: 1, audio_start_ms: 120 },
            ServerEvent::TranscriptionCompleted { turn: 1, transcript: "hi".into() },
            ServerEvent::ReplyCancelled { turn: 2, reason: CancelReason::BargeIn, played_ms: 340, sent_ms: 420 },
            ServerEvent::SafetyDecision {
                turn: 1,
                stage: SafetyStage::Input,
                action: SafetyAction::Refuse,
                rule_id: Some("VW-1".into()),
                category: Some("violence".into()),
                score: Some(0.71),
                elapsed_ms: Some(4.2),
                detail: None,
            },
            ServerEvent::TurnLatency {
                turn: 1,
                marks: vec![LatencyMark { stage: mark::SPEECH_END.into(), at_ms: 0.0 }],
                total_ms: 12.5,
            },
            ServerEvent::frame_error(ErrorCode::BadAudio, 7, "not opus"),
        ];
        for event in events {
            let json = event.to_json();
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(value["type"], event.type_name(), "{json}");
            assert_eq!(ServerEvent::parse(&json).unwrap(), event, "{json}");
        }
        let json = ServerEvent::error(ErrorCode::UnknownEvent, "x").to_json();
        assert_eq!(json, r#"{"type":"error","error":{"code":"unknown_event","message":"x"}}"#);
    }

    #[test]
    fn malformed_events_are_told_apart() {
        assert!(matches!(ClientEvent::parse("{not json"), Err(EventError::InvalidJson(_))));
        assert!(matches!(ClientEvent::parse("[1,2]"), Err(EventError::InvalidJson(_))));
        assert_eq!(ClientEvent::parse(r#"{"text":"hi"}"#), Err(EventError::MissingType));
        assert_eq!(ClientEvent::parse(r#"{"type":7}"#), Err(EventError::MissingType));
        assert_eq!(
            ClientEvent::parse(r#"{"type":"input_audio_buffer.append"}"#),
            Err(EventError::UnknownType("input_audio_buffer.append".into()))
        );
        let err = ClientEvent::parse(r#"{"type":"conversation.item.create"}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidEvent);
        let err = ClientEvent::parse(r#"{"type":"session.update","session":{"input_sample_rate":"fast"}}"#);
        assert!(matches!(err, Err(EventError::InvalidFields { .. })));
        // A server event is not a client event.
        assert_eq!(ClientEvent::parse(r#"{"type":"error"}"#).unwrap_err().code(), ErrorCode::UnknownEvent);
    }
}
