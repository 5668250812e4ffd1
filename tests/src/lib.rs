//! Shared fixtures for the end-to-end tests and benchmarks: real speech clips with their
//! transcripts (Debian's `pocketsphinx-testdata`: LibriVox and "cards" recordings), WAV reading,
//! word error rate, and a real server on a loopback port ([`TestServer`]).
pub mod server;
pub mod tls;
pub mod ws;

pub use server::TestServer;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where Debian's `pocketsphinx-testdata` puts its recordings.
pub const TESTDATA: &str = "/usr/share/pocketsphinx/test/data";

/// Waits until `condition` holds, looking every 20 ms; panics naming `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One recorded utterance and what was said.
#[derive(Debug, Clone)]
pub struct Clip {
    pub path: PathBuf,
    pub transcript: String,
}

/// The LibriVox clips (one human reader) followed by the cards clips (a second speaker).
/// Panics with the install hint when the package is missing: the tests cannot run without real speech.
pub fn speech_clips() -> Vec<Clip> {
    let mut clips = Vec::new();
    for (folder, listing) in [("librivox", "transcription"), ("cards", "cards.transcription")] {
        let dir = Path::new(TESTDATA).join(folder);
        let text = std::fs::read_to_string(dir.join(listing))
            .unwrap_or_else(|e| panic!("{}: {e}: install the Debian package pocketsphinx-testdata", dir.display()));
        for line in text.lines() {
            // "<s> words words </s> (file-id)"
            let Some((words, id)) = line.trim().strip_prefix("<s>").and_then(|l| l.rsplit_once("</s>")) else {
                continue;
            };
            let id = id.trim().trim_start_matches('(').trim_end_matches(')');
            let name = Path::new(id).file_name().unwrap().to_string_lossy().into_owned();
            clips.push(Clip { path: dir.join(format!("{name}.wav")), transcript: words.trim().to_string() });
        }
    }
    clips
}

/// Reads a 16-bit PCM WAV as mono f32 samples in [-1, 1] and its sample rate.
pub fn read_wav(path: &Path) -> (Vec<f32>, u32) {
    parley_client::audio::read_wav(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads a clip that must already be 16 kHz (all pocketsphinx-testdata clips are).
pub fn read_16k(path: &Path) -> Vec<f32> {
    let (samples, rate) = read_wav(path);
    assert_eq!(rate, 16_000, "{}: expected 16 kHz", path.display());
    samples
}

/// Lower-case words with punctuation removed (digits are kept as they are).
pub fn normalize_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '\'' { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Word-level edit distance between a reference and a hypothesis, and the reference length.
pub fn word_errors(reference: &str, hypothesis: &str) -> (usize, usize) {
    let r = normalize_words(reference);
    let h = normalize_words(hypothesis);
    let mut d: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let prev = d.clone();
        d[0] = i;
        for j in 1..=h.len() {
            d[j] = (prev[j] + 1).min(d[j - 1] + 1).min(prev[j - 1] + usize::from(r[i - 1] != h[j - 1]));
        }
    }
    (d[h.len()], r.len())
}

/// `text` spoken by the espeak-ng voice `voice` (a different synthetic voice than the server's):
/// mono samples and their rate (22 050 Hz).
pub fn espeak(voice: &str, text: &str) -> (Vec<f32>, u32) {
    parley_client::eval::espeak(voice, text).unwrap_or_else(|e| panic!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_errors_counts_substitutions_insertions_and_deletions() {
        assert_eq!(word_errors("ten of clubs", "Ten of clubs."), (0, 3));
        assert_eq!(word_errors("ten of clubs", "ten clubs"), (1, 3));
        assert_eq!(word_errors("ten of clubs", "two of clubs now"), (2, 3));
    }
}
