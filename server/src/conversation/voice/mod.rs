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
//!
//! Modules: [`engines`] (the shared models), [`turns`] (turn taking, per session), [`reply`]
//! (one reply), [`speech`] (its TTS stage), [`gates`] (the safety gates), [`ending`] (how a
//! transcript ends).
mod ending;
pub mod engines;
mod gates;
mod reply;
mod speech;
mod turns;

pub use engines::Engines;

use crate::conversation::{Pipeline, SessionClosed, SessionIo};
use crate::models::chat_api::ReplyConfig;
use crate::models::tts::TtsBackend;
use crate::models::{Manifest, ModelError};
use crate::safety::SafetyConfig;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::task::JoinHandle;
use tracing::Instrument;
use turns::Worker;

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
