//! Client-side audio helpers: WAV files and resampling to the stream rate.
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: {source}")]
    Wav { path: String, source: hound::Error },
    #[error("resampling {from} Hz → {to} Hz: {message}")]
    Resample { from: u32, to: u32, message: String },
}

/// Reads a WAV file (any sample format, any channel count) as mono f32 and its rate.
pub fn read_wav(path: &Path) -> Result<(Vec<f32>, u32), AudioError> {
    let err = |source| AudioError::Wav { path: path.display().to_string(), source };
    let mut reader = hound::WavReader::open(path).map_err(err)?;
    let spec = reader.spec();
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>().map_err(err)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|s| s as f32 * scale)).collect::<Result<_, _>>().map_err(err)?
        }
    };
    let channels = spec.channels.max(1) as usize;
    let mono = samples.chunks(channels).map(|c| c.iter().sum::<f32>() / channels as f32).collect();
    Ok((mono, spec.sample_rate))
}

/// Writes mono f32 audio as a 16-bit PCM WAV.
pub fn write_wav(path: &Path, samples: &[f32], rate: u32) -> Result<(), AudioError> {
    let err = |source| AudioError::Wav { path: path.display().to_string(), source };
    let spec =
        hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut writer = hound::WavWriter::create(path, spec).map_err(err)?;
    for s in samples {
        writer.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16).map_err(err)?;
    }
    writer.finalize().map_err(err)
}

/// Resamples a whole clip (startup delay trimmed).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, AudioError> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |e: &dyn std::fmt::Display| AudioError::Resample { from, to, message: e.to_string() };
    let mut resampler = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input).map_err(|e| err(&e))?;
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| err(&e))?;
    let out = resampler.process_all(&input, samples.len(), None).map_err(|e| err(&e))?;
    Ok(out.take_data())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_keeps_the_duration() {
        let rate = 16_000;
        let clip: Vec<f32> = (0..rate).map(|i| (i as f32 * 0.1).sin() * 0.3).collect();
        let up = resample(&clip, 16_000, 48_000).unwrap();
        assert!((up.len() as i64 - 3 * clip.len() as i64).abs() <= 3, "{}", up.len());
    }
}
