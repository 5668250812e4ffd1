//! Cuts streamed reply text into speakable chunks for the TTS: the first clause goes out alone
//! (time to first audio: 4 or 5 words, 1–2 s of speech), later text goes out by sentence, in
//! chunks of at most 6 words for the second and 10 after it (each is synthesized while the one
//! before plays). A chunk cut at its bound ends at its last clause break, if it has one. A later chunk is held until a few words
//! follow it, so a short last sentence ("Anything else?") joins it instead of going out alone (the
//! voice gate cannot judge under ~0.7 s of audio, and blocks most of it). Markdown and emoji the
//! voice cannot say are dropped here, so nothing unspeakable reaches the synthesizer. When a later
//! chunk's audio is due, the words there are go out at once ([`Chunker::cut_due`]).

/// Words the first chunk needs before a break (comma-like or a sentence end) may end it, and a
/// later chunk cut at its bound before its last clause break may: fewer make well under a second
/// of audio, which sounds clipped and which the voice gate cannot judge alone, so its audio would
/// wait for the next chunk's synthesis as well.
const MIN_FIRST_WORDS: usize = 4;
/// Words after which the first chunk is cut at the next space, break or not (a long first sentence
/// would hold the first audio back for all of its tokens and its synthesis: 8 words cost ~90 ms
/// more to first audio than 5).
const MAX_FIRST_WORDS: usize = 5;
/// A chunk longer than this many words is cut at the next space, sentence end or not. Synthesis
/// cannot be interrupted, so this bounds how long another session's first chunk waits for the
/// synthesizer (~20 ms a word alone, more with other models running). 4 sessions x 15 turns:
/// first audio p95 284 and 305 ms at 10 words, 214 at 20 (one run: the gain is not shown, the
/// bound on the wait is; 0 stalls in 5 runs at 10, 1 in 1 at 20).
const MAX_CHUNK_WORDS: usize = 10;
/// The second chunk's bound: it is generated, judged, synthesized and checked while the first
/// plays (1.0–1.4 s). 4 sessions x 15 turns: with 10 words, when turns of several sessions ended
/// together its text came up to 1.1 s after the first audio and took 0.35–0.43 s to synthesize;
/// every stall measured came where the second chunk begins (1.0–1.7 s into the reply).
const MAX_SECOND_WORDS: usize = 6;
/// Words the last chunk needs to go out alone; a shorter end of the text joins the chunk before
/// (unless that is the first chunk, which is never held). Piper tails of 300 / 500 / 700 ms, judged
/// alone: the voice gate blocked 49 / 28 / 6 of 52.
const MIN_LAST_WORDS: usize = 3;

/// Accumulates text deltas; [`Chunker::push`] returns the chunks completed by a delta.
#[derive(Debug, Default)]
pub struct Chunker {
    pending: String,
    chunks_out: usize,
    /// A later chunk, until [`MIN_LAST_WORDS`] words follow it.
    held: Option<String>,
}

