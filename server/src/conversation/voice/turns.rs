//! Turn taking: one worker per session reads the 16 kHz input in 32 ms VAD chunks, recognises speech ahead of the endpoint, starts replies (held while the turn is only tentatively over) and cancels them on barge-in.
use super::VoiceConfig;
use crate::audio::PIPELINE_RATE;
use crate::conversation::{Command, Hold, ReplyOutput, SessionClosed, SessionIo};
use crate::engine::{Engine, EngineError, Priority};
use crate::models::asr::{Settled, Transcript};
use crate::models::llm::{Llm, Message};
use crate::models::vad::{CHUNK_SAMPLES, VadState};
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, mark};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::ending::ending_before;
use super::engines::{Engines, engine_error};
use super::gates::Gates;
use super::reply::{Plan, ReplyContext, ReplyRunning};
use crate::conversation::history::History;
use crate::conversation::{Notice, Settings};
/// Longest user turn, in samples (30 s: Whisper's window); a longer one is ended there.
pub(super) const MAX_UTTERANCE: usize = 30 * PIPELINE_RATE as usize;

/// What the end-of-turn model hears of a turn, in samples: its last 8 s, its whole window.
pub(super) const SOUND_SAMPLES: usize = 8 * PIPELINE_RATE as usize;

/// Audio kept before the detected speech start, in VAD chunks (256 ms: onsets are quiet). With
/// 192 ms the "St" of "Stop, tell me about the weather" was lost and Whisper heard "I'll tell me"
/// or "about whoever"; with 320 ms, "pipe bomb" became "pipe-arm" (espeak-ng speech).
pub(super) const PRE_ROLL_CHUNKS: usize = 8;

/// Milliseconds per VAD chunk.
pub(super) const CHUNK_MS: u32 = (CHUNK_SAMPLES as u32 * 1000) / PIPELINE_RATE;

/// Conversation keys of the LLM's per-conversation KV caches (key 0 is `Llm::generate`'s).
pub(super) static NEXT_CONVERSATION: AtomicU64 = AtomicU64::new(1);

pub(super) enum Turn {
    /// Waiting for speech; `voiced` consecutive voiced chunks so far.
    Idle { voiced: usize },
    /// The user is speaking.
    Speech { turn: u64, last_voiced_end: u64, last_voiced_seen: Instant, silence_ms: u32 },
}

/// Speech being recognised ahead of the reply, for the speech up to `last_voiced_end`.
pub(super) struct EarlyAsr {
    pub(super) last_voiced_end: u64,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) task: JoinHandle<Result<Transcript, EngineError>>,
    /// The turn as heard when recognition started, for the end-of-turn model.
    pub(super) sound: Arc<PauseSound>,
}

/// Speech recognised while the user is still speaking, every `partial_every_ms` of it.
#[derive(Default)]
pub(super) struct Partial {
    /// Utterance samples the latest pass started from.
    pub(super) covered: usize,
    pub(super) settled: Settled,
    /// The settled words sent as transcription deltas so far.
    pub(super) text: String,
    pub(super) running: Option<Pass>,
}

/// A pass in progress: the flag that stops it, and its task (what is settled after it, as tokens
/// and as text).
pub(super) struct Pass {
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) task: JoinHandle<Result<(Settled, String), EngineError>>,
}

/// A reply in progress: its task and the flag that stops it.
pub(super) struct Reply {
    pub(super) turn: u64,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) task: JoinHandle<()>,
    /// Set while the reply was started ahead of the endpoint and its output is still held.
    pub(super) hold: Option<Arc<Hold>>,
}

pub(super) struct Worker {
    pub(super) engines: Arc<Engines>,
    pub(super) config: Arc<VoiceConfig>,
    pub(super) io: SessionIo,
    pub(super) vad_state: Option<VadState>,
    /// The VAD failed on the last chunk (already reported; chunks count as silence meanwhile).
    pub(super) vad_failing: bool,
    pub(super) chunk: [f32; CHUNK_SAMPLES],
    pub(super) utterance: Vec<f32>,
    pub(super) pre_roll: Vec<f32>,
    pub(super) state: Turn,
    pub(super) turn: u64,
    pub(super) history: Arc<History>,
    /// How turns are taken and replies made (the transport may change them).
    pub(super) settings: Settings,
    /// This session's key for the LLM's per-conversation KV cache.
    pub(super) conversation: u64,
    pub(super) reply: Option<Reply>,
    pub(super) partial: Partial,
    pub(super) early_asr: Option<EarlyAsr>,
}

