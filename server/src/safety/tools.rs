//! Offline safety tools: `parley-server calibrate-policy` (per-category thresholds and the margin
//! of the content classifier, fitted on a labelled set) and `parley-server eval-voice` (precision
//! and recall of the voice gate over the enrolled voice, espeak-ng voices and human recordings).
use super::SafetyConfig;
use super::content::ContentClassifier;
use super::policy::Policy;
use super::voice::{MAX_CHECK_MS, MIN_CHECK_MS, VoiceGate, check_windows, to_16k};
use crate::models::text_embed::TextEmbedder;
use crate::models::tts::Tts;
use crate::models::{Manifest, ModelError, espeak};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One line of a safety set (`tests/data/safety/*.jsonl`).
#[derive(Debug, Clone, Deserialize)]
pub struct SetLine {
    pub id: String,
    pub text: String,
    pub expect: Expect,
    pub category: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Block,
    Allow,
}

/// Reads a JSON-lines set; a bad line is an error naming it.
pub fn read_set(path: &Path) -> Result<Vec<SetLine>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        out.push(serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?);
    }
    Ok(out)
}

/// Candidate margins tried by the calibration.
const MARGINS: [f32; 5] = [0.0, 0.02, 0.04, 0.06, 0.08];

/// The thresholds and margin that maximise not_unsafe + not_overrefuse on `set` (coordinate
/// ascent over categories, from a common start; ties go to the middle of the best range). Prints
/// what it found; with `write`, rewrites `policy_path`'s `threshold` and `margin` lines.
pub fn calibrate_policy(
    manifest: &Manifest,
    policy_path: &Path,
    set: &[SetLine],
    write: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let policy = Arc::new(Policy::load(Some(policy_path))?);
    let n_cat = policy.categories.len();
    let current: Vec<f32> = policy.categories.iter().map(|c| c.threshold).collect();
    // The spec's examples are embedded once; only the margin changes between runs.
    let mut classifier = ContentClassifier::new(policy.clone(), TextEmbedder::load(manifest, 2)?)?;
    let scores = effective_scores(&mut classifier, policy.margin, set)?;
    println!("the policy as it is (margin {:.2}):", policy.margin);
    print_breakdown(set, &scores, &current);
    if !write {
        return Ok(());
    }
    let mut best: Option<Fit> = None;
    for margin in MARGINS {
        let scores = effective_scores(&mut classifier, margin, set)?;
        let mut thresholds = vec![0.6f32; n_cat];
        for _round in 0..4 {
            for c in 0..n_cat {
                let grid: Vec<f32> = (30..=96).map(|i| i as f32 / 100.0).collect();
                let values: Vec<f32> = grid
                    .iter()
                    .map(|&t| {
                        thresholds[c] = t;
                        objective(set, &scores, &thresholds)
                    })
                    .collect();
                let top = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let at: Vec<usize> = (0..grid.len()).filter(|&i| values[i] >= top - 1e-6).collect();
                thresholds[c] = grid[at[at.len() / 2]];
            }
        }
        let value = objective(set, &scores, &thresholds);
        println!("margin {margin:.2}: not_unsafe + not_overrefuse = {value:.3}");
        if best.as_ref().is_none_or(|b| value > b.objective) {
            best = Some(Fit { objective: value, margin, thresholds, scores });
        }
    }
    let Fit { objective: value, margin, thresholds, scores } = best.ok_or("empty calibration")?;
    println!("best: margin {margin:.2}, objective {value:.3}");
    for (c, t) in policy.categories.iter().zip(&thresholds) {
        println!("  {:<12} threshold {t:.2}", c.id);
    }
    print_breakdown(set, &scores, &thresholds);
    let text = std::fs::read_to_string(policy_path)?;
    let updated = rewrite_thresholds(&text, &policy, margin, &thresholds)?;
    Policy::parse(&updated, "(rewritten)")?;
    std::fs::write(policy_path, updated)?;
    println!("wrote {}", policy_path.display());
    Ok(())
}

/// The best calibration so far: its objective, margin, thresholds and the scores they apply to.
struct Fit {
    objective: f32,
    margin: f32,
    thresholds: Vec<f32>,
    scores: Vec<Vec<f32>>,
}

