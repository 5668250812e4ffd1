//! Text to speech, role `tts`: the Piper voice `en_US-joe-medium` (VITS, single speaker, 22 050 Hz).
//!
//! Text is turned into IPA phonemes by espeak-ng (voice `en-us`, as the voice was trained), clause
//! by clause; each clause keeps its closing punctuation, which the voice uses for prosody. Each
//! sentence is mapped through the voice's `phoneme_id_map` as `^ _ (id _)* $` and synthesised whole
//! (as Piper does), so audio can be handed on sentence by sentence ([`Tts::synthesize_with`]).
//!
//! The graph runs in two halves, cut at provisioning where the vocoder begins: the encoder gives
//! the sentence's latent (frames of 256 samples), the decoder turns frames into audio. A run of
//! frames decoded with 16 frames of context either side is exactly the whole decode's audio, so a
//! reply's first words can be heard before their whole sentence is decoded ([`Tts::synthesize_head`]).
use super::{Manifest, ModelError, espeak};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

const ROLE: &str = "tts";
/// Longest phoneme sequence synthesised in one run: ~500 phonemes ≈ 30 s of speech. Longer
/// sentences are cut at a word boundary (bounds memory and time to first audio).
const MAX_PHONEMES: usize = 500;
/// Piper's begin / end / pad symbols.
const BOS: char = '^';
const EOS: char = '$';
const PAD: char = '_';

#[derive(Deserialize)]
struct VoiceConfig {
    audio: AudioConfig,
    espeak: EspeakConfig,
    inference: InferenceConfig,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    num_speakers: u32,
}

#[derive(Deserialize)]
struct AudioConfig {
    sample_rate: u32,
}

#[derive(Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Deserialize)]
struct InferenceConfig {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

/// The split graph's parameters, checked at provisioning.
#[derive(Deserialize)]
struct Meta {
    /// Samples a latent frame decodes to.
    hop_samples: usize,
    /// Frames either side a run of frames is decoded with.
    decoder_context_frames: usize,
}

/// A Piper voice: its encoder and decoder sessions and its phoneme table, used from one thread at
/// a time.
pub struct Tts {
    encoder: Session,
    decoder: Session,
    /// The tensor between the halves (the decoder's input).
    latent_name: String,
    ids: HashMap<char, Vec<i64>>,
    voice: String,
    sample_rate: u32,
    /// `[noise_scale, length_scale, noise_w]`, as the voice's config gives them.
    scales: [f32; 3],
    /// Whether the noise scales are used ([`Tts::set_noise`]).
    noise: bool,
    hop: usize,
    context: usize,
}

/// One sentence's latent, `[1, channels, frames]`.
pub struct Latent {
    values: Vec<f32>,
    channels: usize,
    frames: usize,
}

/// What [`Tts::synthesize_head`] left to speak: the rest of the first sentence's latent (from the
/// frame given) and the sentences after it.
pub struct Rest {
    first: Option<(Latent, usize)>,
    sentences: Vec<String>,
}

impl Tts {
    /// Loads the `tts` model and its `.onnx.json` voice config, with `threads` intra-op threads.
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Self, ModelError> {
        let path = manifest.path(ROLE, "config")?;
        let bad = |reason: String| ModelError::Invalid(format!("{}: {reason}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let config: VoiceConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if config.num_speakers > 1 {
            return Err(bad(format!("{} speakers: only single-speaker voices are supported", config.num_speakers)));
        }
        let mut ids = HashMap::new();
        for (symbol, id) in config.phoneme_id_map {
            let mut chars = symbol.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => {
                    ids.insert(c, id);
                }
                _ => {
                    return Err(bad(format!("phoneme_id_map key {symbol:?} is not one character")));
                }
            }
        }
        for symbol in [BOS, EOS, PAD] {
            if !ids.contains_key(&symbol) {
                return Err(bad(format!("phoneme_id_map has no {symbol:?}")));
            }
        }
        let meta: Meta = manifest.meta(ROLE)?;
        if meta.hop_samples == 0 {
            return Err(bad("manifest meta: hop_samples is 0".into()));
        }
        let decoder = manifest.session(ROLE, "decoder", threads)?;
        let latent_name = decoder.inputs()[0].name().to_string();
        let inf = config.inference;
        Ok(Tts {
            encoder: manifest.session(ROLE, "encoder", threads)?,
            decoder,
            latent_name,
            ids,
            voice: config.espeak.voice,
            sample_rate: config.audio.sample_rate,
            scales: [inf.noise_scale, inf.length_scale, inf.noise_w],
            noise: true,
            hop: meta.hop_samples,
            context: meta.decoder_context_frames,
        })
    }

