//! One reply: the transcript, the input gate, then the reply model (embedded or an external endpoint) streamed through the clause chunker to the speech stage; the history keeps what the user heard.
use super::VoiceConfig;
use crate::conversation::{ReplyOutput, SessionClosed, TurnMarks};
use crate::engine::{EngineError, Priority};
use crate::models::asr::Transcript;
use crate::models::llm::{Llm, Message};
use parley_protocol::ServerEvent;
use parley_protocol::event::{SafetyStage, mark};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::ending::{Ending, ending_before, turn_end_odds};
use super::engines::{Engines, engine_error};
use super::gates::Gates;
use super::speech::{FirstAudioWait, Piece, TtsStage};
use super::turns::{Input, Made, PauseSound, prefill, prompt};
use crate::conversation::Notice;
use crate::conversation::chunker::{Chunker, sentence_ends};
use crate::conversation::history::{self, History, Item, Spoken, join_text};
use crate::models::llm::Role;
use std::sync::atomic::AtomicUsize;
/// Text deltas buffered between the LLM thread and the reply task.
pub(super) const DELTA_QUEUE: usize = 256;

/// Clauses buffered between the reply task and its TTS stage.
pub(super) const CLAUSE_QUEUE: usize = 32;

/// Longest the reply model waits for the first chunk's synthesis (a bound, should the stage stall).
pub(super) const MAX_FIRST_AUDIO_WAIT: Duration = Duration::from_millis(1500);

/// What a reply is asked to do (the session's settings, or a requested reply's own).
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// Reply to the user's words; off: only transcribe them into the history.
    pub(super) respond: bool,
    /// Spoken; off: text only.
    pub(super) audio: bool,
    /// The exchange goes into the history; off: out of band.
    pub(super) in_conversation: bool,
    /// The system prompt.
    pub(super) system: String,
    /// Messages to answer instead of the history.
    pub(super) input: Option<Vec<Message>>,
    pub(super) max_tokens: usize,
}

/// Counts a reply in [`Engines::replies_running`] while its task lives, and in
/// [`Engines::first_audio_due`] until its first audio exists.
pub(super) struct ReplyRunning {
    pub(super) engines: Arc<Engines>,
    /// Still counted in [`Engines::first_audio_due`].
    pub(super) due: AtomicBool,
}

impl ReplyRunning {
    pub(super) fn new(engines: &Arc<Engines>) -> Arc<Self> {
        engines.replies_running.fetch_add(1, Ordering::Relaxed);
        engines.first_audio_due.send_modify(|n| *n += 1);
        Arc::new(ReplyRunning { engines: engines.clone(), due: AtomicBool::new(true) })
    }

    /// The reply's first audio exists (or never will).
    pub(super) fn first_audio_made(&self) {
        if self.due.swap(false, Ordering::Relaxed) {
            self.engines.first_audio_due.send_modify(|n| *n -= 1);
        }
    }
}

