//! How a transcript ends (finished, unpunctuated, cut short, hanging), from its words and Whisper's punctuation, and how the end-of-turn model's verdict raises the odds.
/// Words an utterance does not end on, even before a full stop (a trailing "and" or "the" means
/// the speaker paused mid-thought). Words that end sentences often ("than he was.", "where are you
/// from?") are not listed: after Whisper's full stop they end the turn.
pub(super) const HANGING_WORDS: &[&str] = &[
    "a", "an", "and", "because", "but", "if", "into", "my", "of", "or", "our", "than", "the", "uh", "um", "with",
    "your",
];

/// How a transcript ends, as far as its words and Whisper's punctuation tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// A full sentence: a full stop, question or exclamation mark after a word that can end one.
    Finished,
    /// No closing mark (Whisper leaves short answers bare, and may drop a trailing "and": a bare
    /// "I have a cat" may be "I have a cat and"); the reply model judges it.
    Unpunctuated,
    /// Recognition stopped where it found a repeat likelier than the end ("5" before another
    /// " 5"): the pause's sound judges it.
    CutShort,
    /// Trails off ("...") or its last word leaves it hanging ("and", "the", "um"), or recognition
    /// stopped where it found a new word likelier than the end (the "and" it dropped).
    Hanging,
}

impl Ending {
    /// Whether the words leave the turn's end open, for the reply model and the pause's sound to
    /// judge (a finished or hanging one is settled by its words).
    pub(super) fn is_open(self) -> bool {
        matches!(self, Ending::Unpunctuated | Ending::CutShort)
    }
}

/// The probability that the turn is over, from the reply model's `words` (a sentence end next)
/// and the end-of-turn model's `sound`: the words' odds times the sound's, where the sound only
/// ever raises them (a finished turn that does not sound it keeps the words' verdict; the int8
/// model is jittery, and misses some finished read sentences).
pub(super) fn turn_end_odds(words: f32, sound: f32) -> f32 {
    let logit = |p: f32| {
        let p = p.clamp(1e-6, 1.0 - 1e-6);
        (p / (1.0 - p)).ln()
    };
    1.0 / (1.0 + (-(logit(words) + logit(sound).max(0.0))).exp())
}

pub(super) fn ending(text: &str) -> Ending {
    let text = text.trim();
    let last = text.split_whitespace().last().unwrap_or("");
    let last = bare_word(last);
    if text.ends_with("...") || text.ends_with('…') || last.is_empty() || HANGING_WORDS.contains(&last.as_str()) {
        Ending::Hanging
    } else if text.ends_with(['.', '?', '!']) {
        Ending::Finished
    } else {
        Ending::Unpunctuated
    }
}

/// How a transcript ends that Whisper stopped before a likelier word, `next` (if it did). A word
/// already said is the model's habit of repeating itself ("5" before another " 5", when "five
/// five" was said): the pause's sound decides. Any other word is where the speaker may go on ("I
/// have a cat" before " and").
pub(super) fn ending_before(text: &str, next: Option<&str>) -> Ending {
    let ending = ending(text);
    let Some(next) = next.filter(|_| ending != Ending::Hanging) else {
        return ending;
    };
    let next = bare_word(next);
    if !next.is_empty() && text.split_whitespace().any(|w| bare_word(w) == next) {
        Ending::CutShort
    } else {
        Ending::Hanging
    }
}

/// A word without its punctuation, in lower case.
pub(super) fn bare_word(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_utterances_end_a_sentence_without_hanging() {
        use Ending::*;
        let cases = [
            ("What is the capital of France?", Finished),
            ("Tell me a joke.", Finished),
            ("than he was.", Finished),
            ("Where are you from?", Finished),
            ("I want to go to the", Hanging),
            ("I went to the store and...", Hanging),
            ("Tell me about the.", Hanging),
            ("So, um.", Hanging),
            ("", Hanging),
            ("I have a cat and", Hanging),
            // Whisper may have dropped a trailing "and": the reply model judges these.
            ("I have a cat", Unpunctuated),
            ("7 of clubs", Unpunctuated),
        ];
        for (text, expected) in cases {
            assert_eq!(ending(text), expected, "{text:?}");
        }
    }

    #[test]
    fn a_pause_that_sounds_finished_raises_the_odds_of_a_turn_end_and_never_lowers_them() {
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
        // Words the reply model finds a little short of an end, said as a last word.
        assert!(turn_end_odds(0.02, 0.9) >= 0.05);
        // Words that trail off stay unfinished however the pause sounds.
        assert!(turn_end_odds(1e-5, 0.99) < 0.01);
        // A pause that sounds unfinished leaves the words' verdict as it is.
        assert!(close(turn_end_odds(0.37, 0.1), 0.37));
        assert!(close(turn_end_odds(0.2, 0.5), 0.2));
    }

    #[test]
    fn a_transcript_stopped_before_a_new_word_hangs_and_before_a_repeat_is_cut_short() {
        use Ending::*;
        assert_eq!(ending_before("I have a cat", Some(" and")), Hanging);
        assert_eq!(ending_before("I have a cat", Some(",")), Hanging);
        assert_eq!(ending_before("5", Some(" 5")), CutShort);
        assert_eq!(ending_before("10 of clubs", Some(" 10")), CutShort);
        assert_eq!(ending_before("I went to the", Some(" store")), Hanging);
        assert_eq!(ending_before("7 of clubs", None), Unpunctuated);
        assert_eq!(ending_before("What time is it?", None), Finished);
    }
}
