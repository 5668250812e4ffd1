//! Per-model micro-benchmarks with real models and real audio (`cargo bench -p parley-benches`).
mod asr;
mod llm;
mod safety;
mod speaker;
mod text_embed;
mod tts;
mod turn;
mod vad;

use parley_server::models::Manifest;
use std::sync::OnceLock;

pub fn manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| Manifest::load_default().unwrap_or_else(|e| panic!("{e}")))
}

criterion::criterion_group!(
    benches,
    vad::bench,
    asr::bench,
    llm::bench,
    tts::bench,
    speaker::bench,
    text_embed::bench,
    safety::bench,
    turn::bench
);
criterion::criterion_main!(benches);
