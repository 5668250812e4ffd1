//! Client-side audio helpers: WAV files, resampling to the stream rate, and finding the last
//! voiced frame of a clip (the anchor of voice-to-voice latency).
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

/// RMS of each 20 ms frame, in dBFS.
pub fn frame_levels_db(samples: &[f32], rate: u32) -> Vec<f32> {
    let frame = (rate / 50) as usize;
    samples
        .chunks(frame)
        .map(|c| 10.0 * ((c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32).max(1e-12)).log10())
        .collect()
}

/// Index of the last voiced 20 ms frame: the last frame within 35 dB of the loudest one and above
/// −55 dBFS. `None` for a silent clip.
pub fn last_voiced_frame(samples: &[f32], rate: u32) -> Option<usize> {
    let levels = frame_levels_db(samples, rate);
    let peak = levels.iter().copied().fold(f32::MIN, f32::max);
    let threshold = (peak - 35.0).max(-55.0);
    levels.iter().rposition(|&l| l > threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_voiced_frame_ignores_trailing_silence() {
        let rate = 16_000;
        let mut clip: Vec<f32> = (0..rate / 2).map(|i| (i as f32 * 0.1).sin() * 0.3).collect();
        clip.extend(std::iter::repeat_n(0.0005, rate as usize / 2));
        assert_eq!(last_voiced_frame(&clip, rate), Some(24));
        assert_eq!(last_voiced_frame(&[0.0; 3200], rate), None);
        let up = resample(&clip, 16_000, 48_000).unwrap();
        assert!((up.len() as i64 - 3 * clip.len() as i64).abs() <= 3, "{}", up.len());
    }
}
