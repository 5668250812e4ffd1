//! libespeak-ng (Debian `libespeak-ng-dev` to build, `espeak-ng-data` at run time): text → IPA
//! phonemes, as the Piper voices were trained on ([`phonemize`]), and espeak-ng's own formant
//! synthesis ([`synthesize`], the second TTS backend: a voice that is not enrolled, so the voice
//! safety gate can be shown to stop it). A minimal hand-written binding of `speak_lib.h`. The
//! library keeps global state and is not thread-safe, so every call goes through one process-wide
//! mutex.
use super::ModelError;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::Mutex;

// From /usr/include/espeak-ng/speak_lib.h (API revision 12).
/// `espeak_AUDIO_OUTPUT::AUDIO_OUTPUT_SYNCHRONOUS`: no audio device, calls return when done.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_DONT_EXIT`: report a missing data directory instead of calling `exit()`.
const INITIALIZE_DONT_EXIT: c_int = 0x8000;
/// `espeakCHARS_UTF8`: the text is UTF-8.
const CHARS_UTF8: c_int = 1;
/// `espeakPHONEMES_IPA`: phoneme names as IPA characters (bits 0-2 = 2), no separator.
const PHONEMES_IPA: c_int = 0x02;
/// `espeak_ERROR::EE_OK`.
const EE_OK: c_int = 0;
/// `espeak_POSITION_TYPE::POS_CHARACTER`.
const POS_CHARACTER: c_int = 1;
/// Longest synthesis kept, in samples at 22 050 Hz (60 s): bounds memory on runaway input.
const MAX_SYNTH_SAMPLES: usize = 60 * 22_050;

#[link(name = "espeak-ng")]
unsafe extern "C" {
    fn espeak_Initialize(output: c_int, buflength: c_int, path: *const c_char, options: c_int) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(textptr: *mut *const c_void, textmode: c_int, phonememode: c_int) -> *const c_char;
    fn espeak_SetSynthCallback(callback: SynthCallback);
    #[allow(clippy::too_many_arguments)]
    fn espeak_Synth(
        text: *const c_void,
        size: usize,
        position: u32,
        position_type: c_int,
        end_position: u32,
        flags: u32,
        unique_identifier: *mut u32,
        user_data: *mut c_void,
    ) -> c_int;
}

/// `t_espeak_callback`: receives synthesized 16-bit samples (`wav` may be NULL at the end); the
/// third argument, the event list, is not read. Returns 0 to go on, 1 to stop.
type SynthCallback = unsafe extern "C" fn(wav: *mut i16, samples: c_int, events: *mut c_void) -> c_int;

/// The voice currently selected and the output rate, once the library is initialised.
struct State {
    voice: Option<String>,
    sample_rate: u32,
}

/// Samples of the synthesis in progress (only ever filled while [`ESPEAK`] is held).
static SYNTH_OUT: Mutex<Vec<i16>> = Mutex::new(Vec::new());

unsafe extern "C" fn collect_samples(wav: *mut i16, samples: c_int, _events: *mut c_void) -> c_int {
    if wav.is_null() || samples <= 0 {
        return 0;
    }
    // SAFETY: espeak hands `samples` valid samples at `wav` for the duration of the call.
    let chunk = unsafe { std::slice::from_raw_parts(wav, samples as usize) };
    let mut out = SYNTH_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if out.len() + chunk.len() > MAX_SYNTH_SAMPLES {
        return 1;
    }
    out.extend_from_slice(chunk);
    0
}

static ESPEAK: Mutex<Option<State>> = Mutex::new(None);

/// One clause of text as espeak-ng splits it: its IPA phonemes and the punctuation that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub phonemes: String,
    /// The clause's closing punctuation (`.`, `,`, `?`, `!`, `;`, `:`), if any.
    pub terminator: Option<char>,
}

impl Clause {
    /// Whether this clause ends a sentence (Piper synthesises sentence by sentence).
    pub fn ends_sentence(&self) -> bool {
        matches!(self.terminator, Some('.' | '?' | '!'))
    }
}

