//! The voice pipeline: Silero VAD with endpointing → Whisper → SmolLM2 (streamed) → clause
//! chunker → Piper, per session, over models loaded once and owned by engine threads.
//!
//! One worker task per session reads the 16 kHz input ring in 32 ms VAD chunks and decides
//! turns; each turn's reply runs as its own task (ASR → LLM → chunker → TTS → reply output) so
//! the worker keeps listening and can cancel the reply the moment the user speaks again
//! (barge-in). The conversation history keeps only what the user actually heard.
use super::chunker::Chunker;
use super::{Command, Pipeline, SessionClosed, SessionIo, TurnMarks};
use crate::audio::PIPELINE_RATE;
use crate::engine::{Engine, EngineError, Priority};
use crate::models::asr::Asr;
use crate::models::llm::{Llm, Message};
use crate::models::speaker::SpeakerEmbedder;
use crate::models::text_embed::TextEmbedder;
use crate::models::tts::Tts;
use crate::models::vad::{CHUNK_SAMPLES, Vad, VadState};
use crate::models::{Manifest, ModelError};
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, ErrorCode, mark};
use serde::Deserialize;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Jobs that may wait at each priority of an engine before new ones are refused.
const ENGINE_QUEUE: usize = 64;
/// Longest user turn, in samples (30 s: Whisper's window); a longer one is ended there.
const MAX_UTTERANCE: usize = 30 * PIPELINE_RATE as usize;
/// Audio kept before the detected speech start, in VAD chunks (~200 ms: onsets are quiet).
const PRE_ROLL_CHUNKS: usize = 6;
/// Milliseconds per VAD chunk.
const CHUNK_MS: u32 = (CHUNK_SAMPLES as u32 * 1000) / PIPELINE_RATE;
/// Text deltas buffered between the LLM thread and the reply task.
const DELTA_QUEUE: usize = 256;
/// Clauses buffered between the reply task and its TTS stage.
const CLAUSE_QUEUE: usize = 32;
/// Messages of history kept per session (a memory bound; the LLM itself drops the oldest turns
/// that do not fit its context, and trimming here earlier would defeat its prefix cache).
const MAX_HISTORY_MESSAGES: usize = 64;

/// Settings of the voice pipeline (`[voice]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VoiceConfig {
    /// Speech probability at which speech starts.
    pub vad_on: f32,
    /// Speech probability under which a chunk counts as silence.
    pub vad_off: f32,
    /// Voiced time before a turn starts, in ms (filters clicks and coughs).
    pub min_speech_ms: u32,
    /// Silence after the last voiced chunk that ends a turn, in ms.
    pub endpoint_silence_ms: u32,
    /// Most tokens in one reply.
    pub max_reply_tokens: usize,
    /// The system prompt: short, spoken style.
    pub system_prompt: String,
    /// ONNX Runtime intra-op threads per engine. Their sum should not exceed the cores, counting
    /// that LLM and TTS run at the same time during a reply.
    pub threads_vad: usize,
    pub threads_asr: usize,
    pub threads_llm: usize,
    pub threads_tts: usize,
    pub threads_embed: usize,
}

impl Default for VoiceConfig {
    fn default() -> Self {
        Self {
            vad_on: 0.5,
            vad_off: 0.35,
            min_speech_ms: 96,
            endpoint_silence_ms: 480,
            max_reply_tokens: 60,
            system_prompt: "You are Parley, a friendly voice assistant. Answer in one or two short spoken \
                            sentences. No lists, no markdown, no emoji."
                .into(),
            threads_vad: 1,
            threads_asr: 2,
            threads_llm: 1,
            threads_tts: 1,
            threads_embed: 1,
        }
    }
}

/// Every model, each on its own engine thread; shared by all sessions.
pub struct Engines {
    pub vad: Engine<Vad>,
    pub asr: Engine<Asr>,
    pub llm: Engine<Llm>,
    pub tts: Engine<Tts>,
    pub speaker: Engine<SpeakerEmbedder>,
    pub text_embed: Engine<TextEmbedder>,
    /// Output sample rate of the voice.
    pub tts_rate: u32,
}

