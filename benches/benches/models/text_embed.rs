//! Benchmarks of the `text_embed` model: one sentence, and a batch of eight.
use crate::manifest;
use parley_server::models::text_embed::TextEmbedder;
use std::hint::black_box;

const SENTENCE: &str = "Could you tell me how to stop a program that has stopped responding?";

pub fn bench(c: &mut criterion::Criterion) {
    let mut embedder = TextEmbedder::load(manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("text_embed");
    group.sample_size(20);
    group.bench_function("sentence", |b| b.iter(|| embedder.embed(black_box(SENTENCE)).unwrap()));
    let batch = [SENTENCE; 8];
    group.bench_function("batch_8", |b| b.iter(|| embedder.embed_batch(black_box(&batch)).unwrap()));
    group.finish();
}
