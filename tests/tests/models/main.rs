//! Model-layer tests: every provisioned model through its typed API, with real speech.
//! Needs a provisioned cache (`models/provision.sh`; `PARLEY_MODELS` to point elsewhere).
mod asr;
mod llm;
mod manifest;
mod safety;
mod speaker;
mod text_embed;
mod tts;
mod turn;
mod vad;

use parley_server::models::Manifest;
use std::sync::OnceLock;

/// The manifest, loaded once per test binary.
pub fn manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| Manifest::load_default().unwrap_or_else(|e| panic!("{e}")))
}
