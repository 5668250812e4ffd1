//! The echo pipeline: transport without models. In `frame` mode every 20 ms of input goes
//! straight back (the per-frame overhead benchmark); in `packet` mode the session itself returns
//! each audio message undecoded and nothing reaches this worker; in `utterance` mode an energy
//! VAD cuts the input into turns and plays each utterance back after its end, with the same
//! events, latency marks and barge-in a voice pipeline has. Typed text is echoed as reply text.
use super::{Command, Pipeline, SessionClosed, SessionIo, TurnMarks};
use crate::audio::PIPELINE_RATE;
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, mark};
use serde::Deserialize;
use std::time::Instant;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How the echo pipeline answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EchoMode {
    /// Every input frame is sent straight back through the whole audio path (Opus decode,
    /// resample, ring, pacer, resample, Opus encode): the per-frame cost of a voice session
    /// without its models.
    Frame,
    /// Every audio message is sent straight back as received, header and Opus packet, without
    /// decoding: what the transport itself (WebSocket, session, send queue) adds per frame.
    Packet,
    /// An energy VAD finds each utterance; after its end the utterance is played back as a reply
    /// (turns, latency events and barge-in, without models).
    Utterance,
}

/// Echo pipeline settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    pub mode: EchoMode,
    /// Frame RMS above which a 20 ms frame counts as voiced, in dBFS.
    pub vad_threshold_dbfs: f32,
    /// Silence after speech that ends the user's turn, in ms (the endpointing delay).
    pub endpoint_silence_ms: u32,
    /// Voiced audio needed to start a turn, in ms (rejects clicks).
    pub min_speech_ms: u32,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self { mode: EchoMode::Frame, vad_threshold_dbfs: -40.0, endpoint_silence_ms: 400, min_speech_ms: 60 }
    }
}

/// Samples per 20 ms analysis frame at 16 kHz.
const FRAME: usize = 320;
/// Audio kept before the detected speech start, in frames (speech onsets are quiet).
const PRE_ROLL_FRAMES: usize = 10;
/// Longest utterance, in samples (30 s); a longer one is ended (and echoed) at this length.
const MAX_UTTERANCE: usize = 30 * PIPELINE_RATE as usize;
/// Audio kept after the last voiced frame when echoing, in samples (100 ms of decay).
const TAIL: usize = 1600;

/// Shared by all sessions; holds only the configuration.
pub struct EchoPipeline {
    config: EchoConfig,
}

impl EchoPipeline {
    pub fn new(config: EchoConfig) -> Self {
        Self { config }
    }
}

impl Pipeline for EchoPipeline {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn start(&self, io: SessionIo) -> JoinHandle<()> {
        let span = tracing::info_span!("echo", session = %io.session_id);
        let config = self.config.clone();
        tokio::spawn(
            async move {
                if let Err(SessionClosed) = Worker::new(config, io).run().await {
                    tracing::debug!("session closed under the echo worker");
                }
            }
            .instrument(span),
        )
    }
}

enum Vad {
    Idle { voiced_run: usize },
    Speech { turn: u64, last_voiced_end: u64, silence_ms: u32 },
}

struct Worker {
    config: EchoConfig,
    io: SessionIo,
    frame: [f32; FRAME],
    /// Utterance being collected (utterance mode), preallocated to its maximum.
    utterance: Vec<f32>,
    /// Ring of recent frames before a speech start.
    pre_roll: Vec<f32>,
    vad: Vad,
    turn: u64,
}

impl Worker {
    fn new(config: EchoConfig, io: SessionIo) -> Self {
        let utterance = if config.mode == EchoMode::Utterance { Vec::with_capacity(MAX_UTTERANCE) } else { Vec::new() };
        Self {
            config,
            io,
            frame: [0.0; FRAME],
            utterance,
            pre_roll: Vec::with_capacity(PRE_ROLL_FRAMES * FRAME),
            vad: Vad::Idle { voiced_run: 0 },
            turn: 0,
        }
    }