impl Engines {
    /// Loads all six models (each on its engine thread) and logs where each came from.
    pub fn load(manifest: &Arc<Manifest>, config: &VoiceConfig) -> Result<Engines, ModelError> {
        let rt = &manifest.runtime;
        tracing::info!(
            dir = %manifest.dir.display(),
            runtime = %format!("{} {} ({})", rt.source.package, rt.source.version, rt.source.licence),
            "loading models"
        );
        manifest.runtime()?;
        let vad = spawn(manifest, "vad", config.threads_vad, Vad::load)?;
        let asr = spawn(manifest, "asr", config.threads_asr, Asr::load)?;
        let llm = spawn(manifest, "llm", config.threads_llm, Llm::load)?;
        let tts = spawn(manifest, "tts", config.threads_tts, Tts::load)?;
        let speaker = spawn(manifest, "speaker", config.threads_embed, SpeakerEmbedder::load)?;
        let text_embed = spawn(manifest, "text-embed", config.threads_embed, TextEmbedder::load)?;
        let tts_rate = tts.run_blocking(Priority::High, |tts| tts.sample_rate()).map_err(engine_to_model)?;
        Ok(Engines { vad, asr, llm, tts, speaker, text_embed, tts_rate })
    }
}

/// Starts one engine and logs the model's source and load time.
fn spawn<M: 'static>(
    manifest: &Arc<Manifest>,
    role: &'static str,
    threads: usize,
    load: fn(&Manifest, usize) -> Result<M, ModelError>,
) -> Result<Engine<M>, ModelError> {
    let started = Instant::now();
    let source = manifest.model(role)?.source.clone();
    let m = manifest.clone();
    let engine = Engine::spawn(role, ENGINE_QUEUE, move || load(&m, threads.max(1)))?;
    tracing::info!(
        role,
        package = %source.package,
        version = %source.version,
        licence = %source.licence,
        wheel_sha256 = %source.wheel_sha256,
        threads,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(engine)
}

fn engine_to_model(e: EngineError) -> ModelError {
    match e {
        EngineError::Model(e) => e,
        other => ModelError::Invalid(other.to_string()),
    }
}

/// The voice pipeline: shared engines plus settings.
pub struct VoicePipeline {
    engines: Arc<Engines>,
    config: Arc<VoiceConfig>,
}

impl VoicePipeline {
    pub fn new(engines: Arc<Engines>, config: VoiceConfig) -> Self {
        Self { engines, config: Arc::new(config) }
    }

    /// Loads every model from `manifest` and builds the pipeline.
    pub fn load(manifest: Manifest, config: VoiceConfig) -> Result<Self, ModelError> {
        let engines = Engines::load(&Arc::new(manifest), &config)?;
        Ok(Self::new(Arc::new(engines), config))
    }

    pub fn engines(&self) -> &Arc<Engines> {
        &self.engines
    }
}

impl Pipeline for VoicePipeline {
    fn name(&self) -> &'static str {
        "voice"
    }

    fn render_metrics(&self, out: &mut String) {
        let e = &self.engines;
        out.push_str(
            "# HELP parley_engine_jobs_refused_total Model jobs refused because the engine's queue was full.\n",
        );
        out.push_str("# TYPE parley_engine_jobs_refused_total counter\n");
        for (engine, refused) in [
            ("vad", e.vad.refused()),
            ("asr", e.asr.refused()),
            ("llm", e.llm.refused()),
            ("tts", e.tts.refused()),
            ("speaker", e.speaker.refused()),
            ("text-embed", e.text_embed.refused()),
        ] {
            out.push_str(&format!("parley_engine_jobs_refused_total{{engine=\"{engine}\"}} {refused}\n"));
        }
    }

    fn start(&self, io: SessionIo) -> JoinHandle<()> {
        let span = tracing::info_span!("voice", session = %io.session_id);
        let worker = Worker::new(self.engines.clone(), self.config.clone(), io);
        tokio::spawn(
            async move {
                if let Err(SessionClosed) = worker.run().await {
                    tracing::debug!("session closed under the voice worker");
                }
            }
            .instrument(span),
        )
    }
}

enum Turn {
    /// Waiting for speech; `voiced` consecutive voiced chunks so far.
    Idle { voiced: usize },
    /// The user is speaking.
    Speech { turn: u64, last_voiced_end: u64, last_voiced_seen: Instant, silence_ms: u32 },
}

