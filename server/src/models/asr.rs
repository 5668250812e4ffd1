//! Speech recognition: Whisper tiny.en as two ONNX graphs (`models/README.md`, role `asr`).
//!
//! The encoder computes the log-mel spectrogram itself and accepts any length up to 30 s. Whisper was
//! trained on 30 s windows, so the reference way to run it pads every utterance to 30 s
//! ([`AsrMode::Padded30s`]); that costs the full 30 s encoder pass (about 1 s on two cores) for a
//! 2 s utterance. [`AsrMode::Variable`] (the default) encodes the audio plus [`VARIABLE_PADDING_S`]
//! of silence instead. Without the long silent tail the model is reluctant to emit end-of-text
//! and tends to repeat itself, so decoding is guarded:
//! - it stops when end-of-text becomes likely (log-probability above [`EOT_LOGPROB_STOP`]) even
//!   if it is not yet the single most likely token. If that token is a word, the transcript says
//!   so ([`Transcript::cut_short`]): the speech may go on past it (a trailing "and" is lost so);
//! - the token count is bounded in proportion to the audio's duration;
//! - a repeated n-gram (a loop) stops decoding and is cut;
//! - when a loop or the token bound is hit, the utterance is decoded again with
//!   [`RETRY_PADDING_S`] of silence (a longer silent tail is what the model needs to end; this
//!   costs ~0.1-0.2 s where a 30 s pass costs 0.5-0.9 s). If that loops too, its cut text stands
//!   (the text before a loop is right in almost every case, e.g. "5, 5" for "five, five"); a
//!   run-on without a loop is decoded once more in 30 s mode.
//!
//! Silence and noise give an empty transcript: the model's own no-speech probability (the
//! `<|nocaptions|>` token after `<|startoftranscript|>`) is checked before any text is decoded.
//!
//! Speech still being spoken can be recognised in passes over what there is so far
//! ([`Asr::transcribe_partial`]): the tokens two passes in a row agree on are [`Settled`] (local
//! agreement). Later passes, and the transcription at the end, force them (one decoder step for
//! all) and decode only the rest.
use super::{Manifest, ModelError};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Seconds of silence appended to the audio in [`AsrMode::Variable`] (measured on the LibriVox,
/// cards and espeak-ng clips: 0.5, 1 and 2 s give the same WER within one or two words; 1 s
/// needs the 30 s fallback least often).
pub const VARIABLE_PADDING_S: f32 = 1.0;
/// Shortest audio the encoder sees in [`AsrMode::Variable`], in seconds (more silence for short
/// utterances): with a 1–2 s window, short phrases ("five, five") loop and are decoded again.
pub const MIN_ENCODED_S: f32 = 3.0;
/// Seconds of silence for the second try after a degenerate decode in [`AsrMode::Variable`].
pub const RETRY_PADDING_S: f32 = 4.0;
/// Decoding stops once log p(end-of-text) exceeds this (p ≈ 0.08). In 30 s mode this never
/// changes a transcript of the test clips; in variable mode it ends most would-be loops.
pub const EOT_LOGPROB_STOP: f32 = -2.5;
/// Token bound: `MAX_TOKENS_PER_S` × duration + `MAX_TOKENS_BASE` (speech is 3–4 tokens/s).
pub const MAX_TOKENS_PER_S: f32 = 8.0;
pub const MAX_TOKENS_BASE: usize = 8;
/// Audio shorter than this (0.1 s) is not speech: empty transcript without running the model.
pub const MIN_SECONDS: f32 = 0.1;
/// Above this no-speech probability the utterance is treated as silence or noise.
pub const NO_SPEECH_THRESHOLD: f32 = 0.6;
/// Audio quieter than this peak amplitude (−80 dBFS) is silence.
const SILENCE_PEAK: f32 = 1e-4;
/// `<|nocaptions|>`: Whisper's no-speech token in the English-only vocabulary.
const NO_SPEECH_TOKEN: usize = 50361;

/// How the encoder sees the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AsrMode {
    /// Zero-padded to 30 s, as Whisper was trained: most accurate, ~1 s of encoder per call.
    Padded30s,
    /// The audio plus [`VARIABLE_PADDING_S`] of silence, with guarded decoding.
    #[default]
    Variable,
}