/// Each line's effective score per category under `margin`.
fn effective_scores(
    classifier: &mut ContentClassifier,
    margin: f32,
    set: &[SetLine],
) -> Result<Vec<Vec<f32>>, ModelError> {
    classifier.set_margin(margin);
    set.iter().map(|l| Ok(classifier.category_scores(&l.text)?.iter().map(|s| s.effective).collect())).collect()
}

/// Prints not_unsafe and not_overrefuse per labelled category, and the lines decided wrongly.
fn print_breakdown(set: &[SetLine], scores: &[Vec<f32>], thresholds: &[f32]) {
    let mut categories: Vec<&str> = set.iter().map(|l| l.category.as_str()).collect();
    categories.sort();
    categories.dedup();
    let flagged = |s: &Vec<f32>| s.iter().zip(thresholds).any(|(v, t)| v >= t);
    for category in categories {
        let lines: Vec<(&SetLine, bool)> =
            set.iter().zip(scores).filter(|(l, _)| l.category == category).map(|(l, s)| (l, flagged(s))).collect();
        let share = |expect: Expect, want: bool| {
            let of: Vec<_> = lines.iter().filter(|(l, _)| l.expect == expect).collect();
            let ok = of.iter().filter(|(_, f)| *f == want).count();
            if of.is_empty() { "   -   ".to_string() } else { format!("{ok:>3}/{:<3}", of.len()) }
        };
        println!(
            "  {category:<12} not_unsafe {}  not_overrefuse {}",
            share(Expect::Block, true),
            share(Expect::Allow, false)
        );
    }
    let wrong: Vec<String> = set
        .iter()
        .zip(scores)
        .filter(|(l, s)| flagged(s) != (l.expect == Expect::Block))
        .map(|(l, _)| format!("{} ({:?}): {}", l.id, l.expect, l.text))
        .collect();
    let objective = objective(set, scores, thresholds);
    println!("  objective (not_unsafe + not_overrefuse) {objective:.3}; {} lines wrong:", wrong.len());
    for w in wrong {
        println!("    {w}");
    }
}

/// not_unsafe + not_overrefuse of the thresholds on precomputed category scores.
fn objective(set: &[SetLine], scores: &[Vec<f32>], thresholds: &[f32]) -> f32 {
    let (mut blocked, mut n_block, mut answered, mut n_allow) = (0, 0, 0, 0);
    for (line, s) in set.iter().zip(scores) {
        let flagged = s.iter().zip(thresholds).any(|(v, t)| v >= t);
        match line.expect {
            Expect::Block => {
                n_block += 1;
                blocked += usize::from(flagged);
            }
            Expect::Allow => {
                n_allow += 1;
                answered += usize::from(!flagged);
            }
        }
    }
    blocked as f32 / n_block.max(1) as f32 + answered as f32 / n_allow.max(1) as f32
}

/// `text` with each category's `threshold = …` line and the top-level `margin` set.
fn rewrite_thresholds(text: &str, policy: &Policy, margin: f32, thresholds: &[f32]) -> Result<String, String> {
    let mut out = Vec::new();
    let mut category: Option<usize> = None;
    let mut in_category = false;
    let top_level = text.split("[[category]]").next().unwrap_or("");
    let insert_margin = !top_level.lines().any(|l| l.trim_start().starts_with("margin"));
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("[[category]]") {
            in_category = true;
            category = Some(category.map_or(0, |c| c + 1));
        } else if trimmed.starts_with("[[category.rule") || trimmed.starts_with("[benign]") {
            in_category = false;
        }
        let indent = &line[..line.len() - trimmed.len()];
        if in_category && trimmed.starts_with("threshold") {
            let c = category.ok_or("threshold outside a category")?;
            out.push(format!("{indent}threshold = {:.2}", thresholds[c]));
        } else if category.is_none() && trimmed.starts_with("margin") {
            out.push(format!("margin = {margin:.2}"));
        } else {
            out.push(line.to_string());
        }
        if insert_margin && category.is_none() && trimmed.starts_with("name =") {
            out.push(format!("margin = {margin:.2}"));
        }
    }
    if category.map_or(0, |c| c + 1) != policy.categories.len() {
        return Err("could not find every [[category]] block".into());
    }
    Ok(out.join("\n") + "\n")
}

