//! Benchmarks of the `llm` model.
pub fn bench(_c: &mut criterion::Criterion) {}
