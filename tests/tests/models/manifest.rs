//! Tests of the manifest: the real cache loads every role it lists; damaged or incomplete caches
//! (temporary copies with tiny fake files, never the real cache) give clear errors, not panics.
use parley_server::models::{Manifest, ModelError};
use std::path::{Path, PathBuf};
use std::process::Command;

const FAKE_LIB: &str = "not a shared library\n";
const FAKE_LIB_SHA256: &str = "b1fdabc78c6b5e23185c2bce6ef52ec5384d860053a9b54b7154825845d4786f";
const FAKE_GRAPH: &str = "not an onnx graph\n";
const FAKE_GRAPH_SHA256: &str = "e00bce7dd8cdbebfce746b4453153c2bfc6a4987b503bde035b246f3aefa1194";
/// Set in the environment of a child test process: the fake cache it should load.
const CHILD_DIR: &str = "PARLEY_TEST_FAKE_CACHE";

/// A fresh temporary cache with a fake runtime and a fake `vad` model; `runtime_sha`/`vad_sha`
/// go into the manifest as they are (so they can be wrong).
fn fake_cache(name: &str, runtime_sha: &str, vad_sha: &str, write_runtime: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-fake-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("runtime")).unwrap();
    std::fs::create_dir_all(dir.join("vad")).unwrap();
    if write_runtime {
        std::fs::write(dir.join("runtime/libonnxruntime.so"), FAKE_LIB).unwrap();
    }
    std::fs::write(dir.join("vad/silero_vad.onnx"), FAKE_GRAPH).unwrap();
    let source = r#""package": "p", "version": "1", "wheel_sha256": "00", "licence": "MIT""#;
    let manifest = format!(
        r#"{{"schema": 1, "key": "test",
            "runtime": {{"file": "runtime/libonnxruntime.so", "sha256": "{runtime_sha}", {source}}},
            "models": {{"vad": {{{source}, "meta": {{}},
                "files": {{"model": {{"file": "vad/silero_vad.onnx", "sha256": "{vad_sha}",
                                      "inputs": ["input", "state", "sr"], "outputs": ["output", "stateN"]}}}}}}}}}}"#
    );
    std::fs::write(dir.join("manifest.json"), manifest).unwrap();
    dir
}

/// Runs the ignored test `name` of this binary in a child process (ONNX Runtime can be loaded
/// only once per process) with the fake cache `dir`; its panic message, if it failed.
fn run_child(name: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 passed") || text.contains("1 failed"), "child test {name} did not run:\n{text}");
    if out.status.success() { Ok(()) } else { Err(text) }
}

#[test]
fn the_real_cache_loads_every_role_it_lists() {
    let manifest = crate::manifest();
    assert!(!manifest.models.is_empty(), "{}: no models", manifest.dir.display());
    manifest.runtime().unwrap();
    for (role, model) in &manifest.models {
        assert!(
            !model.source.licence.is_empty() && model.source.wheel_sha256.len() == 64,
            "{role}: {:?}",
            model.source
        );
        for (name, entry) in &model.files {
            let path = manifest.path(role, name).unwrap_or_else(|e| panic!("{role}/{name}: {e}"));
            assert!(path.is_file());
            // ONNX graphs: build a session, which also checks the graph's input and output names.
            if !entry.inputs.is_empty() {
                manifest.session(role, name, 1).unwrap_or_else(|e| panic!("{role}/{name}: {e}"));
            }
        }
    }
}

#[test]
fn a_missing_cache_is_no_manifest() {
    let dir = std::env::temp_dir().join("parley-no-such-cache");
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::NoManifest(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("provision.sh") && msg.contains("parley-no-such-cache"), "{msg}");
}

#[test]
fn a_wrong_hash_is_a_hash_mismatch_that_says_what_to_do() {
    let wrong = "0".repeat(64);
    let dir = fake_cache("hash", FAKE_LIB_SHA256, &wrong, true);
    let manifest = Manifest::load(&dir).unwrap();
    let err = manifest.path("vad", "model").unwrap_err();
    match &err {
        ModelError::HashMismatch { path, expected, actual } => {
            assert!(path.ends_with("vad/silero_vad.onnx"));
            assert_eq!(expected, &wrong);
            assert_eq!(actual, FAKE_GRAPH_SHA256);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("provision.sh") && msg.contains("silero_vad.onnx") && msg.contains(FAKE_GRAPH_SHA256),
        "{msg}"
    );
    // The same file with the right hash is accepted.
    let dir_ok = fake_cache("hash-ok", FAKE_LIB_SHA256, FAKE_GRAPH_SHA256, true);
    assert!(Manifest::load(&dir_ok).unwrap().path("vad", "model").is_ok());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(dir_ok).unwrap();
}

#[test]
fn missing_roles_files_and_bad_json_are_clear_errors() {
    let dir = fake_cache("roles", FAKE_LIB_SHA256, FAKE_GRAPH_SHA256, true);
    let manifest = Manifest::load(&dir).unwrap();
    assert!(matches!(manifest.model("asr"), Err(ModelError::MissingRole(r)) if r == "asr"));
    assert!(matches!(manifest.path("vad", "tokenizer"), Err(ModelError::MissingFile { .. })));
    std::fs::remove_file(dir.join("vad/silero_vad.onnx")).unwrap();
    assert!(matches!(manifest.path("vad", "model"), Err(ModelError::FileMissing(_))));
    std::fs::write(dir.join("manifest.json"), "{\"schema\": 1").unwrap();
    assert!(matches!(Manifest::load(&dir), Err(ModelError::BadManifest { .. })));
    std::fs::write(dir.join("manifest.json"), r#"{"schema": 99, "key": "", "runtime": {}, "models": {}}"#).unwrap();
    assert!(matches!(Manifest::load(&dir), Err(ModelError::BadManifest { .. })));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_runtime_library_is_a_clear_error() {
    let dir = fake_cache("no-runtime", FAKE_LIB_SHA256, FAKE_GRAPH_SHA256, false);
    run_child("manifest::child_missing_runtime", &dir).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_runtime_library_that_is_not_a_library_is_a_clear_error() {
    let dir = fake_cache("bad-runtime", FAKE_LIB_SHA256, FAKE_GRAPH_SHA256, true);
    run_child("manifest::child_bad_runtime", &dir).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Child of [`a_missing_runtime_library_is_a_clear_error`]: a fresh process, no runtime loaded yet.
#[test]
#[ignore = "run by a_missing_runtime_library_is_a_clear_error in a child process"]
fn child_missing_runtime() {
    let manifest = Manifest::load(Path::new(&std::env::var_os(CHILD_DIR).unwrap())).unwrap();
    let err = manifest.session("vad", "model", 1).unwrap_err();
    assert!(matches!(err, ModelError::FileMissing(ref p) if p.ends_with("runtime/libonnxruntime.so")), "{err:?}");
    assert!(err.to_string().contains("provision.sh"), "{err}");
}

/// Child of [`a_runtime_library_that_is_not_a_library_is_a_clear_error`].
#[test]
#[ignore = "run by a_runtime_library_that_is_not_a_library_is_a_clear_error in a child process"]
fn child_bad_runtime() {
    let manifest = Manifest::load(Path::new(&std::env::var_os(CHILD_DIR).unwrap())).unwrap();
    let err = manifest.session("vad", "model", 1).unwrap_err();
    assert!(matches!(err, ModelError::Ort(ref m) if m.contains("libonnxruntime.so")), "{err:?}");
}
