//! The append-only audit log: one JSON line per safety decision, written (and flushed to the
//! operating system) before the reply proceeds.
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct AuditEntry<'a> {
    /// Unix time, ms.
    pub ts_ms: u128,
    pub session: &'a str,
    /// The id of the API key the session was opened with (never the key); null without auth.
    pub key_id: Option<&'a str>,
    pub turn: u64,
    pub policy_version: &'a str,
    #[serde(flatten)]
    pub decision: &'a super::Decision,
    /// What was judged: the transcript, the reply chunk, or a description of the audio.
    pub judged: &'a str,
}

/// An open log file, shared by all sessions.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating it and its directory if needed) the log at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry as a single write of one line, then flushes.
    pub fn append(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line)?;
        file.flush()
    }
}
