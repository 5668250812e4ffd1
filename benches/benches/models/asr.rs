//! Benchmarks of the `asr` model: one transcription per clip, in both encoder modes.
use parley_server::models::asr::{Asr, AsrMode};
use parley_tests::{read_16k, speech_clips};
use std::hint::black_box;

pub fn bench(c: &mut criterion::Criterion) {
    let mut asr = Asr::load(crate::manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
    let clips = speech_clips();
    // A short and a long clip of each speaker keeps the run short while covering the range.
    let picked = [&clips[1], &clips[0], &clips[5], &clips[9]];
    let mut group = c.benchmark_group("asr");
    group.sample_size(10);
    for mode in [AsrMode::Variable, AsrMode::Padded30s] {
        asr.mode = mode;
        for clip in picked {
            let audio = read_16k(&clip.path);
            let name = clip.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let id = format!("{mode:?}/{name}/{:.1}s", audio.len() as f64 / 16000.0);
            group.bench_function(id, |b| b.iter(|| asr.transcribe(black_box(&audio)).expect("transcribe")));
        }
    }
    group.finish();
}