impl Worker {
    pub(super) fn new(engines: Arc<Engines>, config: Arc<VoiceConfig>, io: SessionIo) -> Self {
        Self {
            engines,
            config,
            vad_state: Some(VadState::new()),
            vad_failing: false,
            chunk: [0.0; CHUNK_SAMPLES],
            utterance: Vec::with_capacity(MAX_UTTERANCE),
            pre_roll: Vec::with_capacity(PRE_ROLL_CHUNKS * CHUNK_SAMPLES),
            state: Turn::Idle { voiced: 0 },
            turn: 0,
            history: io.history.clone(),
            settings: Settings::default(),
            conversation: NEXT_CONVERSATION.fetch_add(1, Ordering::Relaxed),
            reply: None,
            partial: Partial::default(),
            early_asr: None,
            io,
        }
    }

    pub(super) async fn run(mut self) -> Result<(), SessionClosed> {
        self.prefill(String::new());
        loop {
            while self.io.audio.available() >= CHUNK_SAMPLES {
                self.io.audio.pop(&mut self.chunk);
                self.on_chunk().await?;
            }
            tokio::select! {
                _ = self.io.audio.wait_for(CHUNK_SAMPLES) => {}
                command = self.io.commands.recv() => match command {
                    Some(command) => self.on_command(command).await?,
                    None => return Ok(()),
                },
            }
        }
    }

    async fn on_command(&mut self, command: Command) -> Result<(), SessionClosed> {
        let now = Instant::now();
        let marks = vec![(mark::ENDPOINT, now)];
        let output = self.io.output.clone();
        match command {
            Command::Text(text) => {
                self.cancel_reply(CancelReason::BargeIn).await;
                self.turn += 1;
                let plan = Plan { respond: true, ..self.plan() };
                self.start_reply(self.turn, Input::Text(text), plan, now, marks, 0, output, None);
            }
            Command::Cancel => self.cancel_reply(CancelReason::ClientCancel).await,
            Command::Configure(settings) => {
                if !settings.detect_turns && self.settings.detect_turns {
                    // The client takes turns now: speech under way is dropped.
                    self.state = Turn::Idle { voiced: 0 };
                    self.drop_partial();
                    self.drop_early_asr();
                    self.discard_held().await;
                }
                self.settings = settings;
                self.prefill(String::new());
            }
            Command::Commit { audio, request } => {
                self.turn += 1;
                self.io.output.notice(Notice::Started { turn: self.turn, request }).await?;
                let plan = Plan { respond: false, ..self.plan() };
                self.start_reply(self.turn, Input::Speech(audio, Vec::new()), plan, now, marks, 0, output, None);
            }
            Command::Respond(respond) => {
                self.turn += 1;
                self.io.output.notice(Notice::Started { turn: self.turn, request: respond.request }).await?;
                let base = self.plan();
                let plan = Plan {
                    respond: true,
                    audio: respond.audio,
                    in_conversation: respond.in_conversation,
                    system: respond.instructions.unwrap_or(base.system),
                    input: respond.input,
                    max_tokens: respond.max_tokens.unwrap_or(base.max_tokens),
                };
                self.start_reply(self.turn, Input::Conversation, plan, now, marks, 0, output, None);
            }
        }
        Ok(())
    }

    /// What a reply does under the session's settings.
    fn plan(&self) -> Plan {
        Plan {
            respond: self.settings.create_response,
            audio: true,
            in_conversation: true,
            system: self.settings.instructions.clone().unwrap_or_else(|| self.config.system_prompt.clone()),
            input: None,
            max_tokens: self.settings.max_tokens.unwrap_or(self.config.max_reply_tokens),
        }
    }

