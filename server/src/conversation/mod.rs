//! The conversation core, transport-neutral: PCM in, events and PCM out. This file is its
//! boundary with the transports (`crate::transport`); below it are the pipelines that answer a
//! session ([`echo`], [`voice`]), the clause [`chunker`] and the [`pacer`].
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
//! - **hold**: [`ReplyOutput::held`] gives a reply started ahead of the endpoint its own output,
//!   whose sends wait in order until [`Hold::release`] (the endpoint confirmed the turn) or are
//!   dropped by [`Hold::discard`] (the user went on), so a speculative reply can run its whole
//!   pipeline during the user's pause without the client seeing any of it.
//! - **barge-in**: [`ReplyOutput::cancel`] stops the reply at once (no further frame is sent;
//!   queued audio of that turn, and any that arrives later, is dropped).
//!   [`ReplyOutput::is_playing`] says whether reply audio is still playing at the client.
//!
//! Turn numbers start at 1 and increase; turn 0 is an untracked stream (the per-frame echo): no
//! audio events, no latency report, not cancellable.
pub mod chunker;
pub mod echo;
pub mod history;
pub mod pacer;
pub mod voice;

use crate::audio::ring::AudioInput;
use crate::models::llm::Message;
use history::History;
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, mark};
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
    /// The id of the API key the session was opened with (`None`: authentication is off), for
    /// the safety audit log.
    pub key_id: Option<Arc<str>>,
    pub audio: AudioInput,
    pub commands: mpsc::Receiver<Command>,
    pub output: ReplyOutput,
    /// The conversation so far, shared with the transport.
    pub history: Arc<History>,
}

/// Requests from the client other than audio.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A typed user turn, answered at once (v1 `conversation.item.create`).
    Text(String),
    /// Stop the reply in progress (the session already stopped its audio).
    Cancel,
    /// How turns are taken and replies made from now on.
    Configure(Settings),
    /// Turn taking by the client: the user's turn is this 16 kHz speech. Its turn number comes
    /// back in [`Notice::Started`] with `request`.
    Commit { audio: Vec<f32>, request: u64 },
    /// Reply now, to the conversation so far (the history's last user item is the request the
    /// input gate judges). Its turn number comes back in [`Notice::Started`] with `request`.
    Respond(Respond),
}

/// Session settings a transport may change (the Realtime API's `session.update`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The server detects turns (VAD and endpointing); off: the client commits them.
    pub detect_turns: bool,
    /// A detected turn gets a reply; off: only its transcript.
    pub create_response: bool,
    /// The user speaking cancels the reply in progress (barge-in).
    pub interrupt_response: bool,
    /// The system prompt (`None`: the configured one).
    pub instructions: Option<String>,
    /// Most tokens in one reply (`None`: the configured limit).
    pub max_tokens: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            detect_turns: true,
            create_response: true,
            interrupt_response: true,
            instructions: None,
            max_tokens: None,
        }
    }
}

/// A reply asked for by the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Respond {
    /// The transport's tag, echoed in [`Notice::Started`].
    pub request: u64,
    /// Replaces the system prompt for this reply.
    pub instructions: Option<String>,
    /// Spoken (text, audio and the voice gate) or text only.
    pub audio: bool,
    /// The reply goes into the history; off: out of band, the history is untouched.
    pub in_conversation: bool,
    /// The messages to answer instead of the history.
    pub input: Option<Vec<Message>>,
    pub max_tokens: Option<usize>,
}

/// What the core tells a transport besides the protocol events: for transports whose protocol
/// names things the v1 events leave implicit (the Realtime API's items and responses).
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Turn `turn` began for the command tagged `request` (a commit or a requested reply).
    Started { turn: u64, request: u64 },
    /// Turn `turn`'s reply begins (after the input gate; a refusal is a reply too). `audio`: it
    /// is spoken.
    Reply { turn: u64, audio: bool },
    /// What turn `turn`'s reply read and wrote, in the reply model's tokens (an external endpoint's
    /// are estimated at 4 characters a token).
    Usage { turn: u64, input_tokens: u64, output_tokens: u64 },
    /// Turn `turn` is over: its reply made (or none), its exchange written to the history.
    Done { turn: u64 },
}

