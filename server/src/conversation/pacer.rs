//! The paced sender: cuts the conversation's reply audio into 20 ms frames at the stream's rate
//! and hands them to the transport ([`Transmit`]: Opus frames for v1, base64 PCM or G.711 for
//! the Realtime API) no more than `max_lead` ahead of real time, so a cancel (barge-in) can stop
//! a reply within one frame and drop everything unsent. It also makes the audio events
//! (`response.audio.started`/`done`, `reply.cancelled`), completes `turn.latency`, and says when
//! each turn's reply has ended.
use crate::audio::resample::Resampler;
use crate::conversation::{Output, ReplyControl, TurnMarks};
use crate::metrics::Metrics;
use parley_protocol::event::{CancelReason, LatencyMark, mark};
use parley_protocol::{FRAME_MS, ServerEvent, frame_samples};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::sleep_until;

/// A pacer has nothing more to do: the pipeline's side closed, or the audio could not be
/// resampled or encoded.
#[derive(Debug, thiserror::Error)]
pub enum PacerError {
    #[error(transparent)]
    Codec(#[from] crate::audio::codec::CodecError),
    #[error(transparent)]
    Resample(#[from] crate::audio::resample::ResampleError),
}

/// The transport's side of the pacer: how events and frames reach the client.
pub trait Transmit: Send {
    /// An event of the conversation, in order with the audio.
    fn event(&mut self, event: &ServerEvent);
    /// The next frame (20 ms at `rate`) of reply audio of `turn` (0: an untracked stream); `seq`
    /// numbers the frames of the session's reply stream, `ref_ts_us` is the client timestamp of
    /// the input it answers.
    fn frame(&mut self, turn: u64, pcm: &[f32], rate: u32, seq: u32, ref_ts_us: u64) -> Result<(), PacerError>;
    /// `turn`'s reply ended and all its audio was sent (a cancelled one gets `reply.cancelled`
    /// instead).
    fn turn_end(&mut self, _turn: u64) {}
    /// A notice of the core's (protocols whose events carry no more than v1's ignore them).
    fn notice(&mut self, _notice: crate::conversation::Notice) {}
}

const FRAME: Duration = Duration::from_millis(FRAME_MS as u64);

pub struct Pacer {
    rx: mpsc::Receiver<Output>,
    control: Arc<ReplyControl>,
    transmit: Box<dyn Transmit>,
    metrics: Arc<Metrics>,
    max_lead: Duration,
    rate: u32,
    resampler: Option<Resampler>,
    /// Reply audio at the stream rate, not yet framed.
    pcm: Vec<f32>,
    seq: u32,
    ref_ts_us: u64,
    /// The player's clock: when it plays the first frame of the current run of frames (a client
    /// plays each frame 20 ms after the one before), and the audio sent in the run. A frame sent
    /// after its place on this clock is an underrun: the player has run dry and plays on from
    /// that frame, so the clock moves with it.
    run_start: Instant,
    run_sent: Duration,
    /// Since when a whole frame has waited in `pcm` (`None`: less than a frame waits).
    ready_at: Option<Instant>,
    turn: Option<TurnState>,
    marks: Vec<TurnMarks>,
}

struct TurnState {
    turn: u64,
    frames: u32,
    first_sent: Option<Instant>,
    ended: bool,
}

impl Pacer {
    pub fn new(
        rx: mpsc::Receiver<Output>,
        control: Arc<ReplyControl>,
        transmit: Box<dyn Transmit>,
        metrics: Arc<Metrics>,
        max_lead: Duration,
    ) -> Self {
        let rate = control.output_rate.load(Relaxed);
        Self {
            rx,
            control,
            transmit,
            metrics,
            max_lead,
            rate,
            resampler: None,
            pcm: Vec::with_capacity(frame_samples(48_000) * 16),
            seq: 0,
            ref_ts_us: 0,
            run_start: Instant::now(),
            run_sent: Duration::ZERO,
            ready_at: None,
            turn: None,
            marks: Vec::new(),
        }
    }

    fn frame_len(&self) -> usize {
        frame_samples(self.rate)
    }

    /// Runs until the pipeline's sender is gone and everything queued is sent.
    pub async fn run(mut self) -> Result<(), PacerError> {
        let mut open = true;
        loop {
            let ready = self.pcm.len() >= self.frame_len();
            self.ready_at = if ready { self.ready_at.or_else(|| Some(Instant::now())) } else { None };
            if !ready {
                self.finish_turn_if_drained();
                if !open {
                    return Ok(());
                }
            }
            let due = (self.run_start + self.run_sent).checked_sub(self.max_lead).unwrap_or(self.run_start);
            tokio::select! {
                biased;
                _ = self.control.cancelled.notified() => self.cancel()?,
                _ = sleep_until(due.into()), if ready => self.send_frame()?,
                output = self.rx.recv(), if !ready && open => match output {
                    Some(output) => self.ingest(output)?,
                    None => open = false,
                },
            }
        }
    }

    fn is_cancelled(&self, turn: u64) -> bool {
        turn > 0 && turn <= self.control.cancelled_upto().0
    }

    fn ingest(&mut self, output: Output) -> Result<(), PacerError> {
        match output {
            Output::Event(event) => {
                if let ServerEvent::SpeechStopped { turn, .. }
                | ServerEvent::TranscriptionCompleted { turn, .. }
                | ServerEvent::ResponseTextDelta { turn, .. } = &event
                {
                    self.control.turn_begins(*turn);
                }
                self.transmit.event(&event)
            }
            Output::Notice(notice) => self.transmit.notice(notice),
            Output::Marks(marks) => {
                if self.marks.len() >= 8 {
                    self.marks.remove(0);
                }
                self.marks.push(marks);
            }
            Output::Audio { turn, pcm, sample_rate, ref_ts_us } => {
                if self.is_cancelled(turn) {
                    self.metrics
                        .reply_frames_dropped
                        .fetch_add((pcm.len() / frame_samples(sample_rate).max(1)) as u64, Relaxed);
                    return Ok(());
                }
                self.follow_rate_change()?;
                if self.turn.as_ref().is_none_or(|t| t.turn != turn || t.ended) {
                    self.turn = Some(TurnState { turn, frames: 0, first_sent: None, ended: false });
                }
                if self.resampler.as_ref().is_none_or(|r| r.rates() != (sample_rate, self.rate)) {
                    self.resampler = Some(Resampler::new(sample_rate, self.rate)?);
                }
                let resampler = self.resampler.as_mut().expect("set above");
                resampler.process(&pcm, &mut self.pcm)?;
                self.ref_ts_us = ref_ts_us;
            }
            Output::AudioEnd { turn } => {
                let cancelled = self.is_cancelled(turn);
                if let Some(state) = self.turn.as_mut().filter(|t| t.turn == turn && !cancelled) {
                    state.ended = true;
                    if let Some(resampler) = self.resampler.as_mut() {
                        resampler.flush(&mut self.pcm)?;
                    }
                    let frame = frame_samples(self.rate);
                    let partial = self.pcm.len() % frame;
                    if partial > 0 {
                        self.pcm.resize(self.pcm.len() + frame - partial, 0.0);
                    }
                } else if !cancelled && self.turn.as_ref().is_none_or(|t| t.turn != turn) {
                    // A turn without audio: report its latency now; it has ended.
                    self.send_latency(turn, None);
                    self.end_turn(turn);
                }
            }
        }
        Ok(())
    }

    fn follow_rate_change(&mut self) -> Result<(), PacerError> {
        let rate = self.control.output_rate.load(Relaxed);
        if rate != self.rate {
            self.rate = rate;
            self.resampler = None;
            self.pcm.clear();
        }
        Ok(())
    }

    fn send_frame(&mut self) -> Result<(), PacerError> {
        let started = Instant::now();
        let play_at = self.run_start + self.run_sent;
        if started > play_at {
            self.underrun(play_at, started - play_at);
        }
        let frame = self.frame_len();
        if let Some(state) = self.turn.as_ref().filter(|t| t.turn > 0 && t.frames == 0) {
            let event = ServerEvent::ResponseAudioStarted { turn: state.turn, first_seq: self.seq };
            self.transmit.event(&event);
        }
        let turn = self.turn.as_ref().map_or(0, |t| t.turn);
        self.transmit.frame(turn, &self.pcm[..frame], self.rate, self.seq, self.ref_ts_us)?;
        self.pcm.drain(..frame);
        self.ready_at = None;
        self.seq = self.seq.wrapping_add(1);
        self.run_sent += FRAME;
        let sent_at = Instant::now();
        self.metrics.frames_sent.fetch_add(1, Relaxed);
        self.metrics.output_frame_seconds.observe(sent_at - started);
        if let Some(state) = self.turn.as_mut() {
            state.frames += 1;
            let turn = state.turn;
            if state.first_sent.is_none() {
                state.first_sent = Some(sent_at);
                if turn > 0 {
                    self.send_latency(turn, Some(sent_at));
                }
            }
            self.control.set_playing(turn, self.run_start + self.run_sent);
        }
        Ok(())
    }

    /// The frame about to be sent, due to play at `play_at`, is `late` for the player's clock,
    /// which moves with it. Mid-reply that is an underrun (the player was silent for `late`):
    /// counted by its cause, the audio reaching the pacer late (the pipeline) or the pacer sending
    /// late (the runtime).
    fn underrun(&mut self, play_at: Instant, late: Duration) {
        self.run_start += late;
        let Some(state) = self.turn.as_ref().filter(|t| t.turn > 0 && t.frames > 0) else { return };
        let audio_late = self.ready_at.is_none_or(|ready| ready > play_at);
        self.metrics.reply_underrun(audio_late, late);
        tracing::debug!(
            turn = state.turn,
            at_ms = state.frames * FRAME_MS,
            late_ms = late.as_secs_f64() * 1000.0,
            cause = if audio_late { "audio late" } else { "sender late" },
            "reply audio underrun"
        );
    }

    /// `response.audio.done` once the last frame of an ended turn is sent.
    fn finish_turn_if_drained(&mut self) {
        if let Some(state) = self.turn.as_ref().filter(|t| t.ended)
            && self.pcm.is_empty()
        {
            if state.turn > 0 {
                let event = ServerEvent::ResponseAudioDone {
                    turn: state.turn,
                    frames: state.frames,
                    audio_ms: state.frames as u64 * FRAME_MS as u64,
                };
                self.transmit.event(&event);
                self.end_turn(state.turn);
            }
            self.turn = None;
        }
    }

    fn end_turn(&mut self, turn: u64) {
        self.transmit.turn_end(turn);
        self.control.turn_ends(turn);
    }

    fn cancel(&mut self) -> Result<(), PacerError> {
        let (upto, reason) = self.control.cancelled_upto();
        let Some(state) = self.turn.take_if(|t| t.turn > 0 && t.turn <= upto) else {
            return Ok(());
        };
        let frame = self.frame_len();
        self.metrics.reply_frames_dropped.fetch_add((self.pcm.len() / frame) as u64, Relaxed);
        self.metrics.replies_cancelled.fetch_add(1, Relaxed);
        self.pcm.clear();
        self.resampler = None;
        let sent = Duration::from_millis(state.frames as u64 * FRAME_MS as u64);
        let played = state.first_sent.map_or(Duration::ZERO, |t| t.elapsed()).min(sent);
        self.control.record_cancel(state.turn, played.as_millis() as u64);
        self.control.set_playing(0, Instant::now());
        if reason == CancelReason::Safety {
            // The gate's decision (or its failure) was queued behind the turn's audio before the
            // cut: what is queued goes first (its audio dropped), so the client learns why.
            while self.pcm.len() < frame
                && let Ok(output) = self.rx.try_recv()
            {
                self.ingest(output)?;
            }
        }
        let event = ServerEvent::ReplyCancelled {
            turn: state.turn,
            reason,
            played_ms: played.as_millis() as u64,
            sent_ms: sent.as_millis() as u64,
        };
        self.transmit.event(&event);
        Ok(())
    }

    /// Sends `turn.latency` for `turn` from its marks plus the first frame's send time.
    fn send_latency(&mut self, turn: u64, first_frame: Option<Instant>) {
        let Some(i) = self.marks.iter().position(|m| m.turn == turn) else {
            return;
        };
        let marks = self.marks.remove(i);
        let ms = |t: Instant| t.saturating_duration_since(marks.anchor).as_secs_f64() * 1000.0;
        let mut out: Vec<LatencyMark> = Vec::with_capacity(marks.marks.len() + 1);
        let mut previous = marks.anchor;
        for &(stage, at) in marks.marks.iter().chain(first_frame.map(|t| (mark::FIRST_FRAME_SENT, t)).iter()) {
            if stage != mark::SPEECH_END {
                self.metrics.observe_stage(stage, at.saturating_duration_since(previous));
            }
            previous = at;
            out.push(LatencyMark { stage: stage.to_string(), at_ms: ms(at) });
        }
        let total = previous.saturating_duration_since(marks.anchor);
        if first_frame.is_some() {
            self.metrics.turn_seconds.observe(total);
        }
        self.transmit.event(&ServerEvent::TurnLatency { turn, marks: out, total_ms: total.as_secs_f64() * 1000.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that drops what it is given.
    struct Discard;

    impl Transmit for Discard {
        fn event(&mut self, _event: &ServerEvent) {}
        fn frame(&mut self, _: u64, _: &[f32], _: u32, _: u32, _: u64) -> Result<(), PacerError> {
            Ok(())
        }
    }

    /// A reply whose second part reaches the pacer after the first has played is one underrun
    /// of the pipeline's making, about as long as the gap; one whose audio waits while the pacer
    /// cannot run is one of the pacer's; a reply that keeps up has none.
    #[tokio::test]
    async fn frames_sent_after_the_player_needs_them_are_underruns_by_cause() {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let control = Arc::new(ReplyControl::new(48_000));
        let lead = Duration::from_millis(100);
        let pacer = Pacer::new(rx, control, Box::new(Discard), metrics.clone(), lead);
        let pacer = tokio::spawn(pacer.run());
        let audio =
            |turn, ms: usize| Output::Audio { turn, pcm: vec![0.0; 16 * ms], sample_rate: 16_000, ref_ts_us: 0 };
        // Turn 1: 200 ms, then 100 ms more at once (in time): no underrun.
        tx.send(audio(1, 200)).await.unwrap();
        tx.send(audio(1, 100)).await.unwrap();
        tx.send(Output::AudioEnd { turn: 1 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Turn 2: 100 ms, then 100 ms more 400 ms later: ~300 ms of silence for the player.
        tx.send(audio(2, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.send(audio(2, 100)).await.unwrap();
        tx.send(Output::AudioEnd { turn: 2 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Turn 3: all its audio waits, but the runtime (one thread here) is blocked for 300 ms.
        tx.send(audio(3, 400)).await.unwrap();
        tx.send(Output::AudioEnd { turn: 3 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::thread::sleep(Duration::from_millis(300));
        drop(tx);
        pacer.await.unwrap().unwrap();
        let text = metrics.render();
        let value = |name: &str| -> f64 {
            let line = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
            line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert_eq!(value("parley_reply_underruns_total{cause=\"audio_late\"}"), 1.0);
        // At least the one of the blocked runtime (a loaded machine may delay the pacer more).
        assert!(value("parley_reply_underruns_total{cause=\"sender_late\"}") >= 1.0);
        assert!(value("parley_reply_underrun_seconds_total") >= 0.4);
    }

    /// A transport that records the events it is given.
    struct Record(Arc<std::sync::Mutex<Vec<ServerEvent>>>);

    impl Transmit for Record {
        fn event(&mut self, event: &ServerEvent) {
            self.0.lock().unwrap().push(event.clone());
        }
        fn frame(&mut self, _: u64, _: &[f32], _: u32, _: u32, _: u64) -> Result<(), PacerError> {
            Ok(())
        }
    }

    /// A gate's cut stops the reply's queued audio at once, and the decision queued behind that
    /// audio still reaches the client before `reply.cancelled` (reason safety); its audio does not.
    #[tokio::test]
    async fn a_safety_cut_sends_the_decision_queued_behind_the_audio_first() {
        let (tx, rx) = mpsc::channel(16);
        let control = Arc::new(ReplyControl::new(48_000));
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let transmit = Box::new(Record(events.clone()));
        let pacer = Pacer::new(rx, control.clone(), transmit, Arc::new(Metrics::default()), Duration::from_millis(60));
        let pacer = tokio::spawn(pacer.run());
        let audio = |ms: usize| Output::Audio { turn: 1, pcm: vec![0.0; 16 * ms], sample_rate: 16_000, ref_ts_us: 0 };
        let decision = |action| ServerEvent::SafetyDecision {
            turn: 1,
            stage: parley_protocol::event::SafetyStage::Voice,
            action,
            rule_id: Some("VC-0".into()),
            category: Some("voice".into()),
            score: Some(0.6),
            elapsed_ms: Some(9.0),
            detail: None,
        };
        use parley_protocol::event::SafetyAction::{Allow, Block};
        tx.send(Output::Event(decision(Allow))).await.unwrap();
        tx.send(audio(2_000)).await.unwrap();
        tx.send(Output::Event(decision(Allow))).await.unwrap();
        tx.send(audio(2_000)).await.unwrap();
        tx.send(Output::Event(decision(Block))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        control.cancel(1, CancelReason::Safety);
        tx.send(Output::AudioEnd { turn: 1 }).await.unwrap();
        drop(tx);
        pacer.await.unwrap().unwrap();
        let events = events.lock().unwrap();
        let kinds: Vec<String> = events
            .iter()
            .map(|e| match e {
                ServerEvent::SafetyDecision { action, .. } => format!("{action:?}"),
                ServerEvent::ReplyCancelled { reason, sent_ms, .. } => {
                    assert!(*sent_ms < 2_000, "the queued audio was dropped: {e:?}");
                    format!("cancelled {reason:?}")
                }
                ServerEvent::ResponseAudioStarted { .. } => "started".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["Allow", "started", "Allow", "Block", "cancelled Safety"], "{events:?}");
    }
}
