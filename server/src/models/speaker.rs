//! Speaker embedding (voice identity), role `speaker`: Resemblyzer's GE2E voice encoder.
//!
//! [`SpeakerEmbedder::embed`] reproduces Resemblyzer's `embed_utterance` on 16 kHz audio: the
//! volume is raised to −30 dBFS (never lowered), the utterance is cut into 1.6 s partial segments
//! with 50 % overlap (a last, zero-padded segment is kept when the audio covers at least 75 % of
//! it), all segments go through the graph in one batch, and their embeddings are averaged and
//! L2-normalised. Resemblyzer's default step is 77 frames rather than 80, and its webrtcvad
//! silence trimming is not done here: feed speech.
//!
//! The graph frames its input without padding (frame `t` covers samples `[160 t, 160 t + 400)`),
//! so each segment carries `n_fft / 2` samples of context at both ends, taken from the utterance
//! reflect-padded by that much (librosa's `center=True`, as Resemblyzer's mel spectrogram).
//! The constants come from the manifest's `meta` (written by `models/convert/speaker.py`).
use super::{Manifest, ModelError};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

const ROLE: &str = "speaker";
/// The sample rate [`SpeakerEmbedder::embed`] expects.
pub const SAMPLE_RATE: u32 = 16_000;
/// Segments per graph run: bounds memory on very long audio (48 segments ≈ 40 s of speech).
const MAX_BATCH: usize = 48;

/// Preprocessing constants, from the manifest's `meta` for `speaker`.
#[derive(Debug, Clone, Deserialize)]
struct Meta {
    sample_rate: u32,
    n_fft: usize,
    frame_hop: usize,
    segment_frames: usize,
    segment_samples: usize,
    segment_step_frames: usize,
    min_coverage: f64,
    target_dbfs: f64,
    embedding_dim: usize,
}

/// GE2E speaker embedder: one ONNX Runtime session, used from one thread at a time.
pub struct SpeakerEmbedder {
    session: Session,
    meta: Meta,
}

impl SpeakerEmbedder {
    /// Loads the `speaker` model with `threads` intra-op threads.
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Self, ModelError> {
        let meta: Meta = manifest.meta(ROLE)?;
        let consistent = meta.sample_rate == SAMPLE_RATE
            && meta.frame_hop > 0
            && meta.segment_frames > 0
            && meta.segment_step_frames > 0
            && meta.embedding_dim > 0
            && meta.segment_samples == (meta.segment_frames - 1) * meta.frame_hop + meta.n_fft;
        if !consistent {
            return Err(ModelError::Invalid(format!("manifest meta of `{ROLE}` is inconsistent: {meta:?}")));
        }
        let session = manifest.session(ROLE, "model", threads)?;
        Ok(SpeakerEmbedder { session, meta })
    }

    /// Length of the embeddings (256).
    pub fn dim(&self) -> usize {
        self.meta.embedding_dim
    }

    /// The L2-normalised speaker embedding of one utterance of 16 kHz mono audio.
    ///
    /// Audio shorter than one 1.6 s segment is zero-padded (as Resemblyzer does); embeddings of
    /// very short audio are unreliable. Empty audio and non-finite samples are errors. Silence
    /// gives a valid (meaningless) embedding.
    pub fn embed(&mut self, audio_16k: &[f32]) -> Result<Vec<f32>, ModelError> {
        if audio_16k.is_empty() {
            return Err(ModelError::Invalid("speaker embedding of empty audio: at least one sample is needed".into()));
        }
        if audio_16k.iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Invalid("speaker embedding: the audio has NaN or infinite samples".into()));
        }
        let segments = self.segments(audio_16k);
        let n = self.meta.segment_samples;
        let dim = self.meta.embedding_dim;
        let mut sum = vec![0f32; dim];
        for batch in segments.chunks(MAX_BATCH * n) {
            let rows = batch.len() / n;
            let wav = Tensor::from_array(([rows, n], batch.to_vec()))?;
            let outputs = self.session.run(ort::inputs! {"wav" => wav})?;
            let embedding = outputs
                .get("embedding")
                .ok_or_else(|| ModelError::Invalid("speaker graph returned no `embedding`".into()))?;
            let (_, data) = embedding.try_extract_tensor::<f32>()?;
            if data.len() != rows * dim {
                return Err(ModelError::Invalid(format!(
                    "speaker graph returned {} values for {rows} segments of dimension {dim}",
                    data.len()
                )));
            }
            for row in data.chunks_exact(dim) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
        }
        normalize(&mut sum);
        Ok(sum)
    }

    /// The graph inputs for one utterance, `[segments × segment_samples]` flattened.
    fn segments(&self, audio: &[f32]) -> Vec<f32> {
        let m = &self.meta;
        let segment_len = m.segment_frames * m.frame_hop;
        let starts = segment_starts(audio.len(), m);
        let last = *starts.last().unwrap_or(&0);
        // Volume-normalised audio, zero-padded to cover the last segment, then reflect-padded by
        // n_fft / 2 at both ends (the mel spectrogram's centring).
        let mut x = normalize_volume(audio, m.target_dbfs);
        x.resize(x.len().max(last * m.frame_hop + segment_len), 0.0);
        let padded = reflect_pad(&x, m.n_fft / 2);
        let mut out = Vec::with_capacity(starts.len() * m.segment_samples);
        for s in starts {
            let begin = s * m.frame_hop;
            out.extend_from_slice(&padded[begin..begin + m.segment_samples]);
        }
        out
    }
}

