//! Benchmarks of the `speaker` model: one 1.6 s segment, and 2 s and 3 s utterances of real speech.
use crate::manifest;
use parley_server::models::speaker::SpeakerEmbedder;
use parley_tests::{read_16k, speech_clips};
use std::hint::black_box;

pub fn bench(c: &mut criterion::Criterion) {
    let mut embedder = SpeakerEmbedder::load(manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
    // The longest LibriVox clip (7.1 s), cut to length.
    let speech = speech_clips().iter().map(|clip| read_16k(&clip.path)).max_by_key(Vec::len).unwrap();
    let mut group = c.benchmark_group("speaker");
    group.sample_size(10);
    // 1.6 s is one segment; 2 s and 3 s are two and three (50 % overlap).
    for (name, seconds) in [("segment_1.6s", 1.6), ("utterance_2s", 2.0), ("utterance_3s", 3.0)] {
        let audio = &speech[..(seconds * 16_000.0) as usize];
        group.bench_function(name, |b| b.iter(|| embedder.embed(black_box(audio)).unwrap()));
    }
    group.finish();
}