    /// Turns the voice's sampling noise off (on: as its config says): then the same text always
    /// gives the same audio, for comparing runs.
    pub fn set_noise(&mut self, on: bool) {
        self.noise = on;
    }

    /// Sample rate of the audio this voice produces (22 050 Hz).
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Speaks `text`: mono f32 samples at [`Tts::sample_rate`]. Empty or whitespace-only text gives
    /// empty audio; characters espeak-ng cannot pronounce are skipped.
    pub fn synthesize(&mut self, text: &str) -> Result<Vec<f32>, ModelError> {
        let mut audio = Vec::new();
        self.synthesize_with(text, |chunk| audio.extend_from_slice(chunk))?;
        Ok(audio)
    }

    /// Speaks `text` sentence by sentence, handing each sentence's audio to `on_audio` as soon as it
    /// is synthesised (time to first audio is that of the first sentence).
    pub fn synthesize_with(&mut self, text: &str, mut on_audio: impl FnMut(&[f32])) -> Result<(), ModelError> {
        if text.trim().is_empty() {
            return Ok(());
        }
        for sentence in self.sentences(text)? {
            let audio = self.speak_phonemes(&sentence)?;
            if !audio.is_empty() {
                on_audio(&audio);
            }
        }
        Ok(())
    }

    /// The phoneme strings of `text`, one per sentence, with each clause's punctuation kept.
    pub fn sentences(&self, text: &str) -> Result<Vec<String>, ModelError> {
        let mut sentences = Vec::new();
        let mut current = String::new();
        for clause in espeak::phonemize(text, &self.voice)? {
            current.push_str(&clause.phonemes);
            if let Some(t) = clause.terminator.filter(|t| self.ids.contains_key(t)) {
                current.push(t);
            }
            if clause.ends_sentence() {
                sentences.push(std::mem::take(&mut current));
            } else {
                current.push(' ');
            }
        }
        sentences.push(current);
        // Split over-long sentences at the last space before the limit.
        let mut out = Vec::new();
        for sentence in sentences {
            let mut rest = sentence.trim();
            while rest.chars().count() > MAX_PHONEMES {
                let limit = rest.char_indices().nth(MAX_PHONEMES).map_or(rest.len(), |(i, _)| i);
                let cut = rest[..limit].rfind(' ').filter(|&i| i > 0).unwrap_or(limit);
                out.push(rest[..cut].trim().to_string());
                rest = rest[cut..].trim_start();
            }
            if rest.chars().any(|c| self.ids.contains_key(&c) && c != ' ') {
                out.push(rest.to_string());
            }
        }
        Ok(out)
    }

