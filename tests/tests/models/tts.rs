//! Tests of the `tts` model: Piper through espeak-ng phonemes, checked for plausible duration and
//! level, and heard as speech by the VAD.
use parley_server::models::tts::Tts;
use parley_server::models::vad::{CHUNK_SAMPLES, Vad, VadState};
use std::time::Duration;

const SENTENCE: &str = "Hello there, the quick brown fox jumps over the lazy dog.";

fn stats(audio: &[f32]) -> (f32, f32, f32) {
    let peak = audio.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let rms = (audio.iter().map(|x| x * x).sum::<f32>() / audio.len().max(1) as f32).sqrt();
    let clipped = audio.iter().filter(|x| x.abs() >= 0.999).count() as f32 / audio.len().max(1) as f32;
    (peak, rms, clipped)
}

/// Linear-interpolation resampling: enough for a VAD check.
fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    let n = (x.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 * f64::from(from) / f64::from(to);
            let (j, f) = (t as usize, (t - t.floor()) as f32);
            let a = x[j.min(x.len() - 1)];
            let b = x[(j + 1).min(x.len() - 1)];
            a + (b - a) * f
        })
        .collect()
}

#[test]
fn a_sentence_gives_plausible_speech() {
    let mut tts = Tts::load(crate::manifest(), 2).unwrap();
    assert_eq!(tts.sample_rate(), 22_050);
    let audio = tts.synthesize(SENTENCE).unwrap();
    let seconds = audio.len() as f32 / tts.sample_rate() as f32;
    // 11 words: ordinary speech is 2-4 words a second.
    assert!((2.0..6.0).contains(&seconds), "{seconds:.2} s for {SENTENCE:?}");
    let (peak, rms, clipped) = stats(&audio);
    assert!(peak > 0.1 && rms > 0.02, "too quiet: peak {peak}, rms {rms}");
    assert!(clipped < 0.001, "{:.2} % of samples at full scale", clipped * 100.0);
    assert!(audio.iter().all(|x| x.is_finite()));

    // Silero hears it as speech.
    let mut vad = Vad::load(crate::manifest(), 1).unwrap();
    let audio16 = resample(&audio, tts.sample_rate(), 16_000);
    let mut state = VadState::new();
    let probs: Vec<f32> =
        audio16.chunks_exact(CHUNK_SAMPLES).map(|c| vad.push(&mut state, c.try_into().unwrap()).unwrap()).collect();
    let voiced = probs.iter().filter(|&&p| p > 0.5).count() as f32 / probs.len() as f32;
    assert!(voiced > 0.5, "VAD finds speech in only {voiced:.2} of the synthesised audio");
}

#[test]
fn duration_grows_with_the_text() {
    let mut tts = Tts::load(crate::manifest(), 2).unwrap();
    let short = tts.synthesize("Yes.").unwrap().len();
    let long = tts.synthesize("Yes. I can certainly help you with that, it will only take a minute.").unwrap().len();
    assert!(short > 0 && long > 4 * short, "short {short} samples, long {long} samples");
}

#[test]
fn empty_text_gives_empty_audio() {
    let mut tts = Tts::load(crate::manifest(), 1).unwrap();
    assert!(tts.synthesize("").unwrap().is_empty());
    assert!(tts.synthesize("  \n\t ").unwrap().is_empty());
}

#[test]
fn unknown_characters_are_skipped() {
    let mut tts = Tts::load(crate::manifest(), 1).unwrap();
    let audio = tts.synthesize("Hello \u{1F642} world \u{0}\u{7}!").unwrap();
    assert!(!audio.is_empty());
    assert!(audio.iter().all(|x| x.is_finite()));
}

#[test]
fn sentences_are_handed_on_one_by_one_and_keep_punctuation() {
    let mut tts = Tts::load(crate::manifest(), 2).unwrap();
    let text = "Is it raining? No, it is sunny. Great!";
    let sentences = tts.sentences(text).unwrap();
    assert_eq!(sentences.len(), 3, "{sentences:?}");
    assert!(sentences[0].ends_with('?') && sentences[1].contains(',') && sentences[2].ends_with('!'), "{sentences:?}");
    let mut parts = Vec::new();
    tts.synthesize_with(text, |audio| parts.push(audio.len())).unwrap();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|&n| n > 2_000), "{parts:?}");
}

#[test]
fn a_long_sentence_without_punctuation_is_split() {
    let mut tts = Tts::load(crate::manifest(), 2).unwrap();
    let text = "one two three four five six seven eight nine ten ".repeat(12);
    let sentences = tts.sentences(&text).unwrap();
    assert!(sentences.len() >= 2, "{} phonemes in one run", sentences[0].chars().count());
    assert!(sentences.iter().all(|s| s.chars().count() <= 500));
    let audio = tts.synthesize(&text).unwrap();
    let seconds = audio.len() as f32 / tts.sample_rate() as f32;
    assert!((20.0..80.0).contains(&seconds), "{seconds:.1} s for 120 words");
}

#[test]
fn the_first_part_of_a_sentence_is_decoded_alone_and_the_rest_joins_it_seamlessly() {
    let mut tts = Tts::load(crate::manifest(), 2).unwrap();
    tts.set_noise(false);
    let head = Duration::from_millis(800);
    let hop = 256; // samples a frame
    let at_least = (0.8 * tts.sample_rate() as f64) as usize;
    // "Yes." opens the text: the head goes on into the next sentence and cuts that one.
    for text in [SENTENCE, "Yes. I can certainly help you with that, it will only take a minute."] {
        let whole = tts.synthesize(text).unwrap();
        let (first, rest) = tts.synthesize_head(text, head).unwrap();
        assert!((at_least..at_least + 2 * hop).contains(&first.len()), "{} samples first for {text:?}", first.len());
        let mut joined = first;
        joined.extend(tts.synthesize_rest(rest.expect("a rest")).unwrap());
        assert_eq!(joined.len(), whole.len(), "{text:?}");
        let worst = joined.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "the parts differ from the whole by {worst} for {text:?}");
    }
    // Not much longer than the head: decoded whole, nothing left.
    let (first, rest) = tts.synthesize_head("Yes, sure.", head).unwrap();
    assert!(!first.is_empty() && rest.is_none());
    let (first, rest) = tts.synthesize_head(" ", head).unwrap();
    assert!(first.is_empty() && rest.is_none());
}
