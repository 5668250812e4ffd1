//! The JSON report of `parley talk --report FILE`: one object per turn under `"turns"`.
use serde::Serialize;

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub server: String,
    pub pipeline: String,
    pub turns: Vec<TurnReport>,
}

/// One user turn (one input file) and its reply.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnReport {
    /// Input file (or clip index) of this turn.
    pub input: String,
    /// Server turn numbers that fell in this turn's window.
    pub server_turns: Vec<u64>,
    pub transcript: String,
    pub reply_text: String,
    pub reply_audio_ms: u64,
    /// `safety.decision` events, as received.
    pub safety: Vec<serde_json::Value>,
    /// `reply.cancelled` events, as received.
    pub cancelled: Vec<serde_json::Value>,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// First reply audio frame received − send time of the frame holding the last voiced sample.
    pub voice_to_voice: Option<f64>,
    /// The server's `turn.latency` total (speech end seen → first reply frame sent).
    pub server_total: Option<f64>,
    /// The server's stage boundaries, ms after its anchor.
    pub server_marks: Vec<(String, f64)>,
    /// Durations between consecutive server marks.
    pub server_stages: Vec<(String, f64)>,
}
