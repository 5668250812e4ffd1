//! Streaming fixed-ratio resampling between stream rates (16, 24, 48 kHz) and pipeline rates
//! (16 kHz in, e.g. 22.05 kHz TTS out), on rubato's FFT resampler. Input is consumed in 20 ms
//! chunks (every rate involved holds a whole number of samples in 20 ms); output comes in chunks of
//! about 20 ms, the stream lagging by the resampler's delay. `process` does not allocate once `out` has capacity.
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

/// The rates could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    #[error("cannot resample {from} Hz → {to} Hz: {message}")]
    Setup { from: u32, to: u32, message: String },
    #[error("resampling failed: {0}")]
    Process(String),
}

/// A streaming resampler from one rate to another (a copy when the rates are equal).
pub struct Resampler {
    from: u32,
    to: u32,
    inner: Option<Fft<f32>>,
    chunk_in: usize,
    pending: Vec<f32>,
    out_chunk: Vec<f32>,
}

impl Resampler {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let chunk_in = (from / 50) as usize; // 20 ms
        if !from.is_multiple_of(50) || !to.is_multiple_of(50) {
            return Err(ResampleError::Setup { from, to, message: "20 ms is not a whole number of samples".into() });
        }
        let inner = if from == to {
            None
        } else {
            Some(
                Fft::<f32>::new(from as usize, to as usize, chunk_in, 1, FixedSync::Input)
                    .map_err(|e| ResampleError::Setup { from, to, message: e.to_string() })?,
            )
        };
        let out_max = inner.as_ref().map_or(chunk_in, |r| r.output_frames_max());
        Ok(Self { from, to, inner, chunk_in, pending: Vec::with_capacity(chunk_in), out_chunk: vec![0.0; out_max] })
    }

    pub fn rates(&self) -> (u32, u32) {
        (self.from, self.to)
    }

    /// Output delay the resampler adds, in output samples.
    pub fn delay(&self) -> usize {
        self.inner.as_ref().map_or(0, |r| r.output_delay())
    }

    /// Resamples `input`, appending whole output chunks to `out`; a partial 20 ms chunk is kept
    /// for the next call.
    pub fn process(&mut self, mut input: &[f32], out: &mut Vec<f32>) -> Result<(), ResampleError> {
        let Some(inner) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            return Ok(());
        };
        while !input.is_empty() {
            let take = (self.chunk_in - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == self.chunk_in {
                let n = run_chunk(inner, &self.pending, &mut self.out_chunk)?;
                out.extend_from_slice(&self.out_chunk[..n]);
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Pads a partial chunk with silence and resamples it, so no input is held back.
    pub fn flush(&mut self, out: &mut Vec<f32>) -> Result<(), ResampleError> {
        if let Some(inner) = self.inner.as_mut()
            && !self.pending.is_empty()
        {
            self.pending.resize(self.chunk_in, 0.0);
            let n = run_chunk(inner, &self.pending, &mut self.out_chunk)?;
            out.extend_from_slice(&self.out_chunk[..n]);
            self.pending.clear();
        }
        Ok(())
    }
}

fn run_chunk(inner: &mut Fft<f32>, input: &[f32], out: &mut [f32]) -> Result<usize, ResampleError> {
    let frames_in = input.len();
    let frames_out = out.len();
    let input = InterleavedSlice::new(input, 1, frames_in).map_err(|e| ResampleError::Process(e.to_string()))?;
    let mut output =
        InterleavedSlice::new_mut(out, 1, frames_out).map_err(|e| ResampleError::Process(e.to_string()))?;
    let (_, n) =
        inner.process_into_buffer(&input, &mut output, None).map_err(|e| ResampleError::Process(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f32, ms: u32) -> Vec<f32> {
        (0..rate * ms / 1000).map(|i| (i as f32 / rate as f32 * hz * std::f32::consts::TAU).sin() * 0.5).collect()
    }

    #[test]
    fn ratios_give_whole_frames_and_keep_the_tone() {
        for (from, to) in [(48_000, 16_000), (24_000, 16_000), (16_000, 48_000), (22_050, 48_000), (16_000, 16_000)] {
            let mut resampler = Resampler::new(from, to).unwrap();
            let mut out = Vec::new();
            let input = tone(from, 440.0, 1000);
            // Odd-sized pieces, as network frames and TTS chunks arrive.
            for piece in input.chunks(777) {
                resampler.process(piece, &mut out).unwrap();
            }
            resampler.flush(&mut out).unwrap();
            // Whole 20 ms chunks out, give or take the part still inside the FFT's overlap.
            let expected = to as usize;
            assert!(out.len() <= expected && out.len() + expected / 50 >= expected, "{from} → {to}: {}", out.len());
            let delay = resampler.delay();
            let rms = |s: &[f32]| (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
            let steady = &out[delay + 100..out.len() - 100];
            assert!((rms(steady) - 0.5 / 2f32.sqrt()).abs() < 0.02, "{from} → {to}: rms {}", rms(steady));
        }
    }
}