impl Drop for ReplyRunning {
    fn drop(&mut self) {
        self.first_audio_made();
        self.engines.replies_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything one reply task needs.
pub(super) struct ReplyContext {
    pub(super) engines: Arc<Engines>,
    pub(super) config: Arc<VoiceConfig>,
    pub(super) output: ReplyOutput,
    pub(super) history: Arc<History>,
    pub(super) plan: Plan,
    pub(super) conversation: u64,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) gates: Gates,
    pub(super) turn: u64,
    pub(super) anchor: Instant,
    pub(super) marks: Vec<(&'static str, Instant)>,
    pub(super) ref_ts_us: u64,
    /// A held reply's turn as heard at the pause (the end-of-turn model's input).
    pub(super) sound: Option<Arc<PauseSound>>,
    pub(super) running: Arc<ReplyRunning>,
}

/// What the reply says: the model's answer, or fixed words (the policy's response).
pub(super) enum Script {
    Generate(Vec<Message>),
    Say(String),
}

impl ReplyContext {
    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub(super) async fn run(mut self, input: Input) -> Result<(), SessionClosed> {
        let turn = self.turn;
        // The user's words, whether they are a new item of this turn, and whether they were spoken.
        let (user_text, ending, new_item, spoken_input) = match input {
            Input::Text(text) => (text, Ending::Finished, true, false),
            Input::Speech(audio, settled) => {
                let never = AtomicBool::new(false);
                let result = self
                    .engines
                    .asr
                    .try_run(Priority::High, move |asr| asr.transcribe_unless(&audio, &settled, &never))
                    .await;
                let (text, ending) = self.transcribed(result).await?;
                (text, ending, true, true)
            }
            Input::Recognised(task) => {
                let result = task.await.unwrap_or(Err(EngineError::Stopped("asr")));
                let (text, ending) = self.transcribed(result).await?;
                (text, ending, true, true)
            }
            Input::Conversation => {
                let asked = match &self.plan.input {
                    Some(input) => input.iter().rev().find(|m| m.role == Role::User).map(|m| m.text.clone()),
                    None => self.history.last_user_text(),
                };
                (asked.unwrap_or_default(), Ending::Finished, false, false)
            }
        };
        let user_item = |text: String| {
            let mut item = Item::new(history::user_item_id(turn), Role::User, text);
            item.audio = spoken_input;
            item
        };
        if (new_item && user_text.is_empty()) || self.cancelled() {
            // Nothing intelligible was said (or the user went on): no reply.
            return self.output.audio_end(turn).await;
        }
        if !self.plan.respond {
            // Transcribed only: the turn's words join the conversation, unanswered.
            self.history.push(user_item(user_text));
            return self.output.audio_end(turn).await;
        }
        // Input gate: before any reply starts. A gate that cannot run fails closed: no reply.
        // Meanwhile the reply model (on the LLM's cores) or the end-of-turn model judges a transcript
        // that is not plainly finished.
        let judge = self.output.is_held() && ending.is_open();
        let judged = async {
            if judge {
                self.judge_turn_end(&user_text, ending).await;
            }
        };
        let decision = async {
            match user_text.is_empty() {
                true => Ok(Some(None)),
                false => self.gates.content(SafetyStage::Input, &user_text).await.map(|d| d.map(Some)),
            }
        };
        let (decision, ()) = tokio::join!(decision, judged);
        let Some(decision) = decision? else {
            return self.output.audio_end(turn).await;
        };
        self.marks.push((mark::INPUT_SAFE, Instant::now()));
        self.output.notice(Notice::Reply { turn, audio: self.plan.audio }).await?;
        if let Some(decision) = decision.filter(|d| d.stops()) {
            // The policy's response, in the preset voice. The exchange stays out of the history.
            let response = self.gates.response(&decision);
            self.speak(Script::Say(response)).await?;
            return Ok(());
        }
        let messages = match &self.plan.input {
            Some(input) => prompt(&self.plan.system, input, None),
            None => prompt(&self.plan.system, &self.history.messages(), new_item.then(|| user_text.clone())),
        };
        let heard = self.speak(Script::Generate(messages)).await?;
        if self.output.discarded() || !self.plan.in_conversation {
            // Started ahead of an endpoint that never came (the exchange did not happen), or out
            // of band.
            return Ok(());
        }
        // History keeps only what the user heard.
        if new_item {
            self.history.push(user_item(user_text));
        }
        if !heard.is_empty() {
            let mut reply = Item::new(history::reply_item_id(turn), Role::Assistant, join_text(&heard));
            reply.audio = self.plan.audio;
            reply.spoken = heard;
            self.history.push(reply);
        }
        // The next prompt is known now: it prefills while the reply plays out and the user
        // answers (when old turns were dropped, that is the whole conversation: ~0.5 s).
        let messages = prompt(&self.plan.system, &self.history.messages(), Some(String::new()));
        prefill(&self.engines.llm, self.conversation, messages, self.plan.max_tokens);
        Ok(())
    }

    /// Whether a held reply's transcript that is not plainly finished reads as finished. An
    /// unpunctuated one does if the reply model finds a sentence end likely after it, or once the
    /// pause sounds finished enough to raise those odds; one cut short, if the pause sounds
    /// finished. The reply model's prefill stays in the conversation's cache for the reply; the
    /// reply does not wait for the end-of-turn model.
    pub(super) async fn judge_turn_end(&self, user_text: &str, ending: Ending) {
        let threshold = self.config.sentence_end_threshold;
        if ending == Ending::CutShort {
            let sure = self.config.cut_short_sound_threshold;
            return self.listen(move |sound| sound >= sure);
        }
        if threshold <= 0.0 {
            return;
        }
        let messages = prompt(&self.plan.system, &self.history.messages(), Some(user_text.to_string()));
        let (key, max_tokens) = (self.conversation, self.plan.max_tokens);
        let judged = self
            .engines
            .llm
            .try_run(Priority::High, move |llm| llm.sentence_end_probability(key, &messages, max_tokens))
            .await;
        match judged {
            Ok(words) if words >= threshold => self.output.set_complete(true),
            Ok(words) => self.listen(move |sound| turn_end_odds(words, sound) >= threshold),
            Err(e) => tracing::debug!(error = %e, "judging the sentence end failed"),
        }
    }

    /// Has the end-of-turn model's verdict on the held reply's pause (made ahead by the recognition
    /// at the pause, or now, alongside the reply); the turn reads as finished if `finished` says
    /// so of its probability. A verdict not made ahead is made only while no other reply is being
    /// made, as the passes ahead: its ~65 ms on the cores must not delay another session's reply
    /// (under load the endpoint seldom waits for the words anyway; 4 sessions × 15 turns with it
    /// always on gave v2v p50/p95 553/1,053 and 408/1,147 ms, without it 432/883 and 511/1,215).
    pub(super) fn listen(&self, finished: impl FnOnce(f32) -> bool + Send + 'static) {
        let Some(sound) = self.sound.clone() else { return };
        if !self.config.end_of_turn_model || !(sound.heard() || self.engines.cores_idle()) {
            return;
        }
        let (output, engines) = (self.output.clone(), self.engines.clone());
        tokio::spawn(async move {
            match sound.verdict(&engines, Made::InReply).await {
                Ok(p) => {
                    tracing::debug!(p, "the end-of-turn model heard the pause");
                    if finished(p) {
                        output.set_complete(true);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "the end-of-turn model failed"),
            }
        });
    }

    /// Announces the transcript and says how it ends; a failed recognition is reported and gives
    /// no text.
    pub(super) async fn transcribed(
        &mut self,
        result: Result<Transcript, EngineError>,
    ) -> Result<(String, Ending), SessionClosed> {
        match result {
            Ok(transcript) => {
                self.marks.push((mark::ASR_FINAL, Instant::now()));
                let text = transcript.text.trim().to_string();
                // Recognition stopped before a likelier word: the user may be mid-sentence.
                let ending = ending_before(&text, transcript.cut_short.as_deref());
                self.output.set_complete(ending == Ending::Finished);
                let turn = self.turn;
                self.output.event(ServerEvent::TranscriptionCompleted { turn, transcript: text.clone() }).await?;
                Ok((text, ending))
            }
            Err(e) => {
                self.output.event(engine_error("speech recognition failed", &e)).await?;
                Ok((String::new(), Ending::Hanging))
            }
        }
    }

    /// Speaks `script` chunk by chunk through the TTS stage; returns the chunks the user heard.
    pub(super) async fn speak(&mut self, script: Script) -> Result<Vec<Spoken>, SessionClosed> {
        let turn = self.turn;
        // Set by the TTS stage when a gate stops the reply: generation ends, the reply is not cancelled.
        let halt = Arc::new(AtomicBool::new(false));
        let (piece_tx, piece_rx) = mpsc::channel::<Piece>(CLAUSE_QUEUE);
        let first_audio = Arc::new(FirstAudioWait::new(self.running.clone()));
        let marks = TurnMarks { turn, anchor: self.anchor, marks: std::mem::take(&mut self.marks) };
        let stage = TtsStage::new(
            self.gates.clone(),
            self.cancel.clone(),
            halt.clone(),
            first_audio.clone(),
            self.ref_ts_us,
            self.plan.audio,
            marks,
        );
        let stage = tokio::spawn(stage.run(piece_rx).in_current_span());
        let usage = Arc::new(Usage::default());
        let failure = match script {
            Script::Say(text) => {
                // Sentence by sentence, so the first is heard while the rest is synthesized.
                let mut chunker = Chunker::new();
                let chunks = chunker.push(&text).into_iter().chain(chunker.finish());
                for chunk in chunks {
                    let _ = piece_tx.send(Piece::Say(chunk)).await;
                }
                None
            }
            Script::Generate(messages) => self.generate(messages, halt, &first_audio, &piece_tx, &usage).await,
        };
        drop(piece_tx);
        if let Some(e) = failure {
            self.output.event(engine_error("reply generation failed", &e)).await?;
        }
        let spoken = stage.await.unwrap_or_default();
        if self.output.discarded() {
            return Ok(Vec::new());
        }
        self.output.event(ServerEvent::ResponseTextDone { turn, text: join_text(&spoken) }).await?;
        let (input_tokens, output_tokens) = usage.tokens();
        self.output.notice(Notice::Usage { turn, input_tokens, output_tokens }).await?;
        self.output.audio_end(turn).await?;
        if !self.cancelled() {
            return Ok(spoken);
        }
        let played = match self.plan.audio {
            true => self.output.played_ms_after_cancel(turn).await,
            false => None,
        };
        match played {
            Some(played_ms) => Ok(history::heard(&spoken, played_ms as f64)),
            None => {
                // No audio of this turn reached the pacer, and the pacer has not reported the
                // cancel, so it is reported here. Of a spoken reply nothing was heard; a text
                // reply was read as it went out.
                let reason = self.output.cancel_reason();
                self.output.event(ServerEvent::ReplyCancelled { turn, reason, played_ms: 0, sent_ms: 0 }).await?;
                Ok(if self.plan.audio { Vec::new() } else { spoken })
            }
        }
    }

    /// Streams the model's reply into clauses for the TTS stage until it ends, the reply is
    /// cancelled or a gate halts it; returns the generation's failure, if any.
    pub(super) async fn generate(
        &self,
        messages: Vec<Message>,
        halt: Arc<AtomicBool>,
        first_audio: &Arc<FirstAudioWait>,
        pieces: &mpsc::Sender<Piece>,
        usage: &Arc<Usage>,
    ) -> Option<EngineError> {
        let (delta_tx, mut delta_rx) = mpsc::channel::<String>(DELTA_QUEUE);
        let first_chunk_out = Arc::new(AtomicBool::new(false));
        // The engine jobs hold the only sender: the deltas end when the generation does.
        let slices = Arc::new(DeltaSink {
            cancel: self.cancel.clone(),
            halt,
            first_audio: first_audio.clone(),
            first_chunk_out: first_chunk_out.clone(),
            engines: self.engines.clone(),
            deltas: delta_tx,
        });
        let max_tokens = self.plan.max_tokens;
        let generation = match self.engines.chat_api.clone() {
            Some(api) => {
                let chars: usize = messages.iter().map(|m| m.text.len()).sum();
                usage.input.store(chars.div_ceil(4), Ordering::Relaxed);
                tokio::spawn(
                    async move {
                        api.stream(&messages, max_tokens, &slices.deltas, || slices.stopped())
                            .await
                            .map_err(EngineError::from)
                    }
                    .in_current_span(),
                )
            }
            None => self.generate_embedded(messages, slices, usage.clone()),
        };
        let mut chunker = Chunker::new();
        let mut first_token_seen = false;
        let mut first_chunk_sent = false;
        let mut sentences_left = match self.config.max_reply_sentences {
            0 => usize::MAX,
            n => n,
        };
        // Whether a delta came since the chunker was last asked for a due chunk, and the chunks
        // sent to the TTS stage.
        let (mut new_text, mut chunks_sent) = (false, 0);
        'reply: loop {
            // Once the next chunk's audio is due (every chunk before it synthesized, and less than
            // NEXT_CHUNK_LEAD of audio left), the words there are go out without waiting for the
            // rest of the chunk. Each new delta asks again.
            let all_said = first_audio.chunks_said.load(Ordering::Relaxed) == chunks_sent;
            let due = first_audio.next_due().filter(|_| new_text && all_said);
            let clauses = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                    new_text = false;
                    let cut = chunker.cut_due();
                    if let Some(chunk) = &cut {
                        tracing::debug!(words = chunk.split_whitespace().count(), "later chunk cut when due");
                    }
                    cut.into_iter().collect()
                }
                delta = delta_rx.recv() => {
                    let Some(delta) = delta else { break };
                    usage.output.fetch_add(1, Ordering::Relaxed);
                    if !first_token_seen {
                        first_token_seen = true;
                        let _ = pieces.send(Piece::FirstToken(Instant::now())).await;
                    }
                    new_text = true;
                    chunker.push(&delta)
                }
            };
            for clause in clauses {
                if !first_chunk_sent {
                    // The first chunk goes to synthesis: the model waits until its audio exists.
                    first_chunk_sent = true;
                    first_audio.begin();
                    first_chunk_out.store(true, Ordering::Relaxed);
                }
                sentences_left = sentences_left.saturating_sub(sentence_ends(&clause));
                chunks_sent += 1;
                if pieces.send(Piece::Clause(clause)).await.is_err() || sentences_left == 0 {
                    break 'reply;
                }
            }
        }
        if sentences_left > 0 {
            for rest in chunker.finish() {
                if pieces.send(Piece::Clause(rest)).await.is_err() {
                    break;
                }
            }
        }
        // Ends the generation if it is still running (its next token has nowhere to go).
        drop(delta_rx);
        first_audio.end();
        match generation.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(EngineError::Stopped(if e.is_panic() { "llm (panicked)" } else { "llm" })),
        }
    }

    /// The embedded model's reply, token by token on its engine thread, into `slices`.
    pub(super) fn generate_embedded(
        &self,
        messages: Vec<Message>,
        slices: Arc<DeltaSink>,
        usage: Arc<Usage>,
    ) -> tokio::task::JoinHandle<Result<(), EngineError>> {
        let llm = self.engines.llm.clone();
        let (key, max_tokens) = (self.conversation, self.plan.max_tokens);
        tokio::spawn(
            async move {
                // In this session's own KV cache: other sessions' replies do not evict its prefix.
                let asked = Instant::now();
                let start = move |llm: &mut Llm| Ok((Instant::now(), llm.start(key, &messages, max_tokens)?));
                let (ran, mut decoding) = llm.try_run(Priority::High, start).await?;
                let g = decoding.generation();
                usage.input.store(g.prompt_tokens, Ordering::Relaxed);
                tracing::debug!(
                    prompt_tokens = g.prompt_tokens,
                    prefilled_tokens = g.prefilled_tokens,
                    dropped_messages = g.dropped_messages,
                    queued_ms = ran.saturating_duration_since(asked).as_secs_f64() * 1000.0,
                    prefill_ms = g.prefill_ms,
                    "reply prefilled"
                );
                loop {
                    let sink = slices.clone();
                    // Until its first chunk is out the reply is urgent; then it gives way to other
                    // sessions' first words until its next chunk is due.
                    let priority = match sink.first_audio.next_due() {
                        _ if !sink.first_chunk_out.load(Ordering::Relaxed) => Priority::High,
                        Some(due) => Priority::By(due),
                        None => Priority::Low,
                    };
                    let (slice, done) = llm
                        .try_run(priority, move |llm| {
                            while !llm.resume(&mut decoding, 1, |delta| sink.push(delta))? {
                                if sink.may_yield() {
                                    return Ok((decoding, false));
                                }
                            }
                            Ok((decoding, true))
                        })
                        .await?;
                    if done {
                        return Ok::<_, EngineError>(());
                    }
                    decoding = slice;
                    if let Some(until) = slices.first_audio.next_due() {
                        slices.engines.hold_back(until, || slices.stopped()).await;
                    }
                }
            }
            .in_current_span(),
        )
    }
}