/// Runs `f` holding the library with `voice` selected (initialising it on first use).
fn with_voice<T>(voice: &str, f: impl FnOnce(&State) -> Result<T, ModelError>) -> Result<T, ModelError> {
    let mut guard = ESPEAK.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        // SAFETY: called under the global mutex, so no other espeak call runs concurrently; the
        // path is NULL (use the default data directory) and DONT_EXIT makes a failure a return value.
        let rate = unsafe { espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, std::ptr::null(), INITIALIZE_DONT_EXIT) };
        if rate <= 0 {
            return Err(ModelError::Invalid(
                "espeak-ng failed to initialise: its data files are missing or unreadable \
                 (Debian: apt-get install espeak-ng-data; or set ESPEAK_DATA_PATH)"
                    .into(),
            ));
        }
        // SAFETY: initialised, under the mutex; the callback only touches SYNTH_OUT.
        unsafe { espeak_SetSynthCallback(collect_samples) };
        *guard = Some(State { voice: None, sample_rate: rate as u32 });
    }
    let state = guard.as_mut().expect("initialised above");
    if state.voice.as_deref() != Some(voice) {
        let name = CString::new(voice).map_err(|_| ModelError::Invalid(format!("espeak voice {voice:?} has a NUL")))?;
        // SAFETY: the library is initialised and we hold the global mutex; `name` is a valid
        // NUL-terminated string that outlives the call (espeak copies what it keeps).
        let rc = unsafe { espeak_SetVoiceByName(name.as_ptr()) };
        if rc != EE_OK {
            return Err(ModelError::Invalid(format!(
                "espeak-ng has no voice {voice:?} (error {rc}): install espeak-ng-data"
            )));
        }
        state.voice = Some(voice.to_string());
    }
    f(state)
}