/// A reply in progress: its task and the flag that stops it.
struct Reply {
    turn: u64,
    cancel: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

struct Worker {
    engines: Arc<Engines>,
    config: Arc<VoiceConfig>,
    io: SessionIo,
    vad_state: Option<VadState>,
    chunk: [f32; CHUNK_SAMPLES],
    utterance: Vec<f32>,
    pre_roll: Vec<f32>,
    state: Turn,
    turn: u64,
    history: Arc<Mutex<Vec<Message>>>,
    reply: Option<Reply>,
}

impl Worker {
    fn new(engines: Arc<Engines>, config: Arc<VoiceConfig>, io: SessionIo) -> Self {
        Self {
            engines,
            config,
            io,
            vad_state: Some(VadState::new()),
            chunk: [0.0; CHUNK_SAMPLES],
            utterance: Vec::with_capacity(MAX_UTTERANCE),
            pre_roll: Vec::with_capacity(PRE_ROLL_CHUNKS * CHUNK_SAMPLES),
            state: Turn::Idle { voiced: 0 },
            turn: 0,
            history: Arc::new(Mutex::new(Vec::new())),
            reply: None,
        }
    }

    async fn run(mut self) -> Result<(), SessionClosed> {
        loop {
            while self.io.audio.available() >= CHUNK_SAMPLES {
                self.io.audio.pop(&mut self.chunk);
                self.on_chunk().await?;
            }
            tokio::select! {
                _ = self.io.audio.wait_for(CHUNK_SAMPLES) => {}
                command = self.io.commands.recv() => match command {
                    Some(Command::Text(text)) => {
                        self.cancel_reply(CancelReason::BargeIn);
                        self.turn += 1;
                        let now = Instant::now();
                        let marks = vec![(mark::ENDPOINT, now)];
                        self.start_reply(self.turn, Input::Text(text), now, marks, 0);
                    }
                    Some(Command::Cancel) => self.cancel_reply(CancelReason::ClientCancel),
                    None => return Ok(()),
                },
            }
        }
    }