/// The tokens a reply read and wrote (an external endpoint's are estimated: its deltas, and 4
/// characters a token of the prompt).
#[derive(Default)]
pub(super) struct Usage {
    input: AtomicUsize,
    output: AtomicUsize,
}

impl Usage {
    fn tokens(&self) -> (u64, u64) {
        (self.input.load(Ordering::Relaxed) as u64, self.output.load(Ordering::Relaxed) as u64)
    }
}

/// Where the reply model's text goes, from the LLM engine thread.
pub(super) struct DeltaSink {
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) halt: Arc<AtomicBool>,
    pub(super) first_audio: Arc<FirstAudioWait>,
    /// The first chunk went to synthesis: from here on the reply is ahead of its listener.
    pub(super) first_chunk_out: Arc<AtomicBool>,
    pub(super) engines: Arc<Engines>,
    pub(super) deltas: mpsc::Sender<String>,
}

impl DeltaSink {
    /// Hands one piece of text on; `Break` ends the reply (cancelled, halted by a gate, or gone).
    pub(super) fn push(&self, delta: &str) -> ControlFlow<()> {
        self.first_audio.wait(MAX_FIRST_AUDIO_WAIT, || self.engines.llm.waiting() > 0);
        if self.stopped() || self.deltas.blocking_send(delta.to_string()).is_err() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Cancelled, halted by a gate, or its text has nowhere to go.
    pub(super) fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed) || self.deltas.is_closed()
    }

    /// Whether the reply should give the cores to other sessions' first words: once its own first
    /// chunk is out, its later words are not needed before that audio has played. It yields the
    /// engine to their jobs waiting there (and to other replies' later words once those are due:
    /// without that a reply with nothing else waiting decoded to its end, up to 0.8 s, while
    /// another's due chunk waited), and holds back while their first audio is being made anywhere
    /// ([`Engines::hold_back`]).
    pub(super) fn may_yield(&self) -> bool {
        let holds_back = || {
            *self.engines.first_audio_due.borrow() > 0
                && self.first_audio.next_due().is_some_and(|until| Instant::now() < until)
        };
        self.first_chunk_out.load(Ordering::Relaxed) && (self.engines.llm.urgent_waiting() || holds_back())
    }
}
