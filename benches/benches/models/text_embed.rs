//! Benchmarks of the `text_embed` model.
pub fn bench(_c: &mut criterion::Criterion) {}