    /// Scores one 32 ms chunk and advances the turn state.
    pub(super) async fn on_chunk(&mut self) -> Result<(), SessionClosed> {
        if !self.settings.detect_turns {
            // The client takes turns (and commits its audio itself).
            return Ok(());
        }
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
                    let replying = self.reply.as_ref().is_some_and(|r| !r.task.is_finished());
                    if self.settings.interrupt_response {
                        self.cancel_reply(CancelReason::BargeIn).await;
                    }
                    self.turn += 1;
                    let turn = self.turn;
                    self.utterance.clear();
                    self.utterance.extend_from_slice(&self.pre_roll);
                    self.drop_partial();
                    if !replying {
                        // The history is final (a cut reply writes what was heard once it stops).
                        self.prefill(String::new());
                    }
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
                let (turn, last_voiced_end, last_voiced_seen, silence_ms) =
                    (*turn, *last_voiced_end, *last_voiced_seen, *silence_ms);
                if silence_ms == 0 {
                    // The user went on: speech recognised and a reply started ahead are dropped.
                    self.drop_early_asr();
                    self.discard_held().await;
                    self.listen_ahead(turn).await?;
                } else if let Some(pass) = &self.partial.running {
                    // A pass still running would hold up the recognition at the pause.
                    pass.cancel.store(true, Ordering::Relaxed);
                }
                let held = self.reply.as_ref().and_then(|r| r.hold.as_ref());
                let complete = held.and_then(|h| h.complete()) == Some(true);
                let full = self.utterance.len() + CHUNK_SAMPLES > MAX_UTTERANCE;
                // This session's own reply (one the user just talked over, still stopping) is not
                // another session's.
                let own = usize::from(self.reply.as_ref().is_some_and(|r| !r.task.is_finished()));
                let (asr_ahead_ms, speculate_after_ms) = if self.engines.replies_running.load(Ordering::Relaxed) > own {
                    (config.busy_asr_ahead_ms, config.busy_speculate_after_ms)
                } else {
                    (config.asr_ahead_ms, config.speculate_after_ms)
                };
                if silence_ms >= config.endpoint_silence_ms
                    || (complete && silence_ms >= config.endpoint_complete_ms)
                    || full
                {
                    self.state = Turn::Idle { voiced: 0 };
                    self.end_turn(turn, last_voiced_end, last_voiced_seen, position).await?;
                } else if speculate_after_ms > 0
                    && silence_ms >= speculate_after_ms
                    && held.is_none()
                    && self.settings.create_response
                {
                    self.start_held(turn, last_voiced_end, last_voiced_seen, position);
                } else if asr_ahead_ms > 0 && silence_ms >= asr_ahead_ms && self.early_asr.is_none() && held.is_none() {
                    self.start_early_asr(last_voiced_end, position);
                }
            }
        }
        Ok(())
    }

    /// Runs the VAD on the current chunk. An engine failure is reported and counts as silence.
    pub(super) async fn vad(&mut self) -> Result<f32, SessionClosed> {
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
        let failure = match result {
            Ok((state, Ok(prob))) => {
                self.vad_state = Some(state);
                self.vad_failing = false;
                return Ok(prob);
            }
            Ok((state, Err(e))) => {
                self.vad_state = Some(state);
                EngineError::from(e)
            }
            Err(e) => e,
        };
        // One error per run of failures (not one per 32 ms chunk while the engine is busy).
        if !self.vad_failing {
            self.vad_failing = true;
            self.io.output.event(engine_error("voice activity detection failed", &failure)).await?;
        }
        Ok(0.0)
    }

    /// The user stopped speaking: announce it, then release the reply started ahead or start one.
    pub(super) async fn end_turn(
        &mut self,
        turn: u64,
        last_voiced_end: u64,
        last_voiced_seen: Instant,
        position: u64,
    ) -> Result<(), SessionClosed> {
        let endpoint = Instant::now();
        let audio_end_ms = last_voiced_end * 1000 / PIPELINE_RATE as u64;
        self.io.output.event(ServerEvent::SpeechStopped { turn, audio_end_ms }).await?;
        // A held reply covers all of the speech: any voiced chunk since would have dropped it.
        if let Some(hold) = self.reply.as_mut().and_then(|r| r.hold.take()) {
            self.engines.speculation_used.fetch_add(1, Ordering::Relaxed);
            // Off the worker: what waited may fill the pacer's queue.
            tokio::spawn(async move { hold.release().await });
            return Ok(());
        }
        let (anchor, ref_ts_us) = self.anchor(last_voiced_end, last_voiced_seen);
        let marks = vec![(mark::SPEECH_END, last_voiced_seen), (mark::ENDPOINT, endpoint)];
        let (input, _) = self.input(last_voiced_end, position);
        let output = self.io.output.clone();
        self.start_reply(turn, input, self.plan(), anchor, marks, ref_ts_us, output, None);
        Ok(())
    }

    /// The turn's latency anchor: when the frame holding the last voiced sample arrived, and the
    /// client's timestamp of that frame.
    pub(super) fn anchor(&self, last_voiced_end: u64, last_voiced_seen: Instant) -> (Instant, u64) {
        let stamp = self.io.audio.stamp_at(last_voiced_end.saturating_sub(1));
        (stamp.map_or(last_voiced_seen, |s| s.arrived), stamp.map_or(0, |s| s.client_ts_us))
    }

    /// The turn's speech for its reply: being recognised already (with the pause's sound as heard
    /// then), or to recognise.
    pub(super) fn input(&mut self, last_voiced_end: u64, position: u64) -> (Input, Option<Arc<PauseSound>>) {
        match self.early_asr.take() {
            Some(early) if early.last_voiced_end == last_voiced_end => {
                (Input::Recognised(early.task), Some(early.sound))
            }
            other => {
                if let Some(stale) = other {
                    stale.cancel.store(true, Ordering::Relaxed);
                }
                (Input::Speech(self.speech(last_voiced_end, position), self.partial.settled.ids.clone()), None)
            }
        }
    }

    /// The user may have stopped: recognise the speech so far now, so the reply that may follow
    /// has its transcript sooner. If its words leave the ending open, the end-of-turn model hears
    /// the pause right after, while no reply is being made: the held reply that follows finds its
    /// verdict made, instead of making it beside its own reply model and synthesizer.
    pub(super) fn start_early_asr(&mut self, last_voiced_end: u64, position: u64) {
        let audio = self.speech(last_voiced_end, position);
        let sound = PauseSound::new(&self.utterance);
        let cancel = Arc::new(AtomicBool::new(false));
        let (engines, flag, settled) = (self.engines.clone(), cancel.clone(), self.partial.settled.ids.clone());
        let (ahead, stale, listening) = (sound.clone(), cancel.clone(), self.config.end_of_turn_model);
        let task = tokio::spawn(async move {
            let asr = engines.asr.try_run(Priority::High, move |asr| asr.transcribe_unless(&audio, &settled, &flag));
            let transcript = asr.await?;
            let open = ending_before(transcript.text.trim(), transcript.cut_short.as_deref()).is_open();
            // (Not `cores_idle`: the recognizer may not have marked its job done yet.)
            let idle = engines.llm.idle() && engines.tts.idle();
            if listening && open && idle && !stale.load(Ordering::Relaxed) {
                tokio::spawn(async move { ahead.verdict(&engines, Made::Ahead).await });
            }
            Ok(transcript)
        });
        self.early_asr = Some(EarlyAsr { last_voiced_end, cancel, task, sound });
    }

    /// While the user speaks: takes in the pass over the speech so far that finished, and starts
    /// the next when `partial_every_ms` more speech came and the recognizer, the reply model and
    /// the synthesizer are idle (passes are a head start, not worth slowing any reply for: under
    /// load they would make other sessions' reply audio late). Words newly settled are sent as a
    /// transcription delta of `turn`.
    pub(super) async fn listen_ahead(&mut self, turn: u64) -> Result<(), SessionClosed> {
        if let Some(pass) = self.partial.running.take_if(|pass| pass.task.is_finished())
            && let Ok(Ok((settled, text))) = pass.task.await
        {
            let grew = settled.ids.len() > self.partial.settled.ids.len();
            self.partial.settled = settled;
            if grew {
                self.prefill(text.clone());
                if let Some(delta) = text.strip_prefix(self.partial.text.as_str()).filter(|d| !d.trim().is_empty()) {
                    let delta = delta.to_string();
                    self.partial.text = text;
                    self.io.output.event(ServerEvent::TranscriptionDelta { turn, delta }).await?;
                }
            }
        }
        let every = (self.config.partial_every_ms * PIPELINE_RATE / 1000) as usize;
        if every == 0
            || self.partial.running.is_some()
            || self.utterance.len() < self.partial.covered + every
            || !self.engines.cores_idle()
        {
            return Ok(());
        }
        let audio = self.utterance.clone();
        self.partial.covered = audio.len();
        let cancel = Arc::new(AtomicBool::new(false));
        let (asr, flag, mut settled) = (self.engines.asr.clone(), cancel.clone(), self.partial.settled.clone());
        let task = tokio::spawn(async move {
            asr.try_run(Priority::Low, move |asr| {
                asr.transcribe_partial(&audio, &mut settled, &flag)?;
                let text = asr.text(&settled.ids)?;
                Ok((settled, text))
            })
            .await
        });
        self.partial.running = Some(Pass { cancel, task });
        Ok(())
    }

    /// Puts the conversation so far and the start of what the user is saying into this session's
    /// KV cache, so the reply prefills only the rest: at session start (the system prompt), when
    /// the user starts speaking (in case another conversation took the cache) and as their words
    /// settle; the reply task does it too once the history has its exchange.
    pub(super) fn prefill(&self, user_start: String) {
        let plan = self.plan();
        let messages = prompt(&plan.system, &self.history.messages(), Some(user_start));
        prefill(&self.engines.llm, self.conversation, messages, plan.max_tokens);
    }

    /// A new utterance: what was recognised of the last one is dropped.
    pub(super) fn drop_partial(&mut self) {
        if let Some(pass) = self.partial.running.take() {
            pass.cancel.store(true, Ordering::Relaxed);
        }
        self.partial = Partial::default();
    }

    /// The user went on: speech recognised ahead is stale; its decoding stops at the next token.
    pub(super) fn drop_early_asr(&mut self) {
        if let Some(early) = self.early_asr.take() {
            early.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// The utterance's speech and ~100 ms after it (the trailing silence only costs encoder time).
    pub(super) fn speech(&self, last_voiced_end: u64, position: u64) -> Vec<f32> {
        let trailing = (position - last_voiced_end) as usize;
        let keep = self.utterance.len().saturating_sub(trailing.saturating_sub(PIPELINE_RATE as usize / 10));
        self.utterance[..keep].to_vec()
    }

    /// The user paused: the turn is judged tentatively over and its reply starts now, held, so
    /// recognition, the gates, generation and synthesis run during the pause.
    pub(super) fn start_held(&mut self, turn: u64, last_voiced_end: u64, last_voiced_seen: Instant, position: u64) {
        let (anchor, ref_ts_us) = self.anchor(last_voiced_end, last_voiced_seen);
        let marks = vec![(mark::SPEECH_END, last_voiced_seen), (mark::ENDPOINT, Instant::now())];
        let (input, sound) = self.input(last_voiced_end, position);
        let sound = sound.unwrap_or_else(|| PauseSound::new(&self.utterance));
        let (output, hold) = self.io.output.held();
        self.start_reply(turn, input, self.plan(), anchor, marks, ref_ts_us, output, Some((hold, sound)));
    }

    /// Drops a reply whose output is still held (the user went on): nothing of it is sent.
    pub(super) async fn discard_held(&mut self) {
        if let Some(reply) = &mut self.reply
            && let Some(hold) = reply.hold.take()
        {
            reply.cancel.store(true, Ordering::Relaxed);
            hold.discard().await;
            self.engines.speculation_stale.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_reply(
        &mut self,
        turn: u64,
        input: Input,
        plan: Plan,
        anchor: Instant,
        marks: Vec<(&'static str, Instant)>,
        ref_ts_us: u64,
        output: ReplyOutput,
        held: Option<(Arc<Hold>, Arc<PauseSound>)>,
    ) {
        let (hold, sound) = held.unzip();
        let cancel = Arc::new(AtomicBool::new(false));
        let previous = self.reply.take().map(|r| r.task);
        let gates = Gates {
            engines: self.engines.clone(),
            output: output.clone(),
            session: self.io.session_id.as_str().into(),
            key: self.io.key_id.clone(),
            turn,
        };
        let running = ReplyRunning::new(&self.engines);
        let ctx = ReplyContext {
            engines: self.engines.clone(),
            config: self.config.clone(),
            output,
            history: self.history.clone(),
            plan,
            conversation: self.conversation,
            cancel: cancel.clone(),
            gates,
            turn,
            anchor,
            marks,
            ref_ts_us,
            sound,
            running: running.clone(),
        };
        let span = tracing::info_span!("turn", turn);
        let task = tokio::spawn(
            async move {
                let _running = running;
                // The previous reply (already cancelled) must finish writing its history first.
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                let output = ctx.output.clone();
                if ctx.run(input).await.and(output.notice(Notice::Done { turn }).await).is_err() {
                    tracing::debug!("session closed during the reply");
                }
            }
            .instrument(span),
        );
        self.reply = Some(Reply { turn, cancel, task, hold });
    }

    /// Stops the reply in progress, if any: generation stops and unsent audio is dropped.
    pub(super) async fn cancel_reply(&mut self, reason: CancelReason) {
        if self.reply.as_ref().is_some_and(|r| r.hold.is_some()) {
            // Nothing of a held reply reached the session: dropping it is all (cancelling its turn
            // at the pacer would also drop the reply that turn gets once the user stops).
            self.discard_held().await;
            return;
        }
        if let Some(reply) = &self.reply
            && (!reply.task.is_finished() || self.io.output.is_playing() == Some(reply.turn))
        {
            reply.cancel.store(true, Ordering::Relaxed);
            self.io.output.cancel(reply.turn, reason);
        }
    }
}

/// The session ended (or the server aborted its worker): stop the reply, including the LLM job
/// on its engine thread, which checks the cancel flag at every token.
impl Drop for Worker {
    fn drop(&mut self) {
        self.drop_early_asr();
        self.drop_partial();
        if let Some(reply) = self.reply.take() {
            reply.cancel.store(true, Ordering::Relaxed);
            reply.task.abort();
        }
    }
}

/// Tokens of a background prefill run in one engine job: another session's reply waits for one
/// slice (~50 ms at 600 tokens of context on 2 busy cores), not for the whole re-prefill after a
/// context drop (0.77–0.99 s for 570–670 tokens at 4 sessions: 8 in 14 rounds of 4 x 15 turns).
pub(super) const PREFILL_SLICE: usize = 32;

/// Puts the conversation `history` and the start of the user's next message into conversation
/// `key`'s KV cache, so that the reply prefills only what follows. Background jobs at low
/// priority, [`PREFILL_SLICE`] tokens each; nothing waits for them.
pub(super) fn prefill(llm: &Engine<Llm>, key: u64, messages: Vec<Message>, max_tokens: usize) {
    let (messages, llm) = (Arc::new(messages), llm.clone());
    tokio::spawn(
        async move {
            let (started, mut slices) = (Instant::now(), 0);
            loop {
                let messages = messages.clone();
                let slice = move |llm: &mut Llm| llm.prefill(key, &messages, max_tokens, PREFILL_SLICE);
                slices += 1;
                match llm.try_run(Priority::Low, slice).await {
                    Ok(false) => continue,
                    Ok(true) => break,
                    Err(e) => return tracing::debug!(error = %e, "prefill failed"),
                }
            }
            if slices > 1 {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::debug!(slices, ms, "conversation prefilled in slices");
            }
        }
        .in_current_span(),
    );
}

/// The reply model's input: the system prompt, the conversation so far, and what the user says
/// (when it is not in the conversation yet).
pub(super) fn prompt(system: &str, history: &[Message], user: Option<String>) -> Vec<Message> {
    let mut messages = vec![Message::system(system)];
    messages.extend(history.iter().cloned());
    messages.extend(user.map(Message::user));
    messages
}

/// The turn as heard at a pause (its last 8 s, the pause so far included) and the end-of-turn
/// model's verdict on it, made once: ahead, by the recognition at the pause, or by the reply.
pub(super) struct PauseSound {
    pub(super) audio: Arc<[f32]>,
    pub(super) verdict: tokio::sync::OnceCell<f32>,
    /// A verdict is being (or was) made.
    pub(super) started: AtomicBool,
}

impl PauseSound {
    pub(super) fn new(utterance: &[f32]) -> Arc<Self> {
        let audio = Arc::from(&utterance[utterance.len().saturating_sub(SOUND_SAMPLES)..]);
        Arc::new(PauseSound { audio, verdict: tokio::sync::OnceCell::new(), started: AtomicBool::new(false) })
    }

    /// Whether the end-of-turn model has heard (or is hearing) this pause.
    pub(super) fn heard(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// The end-of-turn model's probability that the turn is over: made now (counted as `made`),
    /// or awaited if it is being made.
    pub(super) async fn verdict(&self, engines: &Engines, made: Made) -> Result<f32, EngineError> {
        self.started.store(true, Ordering::Relaxed);
        let audio = self.audio.clone();
        let verdict = self.verdict.get_or_try_init(|| async move {
            let p = engines.turn.try_run(Priority::High, move |turn| turn.probability(&audio)).await?;
            engines.turn_verdicts[made as usize].fetch_add(1, Ordering::Relaxed);
            Ok(p)
        });
        verdict.await.copied()
    }
}

/// Who made an end-of-turn verdict: the recognition at the pause, or the reply.
#[derive(Clone, Copy)]
pub(super) enum Made {
    Ahead = 0,
    InReply = 1,
}

/// What the user said: recorded speech, speech already being recognised, or typed text.
pub(super) enum Input {
    /// The speech, and the token ids of its start already settled (see `Partial`).
    Speech(Vec<f32>, Vec<u32>),
    Recognised(JoinHandle<Result<Transcript, EngineError>>),
    Text(String),
    /// Nothing new: the reply answers the conversation as it is.
    Conversation,
}
