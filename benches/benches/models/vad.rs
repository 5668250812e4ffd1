//! Benchmarks of the `vad` model.
pub fn bench(_c: &mut criterion::Criterion) {}
