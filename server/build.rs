//! Computes the model-cache key: a hash of everything under `models/` that shapes the provisioned
//! models (pins, converters, scripts), so a changed pin or converter selects a fresh cache.
//! Must match `cache_key()` in `models/provision.py`.
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "__pycache__" || name == "README.md" || name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, root, out);
        } else {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            out.push((rel, path));
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    files.sort();
    let mut hasher = Sha256::new();
    for (rel, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let content = std::fs::read(path).expect("read models/ file");
        hasher.update(rel.as_bytes());
        hasher.update(b"\0");
        hasher.update(format!("{:x}", Sha256::digest(&content)).as_bytes());
        hasher.update(b"\n");
    }
    let key = format!("{:x}", hasher.finalize());
    println!("cargo:rustc-env=PARLEY_MODELS_KEY={}", &key[..16]);
}
