//! The voice gate: reply audio must sound like the enrolled preset voice before it leaves.
//!
//! Enrollment is computed at provisioning (`models/convert/enroll.py`, role `voice-enroll`): the
//! preset voice speaks its own reference sentences and the GE2E speaker model embeds them. Here
//! each chunk of synthesized audio is resampled to 16 kHz, embedded with the same model, and
//! compared (cosine) with the enrollment; a chunk under the threshold is cut. Embeddings of short
//! audio are less reliable, so the pipeline checks at least [`MIN_CHECK_MS`] at a time, and audio
//! shorter than one 1.6 s model segment is tiled to fill it rather than zero-padded. Audio
//! shorter than [`MIN_CHECK_MS`] after audio already passed (a chunk's rest, a reply's last
//! words) is judged in one whole segment with the end of that audio ([`VoiceGate::check_after`]),
//! and alone against a floor; a whole short reply is judged alone, against its own, lower
//! threshold: the enrolled voice scores lower on it, other voices do not score higher
//! (`parley-server eval-voice --tail-ms [--lead]`).
use crate::models::speaker::{SAMPLE_RATE, SpeakerEmbedder, cosine};
use crate::models::{Manifest, ModelError};
use parley_protocol::resample::Resampler;
use serde::Deserialize;

/// The policy rule the voice gate enforces (the spec's `voice` category): only the enrolled
/// preset voice speaks.
pub const RULE_ID: &str = "VC-0";
/// The manifest role holding the enrollment.
const ROLE: &str = "voice-enroll";
/// Audio the pipeline gathers before checking it, in ms (shorter chunks wait for the next one,
/// unless the reply ends). The enrolled voice's last 800 ms alone score 0.74–0.91, as its last
/// 1,000 ms do (60 texts; espeak-ng and human voices at most 0.60).
pub const MIN_CHECK_MS: f64 = 800.0;
/// Audio checked in one go, at most, in ms: one 1.6 s speaker-model segment, so the first frame
/// waits for one short check.
pub const MAX_CHECK_MS: f64 = 1600.0;
/// Audio after a lead judged alone as well, from this length, in ms (shorter pieces alone say
/// little: the enrolled voice's last 150 ms score from 0.43).
pub const ALONE_MIN_MS: f64 = 300.0;
/// The cosine under which such a piece alone is cut. The enrolled voice's last 300–600 ms alone
/// score at least 0.52 (60 texts each of dev and holdout, `eval-voice --tail-ms 300`), its last
/// words in replies at least 0.61 (969 of 0.3–0.7 s); other voices' last 300 ms reach 0.58, so
/// the floor catches most, not all, of a voice that changes only at the very end.
pub const ALONE_FLOOR: f32 = 0.50;
/// Samples of one GE2E segment (1.6 s at 16 kHz); shorter audio is tiled up to this.
const SEGMENT_SAMPLES: usize = 25_600;

#[derive(Debug, Deserialize)]
struct Enrollment {
    voice: String,
    embedding: Vec<f32>,
}

/// The gate: the speaker model and the enrolled voice (one thread at a time).
pub struct VoiceGate {
    embedder: SpeakerEmbedder,
    enrollment: Vec<f32>,
    voice: String,
    threshold: f32,
    /// The threshold of audio shorter than [`MIN_CHECK_MS`].
    short_threshold: f32,
}

/// One check.
#[derive(Debug, Clone, Copy)]
pub struct VoiceCheck {
    /// Cosine to the enrolled voice.
    pub score: f32,
    /// Of [`VoiceGate::check_after`]: the cosine of the audio after the lead alone, when judged.
    pub alone: Option<f32>,
    pub pass: bool,
}

