//! Cuts streamed reply text into speakable chunks for the TTS: the first clause goes out alone
//! (time to first audio), later text goes out by sentence. Markdown and emoji the voice cannot
//! say are dropped here, so nothing unspeakable reaches the synthesizer.

/// Words a clause needs before a comma-like break may end the first chunk (shorter clauses
/// sound clipped and cost a TTS call each).
const MIN_CLAUSE_WORDS: usize = 3;
/// A chunk longer than this many words is cut at the next space, sentence end or not.
const MAX_CHUNK_WORDS: usize = 40;

/// Accumulates text deltas; [`Chunker::push`] returns the chunks completed by a delta.
#[derive(Debug, Default)]
pub struct Chunker {
    pending: String,
    chunks_out: usize,
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
                out.push(chunk.to_string());
                self.chunks_out += 1;
            }
        }
        out
    }

    /// The rest of the text, at the end of the reply.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.trim();
        rest.chars().any(char::is_alphanumeric).then(|| rest.to_string())
    }

    /// Byte index just past the next chunk boundary in `pending`, if one is complete.
    fn boundary(&self) -> Option<usize> {
        let text = &self.pending;
        let mut words = 0;
        let mut in_word = false;
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c.is_whitespace() {
                in_word = false;
                if words >= MAX_CHUNK_WORDS {
                    return Some(i);
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
            if sentence_end || (clause_end && self.chunks_out == 0 && words >= MIN_CLAUSE_WORDS) {
                return Some(next_i);
            }
        }
        None
    }
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
            feed("Sure, the capital of France is Paris, a city of light. It has 2.1 million people! Anything else?"),
            [
                "Sure, the capital of France is Paris,",
                "a city of light.",
                "It has 2.1 million people!",
                "Anything else?"
            ]
        );
    }

    #[test]
    fn markdown_and_emoji_are_dropped() {
        assert_eq!(feed("**Hello** there 😀. # Bye"), ["Hello there .", "Bye"]);
    }

    #[test]
    fn long_run_on_text_is_cut() {
        let text = "word ".repeat(100);
        let chunks = feed(&text);
        assert!(chunks.len() >= 2);
        assert!(chunks.iter().all(|c| c.split_whitespace().count() <= MAX_CHUNK_WORDS));
    }

    #[test]
    fn punctuation_only_makes_no_chunk() {
        assert!(feed("... !!").is_empty());
    }
}
