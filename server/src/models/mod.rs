//! The model layer: finds the provisioned models through their manifest, verifies every file's
//! sha256 before ONNX Runtime sees it, loads the runtime library, and builds sessions.
//! Each submodule wraps one model behind a small typed API.
//!
//! The manifest format and the role → file contract are documented in `models/README.md`.
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub mod asr;
pub mod chat_api;
pub mod espeak;
pub mod llm;
pub mod speaker;
pub mod text_embed;
pub mod tts;
pub mod turn;
pub mod vad;

/// The manifest schema this build understands.
const SCHEMA: u32 = 1;
/// Key of the model cache this build expects (hash of `models/`, computed by `build.rs`).
pub const MODELS_KEY: &str = env!("PARLEY_MODELS_KEY");

/// Why a model could not be loaded or run. Every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "no model manifest at {0}: provision the models with `models/provision.sh` \
         (or set PARLEY_MODELS to an existing provisioned cache)"
    )]
    NoManifest(PathBuf),
    #[error("model manifest {path} is unreadable: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("the model manifest has no `{0}` model: re-run `models/provision.sh`")]
    MissingRole(String),
    #[error("the `{role}` model has no `{name}` file in the manifest: re-run `models/provision.sh`")]
    MissingFile { role: String, name: String },
    #[error("{0} is missing: re-run `models/provision.sh`")]
    FileMissing(PathBuf),
    #[error(
        "{path} has sha256 {actual} but the manifest says {expected}: the cache is damaged; \
         delete it and re-run `models/provision.sh`"
    )]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    #[error("{path}: expected graph {kind} {expected:?}, found {found:?}: the model does not match this build")]
    GraphMismatch { path: PathBuf, kind: &'static str, expected: Vec<String>, found: Vec<String> },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl<R> From<ort::Error<R>> for ModelError {
    fn from(e: ort::Error<R>) -> Self {
        ModelError::Ort(e.to_string())
    }
}

/// Where a model came from and under which licence.
#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    pub package: String,
    pub version: String,
    pub wheel_sha256: String,
    pub licence: String,
}

/// One provisioned file, relative to the cache directory.
#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeEntry {
    #[serde(flatten)]
    pub source: Source,
    #[serde(flatten)]
    pub file: FileEntry,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    #[serde(flatten)]
    pub source: Source,
    pub files: BTreeMap<String, FileEntry>,
    #[serde(default)]
    pub meta: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    schema: u32,
    key: String,
    runtime: RuntimeEntry,
    models: BTreeMap<String, ModelEntry>,
}

/// The provisioned models: the parsed `manifest.json` and the directory it lives in.
#[derive(Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub key: String,
    pub runtime: RuntimeEntry,
    pub models: BTreeMap<String, ModelEntry>,
    verified: Mutex<HashSet<PathBuf>>,
}

impl Manifest {
    /// The cache this build uses: `$PARLEY_MODELS` (when set and not empty), else
    /// `~/.cache/parley/models/<MODELS_KEY>`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("PARLEY_MODELS").filter(|dir| !dir.is_empty()) {
            return PathBuf::from(dir);
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/parley/models").join(MODELS_KEY)
    }

    pub fn load_default() -> Result<Manifest, ModelError> {
        Manifest::load(&Manifest::default_dir())
    }

    pub fn load(dir: &Path) -> Result<Manifest, ModelError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|_| ModelError::NoManifest(dir.to_path_buf()))?;
        let bad = |reason: String| ModelError::BadManifest { path: path.clone(), reason };
        let parsed: ManifestFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if parsed.schema != SCHEMA {
            return Err(bad(format!("schema {} (this build reads schema {SCHEMA})", parsed.schema)));
        }
        Ok(Manifest {
            dir: dir.to_path_buf(),
            key: parsed.key,
            runtime: parsed.runtime,
            models: parsed.models,
            verified: Mutex::new(HashSet::new()),
        })
    }

    pub fn model(&self, role: &str) -> Result<&ModelEntry, ModelError> {
        self.models.get(role).ok_or_else(|| ModelError::MissingRole(role.into()))
    }

    pub fn entry(&self, role: &str, name: &str) -> Result<&FileEntry, ModelError> {
        self.model(role)?
            .files
            .get(name)
            .ok_or_else(|| ModelError::MissingFile { role: role.into(), name: name.into() })
    }

    /// The path of a provisioned file, after checking that it exists and matches its sha256
    /// (each file is hashed once per manifest).
    pub fn path(&self, role: &str, name: &str) -> Result<PathBuf, ModelError> {
        self.verified_path(self.entry(role, name)?)
    }

    fn verified_path(&self, entry: &FileEntry) -> Result<PathBuf, ModelError> {
        let path = self.dir.join(&entry.file);
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(&path) {
            return Ok(path);
        }
        let actual = sha256_file(&path).map_err(|_| ModelError::FileMissing(path.clone()))?;
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(ModelError::HashMismatch { path, expected: entry.sha256.clone(), actual });
        }
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone());
        Ok(path)
    }

    /// Loads the ONNX Runtime library named in the manifest (once per process).
    /// The path and hash are checked first: ort panics on any call made before a library is loaded.
    pub fn runtime(&self) -> Result<&'static ort::environment::Environment, ModelError> {
        static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(env) = ENV.get() {
            return Ok(env);
        }
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(env) = ENV.get() {
            return Ok(env);
        }
        let lib = self.verified_path(&self.runtime.file)?;
        let env = ort::init_from(&lib)
            .map_err(|e| ModelError::Ort(format!("loading {}: {e}", lib.display())))?
            .with_name("parley")
            .build()?;
        Ok(ENV.get_or_init(|| env))
    }

    /// Builds an ONNX Runtime session for `role`/`name` with `threads` intra-op threads, and checks
    /// that the graph's input and output names are the ones the manifest promises.
    pub fn session(&self, role: &str, name: &str, threads: usize) -> Result<ort::session::Session, ModelError> {
        let entry = self.entry(role, name)?;
        let path = self.verified_path(entry)?;
        let env = self.runtime()?;
        let session = ort::session::Session::builder(env)?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Level3)?
            .with_intra_threads(threads)?
            // Idle pool threads sleep instead of spinning: six engines share two cores, and a
            // spinning pool takes the cores the engine that has work needs.
            .with_intra_op_spinning(false)?
            .with_inter_threads(1)?
            .commit_from_file(&path)?;
        let names = |outlets: &[ort::value::Outlet]| outlets.iter().map(|o| o.name().to_string()).collect::<Vec<_>>();
        for (kind, expected, found) in
            [("inputs", &entry.inputs, names(session.inputs())), ("outputs", &entry.outputs, names(session.outputs()))]
        {
            let mut want = expected.clone();
            let mut got = found.clone();
            want.sort();
            got.sort();
            if want != got {
                return Err(ModelError::GraphMismatch { path, kind, expected: expected.clone(), found });
            }
        }
        Ok(session)
    }

    /// Loads a Hugging Face `tokenizer.json` provisioned for `role`.
    pub fn tokenizer(&self, role: &str) -> Result<tokenizers::Tokenizer, ModelError> {
        let path = self.path(role, "tokenizer")?;
        tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer { path, reason: e.to_string() })
    }

    /// A model's `meta` value, as `T`.
    pub fn meta<T: serde::de::DeserializeOwned>(&self, role: &str) -> Result<T, ModelError> {
        serde_json::from_value(self.model(role)?.meta.clone())
            .map_err(|e| ModelError::Invalid(format!("manifest meta of `{role}`: {e}")))
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}