impl Chunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a text delta; returns the chunks it completed, in order.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.pending.extend(delta.chars().filter(|&c| speakable(c)));
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let chunk: String = self.pending.drain(..end).collect();
            let chunk = chunk.trim();
            if chunk.chars().any(char::is_alphanumeric) {
                if self.chunks_out == 0 {
                    out.push(chunk.to_string());
                } else {
                    out.extend(self.held.replace(chunk.to_string()));
                }
                self.chunks_out += 1;
            }
        }
        if words(&self.pending) >= MIN_LAST_WORDS {
            out.extend(self.held.take());
        }
        out
    }

    /// A later chunk's audio is due (the audio before it is about to run out): the held chunk now,
    /// without the words after it, or else the complete words waiting, if there are at least
    /// [`MIN_FIRST_WORDS`]. Words of many tokens (a number, a hyphenated run) would otherwise keep
    /// the next chunk's text back until after the audio before it has played.
    pub fn cut_due(&mut self) -> Option<String> {
        if self.chunks_out == 0 {
            return None;
        }
        if let Some(held) = self.held.take() {
            return Some(held);
        }
        let end = self.pending.rfind(char::is_whitespace)?;
        if words(&self.pending[..end]) < MIN_FIRST_WORDS {
            return None;
        }
        let chunk: String = self.pending.drain(..end).collect();
        self.chunks_out += 1;
        Some(chunk.trim().to_string())
    }

    /// The rest of the text, at the end of the reply: a held chunk and what follows it (as one
    /// chunk when that is under [`MIN_LAST_WORDS`] words).
    pub fn finish(&mut self) -> Vec<String> {
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.trim();
        let rest = rest.chars().any(char::is_alphanumeric).then(|| rest.to_string());
        match (self.held.take(), rest) {
            (Some(held), Some(rest)) if words(&rest) < MIN_LAST_WORDS => vec![format!("{held} {rest}")],
            (held, rest) => held.into_iter().chain(rest).collect(),
        }
    }

    /// Byte index just past the next chunk boundary in `pending`, if one is complete.
    fn boundary(&self) -> Option<usize> {
        let text = &self.pending;
        let first = self.chunks_out == 0;
        let max_words = match self.chunks_out {
            0 => MAX_FIRST_WORDS,
            1 => MAX_SECOND_WORDS,
            _ => MAX_CHUNK_WORDS,
        };
        let mut words = 0;
        let mut in_word = false;
        let mut last_clause_end = None;
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c.is_whitespace() {
                in_word = false;
                if words >= max_words {
                    return Some(last_clause_end.unwrap_or(i));
                }
                continue;
            }
            if !in_word {
                in_word = true;
                words += 1;
            }
            // A break counts only once the next character shows it is not inside a number ("3.5").
            let &(next_i, next) = chars.peek()?;
            if !next.is_whitespace() {
                continue;
            }
            let sentence_end = matches!(c, '.' | '!' | '?');
            let clause_end = matches!(c, ',' | ';' | ':' | '—');
            if (sentence_end && (!first || words >= MIN_FIRST_WORDS))
                || (clause_end && first && words >= MIN_FIRST_WORDS)
            {
                return Some(next_i);
            }
            if clause_end && !first && words >= MIN_FIRST_WORDS {
                // (The first chunk is cut at its bound: a clause break before it is under
                // `MIN_FIRST_WORDS`, too short to be heard or checked alone.)
                last_clause_end = Some(next_i);
            }
        }
        None
    }
}

fn words(text: &str) -> usize {
    text.split_whitespace().filter(|w| w.chars().any(char::is_alphanumeric)).count()
}

/// Words whose full stop does not end a sentence.
const TITLES: &[&str] = &["dr", "mr", "mrs", "ms", "prof", "st"];

/// How many sentences `chunk` ends: words ending in '.', '!' or '?' (a chunk ends only where a
/// space follows), not counting a title's full stop ("Mr.").
pub fn sentence_ends(chunk: &str) -> usize {
    chunk
        .split_whitespace()
        .map(|word| word.trim_end_matches(['"', '\'', ')']))
        .filter(|word| word.ends_with(['.', '!', '?']))
        .filter(|word| !TITLES.contains(&word.trim_end_matches('.').to_lowercase().as_str()))
        .count()
}

