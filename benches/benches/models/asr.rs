//! Benchmarks of the `asr` model.
pub fn bench(_c: &mut criterion::Criterion) {}