    /// Speaks `text` with its first `head` of audio handed back before the rest is decoded: its
    /// sentences up to the one that reaches `head`, and of that one only the frames needed, when
    /// it is longer by two contexts or more (else it is decoded whole). The rest, if any, is for
    /// [`Tts::synthesize_rest`].
    pub fn synthesize_head(&mut self, text: &str, head: Duration) -> Result<(Vec<f32>, Option<Rest>), ModelError> {
        let sentences = if text.trim().is_empty() { Vec::new() } else { self.sentences(text)? };
        let want = (head.as_secs_f64() * f64::from(self.sample_rate)).ceil() as usize;
        let mut audio = Vec::new();
        let mut first = None;
        let mut sentences = sentences.into_iter();
        while audio.len() < want {
            let Some(sentence) = sentences.next() else { break };
            let Some(latent) = self.encode(&sentence)? else { continue };
            // Whole frames covering what `head` still lacks, and one more.
            let cut = (want - audio.len()).div_ceil(self.hop) + 1;
            if latent.frames >= cut + 2 * self.context {
                audio.extend(self.decode(&latent, 0..cut)?);
                first = Some((latent, cut));
            } else {
                audio.extend(self.decode(&latent, 0..latent.frames)?);
            }
        }
        let rest = Rest { first, sentences: sentences.collect() };
        Ok((audio, (rest.first.is_some() || !rest.sentences.is_empty()).then_some(rest)))
    }

    /// The audio of what [`Tts::synthesize_head`] left, in one piece.
    pub fn synthesize_rest(&mut self, rest: Rest) -> Result<Vec<f32>, ModelError> {
        let mut audio = match rest.first {
            Some((latent, from)) => self.decode(&latent, from..latent.frames)?,
            None => Vec::new(),
        };
        for sentence in rest.sentences {
            audio.extend(self.speak_phonemes(&sentence)?);
        }
        Ok(audio)
    }

    /// Synthesises one phoneme string (IPA, as from [`Tts::sentences`]); unknown symbols are skipped.
    pub fn speak_phonemes(&mut self, phonemes: &str) -> Result<Vec<f32>, ModelError> {
        match self.encode(phonemes)? {
            Some(latent) => self.decode(&latent, 0..latent.frames),
            None => Ok(Vec::new()),
        }
    }

    /// The latent of one phoneme string; `None` when the voice knows none of its symbols.
    fn encode(&mut self, phonemes: &str) -> Result<Option<Latent>, ModelError> {
        let ids = self.phoneme_ids(phonemes);
        if ids.len() <= 3 {
            return Ok(None); // ^ _ $: nothing to say
        }
        let n = ids.len();
        let scales = if self.noise { self.scales } else { [0.0, self.scales[1], 0.0] };
        let outputs = self.encoder.run(ort::inputs! {
            "input" => Tensor::from_array(([1, n], ids))?,
            "input_lengths" => Tensor::from_array(([1], vec![n as i64]))?,
            "scales" => Tensor::from_array(([3], scales.to_vec()))?,
        })?;
        let output = outputs
            .get(&self.latent_name)
            .ok_or_else(|| ModelError::Invalid(format!("tts encoder returned no `{}`", self.latent_name)))?;
        let (shape, values) = output.try_extract_tensor::<f32>()?;
        match **shape {
            [1, channels, frames] if channels > 0 && frames > 0 => {
                Ok(Some(Latent { values: values.to_vec(), channels: channels as usize, frames: frames as usize }))
            }
            _ => Err(ModelError::Invalid(format!("tts encoder returned a latent of shape {shape:?}"))),
        }
    }

    /// The audio of `frames` of `latent`: decoded with up to `context` frames either side, which
    /// makes it the same samples as decoding the whole latent.
    fn decode(&mut self, latent: &Latent, frames: Range<usize>) -> Result<Vec<f32>, ModelError> {
        let from = frames.start.saturating_sub(self.context);
        let to = (frames.end + self.context).min(latent.frames);
        let mut run = Vec::with_capacity(latent.channels * (to - from));
        for channel in latent.values.chunks_exact(latent.frames) {
            run.extend_from_slice(&channel[from..to]);
        }
        let input = Tensor::from_array(([1, latent.channels, to - from], run))?;
        let outputs = self.decoder.run(ort::inputs! {self.latent_name.as_str() => input})?;
        let output =
            outputs.get("output").ok_or_else(|| ModelError::Invalid("tts decoder returned no `output`".into()))?;
        let (_, audio) = output.try_extract_tensor::<f32>()?;
        let skip = (frames.start - from) * self.hop;
        let take = frames.len() * self.hop;
        let audio = audio.get(skip..skip + take).ok_or_else(|| {
            ModelError::Invalid(format!("tts decoder gave {} samples for {} frames", audio.len(), to - from))
        })?;
        Ok(audio.iter().map(|s| s.clamp(-1.0, 1.0)).collect())
    }

