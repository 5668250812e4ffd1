//! The voice pipeline: Silero VAD with endpointing → Whisper → input safety gate → the reply LLM
//! (streamed) → clause chunker → output safety gate → Piper → voice safety gate, per session, over
//! models loaded once and owned by engine threads.
//!
//! One worker task per session reads the 16 kHz input ring in 32 ms VAD chunks and decides
//! turns; each turn's reply runs as its own task (ASR → input gate → LLM → chunker → TTS stage)
//! so the worker keeps listening and can cancel the reply the moment the user speaks again
//! (barge-in). The conversation history keeps only what the user actually heard.
//!
//! Ahead of the endpoint: while the user speaks, the speech so far is recognised every second;
//! the text two passes agree on is settled (not decoded again later) and the reply model prefills
//! it as the start of the user's message. At the first sign of a pause (32 ms of silence) the
//! speech so far is recognised (dropped, mid-decode, if the user goes on) and, if its words leave
//! the ending open, heard by the end-of-turn model; after a short pause (96 ms) the turn is
//! judged tentatively over and its whole reply starts — ASR, gates, LLM, TTS — with its output
//! held (`ReplyOutput::held`). While another session's reply is being made, both wait longer (64
//! and 160 ms): work dropped because the user went on would take cores that reply needs.
//! When the endpoint confirms the turn the held output goes out at once; if the user speaks again
//! first, it is dropped unseen and the turn goes on. The endpoint comes sooner when the
//! transcript reads as a finished utterance (`endpoint_complete_ms`) than when it trails off:
//! Whisper ended it with a full stop, or, left unpunctuated ("7 of clubs"), the reply model finds
//! a sentence end likely after its last word, the more readily the more finished the pause sounds
//! to the end-of-turn model (`sentence_end_threshold`).
//!
//! Sessions share the engines by urgency: a reply's first words go first. Once its first audio
//! exists, its later words hold back while another reply's first audio is being made, until they
//! are due ([`NEXT_CHUNK_LEAD`] before the audio so far has played); then they go first, and a
//! due chunk's first audio is decoded and sent ahead of its rest.
//!
//! Safety (policy in `safety/`): the input gate judges the user's words before any reply starts;
//! a flagged request gets the policy's spoken response instead of the model's. The TTS stage
//! judges every reply chunk before synthesizing it (a flagged chunk is never spoken: generation
//! stops and the policy's response is said instead) and checks every piece of synthesized audio
//! against the enrolled voice before it goes to the session (audio that deviates is cut). Reply
//! text reaches the client chunk by chunk, only once its audio passed. A gate that cannot run
//! fails closed.
use super::chunker::{Chunker, sentence_ends};
use super::{Command, Hold, Pipeline, ReplyOutput, SessionClosed, SessionIo, TurnMarks};
use crate::audio::PIPELINE_RATE;
use crate::engine::{Engine, EngineError, Priority};
use crate::models::asr::{Asr, Settled, Transcript};
use crate::models::chat_api::{Backend, ChatApi, ReplyConfig};
use crate::models::llm::{DROP_BLOCK, Llm, Message};
use crate::models::text_embed::TextEmbedder;
use crate::models::tts::{Rest, Synthesizer, TtsBackend};
use crate::models::turn::TurnDetector;
use crate::models::vad::{CHUNK_SAMPLES, Vad, VadState};
use crate::models::{Manifest, ModelError};
use crate::safety::audit::AuditLog;
use crate::safety::content::ContentClassifier;
use crate::safety::policy::Policy;
use crate::safety::voice::{MIN_CHECK_MS, VoiceGate, check_windows};
use crate::safety::{Decision, Recorder, SafetyConfig};
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, ErrorCode, SafetyAction, SafetyStage, mark};
use serde::Deserialize;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Jobs that may wait at each priority of an engine before new ones are refused.
const ENGINE_QUEUE: usize = 64;
/// Longest user turn, in samples (30 s: Whisper's window); a longer one is ended there.
const MAX_UTTERANCE: usize = 30 * PIPELINE_RATE as usize;
/// What the end-of-turn model hears of a turn, in samples: its last 8 s, its whole window.
const SOUND_SAMPLES: usize = 8 * PIPELINE_RATE as usize;
/// Audio kept before the detected speech start, in VAD chunks (256 ms: onsets are quiet). With
/// 192 ms the "St" of "Stop, tell me about the weather" was lost and Whisper heard "I'll tell me"
/// or "about whoever"; with 320 ms, "pipe bomb" became "pipe-arm" (espeak-ng speech).
const PRE_ROLL_CHUNKS: usize = 8;
/// Milliseconds per VAD chunk.
const CHUNK_MS: u32 = (CHUNK_SAMPLES as u32 * 1000) / PIPELINE_RATE;
/// Text deltas buffered between the LLM thread and the reply task.
const DELTA_QUEUE: usize = 256;
/// Clauses buffered between the reply task and its TTS stage.
const CLAUSE_QUEUE: usize = 32;
/// Conversation keys of the LLM's per-conversation KV caches (key 0 is `Llm::generate`'s).
static NEXT_CONVERSATION: AtomicU64 = AtomicU64::new(1);
/// Longest the reply model waits for the first chunk's synthesis (a bound, should the stage stall).
const MAX_FIRST_AUDIO_WAIT: Duration = Duration::from_millis(1500);
/// A reply's next chunk is made within this under load (its words generated, judged, synthesized,
/// its voice checked), so its work is due this long before the audio before it has played. Until
/// then it holds back while other replies' first audio is made ([`Engines::hold_back`]); from then
/// on its engine jobs go ahead of theirs ([`Priority::By`]).
const NEXT_CHUNK_LEAD: Duration = Duration::from_millis(600);
/// How often a held-back reply looks whether it was cancelled.
const HOLD_BACK_POLL: Duration = Duration::from_millis(20);
/// Messages of history kept per session (a memory bound; the LLM itself drops the oldest turns
/// that do not fit its context, and trimming here earlier would defeat its prefix cache). Past it,
/// the older half goes: a whole number of the LLM's drop blocks, so the turns it keeps stay put.
const MAX_HISTORY_MESSAGES: usize = 64;
const _: () = assert!((MAX_HISTORY_MESSAGES / 2).is_multiple_of(DROP_BLOCK));

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
    /// Silence that ends a turn whose transcript reads as finished (a full sentence, not trailing
    /// off on "and", "the", "um"…), in ms; needs the reply started ahead (`speculate_after_ms`).
    pub endpoint_complete_ms: u32,
    /// A transcript Whisper left unpunctuated (it often does with short answers: "5", "7 of
    /// clubs") also reads as finished when the reply model gives at least this probability to a
    /// sentence end right after its last word (with Qwen2.5-Coder-0.5B, complete requests and
    /// answers score at least 0.029, words that trail off, "I would like to", at most 0.0001;
    /// SmolLM2-135M gave 0.05–0.9 and 0.003). A pause that sounds finished to
    /// the end-of-turn model raises the odds by its own (p / (1 − p)); one that does not never
    /// lowers them. 0: off (only punctuation counts).
    pub sentence_end_threshold: f32,
    /// Whisper stopped where a repeat of a word already said was likelier than the end (it tends
    /// to loop: "5" before another " 5" when "five five" was said): the words may all be there,
    /// or a list may go on, so such a transcript reads as finished when the end-of-turn model is
    /// at least this sure the user is done (a finished "five five", the cards clip, scores
    /// 0.26–0.95 as the pause grows: the int8 model is jittery; 0.5 is upstream's threshold).
    /// Above 1: never. A new word likelier than the end ("I have a cat" before " and") always
    /// waits the full endpoint: on Piper's voice that pause scores ≥ 0.5 in 9 of 60 syntheses.
    pub cut_short_sound_threshold: f32,
    /// Whether the end-of-turn model (Smart Turn) listens to the pause: off, only the words count.
    pub end_of_turn_model: bool,
    /// Speech between passes of recognition while the user is still speaking, in ms. The text two
    /// passes in a row agree on is settled: the recognition at the pause does not decode it again,
    /// and the reply model prefills it as the start of the user's message. 0: off.
    pub partial_every_ms: u32,
    /// Silence after which the speech so far is recognised ahead of the reply, in ms (the result
    /// is dropped, mid-decode, if the user goes on; the reply started ahead takes it). 0: off.
    pub asr_ahead_ms: u32,
    /// `asr_ahead_ms` and `speculate_after_ms` while another session's reply is being made: work
    /// dropped because the user went on then takes cores that reply needs, and pauses inside a
    /// sentence end a turn tentatively more often the shorter the wait (4 sessions × 15 turns at
    /// 32/96 ms: 26 held replies dropped and first-token p95 290 ms; at 64/160: 3 and 135 ms).
    pub busy_asr_ahead_ms: u32,
    pub busy_speculate_after_ms: u32,
    /// Silence after which the turn is judged tentatively over and its reply starts, held: nothing
    /// reaches the client before the endpoint confirms the turn, and the reply is dropped unseen
    /// if the user goes on, in ms. 0: off (replies start at the endpoint).
    pub speculate_after_ms: u32,
    /// Most tokens in one reply.
    pub max_reply_tokens: usize,
    /// Most sentences in one reply: generation stops at the end of this one (the system prompt
    /// asks for one or two; the small model often runs on to `max_reply_tokens` mid-sentence,
    /// and long replies take the cores other sessions' first words need). 0: no limit.
    pub max_reply_sentences: usize,
    /// The system prompt: short, spoken style.
    pub system_prompt: String,
    /// ONNX Runtime intra-op threads per engine (idle pool threads sleep, so engines that are not
    /// running cost nothing). The LLM and TTS get 2 each: the LLM's prefill and first clause, then
    /// the first chunk's synthesis (the LLM waits for it), run with nothing else on the cores. So
    /// does the end-of-turn model, which runs in the pause before the reply starts when it can.
    pub threads_vad: usize,
    pub threads_asr: usize,
    pub threads_llm: usize,
    pub threads_tts: usize,
    pub threads_embed: usize,
    pub threads_turn: usize,
    /// Which synthesizer speaks: `piper` (the enrolled preset voice) or `espeak` (not enrolled:
    /// the voice gate cuts all of its audio).
    pub tts: TtsBackend,
    /// espeak-ng voice of the `espeak` backend.
    pub espeak_voice: String,
}