    async fn run(mut self) -> Result<(), SessionClosed> {
        loop {
            while self.io.audio.available() >= FRAME {
                self.io.audio.pop(&mut self.frame);
                match self.config.mode {
                    EchoMode::Frame | EchoMode::Packet => {
                        let ts = self.io.audio.last_stamp().map_or(0, |s| s.client_ts_us);
                        self.io.output.audio(0, self.frame.to_vec(), PIPELINE_RATE, ts).await?;
                    }
                    EchoMode::Utterance => self.utterance_frame().await?,
                }
            }
            tokio::select! {
                _ = self.io.audio.wait_for(FRAME) => {}
                command = self.io.commands.recv() => match command {
                    Some(Command::Text(text)) => self.echo_text(text).await?,
                    Some(_) => {}
                    None => return Ok(()),
                },
            }
        }
    }

    async fn echo_text(&mut self, text: String) -> Result<(), SessionClosed> {
        self.turn += 1;
        let out = &self.io.output;
        out.event(ServerEvent::ResponseTextDelta { turn: self.turn, delta: text.clone() }).await?;
        out.event(ServerEvent::ResponseTextDone { turn: self.turn, text }).await
    }

    async fn utterance_frame(&mut self) -> Result<(), SessionClosed> {
        let rms = (self.frame.iter().map(|s| s * s).sum::<f32>() / FRAME as f32).sqrt();
        let voiced = 20.0 * rms.max(1e-9).log10() > self.config.vad_threshold_dbfs;
        let position = self.io.audio.position();
        match &mut self.vad {
            Vad::Idle { voiced_run } => {
                if self.pre_roll.len() == PRE_ROLL_FRAMES * FRAME {
                    self.pre_roll.drain(..FRAME);
                }
                self.pre_roll.extend_from_slice(&self.frame);
                *voiced_run = if voiced { *voiced_run + 1 } else { 0 };
                if *voiced_run as u32 * 20 >= self.config.min_speech_ms {
                    self.turn += 1;
                    let turn = self.turn;
                    if let Some(playing) = self.io.output.is_playing() {
                        self.io.output.cancel(playing, CancelReason::BargeIn);
                    }
                    self.utterance.clear();
                    self.utterance.extend_from_slice(&self.pre_roll);
                    self.pre_roll.clear();
                    let start = position.saturating_sub((*voiced_run * FRAME) as u64);
                    self.vad = Vad::Speech { turn, last_voiced_end: position, silence_ms: 0 };
                    let audio_start_ms = start * 1000 / PIPELINE_RATE as u64;
                    self.io.output.event(ServerEvent::SpeechStarted { turn, audio_start_ms }).await?;
                }
            }
            Vad::Speech { turn, last_voiced_end, silence_ms } => {
                self.utterance.extend_from_slice(&self.frame);
                if voiced {
                    *last_voiced_end = position;
                    *silence_ms = 0;
                } else {
                    *silence_ms += 20;
                }
                let full = self.utterance.len() + FRAME > MAX_UTTERANCE;
                if *silence_ms >= self.config.endpoint_silence_ms || full {
                    let (turn, last_voiced_end) = (*turn, *last_voiced_end);
                    self.vad = Vad::Idle { voiced_run: 0 };
                    self.reply(turn, last_voiced_end, position).await?;
                }
            }
        }
        Ok(())
    }

    /// Ends the turn: plays the utterance (up to its last voiced sample plus a short tail) back.
    async fn reply(&mut self, turn: u64, last_voiced_end: u64, position: u64) -> Result<(), SessionClosed> {
        let endpoint = Instant::now();
        let stamp = self.io.audio.stamp_at(last_voiced_end.saturating_sub(1));
        let anchor = stamp.map_or(endpoint, |s| s.arrived);
        let audio_end_ms = last_voiced_end * 1000 / PIPELINE_RATE as u64;
        let out = &self.io.output;
        out.event(ServerEvent::SpeechStopped { turn, audio_end_ms }).await?;
        let trailing = (position - last_voiced_end) as usize;
        let keep = self.utterance.len().saturating_sub(trailing.saturating_sub(TAIL));
        let pcm = self.utterance[..keep].to_vec();
        let marks = vec![(mark::SPEECH_END, anchor), (mark::ENDPOINT, endpoint), (mark::FIRST_AUDIO, Instant::now())];
        out.marks(TurnMarks { turn, anchor, marks }).await?;
        out.audio(turn, pcm, PIPELINE_RATE, stamp.map_or(0, |s| s.client_ts_us)).await?;
        out.audio_end(turn).await
    }
}