/// One item of the pipeline → pacer stream.
#[derive(Debug)]
pub enum Output {
    Event(ServerEvent),
    Notice(Notice),
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
    /// Set for a reply started ahead of the endpoint: its sends wait here until released.
    hold: Option<Arc<Hold>>,
}

/// Work a held reply does once it is released (e.g. an audit-log entry), in order with its output.
type Deferred = Box<dyn FnOnce() + Send>;

/// The output of a reply started ahead of the endpoint: everything it sends (and every deferred
/// action) waits in order until the endpoint confirms the turn, then goes out as sent; if the user
/// goes on instead, it is all dropped. Bounded by the reply itself (at most `max_reply_tokens`).
pub struct Hold {
    tx: mpsc::Sender<Output>,
    state: tokio::sync::Mutex<HoldState>,
    discarded: std::sync::atomic::AtomicBool,
    /// The reply's transcript reads as a finished utterance (0 unknown, 1 no, 2 yes).
    complete: AtomicU8,
}

enum HoldState {
    Held(Vec<Held>),
    Released(Instant),
    Discarded,
}

enum Held {
    Out(Output),
    Run(Deferred),
}

impl Hold {
    /// The endpoint confirmed the turn: sends what waited, in order; later sends go straight on.
    pub async fn release(&self) -> Result<(), SessionClosed> {
        let mut state = self.state.lock().await;
        let at = Instant::now();
        let HoldState::Held(queue) = std::mem::replace(&mut *state, HoldState::Released(at)) else {
            return Ok(());
        };
        for item in queue {
            match item {
                Held::Out(output) => self.forward(output, at).await?,
                Held::Run(action) => action(),
            }
        }
        Ok(())
    }

    /// The user went on: nothing held is sent, and nothing the reply sends from now on.
    pub async fn discard(&self) {
        self.discarded.store(true, Relaxed);
        *self.state.lock().await = HoldState::Discarded;
    }

    pub fn is_discarded(&self) -> bool {
        self.discarded.load(Relaxed)
    }

    /// Whether the reply's transcript reads as a finished utterance (`None`: not known yet).
    pub fn complete(&self) -> Option<bool> {
        match self.complete.load(Relaxed) {
            0 => None,
            n => Some(n == 2),
        }
    }

    async fn send(&self, item: Held) -> Result<(), SessionClosed> {
        let mut state = self.state.lock().await;
        match &mut *state {
            HoldState::Held(queue) => queue.push(item),
            HoldState::Discarded => {}
            HoldState::Released(at) => {
                let at = *at;
                match item {
                    Held::Out(output) => self.forward(output, at).await?,
                    Held::Run(action) => action(),
                }
            }
        }
        Ok(())
    }

    /// Sends one output of a released reply; its latency marks gain `endpoint_confirmed`: when
    /// the reply's audio could go out (the release, or the mark before if that came later).
    async fn forward(&self, mut output: Output, released: Instant) -> Result<(), SessionClosed> {
        if let Output::Marks(marks) = &mut output {
            let last = marks.marks.iter().map(|(_, at)| *at).max().unwrap_or(released);
            marks.marks.push((mark::ENDPOINT_CONFIRMED, released.max(last)));
        }
        self.tx.send(output).await.map_err(|_| SessionClosed)
    }
}

/// The session is gone; the worker should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session has closed")]
pub struct SessionClosed;

impl ReplyOutput {
    pub(crate) fn new(tx: mpsc::Sender<Output>, control: Arc<ReplyControl>) -> Self {
        Self { tx, control, hold: None }
    }

