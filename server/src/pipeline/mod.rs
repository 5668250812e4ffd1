//! The boundary between a session's transport and the pipeline that answers it.
//!
//! A [`Pipeline`] is built once per server and shared by all sessions (models live there, never
//! one copy per session). For each session the server calls [`Pipeline::start`] with a
//! [`SessionIo`]; the pipeline spawns its per-session worker and returns its handle. The server
//! aborts the worker when the session ends; the worker should also return when
//! [`SessionIo::commands`] yields `None` (the session is closing).
//!
//! What the worker gets and gives:
//! - **in**: [`AudioInput`] — 16 kHz mono f32 audio through an SPSC ring, with a wakeup
//!   (`wait_for(n).await`) and per-frame [`FrameStamp`](crate::audio::ring::FrameStamp)s (client
//!   timestamp, server arrival time) to anchor turn latency on the frame holding the last voiced
//!   sample; and [`Command`]s (typed text, client cancel).
//! - **out**: [`ReplyOutput`] — events (`ServerEvent`, sent in order), reply audio at any rate the
//!   pacer can resample (16, 22.05, 24, 48 kHz) tagged with the turn, the end of a turn's audio,
//!   and the turn's latency marks. The session resamples, Opus-encodes and paces the audio, and
//!   sends `response.audio.started`/`done`, `turn.latency` (adding `first_frame_sent`) and
//!   `reply.cancelled` itself.
//! - **barge-in**: [`ReplyOutput::cancel`] stops the reply at once (no further frame is sent;
//!   queued audio of that turn, and any that arrives later, is dropped).
//!   [`ReplyOutput::is_playing`] says whether reply audio is still playing at the client.
//!
//! Turn numbers start at 1 and increase; turn 0 is an untracked stream (the per-frame echo): no
//! audio events, no latency report, not cancellable.
pub mod chunker;
pub mod echo;
pub mod voice;

use crate::audio::ring::AudioInput;
use parley_protocol::ServerEvent;
use parley_protocol::event::CancelReason;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// A per-server pipeline factory.
pub trait Pipeline: Send + Sync + 'static {
    /// The name announced in `session.created` (`"echo"`, `"voice"`).
    fn name(&self) -> &'static str;
    /// Spawns the per-session worker.
    fn start(&self, io: SessionIo) -> JoinHandle<()>;
    /// Appends the pipeline's own metrics (Prometheus text) to `/metrics`.
    fn render_metrics(&self, _out: &mut String) {}
}

/// Everything a per-session worker talks through.
pub struct SessionIo {
    /// Session id, for log fields.
    pub session_id: String,
    pub audio: AudioInput,
    pub commands: mpsc::Receiver<Command>,
    pub output: ReplyOutput,
}

/// Requests from the client other than audio.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `conversation.item.create`: a typed user turn.
    Text(String),
    /// `response.cancel`: the session already stopped the audio; stop generating too.
    Cancel,
}

/// One item of the pipeline → pacer stream.
#[derive(Debug)]
pub enum Output {
    Event(ServerEvent),
    Audio { turn: u64, pcm: Vec<f32>, sample_rate: u32, ref_ts_us: u64 },
    AudioEnd { turn: u64 },
    Marks(TurnMarks),
}

/// Stage boundaries of one turn, stamped by the pipeline. The pacer adds `first_frame_sent`
/// and sends `turn.latency` when the turn's first frame goes out (or at its audio end if it
/// has none).
#[derive(Debug, Clone)]
pub struct TurnMarks {
    pub turn: u64,
    /// The server receiving the frame holding the user's last voiced sample.
    pub anchor: Instant,
    /// `(stage, when)` in order, with stage names from `parley_protocol::event::mark`.
    pub marks: Vec<(&'static str, Instant)>,
}

/// The pipeline's send side: a bounded queue to the session's pacer (backpressure: `send` waits
/// while the pacer holds a full queue) plus the shared cancel state.
#[derive(Clone)]
pub struct ReplyOutput {
    tx: mpsc::Sender<Output>,
    control: Arc<ReplyControl>,
}

/// The session is gone; the worker should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session has closed")]
pub struct SessionClosed;

impl ReplyOutput {
    pub(crate) fn new(tx: mpsc::Sender<Output>, control: Arc<ReplyControl>) -> Self {
        Self { tx, control }
    }

    pub async fn send(&self, output: Output) -> Result<(), SessionClosed> {
        self.tx.send(output).await.map_err(|_| SessionClosed)
    }

    pub async fn event(&self, event: ServerEvent) -> Result<(), SessionClosed> {
        self.send(Output::Event(event)).await
    }

    /// Reply audio for `turn`; `ref_ts_us` goes into the frames' header timestamp.
    pub async fn audio(&self, turn: u64, pcm: Vec<f32>, sample_rate: u32, ref_ts_us: u64) -> Result<(), SessionClosed> {
        self.send(Output::Audio { turn, pcm, sample_rate, ref_ts_us }).await
    }

    pub async fn audio_end(&self, turn: u64) -> Result<(), SessionClosed> {
        self.send(Output::AudioEnd { turn }).await
    }

    pub async fn marks(&self, marks: TurnMarks) -> Result<(), SessionClosed> {
        self.send(Output::Marks(marks)).await
    }

