//! Tests of the `speaker` model.
use crate::manifest;
use parley_server::models::speaker::{SAMPLE_RATE, SpeakerEmbedder, cosine};
use parley_tests::{read_16k, speech_clips};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// One embedder shared by the tests of this module (loaded once).
fn embedder() -> MutexGuard<'static, SpeakerEmbedder> {
    static EMBEDDER: OnceLock<Mutex<SpeakerEmbedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            let start = Instant::now();
            let embedder = SpeakerEmbedder::load(manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("speaker: loaded in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
            Mutex::new(embedder)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `text` spoken by an espeak-ng `voice`, at 16 kHz.
fn espeak_16k(voice: &str, text: &str) -> Vec<f32> {
    let (samples, rate) = parley_tests::espeak(voice, text);
    parley_client::audio::resample(&samples, rate, SAMPLE_RATE).unwrap()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

#[test]
fn same_reader_is_closer_than_other_speakers() {
    let mut voices: Vec<(String, Vec<f32>)> = speech_clips()
        .iter()
        .map(|clip| {
            let folder = clip.path.parent().unwrap().file_name().unwrap().to_string_lossy();
            let id = clip.path.file_stem().unwrap().to_string_lossy();
            let name =
                if folder == "librivox" { format!("libri{}", &id[id.len() - 3..]) } else { format!("cards{id}") };
            (name, read_16k(&clip.path))
        })
        .collect();
    let sentences = [
        "The weather was cold and grey all through the morning.",
        "Please remind me to call my sister tomorrow at noon.",
    ];
    for (i, text) in sentences.iter().enumerate() {
        voices.push((format!("esp_m{i}"), espeak_16k("en-us", text)));
        voices.push((format!("esp_f{i}"), espeak_16k("en-us+f3", text)));
    }

    let mut embedder = embedder();
    let embeddings: Vec<Vec<f32>> = voices.iter().map(|(_, audio)| embedder.embed(audio).unwrap()).collect();
    drop(embedder);
    for ((name, _), e) in voices.iter().zip(&embeddings) {
        assert_eq!(e.len(), 256);
        assert!((norm(e) - 1.0).abs() < 1e-4, "{name}: norm {}", norm(e));
    }

    // The similarity matrix, printed for the record (`--nocapture`).
    let names: Vec<&str> = voices.iter().map(|(n, _)| n.as_str()).collect();
    let sim = |a: usize, b: usize| cosine(&embeddings[a], &embeddings[b]);
    eprintln!("{:>9} {}", "", names.iter().map(|n| format!("{n:>9}")).collect::<String>());
    for (a, name) in names.iter().enumerate() {
        eprintln!("{name:>9} {}", (0..names.len()).map(|b| format!("{:>9.2}", sim(a, b))).collect::<String>());
    }

    let group = |prefix: &str| (0..names.len()).filter(|&i| names[i].starts_with(prefix)).collect::<Vec<_>>();
    let (libri, cards, espeak) = (group("libri"), group("cards"), group("esp_"));
    let pairs = |a: &[usize], b: &[usize]| {
        a.iter().flat_map(|&i| b.iter().filter(move |&&j| j != i).map(move |&j| sim(i, j))).collect::<Vec<f32>>()
    };
    let same = pairs(&libri, &libri);
    let other_human = pairs(&libri, &cards);
    let synthetic = pairs(&libri, &espeak);
    eprintln!(
        "libri-libri mean {:.2} min {:.2}; libri-cards mean {:.2} max {:.2}; libri-espeak mean {:.2} max {:.2}",
        mean(&same),
        same.iter().cloned().fold(f32::MAX, f32::min),
        mean(&other_human),
        other_human.iter().cloned().fold(f32::MIN, f32::max),
        mean(&synthetic),
        synthetic.iter().cloned().fold(f32::MIN, f32::max),
    );
    // Every LibriVox clip is, on average, closer to the reader's other clips than to either other voice.
    for &i in &libri {
        let to_same = mean(&pairs(&[i], &libri));
        let to_cards = mean(&pairs(&[i], &cards));
        let to_espeak = mean(&pairs(&[i], &espeak));
        assert!(to_same > to_cards + 0.05, "{}: same reader {to_same:.2} vs cards {to_cards:.2}", names[i]);
        assert!(to_same > to_espeak + 0.05, "{}: same reader {to_same:.2} vs espeak {to_espeak:.2}", names[i]);
    }
    // One synthetic voice across two different sentences is closer than any human clip to it.
    let (m0, m1) =
        (names.iter().position(|n| *n == "esp_m0").unwrap(), names.iter().position(|n| *n == "esp_m1").unwrap());
    let max_human = pairs(&[m0], &libri).into_iter().chain(pairs(&[m0], &cards)).fold(f32::MIN, f32::max);
    assert!(sim(m0, m1) > max_human, "espeak same voice {:.2} vs humans {max_human:.2}", sim(m0, m1));
}

#[test]
fn silence_empty_short_and_invalid_audio_do_not_panic() {
    let mut embedder = embedder();
    assert!(embedder.embed(&[]).is_err(), "empty audio must be an error");
    assert!(embedder.embed(&[0.1, f32::NAN, 0.2]).is_err(), "NaN samples must be an error");
    for (what, audio) in [("silence", vec![0.0f32; 16_000]), ("one sample", vec![0.3]), ("50 ms", vec![0.01; 800])] {
        let e = embedder.embed(&audio).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(e.len(), 256, "{what}");
        assert!(e.iter().all(|x| x.is_finite()), "{what}: non-finite embedding");
        assert!((norm(&e) - 1.0).abs() < 1e-4 || norm(&e) == 0.0, "{what}: norm {}", norm(&e));
    }
}

#[test]
fn long_audio_is_embedded_in_several_batches() {
    // ~50 s of one reader: more segments than one graph run takes.
    let clips: Vec<Vec<f32>> = speech_clips()
        .iter()
        .filter(|c| c.path.to_string_lossy().contains("librivox"))
        .map(|c| read_16k(&c.path))
        .collect();
    let long: Vec<f32> = clips.iter().chain(&clips).flatten().copied().collect();
    assert!(long.len() > 45 * 16_000);
    let mut embedder = embedder();
    let whole = embedder.embed(&long).unwrap();
    let first = embedder.embed(&clips[0]).unwrap();
    assert!((norm(&whole) - 1.0).abs() < 1e-4);
    assert!(cosine(&whole, &first) > 0.8, "the whole reading vs one clip: {:.2}", cosine(&whole, &first));
}

#[test]
fn quiet_audio_is_raised_to_the_target_level() {
    // Two quiet copies (−20 dB and −40 dB) are both raised to −30 dBFS, so they embed alike.
    let clip = read_16k(&speech_clips()[1].path);
    let scaled = |gain: f32| clip.iter().map(|s| s * gain).collect::<Vec<f32>>();
    let mut embedder = embedder();
    let (a, b) = (embedder.embed(&scaled(0.1)).unwrap(), embedder.embed(&scaled(0.01)).unwrap());
    assert!(cosine(&a, &b) > 0.9999, "quiet copies: {:.5}", cosine(&a, &b));
}
