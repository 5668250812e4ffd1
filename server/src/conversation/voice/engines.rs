//! The models every voice session shares, each on its own engine thread, with the safety policy: loading, warm-up, and how replies share the cores ([`Engines::hold_back`]).
use super::VoiceConfig;
use super::turns::prompt;
use crate::engine::{Engine, EngineError, Priority};
use crate::models::llm::Llm;
use crate::models::tts::Synthesizer;
use crate::models::vad::{CHUNK_SAMPLES, VadState};
use parley_protocol::ServerEvent;
use parley_protocol::event::ErrorCode;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::models::asr::Asr;
use crate::models::chat_api::{Backend, ChatApi, ReplyConfig};
use crate::models::text_embed::TextEmbedder;
use crate::models::tts::TtsBackend;
use crate::models::turn::TurnDetector;
use crate::models::vad::Vad;
use crate::models::{Manifest, ModelError};
use crate::safety::audit::AuditLog;
use crate::safety::content::ContentClassifier;
use crate::safety::policy::Policy;
use crate::safety::voice::VoiceGate;
use crate::safety::{Recorder, SafetyConfig};

/// Jobs that may wait at each priority of an engine before new ones are refused.
pub(super) const ENGINE_QUEUE: usize = 64;

/// How often a held-back reply looks whether it was cancelled.
pub(super) const HOLD_BACK_POLL: Duration = Duration::from_millis(20);

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
    pub(super) fn cores_idle(&self) -> bool {
        [self.asr.idle(), self.llm.idle(), self.tts.idle()].iter().all(|&idle| idle)
    }

    /// Waits while a reply's first audio is being made (in any session) and its work can wait:
    /// until `until` at most, and not past `stop`. On two cores, a reply's later words, needed only
    /// once the audio before them has played, would take the cores another listener waits on.
    pub(super) async fn hold_back(&self, until: Instant, stop: impl Fn() -> bool) {
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
    pub(super) fn warm_up(&self, config: &VoiceConfig) -> Result<(), ModelError> {
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
        let messages = prompt(&config.system_prompt, &[], Some("Hello!".into()));
        run(self.llm.run_blocking(high, move |llm| llm.generate(&messages, 1, |_| ControlFlow::Break(())).map(drop)))?;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "models warmed up");
        Ok(())
    }
}

/// Starts one engine and logs the model's source and load time.
pub(super) fn spawn<M: 'static>(
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

pub(super) fn engine_to_model(e: EngineError) -> ModelError {
    match e {
        EngineError::Model(e) => e,
        other => ModelError::Invalid(other.to_string()),
    }
}

/// The `error` event for a failed model job: `busy` when the engine's queue was full (the client
/// may retry), `internal` otherwise. The session goes on either way.
pub(super) fn engine_error(what: &str, e: &EngineError) -> ServerEvent {
    tracing::warn!(error = %e, "{what}");
    let code = if matches!(e, EngineError::Busy(_)) { ErrorCode::Busy } else { ErrorCode::Internal };
    ServerEvent::error(code, format!("{what}: {e}"))
}
