//! Benchmarks of the `vad` model: one 32 ms chunk of real speech, for one stream and for a batch
//! of 8 streams in one graph run (divide by 8 for the cost per stream).
use criterion::Criterion;
use parley_server::models::vad::{CHUNK_SAMPLES, Vad, VadState};
use parley_tests::{read_16k, speech_clips};
use std::time::Duration;

pub fn bench(c: &mut Criterion) {
    let t = std::time::Instant::now();
    let mut vad = Vad::load(crate::manifest(), 1).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("vad: model load {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let speech = read_16k(&speech_clips()[0].path);
    let chunks: Vec<[f32; CHUNK_SAMPLES]> = speech.chunks_exact(CHUNK_SAMPLES).map(|c| c.try_into().unwrap()).collect();

    let mut group = c.benchmark_group("vad");
    group.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut state = VadState::new();
    let mut i = 0;
    group.bench_function("chunk_single", |b| {
        b.iter(|| {
            i = (i + 1) % chunks.len();
            vad.push(&mut state, &chunks[i]).unwrap()
        })
    });
    let mut states = vec![VadState::new(); 8];
    group.bench_function("chunk_batch8", |b| {
        b.iter(|| {
            i = (i + 1) % chunks.len();
            let batch: Vec<&[f32; CHUNK_SAMPLES]> = (0..8).map(|s| &chunks[(i + 7 * s) % chunks.len()]).collect();
            let mut refs: Vec<&mut VadState> = states.iter_mut().collect();
            vad.push_batch(&mut refs, &batch).unwrap()
        })
    });
    group.finish();
}
