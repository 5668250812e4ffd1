//! Voice activity detection, role `vad`: Silero VAD v6 (the ONNX graph as the `silero-vad` wheel
//! ships it).
//!
//! The graph is recurrent: each 32 ms chunk is scored given an LSTM state and the last 4 ms of the
//! previous chunk, so every audio stream keeps its own [`VadState`]. The graph takes a batch
//! dimension, so one [`Vad`] can score one chunk of many streams in one run ([`Vad::push_batch`]).
use super::{Manifest, ModelError};
use ort::session::Session;
use ort::value::Tensor;

const ROLE: &str = "vad";
/// Input sample rate (Hz): the graph's 16 kHz branch is used.
pub const SAMPLE_RATE: u32 = 16_000;
/// New samples per step: 512 = 32 ms at 16 kHz, the window Silero is trained on at 16 kHz.
pub const CHUNK_SAMPLES: usize = 512;
/// Samples of the previous chunk repeated in front of each chunk: 64 = 4 ms. Silero v5+ needs
/// this context; bare 512-sample chunks score ~0 on speech.
pub const CONTEXT_SAMPLES: usize = 64;
/// Width of each of the two LSTM state vectors (h and c) per stream.
const STATE_WIDTH: usize = 128;
/// Graph input width per stream: context + chunk.
const INPUT_SAMPLES: usize = CONTEXT_SAMPLES + CHUNK_SAMPLES;

/// The recurrent state of one audio stream: the LSTM state and the last [`CONTEXT_SAMPLES`] of
/// audio. Starts as silence; [`VadState::reset`] starts a new stream.
#[derive(Clone)]
pub struct VadState {
    context: [f32; CONTEXT_SAMPLES],
    /// `[2][STATE_WIDTH]`: h then c.
    lstm: [f32; 2 * STATE_WIDTH],
}

impl Default for VadState {
    fn default() -> Self {
        VadState { context: [0.0; CONTEXT_SAMPLES], lstm: [0.0; 2 * STATE_WIDTH] }
    }
}

impl VadState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

impl std::fmt::Debug for VadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VadState").finish_non_exhaustive()
    }
}

/// Silero VAD: one ONNX Runtime session, used from one thread at a time.
pub struct Vad {
    session: Session,
}

impl Vad {
    /// Loads the `vad` model with `threads` intra-op threads (1 is right for 32 ms chunks).
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Self, ModelError> {
        // The manifest's meta, when present, must agree with the constants this code is built on.
        let meta = &manifest.model(ROLE)?.meta;
        for (key, want) in [
            ("sample_rate", SAMPLE_RATE as u64),
            ("chunk_samples", CHUNK_SAMPLES as u64),
            ("context_samples", CONTEXT_SAMPLES as u64),
        ] {
            if let Some(got) = meta.get(key).and_then(|v| v.as_u64())
                && got != want
            {
                return Err(ModelError::Invalid(format!(
                    "manifest meta of `{ROLE}`: {key} = {got}, this build needs {want}: re-run `models/provision.sh`"
                )));
            }
        }
        Ok(Vad { session: manifest.session(ROLE, "model", threads)? })
    }

    /// Speech probability (0..1) of the next 512-sample chunk of one stream; advances `state`.
    pub fn push(&mut self, state: &mut VadState, chunk: &[f32; CHUNK_SAMPLES]) -> Result<f32, ModelError> {
        Ok(self.push_batch(&mut [state], &[chunk])?[0])
    }

    /// Scores the next chunk of several streams in one graph run: `chunks[i]` belongs to the
    /// stream of `states[i]`. Gives the same probabilities as [`Vad::push`] on each stream.
    pub fn push_batch(
        &mut self,
        states: &mut [&mut VadState],
        chunks: &[&[f32; CHUNK_SAMPLES]],
    ) -> Result<Vec<f32>, ModelError> {
        let batch = states.len();
        if chunks.len() != batch {
            return Err(ModelError::Invalid(format!("vad: {} states for {} chunks", batch, chunks.len())));
        }
        if batch == 0 {
            return Ok(Vec::new());
        }
        let mut input = Vec::with_capacity(batch * INPUT_SAMPLES);
        for (state, chunk) in states.iter().zip(chunks) {
            input.extend_from_slice(&state.context);
            input.extend_from_slice(&chunk[..]);
        }
        // [2, B, 128]: all streams' h, then all streams' c.
        let mut lstm = vec![0f32; 2 * batch * STATE_WIDTH];
        for (b, state) in states.iter().enumerate() {
            for k in 0..2 {
                let dst = (k * batch + b) * STATE_WIDTH;
                lstm[dst..dst + STATE_WIDTH].copy_from_slice(&state.lstm[k * STATE_WIDTH..(k + 1) * STATE_WIDTH]);
            }
        }
        let outputs = self.session.run(ort::inputs! {
            "input" => Tensor::from_array(([batch, INPUT_SAMPLES], input))?,
            "state" => Tensor::from_array(([2, batch, STATE_WIDTH], lstm))?,
            "sr" => Tensor::from_array(((), vec![i64::from(SAMPLE_RATE)]))?,
        })?;
        let get = |name: &str| {
            outputs.get(name).ok_or_else(|| ModelError::Invalid(format!("vad graph returned no `{name}`")))
        };
        let (_, probs) = get("output")?.try_extract_tensor::<f32>()?;
        let (_, next) = get("stateN")?.try_extract_tensor::<f32>()?;
        if probs.len() != batch || next.len() != 2 * batch * STATE_WIDTH {
            return Err(ModelError::Invalid(format!(
                "vad graph returned {} probabilities and {} state values for a batch of {batch}",
                probs.len(),
                next.len()
            )));
        }
        for (b, (state, chunk)) in states.iter_mut().zip(chunks).enumerate() {
            for k in 0..2 {
                let src = (k * batch + b) * STATE_WIDTH;
                state.lstm[k * STATE_WIDTH..(k + 1) * STATE_WIDTH].copy_from_slice(&next[src..src + STATE_WIDTH]);
            }
            state.context.copy_from_slice(&chunk[CHUNK_SAMPLES - CONTEXT_SAMPLES..]);
        }
        Ok(probs.to_vec())
    }
}