/// The default system prompt, chosen on the answers eval's dev set (`tests/data/answers/dev.jsonl`,
/// every other line, typed, Qwen2.5-Coder-0.5B): 79% with these examples, 76% with the instruction
/// alone, 75.5% with the previous prompt (which named the assistant "Parley": the model then
/// answered "Parley" to "Name a musical instrument"). The examples' facts are in no held-out line.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a friendly voice assistant. Answer directly and correctly \
in one short spoken sentence, without lists or markdown. Examples:
User: What is the capital of Kenya?
Assistant: The capital of Kenya is Nairobi.
User: What is eight plus nine?
Assistant: Eight plus nine is seventeen.
User: How do I remove a splinter?
Assistant: Wash the skin, then pull the splinter out gently with clean tweezers.
User: My cousin is called Tom. What is my cousin's name?
Assistant: Your cousin is called Tom.";

impl Default for VoiceConfig {
    fn default() -> Self {
        Self {
            vad_on: 0.5,
            vad_off: 0.35,
            min_speech_ms: 96,
            endpoint_silence_ms: 480,
            endpoint_complete_ms: 256,
            sentence_end_threshold: 0.01,
            cut_short_sound_threshold: 0.5,
            end_of_turn_model: true,
            partial_every_ms: 1000,
            asr_ahead_ms: 32,
            speculate_after_ms: 96,
            busy_asr_ahead_ms: 64,
            busy_speculate_after_ms: 160,
            max_reply_tokens: 60,
            max_reply_sentences: 2,
            system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
            threads_vad: 1,
            threads_asr: 2,
            threads_llm: 2,
            threads_tts: 2,
            threads_embed: 1,
            threads_turn: 2,
            tts: TtsBackend::Piper,
            espeak_voice: "en-us".into(),
        }
    }
}

/// Every model, each on its own engine thread, and the safety policy; shared by all sessions.
pub struct Engines {
    pub vad: Engine<Vad>,
    pub asr: Engine<Asr>,
    pub llm: Engine<Llm>,
    pub tts: Engine<Synthesizer>,
    /// The input and output gates' classifier (MiniLM sentence embeddings).
    pub content: Engine<ContentClassifier>,
    /// The voice gate (GE2E speaker embeddings against the enrolled voice).
    pub voice_gate: Engine<VoiceGate>,
    /// Whether a pause sounds like the end of the turn (Smart Turn).
    pub turn: Engine<TurnDetector>,
    /// Output sample rate of the voice.
    pub tts_rate: u32,
    pub policy: Arc<Policy>,
    /// Audit log and metrics of the safety decisions.
    pub recorder: Recorder,
    /// Replies started ahead of the endpoint: released, and dropped because the user went on.
    pub speculation_used: AtomicU64,
    pub speculation_stale: AtomicU64,
    /// Replies being made (recognition to the last chunk's synthesis), in all sessions.
    pub replies_running: AtomicUsize,
    /// Replies whose first audio is being made (recognition to the first audio), in all sessions:
    /// while there are any, other replies' later words hold back ([`Engines::hold_back`]).
    pub first_audio_due: watch::Sender<usize>,
    /// End-of-turn verdicts made: ahead, in the pause (index 0), and in the reply (index 1).
    pub turn_verdicts: [AtomicU64; 2],
    /// The external reply endpoint (`[reply] backend = "openai"`), which then makes every reply;
    /// the embedded model still judges whether a transcript reads as finished.
    pub chat_api: Option<Arc<ChatApi>>,
}

impl Engines {
    /// Loads the policy and every model (each on its engine thread) and logs where each came from.
    pub fn load(
        manifest: &Arc<Manifest>,
        config: &VoiceConfig,
        safety: &SafetyConfig,
        reply: &ReplyConfig,
    ) -> Result<Engines, ModelError> {
        let chat_api = match reply.backend {
            Backend::Embedded => None,
            Backend::Openai => {
                let api = ChatApi::new(reply).map_err(ModelError::Invalid)?;
                tracing::info!(url = %api.url(), model = %reply.model, "replies come from an external endpoint");
                Some(Arc::new(api))
            }
        };
        let policy = Arc::new(Policy::load(safety.policy.as_deref()).map_err(ModelError::Invalid)?);
        let audit = AuditLog::open(&safety.audit_log)
            .map_err(|e| ModelError::Invalid(format!("safety audit log {}: {e}", safety.audit_log.display())))?;
        tracing::info!(policy = %policy.name, version = %policy.version, audit_log = %safety.audit_log.display(), "safety policy loaded");
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
        let (backend, espeak_voice) = (config.tts, config.espeak_voice.clone());
        if backend == TtsBackend::Espeak {
            tracing::warn!(voice = %espeak_voice, "tts = espeak: not the enrolled voice; the voice gate will cut all of its audio");
        }
        let tts =
            spawn(manifest, "tts", config.threads_tts, move |m, t| Synthesizer::load(m, t, backend, &espeak_voice))?;
        let (full, short) = (safety.voice_threshold, safety.voice_threshold_short);
        let voice_gate =
            spawn(manifest, "speaker", config.threads_embed, move |m, t| VoiceGate::load(m, t, full, short))?;
        let content_policy = policy.clone();
        let content = spawn(manifest, "text-embed", config.threads_embed, move |m, t| {
            ContentClassifier::new(content_policy, TextEmbedder::load(m, t)?)
        })?;
        let turn = spawn(manifest, "turn", config.threads_turn, TurnDetector::load)?;
        let tts_rate = tts.run_blocking(Priority::High, |tts| tts.sample_rate()).map_err(engine_to_model)?;
        let recorder = Recorder::new(&policy, audit);
        let (speculation_used, speculation_stale) = (AtomicU64::new(0), AtomicU64::new(0));
        let engines = Engines {
            vad,
            asr,
            llm,
            tts,
            content,
            voice_gate,
            turn,
            tts_rate,
            policy,
            recorder,
            speculation_used,
            speculation_stale,
            replies_running: AtomicUsize::new(0),
            first_audio_due: watch::Sender::new(0),
            turn_verdicts: Default::default(),
            chat_api,
        };
        engines.warm_up(config)?;
        Ok(engines)
    }

    /// Whether the recognizer, the reply model and the synthesizer are all idle: no session's reply
    /// is being made, so work that only may help (passes ahead, the end-of-turn model) takes no
    /// core a reply needs.
    fn cores_idle(&self) -> bool {
        [self.asr.idle(), self.llm.idle(), self.tts.idle()].iter().all(|&idle| idle)
    }

