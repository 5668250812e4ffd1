//! Process-wide counters and latency histograms, rendered in the Prometheus text format for
//! `GET /metrics`. Lock-free (atomics only) so the per-frame path can count without contention.
use parley_protocol::event::mark;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Histogram bucket upper bounds in seconds: from 50 µs (one frame's handling), dense around the
/// 20 ms frame budget and the 200–800 ms range of a voice turn.
const BUCKETS_S: [f64; 19] = [
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5, 0.8, 1.5,
    3.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(value.as_nanos() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count());
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }
}

/// Why a session ended; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the WebSocket.
    ClientClosed,
    /// The TCP connection dropped without a close frame (e.g. disconnect mid-reply).
    ClientGone,
    /// Server shutdown.
    Shutdown,
    /// The client stopped reading.
    SlowConsumer,
    /// A message over the size limit.
    MessageTooBig,
    /// Too many malformed messages in a row.
    TooManyErrors,
    /// No message within the idle timeout.
    IdleTimeout,
    /// The session's time or byte budget ran out.
    Budget,
    /// A server-side failure.
    Internal,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::ClientClosed,
        CloseReason::ClientGone,
        CloseReason::Shutdown,
        CloseReason::SlowConsumer,
        CloseReason::MessageTooBig,
        CloseReason::TooManyErrors,
        CloseReason::IdleTimeout,
        CloseReason::Budget,
        CloseReason::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::TooManyErrors => "too_many_errors",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Budget => "budget",
            CloseReason::Internal => "internal",
        }
    }
}

/// Why a session was refused before its upgrade; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The models are still loading (503).
    Loading,
    /// The server is draining after a shutdown signal (503).
    Draining,
    /// Every session slot is taken (503).
    Full,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Loading, Refusal::Draining, Refusal::Full];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Loading => "loading",
            Refusal::Draining => "draining",
            Refusal::Full => "full",
        }
    }
}

/// Why a request was denied by authentication or a key's limits (the error codes of `auth`).
pub const AUTH_DENIALS: [&str; 5] =
    ["missing_api_key", "invalid_api_key", "expired_client_secret", "key_session_limit", "rate_limit_exceeded"];

/// Kinds of bad client input; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputError {
    BadFrame,
    BadAudio,
    OutOfOrder,
    InvalidJson,
    UnknownEvent,
    InvalidEvent,
    MessageTooBig,
}

impl InputError {
    pub const ALL: [InputError; 7] = [
        InputError::BadFrame,
        InputError::BadAudio,
        InputError::OutOfOrder,
        InputError::InvalidJson,
        InputError::UnknownEvent,
        InputError::InvalidEvent,
        InputError::MessageTooBig,
    ];

    pub fn label(self) -> &'static str {
        match self {
            InputError::BadFrame => "bad_frame",
            InputError::BadAudio => "bad_audio",
            InputError::OutOfOrder => "out_of_order",
            InputError::InvalidJson => "invalid_json",
            InputError::UnknownEvent => "unknown_event",
            InputError::InvalidEvent => "invalid_event",
            InputError::MessageTooBig => "message_too_big",
        }
    }
}

/// Stage names with their own histogram, in pipeline order (see [`mark`]); others go to "other".
pub const STAGES: [&str; 9] = [
    mark::ENDPOINT,
    mark::ASR_FINAL,
    mark::INPUT_SAFE,
    mark::FIRST_TOKEN,
    mark::FIRST_CHUNK_SAFE,
    mark::FIRST_AUDIO,
    mark::FIRST_AUDIO_SAFE,
    mark::FIRST_FRAME_SENT,
    "other",
];

/// All server metrics.
#[derive(Default)]
pub struct Metrics {
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    sessions_refused: [AtomicU64; Refusal::ALL.len()],
    auth_denied: [AtomicU64; AUTH_DENIALS.len()],
    sessions_closed: [AtomicU64; CloseReason::ALL.len()],
    input_errors: [AtomicU64; InputError::ALL.len()],
    /// TLS handshakes that failed (not TLS, a bad client hello, no common cipher).
    pub tls_handshake_failures: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    /// Frames missing from the input sequence (concealed by the decoder).
    pub frames_lost: AtomicU64,
    /// Input samples dropped because the session's input ring was full (client faster than real time
    /// or a stalled pipeline). Policy: drop the newest samples.
    pub input_overflow_samples: AtomicU64,
    /// Outgoing messages dropped because the send queue was full (client not reading). Policy: drop
    /// the newest message; the session is closed once the writer stalls past the deadline.
    pub send_queue_dropped: AtomicU64,
    /// Reply audio frames dropped unsent by a cancel (barge-in or `response.cancel`).
    pub reply_frames_dropped: AtomicU64,
    pub replies_cancelled: AtomicU64,
    /// Reply frames sent after a real-time player needed them: [audio late from the pipeline,
    /// sent late by the pacer], and the silence they inserted, µs.
    reply_underruns: [AtomicU64; 2],
    reply_underrun_us: AtomicU64,
    pub http_requests: AtomicU64,
    /// Input path per frame: Opus decode + resample + ring push.
    pub input_frame_seconds: Histogram,
    /// Output path per frame: resample + Opus encode + enqueue.
    pub output_frame_seconds: Histogram,
    /// Stage durations (interval from the previous mark), indexed like [`STAGES`].
    stage_seconds: [Histogram; STAGES.len()],
    /// Whole turn on the server: anchor (speech end) → first reply frame sent.
    pub turn_seconds: Histogram,
    /// Echo `packet` mode, per packet: read from the socket → its echo written to the socket.
    pub echo_turnaround_seconds: Histogram,
}