    /// Scores one 32 ms chunk and advances the turn state.
    async fn on_chunk(&mut self) -> Result<(), SessionClosed> {
        let prob = self.vad().await?;
        let position = self.io.audio.position();
        let config = self.config.clone();
        match &mut self.state {
            Turn::Idle { voiced } => {
                if self.pre_roll.len() == PRE_ROLL_CHUNKS * CHUNK_SAMPLES {
                    self.pre_roll.drain(..CHUNK_SAMPLES);
                }
                self.pre_roll.extend_from_slice(&self.chunk);
                *voiced = if prob >= config.vad_on { *voiced + 1 } else { 0 };
                if *voiced as u32 * CHUNK_MS >= config.min_speech_ms {
                    let start = position.saturating_sub((*voiced * CHUNK_SAMPLES) as u64);
                    // Barge-in: the user talks over the reply; it stops now.
                    self.cancel_reply(CancelReason::BargeIn);
                    self.turn += 1;
                    let turn = self.turn;
                    self.utterance.clear();
                    self.utterance.extend_from_slice(&self.pre_roll);
                    self.pre_roll.clear();
                    self.state = Turn::Speech {
                        turn,
                        last_voiced_end: position,
                        last_voiced_seen: Instant::now(),
                        silence_ms: 0,
                    };
                    let audio_start_ms = start * 1000 / PIPELINE_RATE as u64;
                    self.io.output.event(ServerEvent::SpeechStarted { turn, audio_start_ms }).await?;
                }
            }
            Turn::Speech { turn, last_voiced_end, last_voiced_seen, silence_ms } => {
                self.utterance.extend_from_slice(&self.chunk);
                if prob >= config.vad_off {
                    *last_voiced_end = position;
                    *last_voiced_seen = Instant::now();
                    *silence_ms = 0;
                } else {
                    *silence_ms += CHUNK_MS;
                }
                let full = self.utterance.len() + CHUNK_SAMPLES > MAX_UTTERANCE;
                if *silence_ms >= config.endpoint_silence_ms || full {
                    let (turn, last_voiced_end, last_voiced_seen) = (*turn, *last_voiced_end, *last_voiced_seen);
                    self.state = Turn::Idle { voiced: 0 };
                    self.end_turn(turn, last_voiced_end, last_voiced_seen, position).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs the VAD on the current chunk. An engine failure is reported and counts as silence.
    async fn vad(&mut self) -> Result<f32, SessionClosed> {
        let chunk = self.chunk;
        let mut state = self.vad_state.take().unwrap_or_default();
        let result = self
            .engines
            .vad
            .run(Priority::High, move |vad| {
                let prob = vad.push(&mut state, &chunk);
                (state, prob)
            })
            .await;
        match result {
            Ok((state, Ok(prob))) => {
                self.vad_state = Some(state);
                Ok(prob)
            }
            Ok((state, Err(e))) => {
                self.vad_state = Some(state);
                self.io.output.event(engine_error("voice activity detection failed", &e.into())).await?;
                Ok(0.0)
            }
            Err(e) => {
                self.io.output.event(engine_error("voice activity detection failed", &e)).await?;
                Ok(0.0)
            }
        }
    }

    /// The user stopped speaking: announce it and start the reply.
    async fn end_turn(
        &mut self,
        turn: u64,
        last_voiced_end: u64,
        last_voiced_seen: Instant,
        position: u64,
    ) -> Result<(), SessionClosed> {
        let endpoint = Instant::now();
        let stamp = self.io.audio.stamp_at(last_voiced_end.saturating_sub(1));
        let anchor = stamp.map_or(last_voiced_seen, |s| s.arrived);
        let audio_end_ms = last_voiced_end * 1000 / PIPELINE_RATE as u64;
        self.io.output.event(ServerEvent::SpeechStopped { turn, audio_end_ms }).await?;
        // Keep the speech and ~100 ms after it; the trailing silence only costs encoder time.
        let trailing = (position - last_voiced_end) as usize;
        let keep = self.utterance.len().saturating_sub(trailing.saturating_sub(PIPELINE_RATE as usize / 10));
        let audio = self.utterance[..keep].to_vec();
        let marks = vec![(mark::SPEECH_END, last_voiced_seen), (mark::ENDPOINT, endpoint)];
        self.start_reply(turn, Input::Speech(audio), anchor, marks, stamp.map_or(0, |s| s.client_ts_us));
        Ok(())
    }

    fn start_reply(
        &mut self,
        turn: u64,
        input: Input,
        anchor: Instant,
        marks: Vec<(&'static str, Instant)>,
        ref_ts_us: u64,
    ) {
        let cancel = Arc::new(AtomicBool::new(false));
        let previous = self.reply.take().map(|r| r.task);
        let ctx = ReplyContext {
            engines: self.engines.clone(),
            config: self.config.clone(),
            output: self.io.output.clone(),
            history: self.history.clone(),
            cancel: cancel.clone(),
            turn,
            anchor,
            marks,
            ref_ts_us,
        };
        let span = tracing::info_span!("turn", turn);
        let task = tokio::spawn(
            async move {
                // The previous reply (already cancelled) must finish writing its history first.
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                if let Err(SessionClosed) = ctx.run(input).await {
                    tracing::debug!("session closed during the reply");
                }
            }
            .instrument(span),
        );
        self.reply = Some(Reply { turn, cancel, task });
    }

    /// Stops the reply in progress, if any: generation stops and unsent audio is dropped.
    fn cancel_reply(&mut self, reason: CancelReason) {
        if let Some(reply) = &self.reply
            && (!reply.task.is_finished() || self.io.output.is_playing() == Some(reply.turn))
        {
            reply.cancel.store(true, Ordering::Relaxed);
            self.io.output.cancel(reply.turn, reason);
        }
    }
}

/// The `error` event for a failed model job: `busy` when the engine's queue was full (the client
/// may retry), `internal` otherwise. The session goes on either way.
fn engine_error(what: &str, e: &EngineError) -> ServerEvent {
    tracing::warn!(error = %e, "{what}");
    let code = if matches!(e, EngineError::Busy(_)) { ErrorCode::Busy } else { ErrorCode::Internal };
    ServerEvent::error(code, format!("{what}: {e}"))
}

/// The session ended (or the server aborted its worker): stop the reply, including the LLM job
/// on its engine thread, which checks the cancel flag at every token.
impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            reply.cancel.store(true, Ordering::Relaxed);
            reply.task.abort();
        }
    }
}

/// What the user said: recorded speech, or typed text.
enum Input {
    Speech(Vec<f32>),
    Text(String),
}

/// Everything one reply task needs.
struct ReplyContext {
    engines: Arc<Engines>,
    config: Arc<VoiceConfig>,
    output: super::ReplyOutput,
    history: Arc<Mutex<Vec<Message>>>,
    cancel: Arc<AtomicBool>,
    turn: u64,
    anchor: Instant,
    marks: Vec<(&'static str, Instant)>,
    ref_ts_us: u64,
}

/// One synthesized chunk of the reply.
struct Spoken {
    text: String,
    audio_ms: f64,
}

impl ReplyContext {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    async fn run(mut self, input: Input) -> Result<(), SessionClosed> {
        let turn = self.turn;
        let user_text = match input {
            Input::Text(text) => text,
            Input::Speech(audio) => {
                let result = self.engines.asr.try_run(Priority::High, move |asr| asr.transcribe(&audio)).await;
                let transcript = match result {
                    Ok(t) => t,
                    Err(e) => {
                        self.output.event(engine_error("speech recognition failed", &e)).await?;
                        return self.output.audio_end(turn).await;
                    }
                };
                self.marks.push((mark::ASR_FINAL, Instant::now()));
                let text = transcript.text.trim().to_string();
                self.output.event(ServerEvent::TranscriptionCompleted { turn, transcript: text.clone() }).await?;
                text
            }
        };
        if user_text.is_empty() || self.cancelled() {
            // Nothing intelligible was said (or the user went on): no reply.
            return self.output.audio_end(turn).await;
        }
        let messages = {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            history.push(Message::user(user_text));
            let excess = history.len().saturating_sub(MAX_HISTORY_MESSAGES);
            history.drain(..excess);
            let mut messages = vec![Message::system(self.config.system_prompt.clone())];
            messages.extend(history.iter().cloned());
            messages
        };
        let spoken = self.speak(messages).await?;
        // History keeps only what the user heard.
        let heard = spoken.trim().to_string();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if !heard.is_empty() {
            history.push(Message::assistant(heard));
        }
        Ok(())
    }

    /// Generates the reply and speaks it chunk by chunk; returns the text the user heard.
    async fn speak(&mut self, messages: Vec<Message>) -> Result<String, SessionClosed> {
        let turn = self.turn;
        let (delta_tx, mut delta_rx) = mpsc::channel::<String>(DELTA_QUEUE);
        let cancel = self.cancel.clone();
        let max_tokens = self.config.max_reply_tokens;
        let llm = self.engines.llm.clone();
        let generation = tokio::spawn(async move {
            llm.try_run(Priority::High, move |llm| {
                llm.generate(&messages, max_tokens, |delta| {
                    if cancel.load(Ordering::Relaxed) || delta_tx.blocking_send(delta.to_string()).is_err() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
            })
            .await
        });

        let (clause_tx, clause_rx) = mpsc::channel::<Piece>(CLAUSE_QUEUE);
        let tts_stage = tokio::spawn(tts_stage(
            self.engines.clone(),
            self.output.clone(),
            self.cancel.clone(),
            turn,
            self.ref_ts_us,
            clause_rx,
            TurnMarks { turn, anchor: self.anchor, marks: std::mem::take(&mut self.marks) },
        ));

        let mut chunker = Chunker::new();
        let mut text = String::new();
        let mut first_token_seen = false;
        while let Some(delta) = delta_rx.recv().await {
            if !first_token_seen {
                let now = Instant::now();
                first_token_seen = true;
                let _ = clause_tx.send(Piece::FirstToken(now)).await;
            }
            text.push_str(&delta);
            self.output.event(ServerEvent::ResponseTextDelta { turn, delta: delta.clone() }).await?;
            for clause in chunker.push(&delta) {
                if clause_tx.send(Piece::Clause(clause)).await.is_err() {
                    break;
                }
            }
        }
        if let Some(rest) = chunker.finish() {
            let _ = clause_tx.send(Piece::Clause(rest)).await;
        }
        drop(clause_tx);
        let failure = match generation.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(EngineError::Stopped(if e.is_panic() { "llm (panicked)" } else { "llm" })),
        };
        if let Some(e) = failure {
            self.output.event(engine_error("reply generation failed", &e)).await?;
        }
        self.output.event(ServerEvent::ResponseTextDone { turn, text: text.trim().to_string() }).await?;
        let spoken = tts_stage.await.unwrap_or_default();
        self.output.audio_end(turn).await?;
        if !self.cancelled() {
            return Ok(join_text(&spoken));
        }
        match self.output.played_ms_after_cancel(turn).await {
            Some(played_ms) => Ok(heard_text(&spoken, played_ms as f64)),
            None => {
                // No audio of this turn reached the pacer: nothing was heard, and the pacer has
                // not reported the cancel, so it is reported here.
                let reason = self.output.cancel_reason();
                self.output.event(ServerEvent::ReplyCancelled { turn, reason, played_ms: 0, sent_ms: 0 }).await?;
                Ok(String::new())
            }
        }
    }
}

/// What the reply task hands its TTS stage.
enum Piece {
    /// The first reply token arrived at this time (a latency mark).
    FirstToken(Instant),
    /// A chunk of text to speak.
    Clause(String),
}

/// Synthesizes clauses in order and hands the audio to the session; returns what was synthesized.
async fn tts_stage(
    engines: Arc<Engines>,
    output: super::ReplyOutput,
    cancel: Arc<AtomicBool>,
    turn: u64,
    ref_ts_us: u64,
    mut clauses: mpsc::Receiver<Piece>,
    mut marks: TurnMarks,
) -> Vec<Spoken> {
    let mut spoken = Vec::new();
    let rate = engines.tts_rate;
    while let Some(piece) = clauses.recv().await {
        let clause = match piece {
            Piece::FirstToken(at) => {
                marks.marks.push((mark::FIRST_TOKEN, at));
                continue;
            }
            Piece::Clause(clause) => clause,
        };
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let first = spoken.is_empty();
        if first {
            marks.marks.push((mark::FIRST_CHUNK_SAFE, Instant::now()));
        }
        let priority = if first { Priority::High } else { Priority::Low };
        let text = clause.clone();
        let audio = match engines.tts.try_run(priority, move |tts| tts.synthesize(&text)).await {
            Ok(audio) => audio,
            Err(e) => {
                let _ = output.event(engine_error("speech synthesis failed", &e)).await;
                break;
            }
        };
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        if first {
            marks.marks.push((mark::FIRST_AUDIO, Instant::now()));
            if output.marks(marks.clone()).await.is_err() {
                break;
            }
        }
        let audio_ms = audio.len() as f64 * 1000.0 / rate as f64;
        spoken.push(Spoken { text: clause, audio_ms });
        if output.audio(turn, audio, rate, ref_ts_us).await.is_err() {
            break;
        }
    }
    spoken
}

fn join_text(spoken: &[Spoken]) -> String {
    spoken.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ")
}

/// The reply text the user heard after a cancel: the chunks whose audio had played by then, the
/// last one cut in proportion to how much of it played.
fn heard_text(spoken: &[Spoken], played_ms: f64) -> String {
    let mut heard = Vec::new();
    let mut start = 0.0;
    for chunk in spoken {
        let end = start + chunk.audio_ms;
        if end <= played_ms {
            heard.push(chunk.text.clone());
        } else {
            let fraction = ((played_ms - start) / chunk.audio_ms).clamp(0.0, 1.0);
            let words: Vec<&str> = chunk.text.split_whitespace().collect();
            let n = (words.len() as f64 * fraction).floor() as usize;
            if n > 0 {
                heard.push(words[..n].join(" "));
            }
            break;
        }
        start = end;
    }
    heard.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoken(parts: &[(&str, f64)]) -> Vec<Spoken> {
        parts.iter().map(|(text, audio_ms)| Spoken { text: text.to_string(), audio_ms: *audio_ms }).collect()
    }

    #[test]
    fn history_keeps_only_what_was_played() {
        let reply = spoken(&[("Sure, the capital of France", 1000.0), ("is Paris, a lovely city.", 2000.0)]);
        assert_eq!(join_text(&reply), "Sure, the capital of France is Paris, a lovely city.");
        assert_eq!(heard_text(&reply, 0.0), "");
        assert_eq!(heard_text(&reply, 1000.0), "Sure, the capital of France");
        // Half of the second chunk: half of its words.
        assert_eq!(heard_text(&reply, 2000.0), "Sure, the capital of France is Paris,");
        assert_eq!(heard_text(&reply, 9000.0), "Sure, the capital of France is Paris, a lovely city.");
    }
}
