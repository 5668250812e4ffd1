//! The paced sender: turns the pipeline's reply audio into 20 ms Opus frames and hands them to
//! the WebSocket writer no more than `max_lead` ahead of real time, so a cancel (barge-in) can
//! stop a reply within one frame and drop everything unsent. It also sends the audio events
//! (`response.audio.started`/`done`, `reply.cancelled`) and completes `turn.latency`.
use crate::audio::codec::OpusEncoder;
use crate::audio::resample::Resampler;
use crate::metrics::Metrics;
use crate::pipeline::{Output, ReplyControl, TurnMarks};
use crate::session::Outbox;
use parley_protocol::event::{LatencyMark, mark};
use parley_protocol::{FRAME_MS, FrameHeader, MAX_OPUS_PACKET_BYTES, ServerEvent, frame::HEADER_LEN, frame_samples};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::sleep_until;

/// A pacer has nothing more to do: the pipeline's side closed or the encoder failed.
#[derive(Debug, thiserror::Error)]
pub enum PacerError {
    #[error(transparent)]
    Codec(#[from] crate::audio::codec::CodecError),
    #[error(transparent)]
    Resample(#[from] crate::audio::resample::ResampleError),
}

const FRAME: Duration = Duration::from_millis(FRAME_MS as u64);

pub struct Pacer {
    rx: mpsc::Receiver<Output>,
    control: Arc<ReplyControl>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    max_lead: Duration,
    bitrate: i32,
    complexity: i32,
    rate: u32,
    encoder: OpusEncoder,
    resampler: Option<Resampler>,
    /// Reply audio at the stream rate, not yet framed.
    pcm: Vec<f32>,
    packet: Vec<u8>,
    seq: u32,
    ref_ts_us: u64,
    /// Real-time start of the current continuous run of frames, and audio sent in it.
    run_start: Instant,
    run_sent: Duration,
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
        outbox: Outbox,
        metrics: Arc<Metrics>,
        config: &crate::config::Config,
    ) -> Result<Self, PacerError> {
        let rate = control.output_rate.load(Relaxed);
        Ok(Self {
            rx,
            control,
            outbox,
            metrics,
            max_lead: Duration::from_millis(config.max_lead_ms as u64),
            bitrate: config.opus_bitrate,
            complexity: config.opus_complexity,
            rate,
            encoder: OpusEncoder::new(rate, config.opus_bitrate, config.opus_complexity)?,
            resampler: None,
            pcm: Vec::with_capacity(frame_samples(48_000) * 16),
            packet: vec![0; HEADER_LEN + MAX_OPUS_PACKET_BYTES],
            seq: 0,
            ref_ts_us: 0,
            run_start: Instant::now(),
            run_sent: Duration::ZERO,
            turn: None,
            marks: Vec::new(),
        })
    }

    fn frame_len(&self) -> usize {
        frame_samples(self.rate)
    }

    /// Runs until the pipeline's sender is gone and everything queued is sent.
    pub async fn run(mut self) -> Result<(), PacerError> {
        let mut open = true;
        loop {
            let ready = self.pcm.len() >= self.frame_len();
            if !ready {
                self.finish_turn_if_drained();
                if !open {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if ready && now.saturating_duration_since(self.run_start) > self.run_sent + FRAME {
                // The stream ran dry: a new run starts now and may lead by `max_lead` again.
                self.run_start = now;
                self.run_sent = Duration::ZERO;
            }
            let due = (self.run_start + self.run_sent).checked_sub(self.max_lead).unwrap_or(self.run_start);
            tokio::select! {
                biased;
                _ = self.control.cancelled.notified() => self.cancel(),
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
            Output::Event(event) => self.outbox.event(&event),
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
                } else if self.turn.is_none() && !cancelled {
                    // A turn without audio: report its latency now.
                    self.send_latency(turn, None);
                }
            }
        }
        Ok(())
    }

    fn follow_rate_change(&mut self) -> Result<(), PacerError> {
        let rate = self.control.output_rate.load(Relaxed);
        if rate != self.rate {
            self.rate = rate;
            self.encoder = OpusEncoder::new(rate, self.bitrate, self.complexity)?;
            self.resampler = None;
            self.pcm.clear();
        }
        Ok(())
    }

    fn send_frame(&mut self) -> Result<(), PacerError> {
        let started = Instant::now();
        let frame = self.frame_len();
        if let Some(state) = self.turn.as_ref().filter(|t| t.turn > 0 && t.frames == 0) {
            let event = ServerEvent::ResponseAudioStarted { turn: state.turn, first_seq: self.seq };
            self.outbox.event(&event);
        }
        let n = self.encoder.encode(&self.pcm[..frame], &mut self.packet[HEADER_LEN..])?;
        FrameHeader::audio(self.seq, self.ref_ts_us).write(&mut self.packet);
        self.outbox.audio(&self.packet[..HEADER_LEN + n]);
        self.pcm.drain(..frame);
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
                self.outbox.event(&event);
            }
            self.turn = None;
        }
    }

    fn cancel(&mut self) {
        let (upto, reason) = self.control.cancelled_upto();
        let Some(state) = self.turn.as_ref().filter(|t| t.turn > 0 && t.turn <= upto) else {
            return;
        };
        let frame = self.frame_len();
        self.metrics.reply_frames_dropped.fetch_add((self.pcm.len() / frame) as u64, Relaxed);
        self.metrics.replies_cancelled.fetch_add(1, Relaxed);
        self.pcm.clear();
        self.resampler = None;
        let sent = Duration::from_millis(state.frames as u64 * FRAME_MS as u64);
        let played = state.first_sent.map_or(Duration::ZERO, |t| t.elapsed()).min(sent);
        let event = ServerEvent::ReplyCancelled {
            turn: state.turn,
            reason,
            played_ms: played.as_millis() as u64,
            sent_ms: sent.as_millis() as u64,
        };
        self.outbox.event(&event);
        self.control.record_cancel(state.turn, played.as_millis() as u64);
        self.control.set_playing(0, Instant::now());
        self.turn = None;
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
        self.outbox.event(&ServerEvent::TurnLatency { turn, marks: out, total_ms: total.as_secs_f64() * 1000.0 });
    }
}