/// Speaks `text` with espeak-ng's own synthesizer in `voice` (e.g. `en-us`, `en-gb+f3`): mono
/// f32 samples and their rate (22 050 Hz). Output beyond 60 s is cut.
pub fn synthesize(text: &str, voice: &str) -> Result<(Vec<f32>, u32), ModelError> {
    with_voice(voice, |state| {
        let text = CString::new(text.replace('\0', " ")).expect("NULs were replaced");
        SYNTH_OUT.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let size = text.as_bytes_with_nul().len();
        // SAFETY: we hold the global mutex, the library is initialised in synchronous mode (the
        // call returns when synthesis is done, having called `collect_samples`); `text` is a
        // NUL-terminated UTF-8 buffer alive for the call; the id and user data may be NULL.
        let rc = unsafe {
            espeak_Synth(
                text.as_ptr().cast(),
                size,
                0,
                POS_CHARACTER,
                0,
                CHARS_UTF8 as u32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        let samples = std::mem::take(&mut *SYNTH_OUT.lock().unwrap_or_else(|e| e.into_inner()));
        if rc != EE_OK {
            return Err(ModelError::Invalid(format!("espeak-ng synthesis failed (error {rc})")));
        }
        Ok((samples.iter().map(|&s| f32::from(s) / 32768.0).collect(), state.sample_rate))
    })
}

/// Translates `text` into IPA with espeak-ng's `voice` (e.g. `en-us`), clause by clause.
pub fn phonemize(text: &str, voice: &str) -> Result<Vec<Clause>, ModelError> {
    with_voice(voice, |_| Ok(phonemize_selected(text)))
}

/// [`phonemize`] with the library held and the voice selected.
fn phonemize_selected(text: &str) -> Vec<Clause> {
    // NULs would end the C string early: treat them as spaces.
    let text = CString::new(text.replace('\0', " ")).expect("NULs were replaced");
    let bytes = text.as_bytes();
    let start = text.as_ptr();
    let mut ptr: *const c_void = start.cast();
    let mut clauses = Vec::new();
    while !ptr.is_null() {
        let before = ptr as usize - start as usize;
        // SAFETY: we hold the global mutex and a voice is set; `ptr` points into `text`, a
        // NUL-terminated UTF-8 buffer alive for the whole loop. espeak advances `ptr` within that
        // buffer, or sets it to NULL at the end. The returned string is espeak's own static buffer,
        // valid until the next call: it is copied out before then.
        let phonemes = unsafe {
            let out = espeak_TextToPhonemes(&mut ptr, CHARS_UTF8, PHONEMES_IPA);
            if out.is_null() { String::new() } else { CStr::from_ptr(out).to_string_lossy().into_owned() }
        };
        let after = if ptr.is_null() { bytes.len() } else { (ptr as usize - start as usize).min(bytes.len()) };
        let consumed = String::from_utf8_lossy(&bytes[before.min(after)..after]);
        let terminator = clause_terminator(&consumed, ptr.is_null());
        let phonemes = phonemes.trim().to_string();
        if phonemes.is_empty() && terminator.is_none() {
            continue;
        }
        clauses.push(Clause { phonemes, terminator });
    }
    clauses
}

/// The punctuation that closed a clause, from the text espeak-ng consumed for it. Except at the end
/// of the text, espeak reads one character past the whitespace after the clause (the start of the
/// next one): `"raining? N"`. Closing quotes and brackets after the punctuation are skipped.
fn clause_terminator(consumed: &str, at_end: bool) -> Option<char> {
    let mut text = consumed.trim_end();
    if !at_end
        && let Some((i, _)) = text.char_indices().next_back()
        && text[..i].ends_with(char::is_whitespace)
    {
        text = text[..i].trim_end();
    }
    text.trim_end_matches(['"', '\'', ')', ']', '\u{201d}', '\u{2019}', '\u{bb}'])
        .chars()
        .next_back()
        .filter(|c| matches!(c, '.' | ',' | '?' | '!' | ';' | ':'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn terminators_skip_the_lookahead_character() {
        use super::clause_terminator as t;
        assert_eq!(t("Is it raining? N", false), Some('?'));
        assert_eq!(t("hat?! R", false), Some('!'));
        assert_eq!(t("He said \"yes.\"", false), Some('.'));
        assert_eq!(t("one.\n\n  t", false), Some('.'));
        assert_eq!(t("té was — f", false), None);
        assert_eq!(t("A: b", false), Some(':'));
        assert_eq!(t("Great!", true), Some('!'));
        assert_eq!(t("a b", true), None);
    }

    use super::*;

    #[test]
    fn clauses_and_punctuation() {
        let clauses = phonemize("Hello there, the quick brown fox. Is it?", "en-us").unwrap();
        let ipa: Vec<_> = clauses.iter().map(|c| c.phonemes.as_str()).collect();
        assert_eq!(ipa[0], "həlˈoʊ ðˈɛɹ");
        let terms: Vec<_> = clauses.iter().map(|c| c.terminator).collect();
        assert_eq!(terms, [Some(','), Some('.'), Some('?')]);
        assert!(clauses[1].ends_sentence());
    }

    #[test]
    fn empty_and_concurrent() {
        assert!(phonemize("", "en-us").unwrap().is_empty());
        assert!(phonemize("   \n ", "en-us").unwrap().is_empty());
        let threads: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| phonemize("testing one two three", "en-us").unwrap())).collect();
        for t in threads {
            assert_eq!(t.join().unwrap()[0].phonemes, "tˈɛstɪŋ wˈʌn tˈuː θɹˈiː");
        }
        assert!(phonemize("hello", "no-such-voice").is_err());
        // A bad voice leaves the library usable.
        assert!(!phonemize("hello", "en-us").unwrap().is_empty());
    }

    #[test]
    fn synthesis_speaks_and_phonemizing_still_works() {
        let (audio, rate) = synthesize("Hello there, how are you?", "en-us+f3").unwrap();
        assert_eq!(rate, 22_050);
        let seconds = audio.len() as f32 / rate as f32;
        assert!((0.6..4.0).contains(&seconds), "{seconds} s");
        let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
        assert!(peak > 0.05, "peak {peak}");
        assert!(synthesize("", "en-us").unwrap().0.len() < rate as usize / 2);
        assert_eq!(phonemize("hello", "en-us").unwrap()[0].phonemes, "həlˈoʊ");
    }
}