    /// Barge-in: stops `turn` (and every earlier turn) now. Does not wait.
    pub fn cancel(&self, turn: u64, reason: CancelReason) {
        self.control.cancel(turn, reason);
    }

    /// After [`ReplyOutput::cancel`]: how much of `turn`'s audio the user heard, in ms, once the
    /// pacer has stopped it; `None` if the pacer never had audio of that turn (nothing was heard).
    pub async fn played_ms_after_cancel(&self, turn: u64) -> Option<u64> {
        // The pacer acts on a cancel within microseconds; allow it a few ms of scheduling.
        for _ in 0..10 {
            if let Some(ms) = self.control.cancelled_played_ms(turn) {
                return Some(ms);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        None
    }

    /// The reason given to the latest [`ReplyOutput::cancel`].
    pub fn cancel_reason(&self) -> CancelReason {
        self.control.cancelled_upto().1
    }

    /// Whether reply audio of a turn ≥ 1 is still playing at the client (sent audio whose real-time
    /// end has not passed), and which turn.
    pub fn is_playing(&self) -> Option<u64> {
        self.control.playing(Instant::now())
    }
}

/// State shared between the pipeline, the session reader and the pacer.
pub struct ReplyControl {
    epoch: Instant,
    /// Turns up to this one are cancelled.
    cancel_upto: AtomicU64,
    cancel_reason: AtomicU8,
    pub(crate) cancelled: Notify,
    /// Turn whose audio the pacer sent last (0: none).
    playing_turn: AtomicU64,
    /// Real-time end of the audio sent so far, in ns since `epoch`.
    playing_until_ns: AtomicU64,
    /// Reply stream sample rate; the pacer follows changes.
    pub(crate) output_rate: AtomicU32,
    /// The last cancel the pacer carried out: (turn, ms of its audio played by then).
    last_cancel: std::sync::Mutex<Option<(u64, u64)>>,
}

impl ReplyControl {
    pub(crate) fn new(output_rate: u32) -> Self {
        Self {
            epoch: Instant::now(),
            cancel_upto: AtomicU64::new(0),
            cancel_reason: AtomicU8::new(0),
            cancelled: Notify::new(),
            playing_turn: AtomicU64::new(0),
            playing_until_ns: AtomicU64::new(0),
            output_rate: AtomicU32::new(output_rate),
            last_cancel: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn cancel(&self, turn: u64, reason: CancelReason) {
        if turn == 0 {
            return;
        }
        let code = match reason {
            CancelReason::BargeIn => 0,
            CancelReason::ClientCancel => 1,
            CancelReason::Safety => 2,
        };
        self.cancel_reason.store(code, Relaxed);
        self.cancel_upto.fetch_max(turn, Relaxed);
        self.cancelled.notify_one();
    }

    /// Cancels whatever turn is playing or was last sent (`response.cancel`).
    pub(crate) fn cancel_current(&self, reason: CancelReason) {
        self.cancel(self.playing_turn.load(Relaxed), reason);
    }

    pub(crate) fn cancelled_upto(&self) -> (u64, CancelReason) {
        let reason = match self.cancel_reason.load(Relaxed) {
            0 => CancelReason::BargeIn,
            1 => CancelReason::ClientCancel,
            _ => CancelReason::Safety,
        };
        (self.cancel_upto.load(Relaxed), reason)
    }

    /// Called by the pacer when it has stopped `turn`'s audio after `played_ms` had played.
    pub(crate) fn record_cancel(&self, turn: u64, played_ms: u64) {
        *self.last_cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some((turn, played_ms));
    }

    fn cancelled_played_ms(&self, turn: u64) -> Option<u64> {
        self.last_cancel.lock().unwrap_or_else(|e| e.into_inner()).filter(|(t, _)| *t == turn).map(|(_, ms)| ms)
    }

    pub(crate) fn set_playing(&self, turn: u64, until: Instant) {
        self.playing_turn.store(turn, Relaxed);
        self.playing_until_ns.store(until.saturating_duration_since(self.epoch).as_nanos() as u64, Relaxed);
    }

    fn playing(&self, now: Instant) -> Option<u64> {
        let turn = self.playing_turn.load(Relaxed);
        let until = self.playing_until_ns.load(Relaxed);
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        (turn > 0 && now_ns < until && turn > self.cancel_upto.load(Relaxed)).then_some(turn)
    }
}

/// Builds the pipeline the configuration names. The voice pipeline loads every model from the
/// provisioned cache first (seconds: call it off the async runtime, e.g. in `spawn_blocking`).
pub fn from_config(config: &crate::config::Config) -> Result<Arc<dyn Pipeline>, crate::server::ServerError> {
    match config.pipeline {
        crate::config::PipelineKind::Echo => Ok(Arc::new(echo::EchoPipeline::new(config.echo.clone()))),
        crate::config::PipelineKind::Voice => {
            let dir = config.models.clone().unwrap_or_else(crate::models::Manifest::default_dir);
            let manifest = crate::models::Manifest::load(&dir)?;
            Ok(Arc::new(voice::VoicePipeline::load(manifest, config.voice.clone(), &config.safety)?))
        }
    }
}
