//! The reference end of speech, the anchor of voice-to-voice latency: where each utterance of a
//! clip starts and ends, found from the clip alone by one documented method (`docs/latency.md`),
//! independent of the server under test, the recording's noise floor and its room tail.
//!
//! The method, on the clip's band 100–7000 Hz (above mains hum; with the voice's fundamental and
//! the low first formant of a closing "ee" or "oo", and the fricatives that end many words: "clubs"
//! ends ~120 ms after its vowel, at 3–8 kHz) in 20 ms Hann windows every 5 ms:
//! 1. The speech level is the 95th percentile of the windows' levels, the noise level the 10th.
//!    A window is loud when it is within 18 dB of the speech level and 10 dB above the noise.
//! 2. The envelope is the level held with a decay of at most 100 dB/s. A room whose tail decays
//!    faster than that (RT60 up to 0.6 s) barely lifts it, so a reverberant copy of a clip gets the
//!    envelope of the dry one; noise more than 10 dB under the threshold does not either.
//! 3. Speech is where the envelope is over the threshold. Runs of it less than 600 ms apart are
//!    one utterance; an utterance with under 100 ms of loud windows (a click, a breath) is dropped.
//!
//! An utterance ends at the centre of its last window whose envelope is over the threshold. So a
//! dry recording is given the tail a room would add: a sound at the speech level that stops dead
//! ends 180 ms after its last sample, as its reverberant copy does. A fading end counts only down
//! to 18 dB under the speech level: a faint plosive release or a trailing breath does not count.
//! How far the anchor lies from the last sample of synthesized speech, and how little it moves when
//! a room tail, noise or band limiting is added, is measured in `tests/tests/anchor.rs`.
use realfft::RealFftPlanner;

/// The band whose level is measured, Hz (its top is cut at the clip's Nyquist frequency).
pub const BAND_HZ: (f32, f32) = (100.0, 7000.0);
/// Analysis window, ms.
pub const WINDOW_MS: u32 = 20;
/// Step between windows, ms: the anchor's resolution.
pub const HOP_MS: u32 = 5;
/// A loud window is at most this far under the speech level, dB.
pub const BELOW_SPEECH_DB: f32 = 18.0;
/// …and at least this far over the noise level, dB.
pub const ABOVE_NOISE_DB: f32 = 10.0;
/// The envelope falls at most this fast, dB/s: slower than a room with RT60 ≤ 0.6 s decays.
pub const DECAY_DB_PER_S: f32 = 100.0;
/// An utterance with fewer loud windows than this is not speech, ms.
pub const MIN_LOUD_MS: u32 = 100;
/// Silences shorter than this are inside an utterance, ms.
pub const UTTERANCE_GAP_MS: u32 = 600;

/// One utterance of a clip, in samples at the clip's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utterance {
    /// Centre of its first loud window.
    pub start: usize,
    /// Centre of its last window whose envelope is over the threshold: the reference end of speech.
    pub end: usize,
}

/// The level of the band in each window, dB (of the mean power per sample).
pub fn band_levels_db(samples: &[f32], rate: u32) -> Vec<f32> {
    let window = (rate * WINDOW_MS / 1000) as usize;
    let hop = (rate * HOP_MS / 1000) as usize;
    if window == 0 || hop == 0 || samples.len() < window {
        return Vec::new();
    }
    let fft = RealFftPlanner::<f32>::new().plan_fft_forward(window);
    let hann: Vec<f32> =
        (0..window).map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / window as f32).cos()).collect();
    let bin_hz = rate as f32 / window as f32;
    let top = BAND_HZ.1.min(rate as f32 / 2.0);
    let bins = (BAND_HZ.0 / bin_hz).ceil() as usize..=(top / bin_hz).floor() as usize;
    let mut input = fft.make_input_vec();
    let mut spectrum = fft.make_output_vec();
    let mut scratch = fft.make_scratch_vec();
    (0..=(samples.len() - window) / hop)
        .map(|t| {
            for ((x, s), w) in input.iter_mut().zip(&samples[t * hop..t * hop + window]).zip(&hann) {
                *x = s * w;
            }
            let power: f32 = match fft.process_with_scratch(&mut input, &mut spectrum, &mut scratch) {
                Ok(()) => spectrum[bins.clone()].iter().map(|c| c.norm_sqr()).sum(),
                Err(_) => 0.0, // cannot happen: the buffers come from the plan
            };
            10.0 * (power / window as f32 / window as f32).max(1e-12).log10()
        })
        .collect()
}