/// Characters worth sending to the voice: letters, digits, spaces and ordinary punctuation.
fn speakable(c: char) -> bool {
    c.is_alphanumeric() || c.is_whitespace() || ".,;:!?'\"-—()%$&".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(text: &str) -> Vec<String> {
        let mut chunker = Chunker::new();
        // Deltas of a few characters, as tokens arrive.
        let chars: Vec<char> = text.chars().collect();
        let mut out: Vec<String> = chars.chunks(3).flat_map(|c| chunker.push(&c.iter().collect::<String>())).collect();
        out.extend(chunker.finish());
        out
    }

    #[test]
    fn first_clause_alone_then_sentences() {
        assert_eq!(
            feed("Sure, the capital is Paris, a city of light. It has 2.1 million people! Anything else?"),
            ["Sure, the capital is Paris,", "a city of light.", "It has 2.1 million people! Anything else?"]
        );
    }

    #[test]
    fn a_short_first_sentence_waits_for_more_words() {
        assert_eq!(feed("Sure. The capital is Paris. Yes."), ["Sure. The capital is Paris.", "Yes."]);
    }

    #[test]
    fn a_first_chunk_is_never_cut_at_an_early_clause_break() {
        assert_eq!(feed("Sure, the capital of France is Paris."), ["Sure, the capital of France", "is Paris."]);
    }

    #[test]
    fn a_long_first_sentence_is_cut_after_a_few_words() {
        assert_eq!(
            feed("And Mr. John Dashwood had then leisure to consider how much there was."),
            ["And Mr. John Dashwood had", "then leisure to consider how much there was."]
        );
    }

    #[test]
    fn a_later_chunk_is_held_until_three_words_follow_it() {
        let mut chunker = Chunker::new();
        assert_eq!(chunker.push("Sure, the capital is Paris. It is big."), ["Sure, the capital is Paris."]);
        assert!(chunker.push(" Very big").is_empty(), "'It is big.' is held: the text may end after two words");
        assert_eq!(chunker.push(" indeed"), ["It is big."]);
        assert!(chunker.push(".").is_empty());
        assert_eq!(chunker.finish(), ["Very big indeed."]);
    }

    #[test]
    fn a_later_chunk_whose_audio_is_due_goes_out_with_the_words_it_has() {
        let mut chunker = Chunker::new();
        assert!(chunker.push("Sure, the capital").is_empty());
        assert_eq!(chunker.cut_due(), None, "the first chunk is cut by its own rules");
        assert_eq!(chunker.push(" is Paris. It is big. "), ["Sure, the capital is Paris."]);
        assert_eq!(chunker.cut_due().as_deref(), Some("It is big."), "held, but due: no waiting for more words");
        assert!(chunker.push("The old-fashioned old-sided old-sott").is_empty());
        assert_eq!(chunker.cut_due(), None, "three complete words are too few to be heard or checked alone");
        assert!(chunker.push("ed old-sid").is_empty());
        assert_eq!(chunker.cut_due().as_deref(), Some("The old-fashioned old-sided old-sotted"));
        assert!(chunker.push("ing.").is_empty());
        assert_eq!(chunker.finish(), ["old-siding."]);
    }

    #[test]
    fn markdown_and_emoji_are_dropped() {
        assert_eq!(feed("**Hello** there, my friend 😀. # Bye"), ["Hello there, my friend .", "Bye"]);
    }

    #[test]
    fn long_run_on_text_is_cut_in_bounded_chunks() {
        let text = "word ".repeat(100);
        let sizes: Vec<usize> = feed(&text).iter().map(|c| c.split_whitespace().count()).collect();
        assert_eq!(sizes, [5, 6, 10, 10, 10, 10, 10, 10, 10, 10, 9]);
    }

    #[test]
    fn a_chunk_cut_at_its_bound_ends_at_its_last_clause_break() {
        assert_eq!(
            feed("Well there you are my friend, here it is, then more words that go on and on without end."),
            ["Well there you are my", "friend, here it is,", "then more words that go on and on without end."]
        );
        // Not at a break that leaves it too short to be heard alone: "friend," here.
        assert_eq!(
            feed("Well there you are my friend, and here is a long clause."),
            ["Well there you are my", "friend, and here is a long clause."]
        );
    }

    #[test]
    fn sentence_ends_are_counted_but_not_titles_or_numbers() {
        assert_eq!(sentence_ends("Sure. Mr. Smith has 2.5 cats! Really?"), 3);
        assert_eq!(sentence_ends("He said \"go.\" Then (he left.)"), 2);
        assert_eq!(sentence_ends("and then, well"), 0);
    }

    #[test]
    fn punctuation_only_makes_no_chunk() {
        assert!(feed("... !!").is_empty());
    }
}
