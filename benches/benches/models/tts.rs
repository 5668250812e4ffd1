//! Benchmarks of the `tts` model.
pub fn bench(_c: &mut criterion::Criterion) {}