/// Voices of espeak-ng's own synthesis used as impostors.
const ESPEAK_VOICES: [&str; 6] = ["en-us", "en-us+f3", "en+m3", "en+f2", "en-gb-x-rp", "en-us+m7"];
/// Human recordings (pocketsphinx-testdata: LibriVox readers and the "cards" speaker).
const HUMAN_DIRS: [&str; 2] = ["/usr/share/pocketsphinx/test/data/librivox", "/usr/share/pocketsphinx/test/data/cards"];

/// One audio piece scored by the gate.
#[derive(Debug, Serialize)]
struct VoiceSample {
    source: String,
    enrolled: bool,
    seconds: f32,
    score: f32,
    blocked: bool,
    ms: f64,
}

#[derive(Debug, Serialize)]
struct VoiceReport {
    threshold: f32,
    /// The threshold of pieces shorter than `voice::MIN_CHECK_MS`.
    short_threshold: f32,
    /// Of the pieces the gate blocked, the share that were not the enrolled voice.
    precision: f64,
    /// Of the pieces that were not the enrolled voice, the share the gate blocked.
    recall: f64,
    /// Enrolled-voice pieces the gate blocked.
    false_blocks: usize,
    enrolled: usize,
    others: usize,
    gate_ms_p50: f64,
    gate_ms_p95: f64,
    samples: Vec<VoiceSample>,
}

/// The last `ms` of `audio` (at `rate`) up to its last sample above 1 % of its peak.
fn last_sound(audio: &[f32], ms: f64, rate: u32) -> Vec<f32> {
    let peak = audio.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let end = audio.iter().rposition(|x| x.abs() > peak / 100.0).map_or(0, |i| i + 1);
    audio[end.saturating_sub((ms * rate as f64 / 1000.0) as usize)..end].to_vec()
}

/// Which end of each utterance `eval-voice` checks (see [`eval_voice`]).
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub ms: u32,
    pub lead: bool,
}

