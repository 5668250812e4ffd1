//! Benchmarks of the `turn` model (Smart Turn): one verdict on a turn's last 8 s, on one and on two
//! threads (the server gives it one: it runs alongside the reply).
use crate::manifest;
use parley_server::models::turn::TurnDetector;
use parley_tests::{read_16k, speech_clips};
use std::hint::black_box;

pub fn bench(c: &mut criterion::Criterion) {
    // "five five" (cards 004) and the pause after it: the window is 8 s whatever the length.
    let clip = speech_clips().into_iter().find(|clip| clip.path.ends_with("cards/004.wav")).unwrap();
    let audio = read_16k(&clip.path);
    let mut group = c.benchmark_group("turn");
    group.sample_size(10);
    for threads in [1, 2] {
        let mut turn = TurnDetector::load(manifest(), threads).unwrap_or_else(|e| panic!("{e}"));
        group.bench_function(format!("verdict_{threads}_thread"), |b| {
            b.iter(|| turn.probability(black_box(&audio)).unwrap())
        });
    }
    group.finish();
}