    /// `^ _ (id _)* $` for the symbols of `phonemes` that the voice knows.
    fn phoneme_ids(&self, phonemes: &str) -> Vec<i64> {
        let mut ids = Vec::with_capacity(2 * phonemes.len() + 3);
        ids.extend_from_slice(&self.ids[&BOS]);
        ids.extend_from_slice(&self.ids[&PAD]);
        for c in phonemes.chars() {
            if let Some(id) = self.ids.get(&c) {
                ids.extend_from_slice(id);
                ids.extend_from_slice(&self.ids[&PAD]);
            }
        }
        ids.extend_from_slice(&self.ids[&EOS]);
        ids
    }
}

/// Which synthesizer speaks replies (`voice.tts` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TtsBackend {
    /// The Piper voice: the enrolled preset voice.
    Piper,
    /// espeak-ng's own formant synthesis: a real second backend that is NOT enrolled, so the voice
    /// safety gate stops all of its audio (it exists to prove the gate).
    Espeak,
}

/// The configured reply synthesizer.
pub enum Synthesizer {
    Piper(Box<Tts>),
    /// espeak-ng with this voice (e.g. `en-us`).
    Espeak {
        voice: String,
        sample_rate: u32,
    },
}

impl Synthesizer {
    /// Loads `backend`: the Piper voice from the manifest, or espeak-ng's `espeak_voice`.
    pub fn load(
        manifest: &Manifest,
        threads: usize,
        backend: TtsBackend,
        espeak_voice: &str,
    ) -> Result<Self, ModelError> {
        match backend {
            TtsBackend::Piper => Ok(Synthesizer::Piper(Box::new(Tts::load(manifest, threads)?))),
            TtsBackend::Espeak => {
                let (_, sample_rate) = espeak::synthesize("", espeak_voice)?;
                Ok(Synthesizer::Espeak { voice: espeak_voice.to_string(), sample_rate })
            }
        }
    }

    pub fn sample_rate(&self) -> u32 {
        match self {
            Synthesizer::Piper(tts) => tts.sample_rate(),
            Synthesizer::Espeak { sample_rate, .. } => *sample_rate,
        }
    }

    /// Speaks `text` at [`Synthesizer::sample_rate`].
    pub fn synthesize(&mut self, text: &str) -> Result<Vec<f32>, ModelError> {
        match self {
            Synthesizer::Piper(tts) => tts.synthesize(text),
            Synthesizer::Espeak { voice, .. } => Ok(espeak::synthesize(text, voice)?.0),
        }
    }

    /// Speaks `text`, its first `head` of audio first where the backend can ([`Tts::synthesize_head`];
    /// espeak-ng speaks it all at once). `None`: nothing is left.
    pub fn synthesize_head(&mut self, text: &str, head: Duration) -> Result<(Vec<f32>, Option<Rest>), ModelError> {
        match self {
            Synthesizer::Piper(tts) => tts.synthesize_head(text, head),
            Synthesizer::Espeak { .. } => Ok((self.synthesize(text)?, None)),
        }
    }

    /// Speaks what [`Synthesizer::synthesize_head`] left.
    pub fn synthesize_rest(&mut self, rest: Rest) -> Result<Vec<f32>, ModelError> {
        match self {
            Synthesizer::Piper(tts) => tts.synthesize_rest(rest),
            Synthesizer::Espeak { .. } => Ok(Vec::new()),
        }
    }
}
