//! In-stream safety: the policy spec ([`policy`]), the content classifier behind the input and
//! output gates ([`content`]), the voice gate ([`voice`]), and where every decision goes: the
//! client (a `safety.decision` event), the audit log ([`audit`]) and `/metrics` ([`Recorder`]).
//! The gates themselves run in the voice pipeline (`pipeline/voice.rs`).
pub mod audit;
pub mod content;
pub mod policy;
pub mod tools;
pub mod voice;

use crate::metrics::Histogram;
use audit::{AuditEntry, AuditLog};
use content::Verdict;
use parley_protocol::ServerEvent;
use parley_protocol::event::{SafetyAction, SafetyStage};
use policy::{Policy, Style};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Settings of the safety gates (`[safety]` in the config file). The gates cannot be switched off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafetyConfig {
    /// The policy spec; the built-in `server/policy/default.toml` when unset.
    pub policy: Option<PathBuf>,
    /// The append-only audit log (JSON lines).
    pub audit_log: PathBuf,
    /// Cosine to the enrolled voice under which reply audio (0.8 s or more) is cut. The enrolled
    /// voice's windows in benchmark audit logs (real replies): 34 of 7,104 under 0.75 (22 of the
    /// 622 of 0.8–1 s), so 0.75 cut right replies; 1 under 0.70 (0.686). espeak-ng and human
    /// voices at most 0.61 (`eval-voice`: dev and holdout sets, whole utterances and their last
    /// 0.8 / 1.0 s).
    pub voice_threshold: f32,
    /// The same for audio shorter than `voice::MIN_CHECK_MS`, judged alone (a short reply, or a
    /// reply's last words). Last 300 / 400 / 600 ms of 60 texts: the enrolled voice 0.58 / 0.64
    /// / 0.67 and up, espeak-ng and human voices at most 0.58 / 0.60 / 0.60. At 0.75 the gate cut
    /// 47 / 31 / 9 of the 60 enrolled pieces; at 0.65, 18 / 5 / 0 (and every other voice's).
    pub voice_threshold_short: f32,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        Self { policy: None, audit_log: default_audit_log(), voice_threshold: 0.70, voice_threshold_short: 0.65 }
    }
}

/// `$XDG_STATE_HOME/parley/audit.jsonl`, else `~/.local/state/parley/audit.jsonl`, else `./parley-audit.jsonl`.
fn default_audit_log() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
    match state {
        Some(dir) => dir.join("parley/audit.jsonl"),
        None => PathBuf::from("parley-audit.jsonl"),
    }
}

/// One gate decision: what the client, the audit log and the metrics get.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub stage: SafetyStage,
    pub action: SafetyAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    pub elapsed_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Decision {
    /// The decision of a content gate on `verdict`: the category's style when flagged.
    pub fn content(policy: &Policy, stage: SafetyStage, verdict: &Verdict, elapsed: Duration) -> Decision {
        let cited = verdict.flagged.or(verdict.nearest);
        let category = cited.map(|(c, _)| &policy.categories[c]);
        let action = match (verdict.flagged, category.map(|c| c.style)) {
            (None, _) | (_, None) => SafetyAction::Allow,
            (Some(_), Some(Style::Refuse)) => SafetyAction::Refuse,
            (Some(_), Some(Style::SafeCompletion)) => SafetyAction::SafeCompletion,
        };
        Decision {
            stage,
            action,
            category: category.map(|c| c.id.clone()),
            rule_id: cited.map(|(c, r)| policy.categories[c].rules[r].id.clone()),
            score: Some(verdict.score),
            elapsed_ms: elapsed.as_secs_f64() * 1000.0,
            detail: verdict.flagged.map(|_| format!("flagged: {:?}", verdict.segment)),
        }
    }

    /// Whether the gate stopped what it judged.
    pub fn stops(&self) -> bool {
        self.action != SafetyAction::Allow
    }

    /// The `safety.decision` event for `turn`.
    pub fn event(&self, turn: u64) -> ServerEvent {
        ServerEvent::SafetyDecision {
            turn,
            stage: self.stage,
            action: self.action,
            rule_id: self.rule_id.clone(),
            category: self.category.clone(),
            score: self.score,
            elapsed_ms: Some(self.elapsed_ms),
            detail: self.detail.clone(),
        }
    }
}

/// Records decisions in the audit log and counts them for `/metrics`.
pub struct Recorder {
    policy_version: String,
    audit: AuditLog,
    audit_errors: AtomicU64,
    counts: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
    gate_seconds: [Histogram; 3],
}

impl Recorder {
    pub fn new(policy: &Policy, audit: AuditLog) -> Self {
        Self {
            policy_version: format!("{} {}", policy.name, policy.version),
            audit,
            audit_errors: AtomicU64::new(0),
            counts: Mutex::new(BTreeMap::new()),
            gate_seconds: Default::default(),
        }
    }

    /// Appends the decision to the audit log (flushed before this returns) and counts it. A failed
    /// write is logged and counted; the decision itself stands.
    pub fn record(&self, session: &str, key_id: Option<&str>, turn: u64, decision: &Decision, judged: &str) {
        let ts_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let entry = AuditEntry { ts_ms, session, key_id, turn, policy_version: &self.policy_version, decision, judged };
        if let Err(e) = self.audit.append(&entry) {
            self.audit_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %e, path = %self.audit.path().display(), "cannot write the safety audit log");
        }
        let key =
            (stage_label(decision.stage), action_label(decision.action), decision.category.clone().unwrap_or_default());
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
        self.gate_seconds[decision.stage as usize].observe(Duration::from_secs_f64(decision.elapsed_ms / 1000.0));
        if decision.stops() {
            tracing::info!(session, turn, stage = ?decision.stage, action = ?decision.action,
                rule = decision.rule_id.as_deref().unwrap_or(""), score = decision.score, "safety gate stopped a turn");
        }
    }

    /// Appends the safety metrics (Prometheus text) to `out`.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP parley_safety_decisions_total Safety gate decisions, by gate, action and category.\n\
             # TYPE parley_safety_decisions_total counter"
        );
        for ((stage, action, category), n) in self.counts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "parley_safety_decisions_total{{stage=\"{stage}\",action=\"{action}\",category=\"{category}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP parley_safety_gate_seconds Time each safety gate took per decision.\n\
             # TYPE parley_safety_gate_seconds histogram"
        );
        for stage in [SafetyStage::Input, SafetyStage::Output, SafetyStage::Voice] {
            let labels = format!("stage=\"{}\"", stage_label(stage));
            self.gate_seconds[stage as usize].render(out, "parley_safety_gate_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP parley_safety_audit_errors_total Audit log writes that failed.\n\
             # TYPE parley_safety_audit_errors_total counter\nparley_safety_audit_errors_total {}",
            self.audit_errors.load(Relaxed)
        );
    }
}

fn stage_label(stage: SafetyStage) -> &'static str {
    match stage {
        SafetyStage::Input => "input",
        SafetyStage::Output => "output",
        SafetyStage::Voice => "voice",
    }
}

fn action_label(action: SafetyAction) -> &'static str {
    match action {
        SafetyAction::Allow => "allow",
        SafetyAction::SafeCompletion => "safe_completion",
        SafetyAction::Refuse => "refuse",
        SafetyAction::Block => "block",
    }
}
