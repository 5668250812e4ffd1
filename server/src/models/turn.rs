//! Acoustic end of turn, role `turn`: Smart Turn v3.2 (the `pipecat-ai` wheel's int8 graph, with
//! its normalisation and log-mel front end prepended by `models/convert/turn.py`).
//!
//! It hears whether the speech before a pause sounds finished (falling pitch, a final syllable
//! drawn out) or held open ("and…", a list going on), whatever the words: the cue Whisper's text
//! lacks when a short answer ends without punctuation ("five five"). It scores the last 8 s of
//! the turn, pause included (upstream runs it after ~200 ms of silence). Its output is jittery —
//! int8 throughout, it moves by up to ~0.1 on inaudible changes — so treat it as one cue among
//! others, not as a verdict.
use super::{Manifest, ModelError};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

const ROLE: &str = "turn";
/// The sample rate [`TurnDetector::probability`] expects.
pub const SAMPLE_RATE: u32 = 16_000;

#[derive(Debug, Deserialize)]
struct Meta {
    sample_rate: u32,
    samples: usize,
}

/// Smart Turn: one ONNX Runtime session, used from one thread at a time.
pub struct TurnDetector {
    session: Session,
    /// Samples per window: the graph takes exactly this many (8 s).
    window: usize,
}

impl TurnDetector {
    /// Loads the `turn` model with `threads` intra-op threads.
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Self, ModelError> {
        let meta: Meta = manifest.meta(ROLE)?;
        if meta.sample_rate != SAMPLE_RATE || meta.samples == 0 {
            return Err(ModelError::Invalid(format!("manifest meta of `{ROLE}` is inconsistent: {meta:?}")));
        }
        let session = manifest.session(ROLE, "model", threads)?;
        Ok(TurnDetector { session, window: meta.samples })
    }

    /// The probability that the speaker has finished their turn, from the end of `audio_16k` (the
    /// turn's speech and the pause after it; only the last 8 s count). Empty audio and non-finite
    /// samples are errors.
    pub fn probability(&mut self, audio_16k: &[f32]) -> Result<f32, ModelError> {
        if audio_16k.is_empty() {
            return Err(ModelError::Invalid("end-of-turn detection of empty audio".into()));
        }
        if audio_16k.iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Invalid("end-of-turn detection: the audio has NaN or infinite samples".into()));
        }
        // The last 8 s, zero-padded at the front.
        let tail = &audio_16k[audio_16k.len().saturating_sub(self.window)..];
        let mut window = vec![0.0; self.window - tail.len()];
        window.extend_from_slice(tail);
        let audio = Tensor::from_array(([1, self.window], window))?;
        let outputs = self.session.run(ort::inputs! {"audio" => audio})?;
        let probability = outputs
            .get("probability")
            .ok_or_else(|| ModelError::Invalid("turn graph returned no `probability`".into()))?;
        let (_, data) = probability.try_extract_tensor::<f32>()?;
        match data {
            [p] if p.is_finite() => Ok(p.clamp(0.0, 1.0)),
            _ => Err(ModelError::Invalid(format!("turn graph returned {data:?}, not one probability"))),
        }
    }
}