/// First frames of the partial segments of an utterance of `n_samples` (Resemblyzer's
/// `compute_partial_slices`): always at least one.
fn segment_starts(n_samples: usize, m: &Meta) -> Vec<usize> {
    let n_frames = (n_samples + m.frame_hop) / m.frame_hop; // ceil((n + 1) / hop)
    let steps = (n_frames + m.segment_step_frames + 1).saturating_sub(m.segment_frames).max(1);
    let mut starts: Vec<usize> = (0..steps).step_by(m.segment_step_frames).collect();
    let last = starts[starts.len() - 1];
    let coverage = (n_samples as f64 - (last * m.frame_hop) as f64) / (m.segment_frames * m.frame_hop) as f64;
    if coverage < m.min_coverage && starts.len() > 1 {
        starts.pop();
    }
    starts
}

/// Raises the level to `target_dbfs` (RMS re full scale); never lowers it. Silence stays silence.
fn normalize_volume(audio: &[f32], target_dbfs: f64) -> Vec<f32> {
    let mean_square = audio.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / audio.len().max(1) as f64;
    let rms = mean_square.sqrt();
    let gain = if rms > 0.0 { 10f64.powf((target_dbfs - 20.0 * rms.log10()) / 20.0) } else { 1.0 };
    if gain > 1.0 { audio.iter().map(|&s| (f64::from(s) * gain) as f32).collect() } else { audio.to_vec() }
}

/// `x` with `pad` samples mirrored at each end, excluding the edge sample (numpy's `reflect`).
/// Needs `x.len() > pad`.
fn reflect_pad(x: &[f32], pad: usize) -> Vec<f32> {
    let n = x.len();
    let mut out = Vec::with_capacity(n + 2 * pad);
    out.extend((1..=pad).rev().map(|i| x[i]));
    out.extend_from_slice(x);
    out.extend((1..=pad).map(|i| x[n - 1 - i]));
    out
}

/// Scales `v` to unit L2 norm; a zero vector stays zero.
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine similarity of two embeddings (0 when either is a zero vector or the lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms = a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norms > 0.0 { dot / norms } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            sample_rate: 16_000,
            n_fft: 400,
            frame_hop: 160,
            segment_frames: 160,
            segment_samples: 25_840,
            segment_step_frames: 80,
            min_coverage: 0.75,
            target_dbfs: -30.0,
            embedding_dim: 256,
        }
    }

    #[test]
    fn segments_follow_resemblyzer() {
        let m = meta();
        assert_eq!(segment_starts(1, &m), vec![0]);
        assert_eq!(segment_starts(25_600, &m), vec![0]); // 1.6 s: one segment
        assert_eq!(segment_starts(32_000, &m), vec![0, 80]); // 2 s: the second covers 75 %
        assert_eq!(segment_starts(48_000, &m), vec![0, 80, 160]);
    }

    #[test]
    fn reflect_pad_mirrors_without_the_edge() {
        assert_eq!(reflect_pad(&[1.0, 2.0, 3.0, 4.0], 2), vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0]);
    }

    #[test]
    fn volume_is_raised_never_lowered() {
        let quiet = normalize_volume(&[0.001, -0.001], -30.0);
        assert!((quiet[0] - 10f32.powf(-1.5)).abs() < 1e-6);
        assert_eq!(normalize_volume(&[0.5, -0.5], -30.0), vec![0.5, -0.5]);
        assert_eq!(normalize_volume(&[0.0; 4], -30.0), vec![0.0; 4]);
    }

    #[test]
    fn cosine_handles_zero_vectors() {
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    }
}
