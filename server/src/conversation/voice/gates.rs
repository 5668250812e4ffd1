//! The safety gates as one reply uses them: each decision goes to the client, the audit log and the metrics before the reply goes on.
use crate::conversation::{ReplyOutput, SessionClosed};
use crate::engine::Priority;
use crate::safety::Decision;
use parley_protocol::event::{SafetyAction, SafetyStage};
use std::sync::Arc;
use std::time::Instant;

use super::engines::{Engines, engine_error};
/// The safety gates as one reply uses them: each decision goes to the client, the audit log and
/// the metrics before the reply proceeds.
#[derive(Clone)]
pub(super) struct Gates {
    pub(super) engines: Arc<Engines>,
    pub(super) output: ReplyOutput,
    pub(super) session: Arc<str>,
    pub(super) key: Option<Arc<str>>,
    pub(super) turn: u64,
}

impl Gates {
    /// Judges `text` at `stage` (input or output). `None`: the gate could not run (reported).
    pub(super) async fn content(&self, stage: SafetyStage, text: &str) -> Result<Option<Decision>, SessionClosed> {
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

    /// Compares synthesized `audio` (at the voice's rate), whose first `lead` samples the gate
    /// passed before, with the enrolled voice. `None`: the gate could not run (reported).
    pub(super) async fn voice(&self, audio: Vec<f32>, lead: usize) -> Result<Option<Decision>, SessionClosed> {
        let started = Instant::now();
        let rate = self.engines.tts_rate;
        let seconds = |n: usize| n as f64 / rate as f64;
        let (total, new) = (seconds(audio.len()), seconds(audio.len().saturating_sub(lead)));
        match self.engines.voice_gate.try_run(Priority::High, move |gate| gate.check_after(&audio, rate, lead)).await {
            Ok(check) => {
                let decision = Decision {
                    stage: SafetyStage::Voice,
                    action: if check.pass { SafetyAction::Allow } else { SafetyAction::Block },
                    category: Some("voice".into()),
                    rule_id: Some(crate::safety::voice::RULE_ID.into()),
                    score: Some(check.score),
                    elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                    detail: (!check.pass).then(|| match check.alone {
                        Some(alone) => {
                            format!("the audio does not match the enrolled voice (its new part alone {alone:.2}): cut")
                        }
                        None => "the audio does not match the enrolled voice: cut".into(),
                    }),
                };
                let judged = match lead {
                    0 => format!("{total:.2} s of synthesized audio"),
                    _ => format!("{total:.2} s of synthesized audio ({new:.2} s new)"),
                };
                self.record(decision, &judged).await.map(Some)
            }
            Err(e) => {
                self.output.event(engine_error("voice check failed", &e)).await?;
                Ok(None)
            }
        }
    }

    /// Audits and counts the decision (for a held reply: once it is released), then sends it.
    pub(super) async fn record(&self, decision: Decision, judged: &str) -> Result<Decision, SessionClosed> {
        let (engines, session, key, turn) = (self.engines.clone(), self.session.clone(), self.key.clone(), self.turn);
        let (audited, judged) = (decision.clone(), judged.to_string());
        let record = move || engines.recorder.record(&session, key.as_deref(), turn, &audited, &judged);
        self.output.when_released(record).await?;
        self.output.event(decision.event(self.turn)).await?;
        Ok(decision)
    }

    /// The policy's words for a decision that stopped the turn.
    pub(super) fn response(&self, decision: &Decision) -> String {
        let category = decision.category.as_deref().and_then(|id| self.engines.policy.category(id));
        category.map_or_else(|| "I can't help with that.".to_string(), |c| c.response.clone())
    }
}