/// Why decoding ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model emitted end-of-text (or made it likely enough).
    EndOfText,
    /// No decoding: too short, silent, or the model judged it not to be speech.
    NoSpeech,
    /// A repeated n-gram was cut.
    Loop,
    /// The duration-based token bound was reached.
    TokenBound,
    /// The caller gave up on the result (see [`Asr::transcribe_unless`]): the text is partial.
    Cancelled,
}

/// One transcribed utterance.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub text: String,
    /// Text tokens decoded (prompt excluded).
    pub tokens: usize,
    /// Their ids (the forced prefix included).
    pub ids: Vec<u32>,
    /// Encoder time, including a 30 s fallback pass if there was one.
    pub encode_ms: f64,
    /// Decoder time (all steps, including the prompt).
    pub decode_ms: f64,
    /// Decoder calls made (prompt steps included).
    pub decoder_steps: usize,
    pub stop: Stop,
    /// Whether the first pass was degenerate and the audio was decoded again (longer padding).
    pub fell_back: bool,
    /// The model's no-speech probability.
    pub no_speech_prob: f32,
    /// Decoding stopped on a likely end-of-text, not after a full stop, while this word (or a
    /// comma) was likelier still: the speech may go on past the transcript ("I have a cat" for "I
    /// have a cat and", `Some(" and")`).
    pub cut_short: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Meta {
    sample_rate: usize,
    max_samples: usize,
    samples_per_frame: usize,
    n_layers: usize,
    n_heads: usize,
    head_dim: usize,
    vocab: usize,
    n_text_ctx: usize,
    sot: i64,
    no_timestamps: i64,
    eot: usize,
    suppress_ids: Vec<usize>,
    suppress_ids_begin: Vec<usize>,
}

/// The start of a transcript that passes over speech still being spoken agree on.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// Token ids of the latest pass.
    latest: Vec<u32>,
    /// Token ids the latest two passes agree on.
    pub ids: Vec<u32>,
}

/// Whisper encoder + decoder sessions and the tokenizer. Not `Sync`: one per owning thread.
pub struct Asr {
    encoder: Session,
    decoder: Session,
    tokenizer: tokenizers::Tokenizer,
    meta: Meta,
    /// Tokens never allowed in the text (special, timestamp and Whisper's suppress list).
    suppressed: Vec<bool>,
    /// `.`, `?` and `!`: decoding that stops before one of them is not cut short.
    sentence_ends: Vec<u32>,
    pub mode: AsrMode,
}

/// Result of one decoding pass.
struct Decoded {
    tokens: Vec<u32>,
    stop: Stop,
    steps: usize,
    no_speech_prob: f32,
    /// The token that was likelier than the end-of-text decoding stopped on.
    cut_short: Option<u32>,
}

impl Asr {
    /// Loads the `asr` model of `manifest` with `threads` intra-op threads per session.
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Asr, ModelError> {
        let meta: Meta = manifest.meta("asr")?;
        if meta.vocab <= meta.eot || meta.sample_rate == 0 || meta.samples_per_frame == 0 {
            return Err(ModelError::Invalid(format!("asr meta is inconsistent: {meta:?}")));
        }
        let mut suppressed = vec![false; meta.vocab];
        for s in suppressed.iter_mut().skip(meta.eot + 1) {
            *s = true;
        }
        for &id in &meta.suppress_ids {
            if let Some(s) = suppressed.get_mut(id) {
                *s = true;
            }
        }
        let tokenizer = manifest.tokenizer("asr")?;
        let sentence_ends = [".", "?", "!"].into_iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        Ok(Asr {
            encoder: manifest.session("asr", "encoder", threads)?,
            decoder: manifest.session("asr", "decoder", threads)?,
            tokenizer,
            meta,
            suppressed,
            sentence_ends,
            mode: AsrMode::default(),
        })
    }

    pub fn sample_rate(&self) -> usize {
        self.meta.sample_rate
    }

    /// The longest input [`Asr::transcribe`] accepts, in samples (30 s).
    pub fn max_samples(&self) -> usize {
        self.meta.max_samples
    }