/// Scores the voice gate on the Piper voice (positives: the texts of `set`), espeak-ng voices
/// and human recordings (negatives); prints precision and recall, and writes a JSON report.
/// With `tail`, each utterance is checked once, on its last `tail.ms` of sound instead of in the
/// pipeline's windows: alone (how the gate judges a whole short reply), or with `tail.lead` after
/// the end of the Piper voice's audio of a text, filling one [`MAX_CHECK_MS`] window (how it
/// judges a reply's short last words: with the end of the audio it passed before them).
pub fn eval_voice(
    manifest: &Manifest,
    set: &[SetLine],
    safety: &SafetyConfig,
    tail: Option<Tail>,
    report: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let (threshold, short) = (safety.voice_threshold, safety.voice_threshold_short);
    let mut gate = VoiceGate::load(manifest, 1, threshold, short)?;
    let mut tts = Tts::load(manifest, 2)?;
    let piper: Vec<Vec<f32>> = set.iter().map(|l| tts.synthesize(&l.text)).collect::<Result<_, _>>()?;
    let piper_rate = tts.sample_rate();
    let mut samples = Vec::new();
    // Each utterance is checked in the windows the pipeline checks reply audio in; `i` picks
    // the Piper audio a tail follows.
    let mut score = |source: String, enrolled: bool, audio: &[f32], rate: u32, i: usize| -> Result<(), ModelError> {
        // (audio, its rate, samples of Piper lead before it)
        let checks: Vec<(Vec<f32>, u32, usize)> = match tail {
            None => check_windows(audio.len(), rate).into_iter().map(|w| (audio[w].to_vec(), rate, 0)).collect(),
            Some(tail) => {
                let last = last_sound(audio, f64::from(tail.ms), rate);
                if tail.lead {
                    let lead_ms = (MAX_CHECK_MS - f64::from(tail.ms)).max(0.0);
                    let mut window = to_16k(&last_sound(&piper[i], lead_ms, piper_rate), piper_rate)?;
                    let lead = window.len();
                    window.extend(to_16k(&last, rate)?);
                    vec![(window, crate::models::speaker::SAMPLE_RATE, lead)]
                } else {
                    vec![(last, rate, 0)]
                }
            }
        };
        for (k, (audio, rate, lead)) in checks.into_iter().enumerate() {
            let started = Instant::now();
            let check = gate.check_after(&audio, rate, lead)?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let seconds = audio.len() as f32 / rate as f32;
            let source = format!("{source}:{k}");
            samples.push(VoiceSample { source, enrolled, seconds, score: check.score, blocked: !check.pass, ms });
        }
        Ok(())
    };
    for (i, line) in set.iter().enumerate() {
        score(format!("piper:{}", line.id), true, &piper[i], piper_rate, (i + 1) % set.len())?;
    }
    for (i, line) in set.iter().enumerate() {
        let voice = ESPEAK_VOICES[i % ESPEAK_VOICES.len()];
        let (audio, rate) = espeak::synthesize(&line.text, voice)?;
        score(format!("espeak:{voice}:{}", line.id), false, &audio, rate, i)?;
    }
    let mut i = 0;
    for dir in HUMAN_DIRS {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.retain(|p| p.extension().is_some_and(|e| e == "wav"));
        paths.sort();
        for path in paths {
            let mut reader = hound::WavReader::open(&path)?;
            let rate = reader.spec().sample_rate;
            let audio: Vec<f32> =
                reader.samples::<i16>().map(|s| s.map(|s| f32::from(s) / 32768.0)).collect::<Result<_, _>>()?;
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            score(format!("human:{name}"), false, &audio, rate, i % set.len())?;
            i += 1;
        }
    }
    let blocked_others = samples.iter().filter(|s| !s.enrolled && s.blocked).count();
    let blocked = samples.iter().filter(|s| s.blocked).count();
    let others = samples.iter().filter(|s| !s.enrolled).count();
    let enrolled = samples.len() - others;
    let mut ms: Vec<f64> = samples.iter().map(|s| s.ms).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |q: f64| ms.get(((ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    let result = VoiceReport {
        threshold,
        short_threshold: short,
        precision: blocked_others as f64 / blocked.max(1) as f64,
        recall: blocked_others as f64 / others.max(1) as f64,
        false_blocks: blocked - blocked_others,
        enrolled,
        others,
        gate_ms_p50: pct(0.5),
        gate_ms_p95: pct(0.95),
        samples,
    };
    let range = |enrolled: bool, prefix: &str| {
        let v: Vec<f32> = result
            .samples
            .iter()
            .filter(|s| s.enrolled == enrolled && s.source.starts_with(prefix))
            .map(|s| s.score)
            .collect();
        let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        format!("{} pieces, cosine {lo:.2}..{hi:.2}", v.len())
    };
    println!("voice gate (threshold {threshold}, {short} under {MIN_CHECK_MS} ms, voice {}):", gate.voice());
    println!("  enrolled Piper voice: {}", range(true, "piper"));
    println!("  espeak-ng voices:     {}", range(false, "espeak"));
    println!("  human recordings:     {}", range(false, "human"));
    println!(
        "  precision {:.3}, recall {:.3}, enrolled pieces blocked {}/{}; gate time p50 {:.1} ms, p95 {:.1} ms",
        result.precision, result.recall, result.false_blocks, result.enrolled, result.gate_ms_p50, result.gate_ms_p95
    );
    if let Some(path) = report {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")?;
        println!("report: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_margin_are_rewritten_in_place() {
        let spec = |margin: &str| {
            format!(
                "version = \"1\"\nname = \"t\"\n{margin}\n[[category]]\nid = \"a\"\ntitle = \"A\"\ndefinition = \"d\"\n\
                 style = \"refuse\"\nresponse = \"No.\"\nthreshold = 0.5\n  [[category.rule]]\n  id = \"A-1\"\n  \
                 text = \"t\"\n  violating = [\"x\"]\n"
            )
        };
        for text in [spec(""), spec("margin = 0.01")] {
            let policy = Policy::parse(&text, "t").unwrap();
            let rewritten = rewrite_thresholds(&text, &policy, 0.04, &[0.62]).unwrap();
            let policy = Policy::parse(&rewritten, "rewritten").unwrap();
            assert_eq!((policy.margin, policy.categories[0].threshold), (0.04, 0.62), "{rewritten}");
        }
    }
}
