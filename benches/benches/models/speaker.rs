//! Benchmarks of the `speaker` model.
pub fn bench(_c: &mut criterion::Criterion) {}