    /// Waits while a reply's first audio is being made (in any session) and its work can wait:
    /// until `until` at most, and not past `stop`. On two cores, a reply's later words, needed only
    /// once the audio before them has played, would take the cores another listener waits on.
    async fn hold_back(&self, until: Instant, stop: impl Fn() -> bool) {
        let mut due = self.first_audio_due.subscribe();
        while Instant::now() < until && !stop() {
            let step = until.min(Instant::now() + HOLD_BACK_POLL);
            if let Ok(Ok(_)) = tokio::time::timeout_at(step.into(), due.wait_for(|n| *n == 0)).await {
                return;
            }
        }
    }

    /// Runs every model once, so the first turn does not pay for it (an ONNX session's first run is
    /// several times slower than the next), and leaves the system prompt in the reply model's
    /// prefix cache.
    fn warm_up(&self, config: &VoiceConfig) -> Result<(), ModelError> {
        let started = Instant::now();
        let high = Priority::High;
        let run = |r: Result<Result<(), ModelError>, EngineError>| r.map_err(engine_to_model)?;
        let speech = self.tts.run_blocking(high, |tts| tts.synthesize("Hello! How can I help you today?"));
        let speech = speech.map_err(engine_to_model)??;
        let speech16 = crate::safety::voice::to_16k(&speech, self.tts_rate)?;
        let mut chunk = [0.0; CHUNK_SAMPLES];
        let n = speech16.len().min(CHUNK_SAMPLES);
        chunk[..n].copy_from_slice(&speech16[..n]);
        run(self.vad.run_blocking(high, move |vad| vad.push(&mut VadState::new(), &chunk).map(drop)))?;
        let sound = speech16.clone();
        run(self.turn.run_blocking(high, move |turn| turn.probability(&sound).map(drop)))?;
        run(self.asr.run_blocking(high, move |asr| asr.transcribe(&speech16).map(drop)))?;
        let rate = self.tts_rate;
        run(self.voice_gate.run_blocking(high, move |gate| gate.check(&speech, rate).map(drop)))?;
        run(self.content.run_blocking(high, |c| c.judge("What is the weather like today?", false).map(drop)))?;
        let messages = prompt(config, &[], "Hello!");
        run(self.llm.run_blocking(high, move |llm| llm.generate(&messages, 1, |_| ControlFlow::Break(())).map(drop)))?;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "models warmed up");
        Ok(())
    }
}

/// Starts one engine and logs the model's source and load time.
fn spawn<M: 'static>(
    manifest: &Arc<Manifest>,
    role: &'static str,
    threads: usize,
    load: impl FnOnce(&Manifest, usize) -> Result<M, ModelError> + Send + 'static,
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

    /// Loads every model from `manifest` and the safety policy, and builds the pipeline.
    pub fn load(
        manifest: Manifest,
        config: VoiceConfig,
        safety: &SafetyConfig,
        reply: &ReplyConfig,
    ) -> Result<Self, ModelError> {
        let engines = Engines::load(&Arc::new(manifest), &config, safety, reply)?;
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
            ("speaker", e.voice_gate.refused()),
            ("text-embed", e.content.refused()),
        ] {
            out.push_str(&format!("parley_engine_jobs_refused_total{{engine=\"{engine}\"}} {refused}\n"));
        }
        out.push_str(&format!(
            "# HELP parley_speculation_total Replies started ahead of the endpoint: used, or stale (the user went on).\n\
             # TYPE parley_speculation_total counter\n\
             parley_speculation_total{{outcome=\"used\"}} {}\nparley_speculation_total{{outcome=\"stale\"}} {}\n",
            e.speculation_used.load(Ordering::Relaxed),
            e.speculation_stale.load(Ordering::Relaxed)
        ));
        out.push_str(&format!(
            "# HELP parley_turn_verdicts_total End-of-turn model verdicts: made ahead, in the pause, or in the reply.\n\
             # TYPE parley_turn_verdicts_total counter\n\
             parley_turn_verdicts_total{{made=\"ahead\"}} {}\nparley_turn_verdicts_total{{made=\"in_reply\"}} {}\n",
            e.turn_verdicts[0].load(Ordering::Relaxed),
            e.turn_verdicts[1].load(Ordering::Relaxed)
        ));
        e.recorder.render(out);
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

/// Speech being recognised ahead of the reply, for the speech up to `last_voiced_end`.
struct EarlyAsr {
    last_voiced_end: u64,
    cancel: Arc<AtomicBool>,
    task: JoinHandle<Result<Transcript, EngineError>>,
    /// The turn as heard when recognition started, for the end-of-turn model.
    sound: Arc<PauseSound>,
}

/// Speech recognised while the user is still speaking, every `partial_every_ms` of it.
#[derive(Default)]
struct Partial {
    /// Utterance samples the latest pass started from.
    covered: usize,
    settled: Settled,
    running: Option<Pass>,
}

/// A pass in progress: the flag that stops it, and its task (what is settled after it, as tokens
/// and as text).
struct Pass {
    cancel: Arc<AtomicBool>,
    task: JoinHandle<Result<(Settled, String), EngineError>>,
}

/// A reply in progress: its task and the flag that stops it.
struct Reply {
    turn: u64,
    cancel: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// Set while the reply was started ahead of the endpoint and its output is still held.
    hold: Option<Arc<Hold>>,
}

struct Worker {
    engines: Arc<Engines>,
    config: Arc<VoiceConfig>,
    io: SessionIo,
    vad_state: Option<VadState>,
    /// The VAD failed on the last chunk (already reported; chunks count as silence meanwhile).
    vad_failing: bool,
    chunk: [f32; CHUNK_SAMPLES],
    utterance: Vec<f32>,
    pre_roll: Vec<f32>,
    state: Turn,
    turn: u64,
    history: Arc<Mutex<Vec<Message>>>,
    /// This session's key for the LLM's per-conversation KV cache.
    conversation: u64,
    reply: Option<Reply>,
    partial: Partial,
    early_asr: Option<EarlyAsr>,
}

impl Worker {
    fn new(engines: Arc<Engines>, config: Arc<VoiceConfig>, io: SessionIo) -> Self {
        Self {
            engines,
            config,
            io,
            vad_state: Some(VadState::new()),
            vad_failing: false,
            chunk: [0.0; CHUNK_SAMPLES],
            utterance: Vec::with_capacity(MAX_UTTERANCE),
            pre_roll: Vec::with_capacity(PRE_ROLL_CHUNKS * CHUNK_SAMPLES),
            state: Turn::Idle { voiced: 0 },
            turn: 0,
            history: Arc::new(Mutex::new(Vec::new())),
            conversation: NEXT_CONVERSATION.fetch_add(1, Ordering::Relaxed),
            reply: None,
            partial: Partial::default(),
            early_asr: None,
        }
    }