    /// Transcribes one utterance of 16 kHz mono audio in the current [`AsrMode`].
    /// Empty, very short, silent or noise-only audio gives an empty transcript; audio longer
    /// than 30 s is an error (split it first, e.g. at VAD pauses). Non-finite samples count as 0.
    pub fn transcribe(&mut self, audio_16k: &[f32]) -> Result<Transcript, ModelError> {
        self.transcribe_unless(audio_16k, &[], &AtomicBool::new(false))
    }

    /// [`Asr::transcribe`] with the text starting with `prefix` (token ids of an earlier
    /// transcript of the same speech's start, forced in one decoder step), stopping early
    /// ([`Stop::Cancelled`]: before encoding, or between decoder steps) once `cancel` is set: for
    /// speech recognised ahead that may turn out stale.
    pub fn transcribe_unless(
        &mut self,
        audio_16k: &[f32],
        prefix: &[u32],
        cancel: &AtomicBool,
    ) -> Result<Transcript, ModelError> {
        if audio_16k.len() > self.meta.max_samples {
            return Err(ModelError::Invalid(format!(
                "asr: {:.1} s of audio; Whisper transcribes at most {:.0} s per call: split the audio first",
                audio_16k.len() as f32 / self.meta.sample_rate as f32,
                self.meta.max_samples as f32 / self.meta.sample_rate as f32
            )));
        }
        let mut transcript = Transcript {
            text: String::new(),
            tokens: 0,
            ids: Vec::new(),
            encode_ms: 0.0,
            decode_ms: 0.0,
            decoder_steps: 0,
            stop: Stop::NoSpeech,
            fell_back: false,
            no_speech_prob: 1.0,
            cut_short: None,
        };
        let seconds = audio_16k.len() as f32 / self.meta.sample_rate as f32;
        let peak = audio_16k.iter().filter(|x| x.is_finite()).fold(0.0f32, |m, x| m.max(x.abs()));
        if seconds < MIN_SECONDS || peak < SILENCE_PEAK {
            return Ok(transcript);
        }
        if cancel.load(Ordering::Relaxed) {
            transcript.stop = Stop::Cancelled;
            return Ok(transcript);
        }
        let max_tokens = ((seconds * MAX_TOKENS_PER_S) as usize + MAX_TOKENS_BASE).min(self.meta.n_text_ctx / 2);

        // Seconds of silence appended per try (`None`: padded to 30 s).
        let tries: &[Option<f32>] = match self.mode {
            AsrMode::Padded30s => &[None],
            AsrMode::Variable => &[Some(VARIABLE_PADDING_S), Some(RETRY_PADDING_S), None],
        };
        let mut decoded = None;
        for (i, &padding) in tries.iter().enumerate() {
            let t0 = Instant::now();
            let (cross_k, cross_v) = self.encode(audio_16k, padding)?;
            let t1 = Instant::now();
            let attempt = self.decode(&cross_k, &cross_v, prefix, max_tokens, cancel)?;
            transcript.encode_ms += ms(t1 - t0);
            transcript.decode_ms += ms(t1.elapsed());
            transcript.decoder_steps += attempt.steps;
            let retried = i > 0;
            transcript.fell_back = retried;
            let degenerate = attempt.stop == Stop::TokenBound || (attempt.stop == Stop::Loop && !retried);
            decoded = Some(attempt);
            if !degenerate {
                break;
            }
        }
        let decoded = decoded.ok_or_else(|| ModelError::Invalid("asr: no decoding tried".into()))?;
        transcript.stop = decoded.stop;
        transcript.no_speech_prob = decoded.no_speech_prob;
        transcript.cut_short = decoded.cut_short.map(|token| self.text(&[token])).transpose()?;
        transcript.tokens = decoded.tokens.len();
        transcript.text = self.text(&decoded.tokens)?;
        transcript.ids = decoded.tokens;
        tracing::debug!(
            seconds,
            prefix = prefix.len(),
            tokens = transcript.tokens,
            steps = transcript.decoder_steps,
            encode_ms = transcript.encode_ms,
            decode_ms = transcript.decode_ms,
            stop = ?transcript.stop,
            "transcribed"
        );
        Ok(transcript)
    }