/// The utterances of a clip, in order; none for a silent or too short clip.
pub fn utterances(samples: &[f32], rate: u32) -> Vec<Utterance> {
    let levels = band_levels_db(samples, rate);
    if levels.is_empty() {
        return Vec::new();
    }
    let mut sorted = levels.clone();
    sorted.sort_by(f32::total_cmp);
    let at = |p: f32| sorted[((sorted.len() - 1) as f32 * p).round() as usize];
    let threshold = (at(0.95) - BELOW_SPEECH_DB).max(at(0.10) + ABOVE_NOISE_DB);
    let decay = DECAY_DB_PER_S * HOP_MS as f32 / 1000.0;

    // Runs of the envelope over the threshold: (first loud window, last window over, loud windows).
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut envelope = f32::NEG_INFINITY;
    let mut run: Option<(Option<usize>, usize, usize)> = None;
    for (t, &level) in levels.iter().enumerate() {
        envelope = level.max(envelope - decay);
        let loud = level > threshold;
        if envelope > threshold {
            let (first, last, count) = run.get_or_insert((None, t, 0));
            *first = first.or(loud.then_some(t));
            *last = t;
            *count += usize::from(loud);
        } else if let Some((Some(first), last, count)) = run.take() {
            runs.push((first, last, count));
        }
    }
    if let Some((Some(first), last, count)) = run {
        runs.push((first, last, count));
    }

    let min_loud = (MIN_LOUD_MS / HOP_MS) as usize;
    let gap = (UTTERANCE_GAP_MS / HOP_MS) as usize;
    // Merged before short ones are dropped: a weak last syllable belongs to its utterance whether
    // or not it has 100 ms of loud windows of its own.
    let mut merged: Vec<(usize, usize, usize)> = Vec::new();
    for (first, last, loud) in runs {
        match merged.last_mut() {
            Some(previous) if first < previous.1 + gap => {
                previous.1 = last;
                previous.2 += loud;
            }
            _ => merged.push((first, last, loud)),
        }
    }
    let hop = (rate * HOP_MS / 1000) as usize;
    let centre = (rate * WINDOW_MS / 1000 / 2) as usize;
    merged
        .into_iter()
        .filter(|u| u.2 >= min_loud)
        .map(|(first, last, _)| Utterance { start: first * hop + centre, end: last * hop + centre })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u32 = 16_000;

    /// A 300 Hz + 1 kHz "voiced" burst of `ms` at `amplitude`.
    fn burst(ms: u32, amplitude: f32) -> Vec<f32> {
        (0..RATE * ms / 1000)
            .map(|i| {
                let t = i as f32 / RATE as f32;
                amplitude
                    * ((2.0 * std::f32::consts::PI * 1000.0 * t).sin()
                        + 0.5 * (2.0 * std::f32::consts::PI * 700.0 * t).sin())
            })
            .collect()
    }

    fn silence(ms: u32) -> Vec<f32> {
        vec![0.0; (RATE * ms / 1000) as usize]
    }

    fn ms(samples: usize) -> i64 {
        (samples as u64 * 1000 / RATE as u64) as i64
    }

    #[test]
    fn an_utterance_ends_where_its_sound_ends() {
        let clip = [silence(500), burst(800, 0.3), silence(1000)].concat();
        let found = utterances(&clip, RATE);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!((ms(found[0].start) - 500).abs() <= 15, "{found:?}");
        // A sound at the speech level that stops dead: its envelope falls 18 dB in 180 ms.
        assert!((ms(found[0].end) - 1480).abs() <= 15, "{found:?}");
        assert!(utterances(&silence(2000), RATE).is_empty());
        assert!(utterances(&[0.1; 100], RATE).is_empty());
        // A sample rate under the band (a malformed file): nothing found, no panic.
        for rate in [1, 50, 150, 200, 201, 400] {
            assert!(utterances(&[0.1; 4000], rate).is_empty(), "{rate} Hz");
        }
    }

    #[test]
    fn pauses_split_utterances_and_clicks_are_not_speech() {
        let clip = [
            silence(400),
            burst(600, 0.3),
            silence(300), // inside the utterance
            burst(400, 0.3),
            silence(1200), // between utterances
            burst(500, 0.2),
            silence(800),
            burst(20, 0.5), // a click
            silence(800),
        ]
        .concat();
        let found = utterances(&clip, RATE);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!((ms(found[0].end) - 1880).abs() <= 15, "{found:?}");
        // 3.5 dB under the speech level: 14.5 dB over the threshold, 145 ms of envelope.
        assert!((ms(found[1].start) - 2900).abs() <= 15 && (ms(found[1].end) - 3545).abs() <= 15, "{found:?}");
    }

    #[test]
    fn a_decaying_tail_does_not_move_the_end() {
        // The burst, then an exponential tail starting 12 dB down and falling 167 dB/s (RT60 0.36 s).
        let dry = [silence(500), burst(800, 0.3), silence(1000)].concat();
        let mut wet = dry.clone();
        let end = (RATE * 1300 / 1000) as usize;
        let tail = burst(1000, 0.3 * 0.25);
        for (i, s) in tail.iter().enumerate() {
            wet[end + i] += s * 10f32.powf(-167.0 * (i as f32 / RATE as f32) / 20.0);
        }
        let (dry_end, wet_end) = (utterances(&dry, RATE)[0].end, utterances(&wet, RATE)[0].end);
        assert!((ms(wet_end) - ms(dry_end)).abs() <= 20, "dry {} ms, wet {} ms", ms(dry_end), ms(wet_end));
    }
}