impl VoiceGate {
    /// Loads the speaker model and the enrollment of the preset voice; `threshold` is the cosine
    /// under which audio is cut, `short_threshold` that of audio shorter than [`MIN_CHECK_MS`].
    pub fn load(manifest: &Manifest, threads: usize, threshold: f32, short_threshold: f32) -> Result<Self, ModelError> {
        let path = manifest.path(ROLE, "enrollment")?;
        let bad = |reason: String| ModelError::Invalid(format!("{}: {reason}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let enrollment: Enrollment = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let embedder = SpeakerEmbedder::load(manifest, threads)?;
        if enrollment.embedding.len() != embedder.dim() {
            return Err(bad(format!(
                "{} values, the speaker model gives {}",
                enrollment.embedding.len(),
                embedder.dim()
            )));
        }
        let voice = enrollment.voice;
        Ok(VoiceGate { embedder, enrollment: enrollment.embedding, voice, threshold, short_threshold })
    }

    /// The enrolled voice's name (e.g. `en_US-joe-medium`).
    pub fn voice(&self) -> &str {
        &self.voice
    }

    /// Compares `audio` (mono, at `rate`) with the enrolled voice.
    pub fn check(&mut self, audio: &[f32], rate: u32) -> Result<VoiceCheck, ModelError> {
        self.check_after(audio, rate, 0)
    }

    /// Compares `audio`, whose first `lead` samples are audio the gate passed, with the enrolled
    /// voice: the whole against the threshold for its length, and the rest alone, if it lasts at
    /// least [`ALONE_MIN_MS`], against [`ALONE_FLOOR`], so another voice cannot pass behind the lead.
    pub fn check_after(&mut self, audio: &[f32], rate: u32, lead: usize) -> Result<VoiceCheck, ModelError> {
        let audio = to_16k(audio, rate)?;
        let ms = |samples: usize| samples as f64 * 1000.0 / f64::from(SAMPLE_RATE);
        let score = self.score(&audio)?;
        let threshold = if ms(audio.len()) < MIN_CHECK_MS { self.short_threshold } else { self.threshold };
        let mut check = VoiceCheck { score, alone: None, pass: score >= threshold };
        let lead = (lead as u64 * u64::from(SAMPLE_RATE) / u64::from(rate.max(1))) as usize;
        let rest = &audio[lead.min(audio.len())..];
        if lead > 0 && ms(rest.len()) >= ALONE_MIN_MS {
            let alone = self.score(rest)?;
            check.alone = Some(alone);
            check.pass &= alone >= ALONE_FLOOR;
        }
        Ok(check)
    }

    /// The cosine of 16 kHz `audio` to the enrollment (0 for no audio).
    fn score(&mut self, audio: &[f32]) -> Result<f32, ModelError> {
        if audio.is_empty() {
            return Ok(0.0);
        }
        let tiled: Vec<f32>;
        let audio = if audio.len() < SEGMENT_SAMPLES {
            tiled = audio.iter().copied().cycle().take(SEGMENT_SAMPLES).collect();
            &tiled
        } else {
            audio
        };
        Ok(cosine(&self.embedder.embed(audio)?, &self.enrollment))
    }
}

/// The windows `len` samples of audio at `rate` are checked in: [`MAX_CHECK_MS`] each, the last
/// one merged into the one before when it would be shorter than [`MIN_CHECK_MS`].
pub fn check_windows(len: usize, rate: u32) -> Vec<std::ops::Range<usize>> {
    let ms = |ms: f64| (ms * rate as f64 / 1000.0) as usize;
    windows(len, ms(MAX_CHECK_MS), ms(MIN_CHECK_MS))
}

fn windows(len: usize, max: usize, min: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + max.max(1)).min(len);
        match out.last_mut() {
            Some(last) if end - start < min => last.end = end,
            _ => out.push(start..end),
        }
        start = end;
    }
    out
}

pub(crate) fn to_16k(audio: &[f32], rate: u32) -> Result<Vec<f32>, ModelError> {
    let mut resampler = Resampler::new(rate, SAMPLE_RATE).map_err(|e| ModelError::Invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(audio.len() * SAMPLE_RATE as usize / rate.max(1) as usize + 1024);
    resampler.process(audio, &mut out).map_err(|e| ModelError::Invalid(e.to_string()))?;
    resampler.flush(&mut out).map_err(|e| ModelError::Invalid(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn audio_is_checked_in_windows_none_too_short() {
        assert!(windows(0, 10, 5).is_empty());
        assert_eq!(windows(3, 10, 5), vec![0..3]); // all there is
        assert_eq!(windows(10, 10, 5), vec![0..10]);
        assert_eq!(windows(24, 10, 5), vec![0..10, 10..24]); // 4 left over: merged
        assert_eq!(windows(26, 10, 5), vec![0..10, 10..20, 20..26]);
    }
}