    /// A pass over speech still being spoken (its audio so far): decodes after the settled tokens,
    /// then settles those this pass and the one before agree on. A pass that was stopped, looped
    /// or hit its token bound leaves `settled` as it was.
    pub fn transcribe_partial(
        &mut self,
        audio_16k: &[f32],
        settled: &mut Settled,
        cancel: &AtomicBool,
    ) -> Result<(), ModelError> {
        let transcript = self.transcribe_unless(audio_16k, &settled.ids, cancel)?;
        if transcript.stop == Stop::EndOfText {
            let agreed = settled.latest.iter().zip(&transcript.ids).take_while(|(a, b)| a == b).count();
            settled.ids = transcript.ids[..agreed.max(settled.ids.len())].to_vec();
            settled.latest = transcript.ids;
        }
        Ok(())
    }

    /// The text of token ids of a transcript.
    pub fn text(&self, ids: &[u32]) -> Result<String, ModelError> {
        let text =
            self.tokenizer.decode(ids, true).map_err(|e| ModelError::Invalid(format!("asr: detokenizing: {e}")))?;
        Ok(text.trim().to_string())
    }

    /// Runs the encoder on the audio plus `padding` seconds of silence (`None`: padded to 30 s);
    /// returns the cross-attention K and V.
    fn encode(&mut self, audio: &[f32], padding: Option<f32>) -> Result<(DynValue, DynValue), ModelError> {
        let frame = self.meta.samples_per_frame;
        let len = match padding {
            None => self.meta.max_samples,
            Some(seconds) => {
                let rate = self.meta.sample_rate as f32;
                let padded = (audio.len() + (seconds * rate) as usize).max((MIN_ENCODED_S * rate) as usize);
                padded.div_ceil(frame).saturating_mul(frame).min(self.meta.max_samples)
            }
        };
        let mut input: Vec<f32> = audio.iter().map(|&x| if x.is_finite() { x } else { 0.0 }).collect();
        input.resize(len, 0.0);
        let tensor = Tensor::from_array(([1usize, len], input))?;
        let mut out = self.encoder.run(ort::inputs! {"audio" => tensor})?;
        let take = |out: &mut ort::session::SessionOutputs, name: &str| {
            out.remove(name).ok_or_else(|| ModelError::Invalid(format!("asr encoder gave no `{name}`")))
        };
        Ok((take(&mut out, "cross_k")?, take(&mut out, "cross_v")?))
    }