    /// An output for a reply started ahead of the endpoint: what it sends waits in the returned
    /// [`Hold`] until released.
    pub fn held(&self) -> (ReplyOutput, Arc<Hold>) {
        let hold = Arc::new(Hold {
            tx: self.tx.clone(),
            state: tokio::sync::Mutex::new(HoldState::Held(Vec::new())),
            discarded: Default::default(),
            complete: AtomicU8::new(0),
        });
        (Self { tx: self.tx.clone(), control: self.control.clone(), hold: Some(hold.clone()) }, hold)
    }

    pub async fn send(&self, output: Output) -> Result<(), SessionClosed> {
        match &self.hold {
            Some(hold) => hold.send(Held::Out(output)).await,
            None => self.tx.send(output).await.map_err(|_| SessionClosed),
        }
    }

    /// Runs `action` now, or for a held reply once it is released (never if it is discarded), in
    /// order with what the reply sends.
    pub async fn when_released(&self, action: impl FnOnce() + Send + 'static) -> Result<(), SessionClosed> {
        match &self.hold {
            Some(hold) => hold.send(Held::Run(Box::new(action))).await,
            None => {
                action();
                Ok(())
            }
        }
    }

    /// Whether this is a held reply the user went on from (its output goes nowhere).
    pub fn discarded(&self) -> bool {
        self.hold.as_ref().is_some_and(|h| h.is_discarded())
    }

    /// Whether this reply was started ahead of the endpoint (its output waits for it).
    pub fn is_held(&self) -> bool {
        self.hold.is_some()
    }

    /// A held reply says whether its transcript reads as a finished utterance (the endpointer
    /// may then confirm the turn sooner).
    pub fn set_complete(&self, complete: bool) {
        if let Some(hold) = &self.hold {
            hold.complete.store(if complete { 2 } else { 1 }, Relaxed);
        }
    }

    pub async fn event(&self, event: ServerEvent) -> Result<(), SessionClosed> {
        self.send(Output::Event(event)).await
    }

    pub async fn notice(&self, notice: Notice) -> Result<(), SessionClosed> {
        self.send(Output::Notice(notice)).await
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

    /// A safety gate cut the reply: its turn stops at the pacer. For a held reply, only once it is
    /// released: a discarded one never reached the pacer, and its turn gets the reply started next
    /// (cancelling the turn now would silence that one).
    pub async fn cut(&self, turn: u64) -> Result<(), SessionClosed> {
        let control = self.control.clone();
        self.when_released(move || control.cancel(turn, CancelReason::Safety)).await
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
    /// The latest turn the pacer saw begin (its end of speech or its first reply text) and the
    /// latest it saw end (all its audio sent, or none to send): a draining session waits for the
    /// turn in between.
    turn_begun: AtomicU64,
    turn_ended: AtomicU64,
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
            turn_begun: AtomicU64::new(0),
            turn_ended: AtomicU64::new(0),
        }
    }

    pub(crate) fn turn_begins(&self, turn: u64) {
        self.turn_begun.fetch_max(turn, Relaxed);
    }

    pub(crate) fn turn_ends(&self, turn: u64) {
        self.turn_ended.fetch_max(turn, Relaxed);
    }

    /// Whether a turn has begun and is neither done nor cancelled.
    pub fn turn_in_flight(&self) -> bool {
        let settled = self.turn_ended.load(Relaxed).max(self.cancel_upto.load(Relaxed));
        self.turn_begun.load(Relaxed) > settled
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_in_a_discarded_held_reply_leaves_the_turn_to_the_next_reply() {
        let (tx, _rx) = mpsc::channel(16);
        let output = ReplyOutput::new(tx, Arc::new(ReplyControl::new(48_000)));
        let (held, hold) = output.held();
        held.cut(4).await.unwrap();
        hold.discard().await;
        assert_eq!(output.control.cancelled_upto().0, 0, "a discarded reply cancels nothing");
        let (held, hold) = output.held();
        held.cut(4).await.unwrap();
        assert_eq!(output.control.cancelled_upto().0, 0, "not before the release");
        hold.release().await.unwrap();
        assert_eq!(output.control.cancelled_upto().0, 4);
    }
}
