//! Text → IPA phonemes through libespeak-ng (Debian `libespeak-ng-dev` to build, `espeak-ng-data`
//! at run time), as the Piper voices were trained on. A minimal hand-written binding: three
//! functions of `speak_lib.h`. The library keeps global state and is not thread-safe, so every
//! call goes through one process-wide mutex.
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

#[link(name = "espeak-ng")]
unsafe extern "C" {
    fn espeak_Initialize(output: c_int, buflength: c_int, path: *const c_char, options: c_int) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(textptr: *mut *const c_void, textmode: c_int, phonememode: c_int) -> *const c_char;
}

/// The voice currently selected, once the library is initialised.
struct State {
    voice: Option<String>,
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

/// Translates `text` into IPA with espeak-ng's `voice` (e.g. `en-us`), clause by clause.
pub fn phonemize(text: &str, voice: &str) -> Result<Vec<Clause>, ModelError> {
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
        *guard = Some(State { voice: None });
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
    Ok(clauses)
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
}