    /// Greedy decoding with the self-attention KV cache and the guards described in the module
    /// doc, the text starting with `prefix`.
    fn decode(
        &mut self,
        cross_k: &DynValue,
        cross_v: &DynValue,
        prefix: &[u32],
        max_tokens: usize,
        cancel: &AtomicBool,
    ) -> Result<Decoded, ModelError> {
        let m = &self.meta;
        let empty = || Tensor::<f32>::from_array(([m.n_layers, 1, m.n_heads, 0, m.head_dim], Vec::<f32>::new()));
        let mut past_k: DynValue = empty()?.into_dyn();
        let mut past_v: DynValue = empty()?.into_dyn();
        let (sot, no_timestamps, eot) = (m.sot, m.no_timestamps, m.eot);
        let mut decoded =
            Decoded { tokens: Vec::new(), stop: Stop::TokenBound, steps: 0, no_speech_prob: 0.0, cut_short: None };
        let prefix = &prefix[..prefix.len().min(max_tokens)];
        let mut feed = vec![sot];
        let mut logits = Vec::new();
        // Step 0 feeds <|startoftranscript|> (its logits give the no-speech probability), step 1
        // <|notimestamps|> and the forced prefix, then each decoded token.
        for step in 0..max_tokens + 2 - prefix.len() {
            if cancel.load(Ordering::Relaxed) {
                decoded.stop = Stop::Cancelled;
                return Ok(decoded);
            }
            let tokens = Tensor::from_array(([1usize, feed.len()], std::mem::take(&mut feed)))?;
            let mut out = self.decoder.run(ort::inputs! {
                "tokens" => tokens,
                "cross_k" => cross_k,
                "cross_v" => cross_v,
                "past_k" => past_k,
                "past_v" => past_v,
            })?;
            decoded.steps += 1;
            logits.clear();
            logits.extend_from_slice(out["logits"].try_extract_tensor::<f32>()?.1);
            let missing = |name: &str| ModelError::Invalid(format!("asr decoder gave no `{name}`"));
            past_k = out.remove("present_k").ok_or_else(|| missing("present_k"))?;
            past_v = out.remove("present_v").ok_or_else(|| missing("present_v"))?;
            if logits.len() != m.vocab {
                return Err(ModelError::Invalid(format!(
                    "asr decoder gave {} logits, expected {}",
                    logits.len(),
                    m.vocab
                )));
            }
            if step == 0 {
                decoded.no_speech_prob = softmax_at(&logits, NO_SPEECH_TOKEN);
                if decoded.no_speech_prob > NO_SPEECH_THRESHOLD {
                    decoded.stop = Stop::NoSpeech;
                    return Ok(decoded);
                }
                feed.push(no_timestamps);
                feed.extend(prefix.iter().map(|&t| i64::from(t)));
                decoded.tokens.extend_from_slice(prefix);
                continue;
            }
            let first = decoded.tokens.is_empty();
            for (id, l) in logits.iter_mut().enumerate() {
                if self.suppressed[id] || !l.is_finite() {
                    *l = f32::NEG_INFINITY;
                }
            }
            if first {
                for &id in &m.suppress_ids_begin {
                    if let Some(l) = logits.get_mut(id) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let Some(best) = argmax(&logits) else {
                decoded.stop = Stop::EndOfText;
                return Ok(decoded);
            };
            if best == eot || (!first && log_softmax_at(&logits, eot) > EOT_LOGPROB_STOP) {
                // The full stop itself is not kept: "I have a cat in." would read as finished.
                let ends_sentence = |t: &u32| self.sentence_ends.contains(t);
                if best != eot && !ends_sentence(&(best as u32)) && !decoded.tokens.last().is_some_and(ends_sentence) {
                    decoded.cut_short = Some(best as u32);
                }
                decoded.stop = Stop::EndOfText;
                return Ok(decoded);
            }
            decoded.tokens.push(best as u32);
            if let Some(keep) = loop_cut(&decoded.tokens) {
                decoded.tokens.truncate(keep);
                decoded.stop = Stop::Loop;
                return Ok(decoded);
            }
            feed.push(best as i64);
        }
        Ok(decoded)
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn argmax(x: &[f32]) -> Option<usize> {
    x.iter().enumerate().filter(|(_, v)| v.is_finite()).max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}

/// log softmax(x)[i], ignoring -inf entries.
fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f32::NEG_INFINITY;
    }
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    x[i] - max - sum.ln()
}

fn softmax_at(x: &[f32], i: usize) -> f32 {
    if i >= x.len() { 0.0 } else { log_softmax_at(x, i).exp() }
}

/// If `tokens` ends in a loop, the length to keep (the first occurrence only): an n-gram of
/// 2–8 tokens repeated three times in a row, a single token four times in a row ("five five" is
/// speech, "five five five five" is a loop), or the transcript restarting (its first four tokens
/// repeated at the end).
fn loop_cut(tokens: &[u32]) -> Option<usize> {
    let len = tokens.len();
    for n in 1..=8 {
        let repeats = if n == 1 { 4 } else { 3 };
        if len < n * repeats {
            continue;
        }
        let tail = &tokens[len - n..];
        if (1..repeats).all(|r| &tokens[len - n * (r + 1)..len - n * r] == tail) {
            return Some(len - n * (repeats - 1));
        }
    }
    if len >= 8 && tokens[len - 4..] == tokens[..4] {
        return Some(len - 4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_cut_finds_repeats_and_spares_speech() {
        assert_eq!(loop_cut(&[1, 2, 3]), None);
        assert_eq!(loop_cut(&[5, 5]), None);
        assert_eq!(loop_cut(&[5, 5, 5, 5]), Some(1));
        assert_eq!(loop_cut(&[9, 1, 2, 3, 1, 2, 3, 1, 2, 3]), Some(4));
        assert_eq!(loop_cut(&[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]), Some(8));
        assert_eq!(loop_cut(&[1, 2, 1, 2]), None);
    }

    #[test]
    fn log_softmax_ignores_masked_entries() {
        let x = [0.0, f32::NEG_INFINITY, 0.0];
        assert!((log_softmax_at(&x, 0) - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(log_softmax_at(&x, 1), f32::NEG_INFINITY);
        assert_eq!(argmax(&[f32::NEG_INFINITY, 1.0, 0.5]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY]), None);
    }
}
