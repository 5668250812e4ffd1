//! Benchmarks of the `tts` model: time to audio for a short clause (espeak-ng phonemes + one
//! Piper run), a full sentence, and the phonemizer alone. RTF = time / audio duration (printed).
use criterion::Criterion;
use parley_server::models::tts::Tts;
use std::time::{Duration, Instant};

const CLAUSE: &str = "Sure, I can help.";
const SENTENCE: &str = "Hello there, the quick brown fox jumps over the lazy dog.";

pub fn bench(c: &mut Criterion) {
    let t = Instant::now();
    let mut tts = Tts::load(crate::manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("tts: model load {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    for text in [CLAUSE, SENTENCE] {
        tts.synthesize(text).unwrap(); // warm-up
        let t = Instant::now();
        let audio = tts.synthesize(text).unwrap();
        let dt = t.elapsed().as_secs_f64();
        let seconds = audio.len() as f64 / f64::from(tts.sample_rate());
        eprintln!("tts: {text:?}: {seconds:.2} s of audio in {:.0} ms, RTF {:.3}", dt * 1e3, dt / seconds);
    }

    let mut group = c.benchmark_group("tts");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    group.bench_function("phonemize_sentence", |b| b.iter(|| tts.sentences(SENTENCE).unwrap()));
    group.bench_function("time_to_audio_short_clause", |b| b.iter(|| tts.synthesize(CLAUSE).unwrap()));
    group.bench_function("sentence", |b| b.iter(|| tts.synthesize(SENTENCE).unwrap()));
    group.finish();
}