    async fn run(mut self) -> Result<(), SessionClosed> {
        self.prefill(String::new());
        loop {
            while self.io.audio.available() >= CHUNK_SAMPLES {
                self.io.audio.pop(&mut self.chunk);
                self.on_chunk().await?;
            }
            tokio::select! {
                _ = self.io.audio.wait_for(CHUNK_SAMPLES) => {}
                command = self.io.commands.recv() => match command {
                    Some(Command::Text(text)) => {
                        self.cancel_reply(CancelReason::BargeIn).await;
                        self.turn += 1;
                        let now = Instant::now();
                        let marks = vec![(mark::ENDPOINT, now)];
                        let output = self.io.output.clone();
                        self.start_reply(self.turn, Input::Text(text), now, marks, 0, output, None);
                    }
                    Some(Command::Cancel) => self.cancel_reply(CancelReason::ClientCancel).await,
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
                    let replying = self.reply.as_ref().is_some_and(|r| !r.task.is_finished());
                    self.cancel_reply(CancelReason::BargeIn).await;
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
                    self.listen_ahead().await;
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
                } else if speculate_after_ms > 0 && silence_ms >= speculate_after_ms && held.is_none() {
                    self.start_held(turn, last_voiced_end, last_voiced_seen, position);
                } else if asr_ahead_ms > 0 && silence_ms >= asr_ahead_ms && self.early_asr.is_none() && held.is_none() {
                    self.start_early_asr(last_voiced_end, position);
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
    async fn end_turn(
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
        self.start_reply(turn, input, anchor, marks, ref_ts_us, output, None);
        Ok(())
    }

    /// The turn's latency anchor: when the frame holding the last voiced sample arrived, and the
    /// client's timestamp of that frame.
    fn anchor(&self, last_voiced_end: u64, last_voiced_seen: Instant) -> (Instant, u64) {
        let stamp = self.io.audio.stamp_at(last_voiced_end.saturating_sub(1));
        (stamp.map_or(last_voiced_seen, |s| s.arrived), stamp.map_or(0, |s| s.client_ts_us))
    }

    /// The turn's speech for its reply: being recognised already (with the pause's sound as heard
    /// then), or to recognise.
    fn input(&mut self, last_voiced_end: u64, position: u64) -> (Input, Option<Arc<PauseSound>>) {
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
    fn start_early_asr(&mut self, last_voiced_end: u64, position: u64) {
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
    /// load they would make other sessions' reply audio late).
    async fn listen_ahead(&mut self) {
        if let Some(pass) = self.partial.running.take_if(|pass| pass.task.is_finished())
            && let Ok(Ok((settled, text))) = pass.task.await
        {
            if settled.ids.len() > self.partial.settled.ids.len() {
                self.prefill(text);
            }
            self.partial.settled = settled;
        }
        let every = (self.config.partial_every_ms * PIPELINE_RATE / 1000) as usize;
        if every == 0
            || self.partial.running.is_some()
            || self.utterance.len() < self.partial.covered + every
            || !self.engines.cores_idle()
        {
            return;
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
    }

    /// Puts the conversation so far and the start of what the user is saying into this session's
    /// KV cache, so the reply prefills only the rest: at session start (the system prompt), when
    /// the user starts speaking (in case another conversation took the cache) and as their words
    /// settle; the reply task does it too once the history has its exchange.
    fn prefill(&self, user_start: String) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        prefill(&self.engines.llm, self.conversation, &self.config, &history, user_start);
    }

    /// A new utterance: what was recognised of the last one is dropped.
    fn drop_partial(&mut self) {
        if let Some(pass) = self.partial.running.take() {
            pass.cancel.store(true, Ordering::Relaxed);
        }
        self.partial = Partial::default();
    }

    /// The user went on: speech recognised ahead is stale; its decoding stops at the next token.
    fn drop_early_asr(&mut self) {
        if let Some(early) = self.early_asr.take() {
            early.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// The utterance's speech and ~100 ms after it (the trailing silence only costs encoder time).
    fn speech(&self, last_voiced_end: u64, position: u64) -> Vec<f32> {
        let trailing = (position - last_voiced_end) as usize;
        let keep = self.utterance.len().saturating_sub(trailing.saturating_sub(PIPELINE_RATE as usize / 10));
        self.utterance[..keep].to_vec()
    }

    /// The user paused: the turn is judged tentatively over and its reply starts now, held, so
    /// recognition, the gates, generation and synthesis run during the pause.
    fn start_held(&mut self, turn: u64, last_voiced_end: u64, last_voiced_seen: Instant, position: u64) {
        let (anchor, ref_ts_us) = self.anchor(last_voiced_end, last_voiced_seen);
        let marks = vec![(mark::SPEECH_END, last_voiced_seen), (mark::ENDPOINT, Instant::now())];
        let (input, sound) = self.input(last_voiced_end, position);
        let sound = sound.unwrap_or_else(|| PauseSound::new(&self.utterance));
        let (output, hold) = self.io.output.held();
        self.start_reply(turn, input, anchor, marks, ref_ts_us, output, Some((hold, sound)));
    }

    /// Drops a reply whose output is still held (the user went on): nothing of it is sent.
    async fn discard_held(&mut self) {
        if let Some(reply) = &mut self.reply
            && let Some(hold) = reply.hold.take()
        {
            reply.cancel.store(true, Ordering::Relaxed);
            hold.discard().await;
            self.engines.speculation_stale.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_reply(
        &mut self,
        turn: u64,
        input: Input,
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
            turn,
        };
        let running = ReplyRunning::new(&self.engines);
        let ctx = ReplyContext {
            engines: self.engines.clone(),
            config: self.config.clone(),
            output,
            history: self.history.clone(),
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
                if let Err(SessionClosed) = ctx.run(input).await {
                    tracing::debug!("session closed during the reply");
                }
            }
            .instrument(span),
        );
        self.reply = Some(Reply { turn, cancel, task, hold });
    }

    /// Stops the reply in progress, if any: generation stops and unsent audio is dropped.
    async fn cancel_reply(&mut self, reason: CancelReason) {
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

/// Counts a reply in [`Engines::replies_running`] while its task lives, and in
/// [`Engines::first_audio_due`] until its first audio exists.
struct ReplyRunning {
    engines: Arc<Engines>,
    /// Still counted in [`Engines::first_audio_due`].
    due: AtomicBool,
}

impl ReplyRunning {
    fn new(engines: &Arc<Engines>) -> Arc<Self> {
        engines.replies_running.fetch_add(1, Ordering::Relaxed);
        engines.first_audio_due.send_modify(|n| *n += 1);
        Arc::new(ReplyRunning { engines: engines.clone(), due: AtomicBool::new(true) })
    }

    /// The reply's first audio exists (or never will).
    fn first_audio_made(&self) {
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
const PREFILL_SLICE: usize = 32;

/// Puts the conversation `history` and the start of the user's next message into conversation
/// `key`'s KV cache, so that the reply prefills only what follows. Background jobs at low
/// priority, [`PREFILL_SLICE`] tokens each; nothing waits for them.
fn prefill(llm: &Engine<Llm>, key: u64, config: &VoiceConfig, history: &[Message], user_start: String) {
    let messages = Arc::new(prompt(config, history, user_start));
    let (llm, max_tokens) = (llm.clone(), config.max_reply_tokens);
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

/// The reply model's input: the system prompt, the conversation so far, and what the user says.
fn prompt(config: &VoiceConfig, history: &[Message], user: impl Into<String>) -> Vec<Message> {
    let mut messages = vec![Message::system(config.system_prompt.clone())];
    messages.extend(history.iter().cloned());
    messages.push(Message::user(user));
    messages
}

/// The turn as heard at a pause (its last 8 s, the pause so far included) and the end-of-turn
/// model's verdict on it, made once: ahead, by the recognition at the pause, or by the reply.
struct PauseSound {
    audio: Arc<[f32]>,
    verdict: tokio::sync::OnceCell<f32>,
    /// A verdict is being (or was) made.
    started: AtomicBool,
}

impl PauseSound {
    fn new(utterance: &[f32]) -> Arc<Self> {
        let audio = Arc::from(&utterance[utterance.len().saturating_sub(SOUND_SAMPLES)..]);
        Arc::new(PauseSound { audio, verdict: tokio::sync::OnceCell::new(), started: AtomicBool::new(false) })
    }

    /// Whether the end-of-turn model has heard (or is hearing) this pause.
    fn heard(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// The end-of-turn model's probability that the turn is over: made now (counted as `made`),
    /// or awaited if it is being made.
    async fn verdict(&self, engines: &Engines, made: Made) -> Result<f32, EngineError> {
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
enum Made {
    Ahead = 0,
    InReply = 1,
}

/// What the user said: recorded speech, speech already being recognised, or typed text.
enum Input {
    /// The speech, and the token ids of its start already settled (see `Partial`).
    Speech(Vec<f32>, Vec<u32>),
    Recognised(JoinHandle<Result<Transcript, EngineError>>),
    Text(String),
}

/// Everything one reply task needs.
struct ReplyContext {
    engines: Arc<Engines>,
    config: Arc<VoiceConfig>,
    output: super::ReplyOutput,
    history: Arc<Mutex<Vec<Message>>>,
    conversation: u64,
    cancel: Arc<AtomicBool>,
    gates: Gates,
    turn: u64,
    anchor: Instant,
    marks: Vec<(&'static str, Instant)>,
    ref_ts_us: u64,
    /// A held reply's turn as heard at the pause (the end-of-turn model's input).
    sound: Option<Arc<PauseSound>>,
    running: Arc<ReplyRunning>,
}

/// One chunk of the reply: its text and, once synthesized, its length.
struct Spoken {
    text: String,
    audio_ms: f64,
}

/// What the reply says: the model's answer, or fixed words (the policy's response).
enum Script {
    Generate(Vec<Message>),
    Say(String),
}

impl ReplyContext {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    async fn run(mut self, input: Input) -> Result<(), SessionClosed> {
        let turn = self.turn;
        let (user_text, ending) = match input {
            Input::Text(text) => (text, Ending::Finished),
            Input::Speech(audio, settled) => {
                let never = AtomicBool::new(false);
                let result = self
                    .engines
                    .asr
                    .try_run(Priority::High, move |asr| asr.transcribe_unless(&audio, &settled, &never))
                    .await;
                self.transcribed(result).await?
            }
            Input::Recognised(task) => {
                let result = task.await.unwrap_or(Err(EngineError::Stopped("asr")));
                self.transcribed(result).await?
            }
        };
        if user_text.is_empty() || self.cancelled() {
            // Nothing intelligible was said (or the user went on): no reply.
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
        let (decision, ()) = tokio::join!(self.gates.content(SafetyStage::Input, &user_text), judged);
        let Some(decision) = decision? else {
            return self.output.audio_end(turn).await;
        };
        self.marks.push((mark::INPUT_SAFE, Instant::now()));
        if decision.stops() {
            // The policy's response, in the preset voice. The exchange stays out of the history.
            let response = self.gates.response(&decision);
            self.speak(Script::Say(response)).await?;
            return Ok(());
        }
        let messages = prompt(&self.config, &self.history.lock().unwrap_or_else(|e| e.into_inner()), user_text.clone());
        let spoken = self.speak(Script::Generate(messages)).await?;
        if self.output.discarded() {
            // Started ahead of an endpoint that never came: the exchange did not happen.
            return Ok(());
        }
        // History keeps only what the user heard.
        let heard = spoken.trim().to_string();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.push(Message::user(user_text));
        if !heard.is_empty() {
            history.push(Message::assistant(heard));
        }
        if history.len() > MAX_HISTORY_MESSAGES {
            history.drain(..MAX_HISTORY_MESSAGES / 2);
        }
        // The next prompt is known now: it prefills while the reply plays out and the user
        // answers (when old turns were dropped, that is the whole conversation: ~0.5 s).
        prefill(&self.engines.llm, self.conversation, &self.config, &history, String::new());
        Ok(())
    }

    /// Whether a held reply's transcript that is not plainly finished reads as finished. An
    /// unpunctuated one does if the reply model finds a sentence end likely after it, or once the
    /// pause sounds finished enough to raise those odds; one cut short, if the pause sounds
    /// finished. The reply model's prefill stays in the conversation's cache for the reply; the
    /// reply does not wait for the end-of-turn model.
    async fn judge_turn_end(&self, user_text: &str, ending: Ending) {
        let threshold = self.config.sentence_end_threshold;
        if ending == Ending::CutShort {
            let sure = self.config.cut_short_sound_threshold;
            return self.listen(move |sound| sound >= sure);
        }
        if threshold <= 0.0 {
            return;
        }
        let messages = prompt(&self.config, &self.history.lock().unwrap_or_else(|e| e.into_inner()), user_text);
        let (key, max_tokens) = (self.conversation, self.config.max_reply_tokens);
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
    fn listen(&self, finished: impl FnOnce(f32) -> bool + Send + 'static) {
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
    async fn transcribed(
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

    /// Speaks `script` chunk by chunk through the TTS stage; returns the text the user heard.
    async fn speak(&mut self, script: Script) -> Result<String, SessionClosed> {
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
            marks,
        );
        let stage = tokio::spawn(stage.run(piece_rx).in_current_span());
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
            Script::Generate(messages) => self.generate(messages, halt, &first_audio, &piece_tx).await,
        };
        drop(piece_tx);
        if let Some(e) = failure {
            self.output.event(engine_error("reply generation failed", &e)).await?;
        }
        let spoken = stage.await.unwrap_or_default();
        if self.output.discarded() {
            return Ok(String::new());
        }
        self.output.event(ServerEvent::ResponseTextDone { turn, text: join_text(&spoken) }).await?;
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

    /// Streams the model's reply into clauses for the TTS stage until it ends, the reply is
    /// cancelled or a gate halts it; returns the generation's failure, if any.
    async fn generate(
        &self,
        messages: Vec<Message>,
        halt: Arc<AtomicBool>,
        first_audio: &Arc<FirstAudioWait>,
        pieces: &mpsc::Sender<Piece>,
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
        let max_tokens = self.config.max_reply_tokens;
        let generation = match self.engines.chat_api.clone() {
            Some(api) => tokio::spawn(
                async move {
                    api.stream(&messages, max_tokens, &slices.deltas, || slices.stopped())
                        .await
                        .map_err(EngineError::from)
                }
                .in_current_span(),
            ),
            None => self.generate_embedded(messages, slices),
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
    fn generate_embedded(
        &self,
        messages: Vec<Message>,
        slices: Arc<DeltaSink>,
    ) -> tokio::task::JoinHandle<Result<(), EngineError>> {
        let llm = self.engines.llm.clone();
        let (key, max_tokens) = (self.conversation, self.config.max_reply_tokens);
        tokio::spawn(
            async move {
                // In this session's own KV cache: other sessions' replies do not evict its prefix.
                let asked = Instant::now();
                let start = move |llm: &mut Llm| Ok((Instant::now(), llm.start(key, &messages, max_tokens)?));
                let (ran, mut decoding) = llm.try_run(Priority::High, start).await?;
                let g = decoding.generation();
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

/// What the reply task hands its TTS stage.
enum Piece {
    /// The first reply token arrived at this time (a latency mark).
    FirstToken(Instant),
    /// A chunk of the model's reply: judged by the output gate before it is synthesized.
    Clause(String),
    /// The policy's own words: spoken without the output gate (the voice gate still applies).
    Say(String),
}

/// Where the reply model's text goes, from the LLM engine thread.
struct DeltaSink {
    cancel: Arc<AtomicBool>,
    halt: Arc<AtomicBool>,
    first_audio: Arc<FirstAudioWait>,
    /// The first chunk went to synthesis: from here on the reply is ahead of its listener.
    first_chunk_out: Arc<AtomicBool>,
    engines: Arc<Engines>,
    deltas: mpsc::Sender<String>,
}

impl DeltaSink {
    /// Hands one piece of text on; `Break` ends the reply (cancelled, halted by a gate, or gone).
    fn push(&self, delta: &str) -> ControlFlow<()> {
        self.first_audio.wait(MAX_FIRST_AUDIO_WAIT, || self.engines.llm.waiting() > 0);
        if self.stopped() || self.deltas.blocking_send(delta.to_string()).is_err() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Cancelled, halted by a gate, or its text has nowhere to go.
    fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed) || self.deltas.is_closed()
    }

    /// Whether the reply should give the cores to other sessions' first words: once its own first
    /// chunk is out, its later words are not needed before that audio has played. It yields the
    /// engine to their jobs waiting there (and to other replies' later words once those are due:
    /// without that a reply with nothing else waiting decoded to its end, up to 0.8 s, while
    /// another's due chunk waited), and holds back while their first audio is being made anywhere
    /// ([`Engines::hold_back`]).
    fn may_yield(&self) -> bool {
        let holds_back = || {
            *self.engines.first_audio_due.borrow() > 0
                && self.first_audio.next_due().is_some_and(|until| Instant::now() < until)
        };
        self.first_chunk_out.load(Ordering::Relaxed) && (self.engines.llm.urgent_waiting() || holds_back())
    }
}

/// The reply model pauses between tokens while the first chunk is synthesized: on two cores its
/// next tokens (not needed until that audio has played) would take the cores the first audio
/// needs. Measured on this machine: first audio ~100 ms sooner, with the TTS on 2 threads. It does
/// not pause while other sessions' jobs wait for the model (the engine would idle in front of them).
/// Shared by the reply model and the TTS stage, it also keeps when the reply's audio so far will
/// have played, and ends the reply's count in [`Engines::first_audio_due`] with its first audio.
struct FirstAudioWait {
    pending: Mutex<bool>,
    done: std::sync::Condvar,
    running: Arc<ReplyRunning>,
    /// When the audio synthesized so far will have played, counted from when the first audio
    /// existed (`None` before): the next chunk is needed by then.
    heard_until: Mutex<Option<Instant>>,
    /// Chunks of the reply model's text synthesized whole so far.
    chunks_said: AtomicUsize,
}

impl FirstAudioWait {
    fn new(running: Arc<ReplyRunning>) -> Self {
        FirstAudioWait {
            pending: Mutex::new(false),
            done: Default::default(),
            running,
            heard_until: Mutex::new(None),
            chunks_said: AtomicUsize::new(0),
        }
    }

    /// Counts `audio` more of the reply as synthesized (the first: from now).
    fn add_audio(&self, audio: Duration) {
        let mut heard = self.heard_until.lock().unwrap_or_else(|e| e.into_inner());
        *heard = Some(heard.unwrap_or_else(Instant::now) + audio);
    }

    /// When the audio synthesized so far will have played: `None` before the first audio exists.
    fn heard_until(&self) -> Option<Instant> {
        *self.heard_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the work on the reply's next chunk is due ([`NEXT_CHUNK_LEAD`]): `None` before its first
    /// audio exists.
    fn next_due(&self) -> Option<Instant> {
        self.heard_until().and_then(|heard| heard.checked_sub(NEXT_CHUNK_LEAD))
    }

    fn begin(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// The first audio exists (or never will): the model goes on.
    fn end(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.done.notify_all();
        self.running.first_audio_made();
    }

    /// Blocks (the engine thread) while the first chunk is being synthesized, at most `limit`,
    /// and only as long as `others_waiting` says no.
    fn wait(&self, limit: Duration, others_waiting: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while *pending && !others_waiting() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return };
            let slice = left.min(Duration::from_millis(10));
            pending = self.done.wait_timeout(pending, slice).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The safety gates as one reply uses them: each decision goes to the client, the audit log and
/// the metrics before the reply proceeds.
#[derive(Clone)]
struct Gates {
    engines: Arc<Engines>,
    output: super::ReplyOutput,
    session: Arc<str>,
    turn: u64,
}

impl Gates {
    /// Judges `text` at `stage` (input or output). `None`: the gate could not run (reported).
    async fn content(&self, stage: SafetyStage, text: &str) -> Result<Option<Decision>, SessionClosed> {
        let started = Instant::now();
        let owned = text.to_string();
        let reply = stage == SafetyStage::Output;
        match self.engines.content.try_run(Priority::High, move |c| c.judge(&owned, reply)).await {
            Ok(verdict) => {
                let decision = Decision::content(&self.engines.policy, stage, &verdict, started.elapsed());
                self.record(decision, text).await.map(Some)
            }
            Err(e) => {
                self.output.event(engine_error("safety check failed", &e)).await?;
                Ok(None)
            }
        }
    }

    /// Compares synthesized `audio` (at the voice's rate) with the enrolled voice. `None`: the
    /// gate could not run (reported).
    async fn voice(&self, audio: Vec<f32>) -> Result<Option<Decision>, SessionClosed> {
        let started = Instant::now();
        let rate = self.engines.tts_rate;
        let seconds = audio.len() as f64 / rate as f64;
        match self.engines.voice_gate.try_run(Priority::High, move |gate| gate.check(&audio, rate)).await {
            Ok(check) => {
                let decision = Decision {
                    stage: SafetyStage::Voice,
                    action: if check.pass { SafetyAction::Allow } else { SafetyAction::Block },
                    category: Some("voice".into()),
                    rule_id: Some(crate::safety::voice::RULE_ID.into()),
                    score: Some(check.score),
                    elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                    detail: (!check.pass).then(|| "the audio does not match the enrolled voice: cut".into()),
                };
                let judged = format!("{seconds:.2} s of synthesized audio");
                self.record(decision, &judged).await.map(Some)
            }
            Err(e) => {
                self.output.event(engine_error("voice check failed", &e)).await?;
                Ok(None)
            }
        }
    }

    /// Audits and counts the decision (for a held reply: once it is released), then sends it.
    async fn record(&self, decision: Decision, judged: &str) -> Result<Decision, SessionClosed> {
        let (engines, session, turn) = (self.engines.clone(), self.session.clone(), self.turn);
        let (audited, judged) = (decision.clone(), judged.to_string());
        self.output.when_released(move || engines.recorder.record(&session, turn, &audited, &judged)).await?;
        self.output.event(decision.event(self.turn)).await?;
        Ok(decision)
    }

    /// The policy's words for a decision that stopped the turn.
    fn response(&self, decision: &Decision) -> String {
        let category = decision.category.as_deref().and_then(|id| self.engines.policy.category(id));
        category.map_or_else(|| "I can't help with that.".to_string(), |c| c.response.clone())
    }
}

/// A synthesized chunk waiting for the voice gate.
struct Pending {
    text: String,
    audio: Vec<f32>,
    /// The rest of the chunk before it, whose first audio went ahead (see [`TtsStage::say`]).
    continues: bool,
}

/// The second half of a reply: output gate → TTS → voice gate → session, chunk by chunk.
struct TtsStage {
    engines: Arc<Engines>,
    gates: Gates,
    output: super::ReplyOutput,
    cancel: Arc<AtomicBool>,
    halt: Arc<AtomicBool>,
    first_audio: Arc<FirstAudioWait>,
    ref_ts_us: u64,
    marks: TurnMarks,
    marks_sent: bool,
    /// Chunks handed to the session, in order.
    spoken: Vec<Spoken>,
    /// Synthesized chunks not yet checked by the voice gate (less than [`MIN_CHECK_MS`] of audio).
    pending: Vec<Pending>,
    /// The last window of audio the voice gate passed.
    passed_window: Vec<f32>,
    /// When the chunk being said first had audio handed to the session (not its rest's).
    chunk_sent: Option<Instant>,
}

impl TtsStage {
    /// The stage of one reply, speaking with `gates`' engines to its output.
    fn new(
        gates: Gates,
        cancel: Arc<AtomicBool>,
        halt: Arc<AtomicBool>,
        first_audio: Arc<FirstAudioWait>,
        ref_ts_us: u64,
        marks: TurnMarks,
    ) -> Self {
        TtsStage {
            engines: gates.engines.clone(),
            output: gates.output.clone(),
            gates,
            cancel,
            halt,
            first_audio,
            ref_ts_us,
            marks,
            marks_sent: false,
            spoken: Vec::new(),
            pending: Vec::new(),
            passed_window: Vec::new(),
            chunk_sent: None,
        }
    }

    fn stopped(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed)
    }

    /// Runs until the pieces end or the reply stops; returns the chunks handed to the session.
    async fn run(mut self, mut pieces: mpsc::Receiver<Piece>) -> Vec<Spoken> {
        let mut previous = String::new();
        while let Some(piece) = self.next_piece(&mut pieces).await {
            let (text, judge) = match piece {
                Piece::FirstToken(at) => {
                    self.marks.marks.push((mark::FIRST_TOKEN, at));
                    continue;
                }
                Piece::Clause(text) => (text, true),
                Piece::Say(text) => (text, false),
            };
            if self.stopped() {
                break;
            }
            let (received, needed) = (Instant::now(), self.first_audio.heard_until());
            let at_ms = self.spoken.iter().map(|s| s.audio_ms).sum::<f64>() + self.pending_ms();
            // A later chunk (its first audio exists) gives way to other replies' first audio.
            if let Some(until) = self.waiting_due().or(self.first_audio.next_due()) {
                self.engines.hold_back(until, || self.stopped()).await;
            }
            if !self.check_waiting_if_due().await {
                break;
            }
            let held = Instant::now();
            if judge {
                // The chunk is judged together with the one before, so content split across a
                // chunk boundary is seen whole.
                let judged = format!("{previous} {text}");
                match self.gates.content(SafetyStage::Output, judged.trim()).await {
                    Ok(Some(decision)) if !decision.stops() => previous = text.clone(),
                    Ok(Some(decision)) => {
                        // Never spoken: generation stops and the policy's words are said instead.
                        self.halt.store(true, Ordering::Relaxed);
                        let response = self.gates.response(&decision);
                        self.say(response).await;
                        break;
                    }
                    Ok(None) | Err(SessionClosed) => {
                        self.halt.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let (judged, words) = (Instant::now(), text.split_whitespace().count());
            self.chunk_sent = None;
            if !self.say(text).await {
                break;
            }
            if judge {
                self.first_audio.chunks_said.fetch_add(1, Ordering::Relaxed);
            }
            if let (Some(needed), Some(sent)) = (needed, self.chunk_sent.take()) {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                tracing::debug!(
                    words,
                    at_ms,
                    slack_ms = ms(needed.saturating_duration_since(received)),
                    hold_ms = ms(held - received),
                    gate_ms = ms(judged - held),
                    say_ms = ms(sent.saturating_duration_since(judged)),
                    late_ms = ms(sent.saturating_duration_since(needed)),
                    "later chunk spoken"
                );
            }
        }
        self.first_audio.end();
        self.check_voice(false).await;
        self.spoken
    }

    /// The next piece of the reply's text. Meanwhile, audio waiting for the voice gate because it
    /// is too short to check alone is checked once it is due ([`TtsStage::waiting_due`]).
    async fn next_piece(&mut self, pieces: &mut mpsc::Receiver<Piece>) -> Option<Piece> {
        let Some(due) = self.waiting_due() else { return pieces.recv().await };
        tokio::select! {
            piece = pieces.recv() => return piece,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        if !self.check_waiting_if_due().await {
            return None;
        }
        pieces.recv().await
    }

    /// When audio waiting for the voice gate (a later chunk shorter than [`MIN_CHECK_MS`], held to
    /// be checked with the next one) must be checked without it: [`NEXT_CHUNK_LEAD`] before the
    /// audio sent so far has played, as the next chunk's synthesis may not end in time. `None`
    /// when none waits, or the reply's first audio is still to come.
    fn waiting_due(&self) -> Option<Instant> {
        if self.pending.is_empty() || self.spoken.is_empty() {
            return None;
        }
        let waiting = Duration::from_secs_f64(self.pending_ms() / 1000.0);
        self.first_audio.heard_until()?.checked_sub(waiting + NEXT_CHUNK_LEAD)
    }

    /// Checks the waiting audio, with the end of the audio before it, if it is due. False when
    /// the reply must stop.
    async fn check_waiting_if_due(&mut self) -> bool {
        match self.waiting_due() {
            Some(due) if due <= Instant::now() => {
                tracing::debug!(waiting_ms = self.pending_ms(), "short chunk checked without the next");
                self.check_voice(true).await
            }
            _ => !self.stopped(),
        }
    }

    /// When the synthesis of the reply's `first` chunk or a later one is due: the first chunk's
    /// (`None`) goes ahead of later chunks; a later one's by when it is due, since another
    /// session's next chunk may be due first.
    fn due(&self, first: bool) -> Option<Instant> {
        self.first_audio.next_due().filter(|_| !first)
    }

    /// Synthesizes one chunk and queues it for the voice gate, which runs once at least
    /// [`MIN_CHECK_MS`] of audio waits. The first [`MIN_CHECK_MS`] of the first chunk, and of a
    /// later chunk whose work is due, is decoded, checked and sent before the rest of it is decoded
    /// (its rest is checked at once, with the end of that audio before it). False when the reply
    /// must stop.
    async fn say(&mut self, text: String) -> bool {
        if self.marks.marks.iter().all(|(m, _)| *m != mark::FIRST_CHUNK_SAFE) {
            self.marks.marks.push((mark::FIRST_CHUNK_SAFE, Instant::now()));
        }
        let first = self.spoken.is_empty() && self.pending.is_empty();
        let owned = text.clone();
        let head = Duration::from_secs_f64(MIN_CHECK_MS / 1000.0);
        let engine = self.engines.tts.clone();
        let due = self.due(first);
        let job = move |tts: &mut Synthesizer| {
            // The first MIN_CHECK_MS goes ahead of the rest of the first chunk, but not while
            // other sessions' audio waits: the rest would go ahead of their due chunks, or wait
            // behind their first words while the first part plays. And of a later chunk whose
            // work is due: the audio before it ends within NEXT_CHUNK_LEAD.
            let head_first = match due {
                None => engine.waiting() == 0,
                Some(due) => Instant::now() >= due,
            };
            if head_first { tts.synthesize_head(&owned, head) } else { Ok((tts.synthesize(&owned)?, None)) }
        };
        let spoken = self.engines.tts.try_run(due.map_or(Priority::High, Priority::By), job).await;
        let (audio, rest) = match spoken {
            Ok(spoken) => spoken,
            Err(e) => {
                self.first_audio.end();
                let _ = self.output.event(engine_error("speech synthesis failed", &e)).await;
                return false;
            }
        };
        if first {
            self.marks.marks.push((mark::FIRST_AUDIO, Instant::now()));
        }
        let queued = self.queue(Pending { text, audio, continues: false }).await;
        // The first audio is out (or checked and waiting for more): the reply model goes on.
        self.first_audio.end();
        queued && self.say_rest(rest, first).await
    }

    /// Synthesizes and queues the rest of a chunk (the reply's `first` or a later one) whose first
    /// audio went ahead.
    async fn say_rest(&mut self, rest: Option<Rest>, first: bool) -> bool {
        let Some(rest) = rest else { return true };
        if self.stopped() {
            return false;
        }
        // Needed before the first part has played (0.8 s).
        let priority = self.due(first).map_or(Priority::High, Priority::By);
        match self.engines.tts.try_run(priority, move |tts| tts.synthesize_rest(rest)).await {
            Ok(audio) => self.queue(Pending { text: String::new(), audio, continues: true }).await,
            Err(e) => {
                let _ = self.output.event(engine_error("speech synthesis failed", &e)).await;
                false
            }
        }
    }

    /// Queues synthesized audio for the voice gate and checks it once there is enough (a chunk's
    /// rest at once). False when the reply must stop.
    async fn queue(&mut self, piece: Pending) -> bool {
        self.first_audio.add_audio(Duration::from_secs_f64(piece.audio.len() as f64 / self.engines.tts_rate as f64));
        // A rest whose first audio was sent is needed before that audio has played.
        let rest_of_sent = piece.continues && self.pending.is_empty();
        self.pending.push(piece);
        if self.pending_ms() >= MIN_CHECK_MS || rest_of_sent { self.check_voice(false).await } else { true }
    }

    /// Synthesized audio waiting for the voice gate, ms.
    fn pending_ms(&self) -> f64 {
        self.pending.iter().map(|p| p.audio.len()).sum::<usize>() as f64 * 1000.0 / self.engines.tts_rate as f64
    }

    /// Runs the voice gate on the waiting audio and hands what passes to the session (text
    /// delta, then audio); audio too short to check alone is checked with the end of the audio
    /// before it when it is a chunk's rest or `early` (its next chunk would come too late). False
    /// when the reply must stop.
    async fn check_voice(&mut self, early: bool) -> bool {
        if self.pending.is_empty() || self.cancel.load(Ordering::Relaxed) {
            return !self.stopped();
        }
        let rate = self.engines.tts_rate;
        let turn = self.gates.turn;
        let pending = std::mem::take(&mut self.pending);
        // A chunk's rest shorter than a check, or a short chunk checked early, is checked with the
        // end of the audio that went ahead of it (one window of at least MIN_CHECK_MS, as it would
        // be with the next chunk's audio).
        let waiting: usize = pending.iter().map(|p| p.audio.len()).sum();
        let min = (MIN_CHECK_MS * rate as f64 / 1000.0) as usize;
        let before = &self.passed_window;
        let lead = if early || pending[0].continues { min.saturating_sub(waiting).min(before.len()) } else { 0 };
        let mut audio = before[before.len() - lead..].to_vec();
        audio.extend(pending.iter().flat_map(|p| p.audio.iter().copied()));
        let mut bounds = Vec::with_capacity(pending.len());
        let mut at = lead;
        for p in &pending {
            bounds.push(at..at + p.audio.len());
            at += p.audio.len();
        }
        let mut announced = vec![false; pending.len()];
        // Checked window by window, so the first frame waits for one short check only.
        for window in check_windows(audio.len(), rate) {
            let checked = audio[window.clone()].to_vec();
            let passed = matches!(self.gates.voice(checked.clone()).await, Ok(Some(d)) if !d.stops());
            if !passed {
                // Cut: none of this audio leaves the server, and the reply stops; the client gets
                // `reply.cancelled` with reason `safety` after the gate's decision.
                self.halt.store(true, Ordering::Relaxed);
                self.cancel.store(true, Ordering::Relaxed);
                let _ = self.output.cut(turn).await;
                return false;
            }
            self.passed_window = checked;
            if !self.marks_sent {
                self.marks_sent = true;
                self.marks.marks.push((mark::FIRST_AUDIO_SAFE, Instant::now()));
                if self.output.marks(self.marks.clone()).await.is_err() {
                    return false;
                }
            }
            for (i, p) in pending.iter().enumerate() {
                let part = bounds[i].start.max(window.start)..bounds[i].end.min(window.end);
                if part.is_empty() {
                    continue;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return false;
                }
                if !announced[i] {
                    announced[i] = true;
                    self.chunk_sent.get_or_insert_with(Instant::now);
                    let audio_ms = p.audio.len() as f64 * 1000.0 / rate as f64;
                    match self.spoken.last_mut() {
                        Some(last) if p.continues => last.audio_ms += audio_ms,
                        _ => {
                            let delta = if self.spoken.is_empty() { p.text.clone() } else { format!(" {}", p.text) };
                            self.spoken.push(Spoken { text: p.text.clone(), audio_ms });
                            if self.output.event(ServerEvent::ResponseTextDelta { turn, delta }).await.is_err() {
                                return false;
                            }
                        }
                    }
                }
                if self.output.audio(turn, audio[part].to_vec(), rate, self.ref_ts_us).await.is_err() {
                    return false;
                }
            }
        }
        !self.stopped()
    }
}

/// Words an utterance does not end on, even before a full stop (a trailing "and" or "the" means
/// the speaker paused mid-thought). Words that end sentences often ("than he was.", "where are you
/// from?") are not listed: after Whisper's full stop they end the turn.
const HANGING_WORDS: &[&str] = &[
    "a", "an", "and", "because", "but", "if", "into", "my", "of", "or", "our", "than", "the", "uh", "um", "with",
    "your",
];

/// How a transcript ends, as far as its words and Whisper's punctuation tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A full sentence: a full stop, question or exclamation mark after a word that can end one.
    Finished,
    /// No closing mark (Whisper leaves short answers bare, and may drop a trailing "and": a bare
    /// "I have a cat" may be "I have a cat and"); the reply model judges it.
    Unpunctuated,
    /// Recognition stopped where it found a repeat likelier than the end ("5" before another
    /// " 5"): the pause's sound judges it.
    CutShort,
    /// Trails off ("...") or its last word leaves it hanging ("and", "the", "um"), or recognition
    /// stopped where it found a new word likelier than the end (the "and" it dropped).
    Hanging,
}

impl Ending {
    /// Whether the words leave the turn's end open, for the reply model and the pause's sound to
    /// judge (a finished or hanging one is settled by its words).
    fn is_open(self) -> bool {
        matches!(self, Ending::Unpunctuated | Ending::CutShort)
    }
}

/// The probability that the turn is over, from the reply model's `words` (a sentence end next)
/// and the end-of-turn model's `sound`: the words' odds times the sound's, where the sound only
/// ever raises them (a finished turn that does not sound it keeps the words' verdict; the int8
/// model is jittery, and misses some finished read sentences).
fn turn_end_odds(words: f32, sound: f32) -> f32 {
    let logit = |p: f32| {
        let p = p.clamp(1e-6, 1.0 - 1e-6);
        (p / (1.0 - p)).ln()
    };
    1.0 / (1.0 + (-(logit(words) + logit(sound).max(0.0))).exp())
}

fn ending(text: &str) -> Ending {
    let text = text.trim();
    let last = text.split_whitespace().last().unwrap_or("");
    let last = bare_word(last);
    if text.ends_with("...") || text.ends_with('…') || last.is_empty() || HANGING_WORDS.contains(&last.as_str()) {
        Ending::Hanging
    } else if text.ends_with(['.', '?', '!']) {
        Ending::Finished
    } else {
        Ending::Unpunctuated
    }
}

/// How a transcript ends that Whisper stopped before a likelier word, `next` (if it did). A word
/// already said is the model's habit of repeating itself ("5" before another " 5", when "five
/// five" was said): the pause's sound decides. Any other word is where the speaker may go on ("I
/// have a cat" before " and").
fn ending_before(text: &str, next: Option<&str>) -> Ending {
    let ending = ending(text);
    let Some(next) = next.filter(|_| ending != Ending::Hanging) else {
        return ending;
    };
    let next = bare_word(next);
    if !next.is_empty() && text.split_whitespace().any(|w| bare_word(w) == next) {
        Ending::CutShort
    } else {
        Ending::Hanging
    }
}

/// A word without its punctuation, in lower case.
fn bare_word(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
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
    use super::super::{Output, ReplyControl};
    use super::*;

    /// A later chunk too short for the voice gate alone ("Yes.") goes out, checked with the end of
    /// the audio before it, before that audio has played, when no next chunk comes to be checked
    /// with it: before, it waited for the next chunk's synthesis (a 19 ms stall at 4 sessions).
    /// Real models (needs the provisioned model cache, as the `tests` crate does), no sampling
    /// noise in the voice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_later_chunk_goes_out_before_the_audio_before_it_has_played() {
        let manifest = Arc::new(Manifest::load_default().unwrap_or_else(|e| panic!("{e}")));
        let audit_log = std::env::temp_dir().join(format!("parley-unit-audit-{}.jsonl", std::process::id()));
        let safety = SafetyConfig { audit_log, ..Default::default() };
        let engines =
            Arc::new(Engines::load(&manifest, &VoiceConfig::default(), &safety, &Default::default()).unwrap());
        let quiet = |tts: &mut Synthesizer| {
            if let Synthesizer::Piper(tts) = tts {
                tts.set_noise(false);
            }
        };
        engines.tts.run(Priority::High, quiet).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let output = ReplyOutput::new(tx, Arc::new(ReplyControl::new(engines.tts_rate)));
        let turn = 1;
        let gates = Gates { engines: engines.clone(), output, session: "test".into(), turn };
        let first_audio = Arc::new(FirstAudioWait::new(ReplyRunning::new(&engines)));
        let marks = TurnMarks { turn, anchor: Instant::now(), marks: Vec::new() };
        let stage = TtsStage::new(gates, Default::default(), Default::default(), first_audio, 0, marks);
        let (pieces, piece_rx) = mpsc::channel(8);
        let stage = tokio::spawn(stage.run(piece_rx));
        pieces.send(Piece::Clause("Here is a short story about a cat who lived by the sea.".into())).await.unwrap();
        pieces.send(Piece::Clause("Yes.".into())).await.unwrap();
        // The pieces stay open: the reply model has not made its next chunk.
        let (mut first_sent, mut first_ms, mut short_ms, mut texts) = (None, 0.0, 0.0, Vec::new());
        while short_ms == 0.0 || !rx.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            match next.expect("the short chunk was not sent while the reply went on").expect("the reply ended") {
                Output::Event(ServerEvent::ResponseTextDelta { delta, .. }) => texts.push(delta),
                Output::Audio { pcm, sample_rate, .. } => {
                    let ms = pcm.len() as f64 * 1000.0 / sample_rate as f64;
                    let sent = *first_sent.get_or_insert_with(Instant::now);
                    if texts.len() < 2 {
                        first_ms += ms;
                    } else {
                        let played = sent + Duration::from_secs_f64(first_ms / 1000.0);
                        assert!(short_ms > 0.0 || Instant::now() < played, "sent after the audio before it had played");
                        short_ms += ms;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert_eq!(texts[1].trim(), "Yes.");
        assert!(short_ms < MIN_CHECK_MS, "the chunk was {short_ms} ms of audio: not short");
        drop(pieces);
        let spoken = stage.await.unwrap();
        assert_eq!(spoken.len(), 2);
    }

    fn spoken(parts: &[(&str, f64)]) -> Vec<Spoken> {
        parts.iter().map(|(text, audio_ms)| Spoken { text: text.to_string(), audio_ms: *audio_ms }).collect()
    }

    #[test]
    fn finished_utterances_end_a_sentence_without_hanging() {
        use Ending::*;
        let cases = [
            ("What is the capital of France?", Finished),
            ("Tell me a joke.", Finished),
            ("than he was.", Finished),
            ("Where are you from?", Finished),
            ("I want to go to the", Hanging),
            ("I went to the store and...", Hanging),
            ("Tell me about the.", Hanging),
            ("So, um.", Hanging),
            ("", Hanging),
            ("I have a cat and", Hanging),
            // Whisper may have dropped a trailing "and": the reply model judges these.
            ("I have a cat", Unpunctuated),
            ("7 of clubs", Unpunctuated),
        ];
        for (text, expected) in cases {
            assert_eq!(ending(text), expected, "{text:?}");
        }
    }

    #[test]
    fn a_pause_that_sounds_finished_raises_the_odds_of_a_turn_end_and_never_lowers_them() {
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
        // Words the reply model finds a little short of an end, said as a last word.
        assert!(turn_end_odds(0.02, 0.9) >= 0.05);
        // Words that trail off stay unfinished however the pause sounds.
        assert!(turn_end_odds(1e-5, 0.99) < 0.01);
        // A pause that sounds unfinished leaves the words' verdict as it is.
        assert!(close(turn_end_odds(0.37, 0.1), 0.37));
        assert!(close(turn_end_odds(0.2, 0.5), 0.2));
    }

    #[test]
    fn a_transcript_stopped_before_a_new_word_hangs_and_before_a_repeat_is_cut_short() {
        use Ending::*;
        assert_eq!(ending_before("I have a cat", Some(" and")), Hanging);
        assert_eq!(ending_before("I have a cat", Some(",")), Hanging);
        assert_eq!(ending_before("5", Some(" 5")), CutShort);
        assert_eq!(ending_before("10 of clubs", Some(" 10")), CutShort);
        assert_eq!(ending_before("I went to the", Some(" store")), Hanging);
        assert_eq!(ending_before("7 of clubs", None), Unpunctuated);
        assert_eq!(ending_before("What time is it?", None), Finished);
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