impl Metrics {
    pub fn auth_denied(&self, code: &str) {
        if let Some(i) = AUTH_DENIALS.iter().position(|c| *c == code) {
            self.auth_denied[i].fetch_add(1, Relaxed);
        }
    }

    pub fn auth_denials(&self, code: &str) -> u64 {
        AUTH_DENIALS.iter().position(|c| *c == code).map_or(0, |i| self.auth_denied[i].load(Relaxed))
    }

    pub fn session_refused(&self, refusal: Refusal) {
        self.sessions_refused[refusal as usize].fetch_add(1, Relaxed);
    }

    pub fn sessions_refused(&self, refusal: Refusal) -> u64 {
        self.sessions_refused[refusal as usize].load(Relaxed)
    }

    pub fn session_closed(&self, reason: CloseReason) {
        self.sessions_closed[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn sessions_closed(&self, reason: CloseReason) -> u64 {
        self.sessions_closed[reason as usize].load(Relaxed)
    }

    pub fn input_error(&self, kind: InputError) {
        self.input_errors[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn input_errors(&self, kind: InputError) -> u64 {
        self.input_errors[kind as usize].load(Relaxed)
    }

    /// Counts a reply underrun of `silence`: its audio reached the pacer late (`audio_late`) or
    /// the pacer sent it late.
    pub fn reply_underrun(&self, audio_late: bool, silence: Duration) {
        self.reply_underruns[usize::from(!audio_late)].fetch_add(1, Relaxed);
        self.reply_underrun_us.fetch_add(silence.as_micros() as u64, Relaxed);
    }

    /// Records one stage's duration under its mark name.
    pub fn observe_stage(&self, stage: &str, duration: Duration) {
        let index = STAGES.iter().position(|s| *s == stage).unwrap_or(STAGES.len() - 1);
        self.stage_seconds[index].observe(duration);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        counter(
            &mut out,
            "parley_sessions_active",
            "Open voice sessions.",
            "gauge",
            self.sessions_active.load(Relaxed),
        );
        counter(
            &mut out,
            "parley_sessions_total",
            "Voice sessions accepted.",
            "counter",
            self.sessions_total.load(Relaxed),
        );
        let name = "parley_sessions_refused_total";
        let _ = writeln!(out, "# HELP {name} Sessions refused before the upgrade, by reason.\n# TYPE {name} counter");
        for refusal in Refusal::ALL {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", refusal.label(), self.sessions_refused(refusal));
        }
        let name = "parley_auth_denied_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests denied (401, 429) by authentication or a key's limits, by code.\n# TYPE {name} counter"
        );
        for (code, count) in AUTH_DENIALS.iter().zip(&self.auth_denied) {
            let _ = writeln!(out, "{name}{{code=\"{code}\"}} {}", count.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP parley_sessions_closed_total Sessions ended, by reason.\n# TYPE parley_sessions_closed_total counter"
        );
        for reason in CloseReason::ALL {
            let _ = writeln!(
                out,
                "parley_sessions_closed_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.sessions_closed(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP parley_input_errors_total Rejected client messages, by kind.\n# TYPE parley_input_errors_total counter"
        );
        for kind in InputError::ALL {
            let _ = writeln!(out, "parley_input_errors_total{{kind=\"{}\"}} {}", kind.label(), self.input_errors(kind));
        }
        for (name, help, value) in [
            ("parley_frames_received_total", "Audio frames received and decoded.", &self.frames_received),
            ("parley_frames_sent_total", "Audio frames sent.", &self.frames_sent),
            ("parley_frames_lost_total", "Input frames missing from the sequence (concealed).", &self.frames_lost),
            (
                "parley_input_overflow_samples_total",
                "16 kHz input samples dropped: input ring full (drop newest).",
                &self.input_overflow_samples,
            ),
            (
                "parley_send_queue_dropped_total",
                "Outgoing messages dropped: send queue full (drop newest).",
                &self.send_queue_dropped,
            ),
            (
                "parley_reply_frames_dropped_total",
                "Reply frames dropped unsent by a cancel.",
                &self.reply_frames_dropped,
            ),
            ("parley_replies_cancelled_total", "Replies cancelled (barge-in or client).", &self.replies_cancelled),
            ("parley_http_requests_total", "Plain HTTP requests served.", &self.http_requests),
            ("parley_tls_handshake_failures_total", "TLS handshakes that failed.", &self.tls_handshake_failures),
        ] {
            counter(&mut out, name, help, "counter", value.load(Relaxed));
        }
        let name = "parley_reply_underruns_total";
        let _ = writeln!(
            out,
            "# HELP {name} Reply frames sent after a real-time player needed them, by cause.\n# TYPE {name} counter"
        );
        for (cause, count) in ["audio_late", "sender_late"].iter().zip(&self.reply_underruns) {
            let _ = writeln!(out, "{name}{{cause=\"{cause}\"}} {}", count.load(Relaxed));
        }
        let name = "parley_reply_underrun_seconds_total";
        let seconds = self.reply_underrun_us.load(Relaxed) as f64 / 1e6;
        let _ =
            writeln!(out, "# HELP {name} Silence reply underruns inserted.\n# TYPE {name} counter\n{name} {seconds}");
        for (name, help, histogram) in [
            (
                "parley_input_frame_seconds",
                "Per input frame: Opus decode, resample, ring push.",
                &self.input_frame_seconds,
            ),
            (
                "parley_output_frame_seconds",
                "Per output frame: resample, Opus encode, enqueue.",
                &self.output_frame_seconds,
            ),
            ("parley_turn_seconds", "Turn on the server: speech end to first reply frame sent.", &self.turn_seconds),
            (
                "parley_echo_turnaround_seconds",
                "Echo packet mode, per packet: read from the socket to its echo written to the socket.",
                &self.echo_turnaround_seconds,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            histogram.render(&mut out, name, "");
        }
        let name = "parley_stage_seconds";
        let _ =
            writeln!(out, "# HELP {name} Turn stage durations (previous mark to this one).\n# TYPE {name} histogram");
        for (stage, histogram) in STAGES.iter().zip(&self.stage_seconds) {
            histogram.render(&mut out, name, &format!("stage=\"{stage}\""));
        }
        render_process(&mut out);
        out
    }
}

/// The standard Prometheus process metrics (CPU time, resident and peak resident memory, open
/// descriptors), read from `/proc/self` (Linux), and the runtime's alive tasks; each left out
/// where it cannot be read.
fn render_process(out: &mut String) {
    // utime and stime are fields 14 and 15 of /proc/self/stat, in USER_HZ (100 per second on
    // Linux); the command name (field 2) may hold spaces, so count from its closing parenthesis.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
        let seconds = (user + system) as f64 / 100.0;
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time spent.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {seconds}"
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    for (name, key, help) in [
        ("process_resident_memory_bytes", "VmRSS:", "Resident memory size."),
        ("process_peak_resident_memory_bytes", "VmHWM:", "Peak resident memory size."),
    ] {
        if let Some(kib) = kib(key) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", kib * 1024);
        }
    }
    // What a soak watches for leaks: descriptors, and tasks alive on the async runtime.
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let name = "process_open_fds";
        let _ = writeln!(out, "# HELP {name} Open file descriptors.\n# TYPE {name} gauge\n{name} {}", fds.count());
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let (name, tasks) = ("parley_runtime_alive_tasks", handle.metrics().num_alive_tasks());
        let _ = writeln!(out, "# HELP {name} Tasks alive on the async runtime.\n# TYPE {name} gauge\n{name} {tasks}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.session_closed(CloseReason::SlowConsumer);
        metrics.input_error(InputError::BadAudio);
        metrics.turn_seconds.observe(Duration::from_millis(150));
        metrics.turn_seconds.observe(Duration::from_millis(15));
        metrics.observe_stage(mark::ENDPOINT, Duration::from_millis(300));
        let text = metrics.render();
        assert!(text.contains("parley_sessions_closed_total{reason=\"slow_consumer\"} 1"), "{text}");
        assert!(text.contains("parley_input_errors_total{kind=\"bad_audio\"} 1"));
        assert!(text.contains("parley_turn_seconds_bucket{le=\"0.02\"} 1"));
        assert!(text.contains("parley_turn_seconds_bucket{le=\"0.16\"} 2"));
        assert!(text.contains("parley_turn_seconds_count 2"));
        assert!(text.contains("parley_stage_seconds_bucket{stage=\"endpoint\",le=\"0.3\"} 1"));
        // This test process's own CPU time and memory.
        let value = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{text}"));
            line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap()
        };
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_peak_resident_memory_bytes") >= value("process_resident_memory_bytes"));
    }
}
