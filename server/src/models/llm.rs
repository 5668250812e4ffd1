//! The reply LLM (Qwen2.5-Coder-0.5B-Instruct by default; any ChatML GGUF the converter maps), greedy decoding with a KV cache, streamed as text.
//!
//! - **Prompt**: `history` rendered as ChatML turns (the manifest's `chat_template`), preceded by the
//!   default system prompt when the history does not start with one, and followed by the assistant
//!   generation prompt. Control-token spellings inside message text (`<|im_end|>` …) are defused so a
//!   user cannot forge a turn.
//! - **Prefix cache, per conversation**: each conversation (a key; [`Llm::generate`] uses key 0)
//!   keeps its own KV cache with its tokens, for up to [`MAX_CONVERSATIONS`] conversations (the least
//!   recently used gives its buffers up). A new call reuses the longest common token prefix (at
//!   least the system prompt; after a reply, the whole previous conversation) and prefills only the
//!   tokens after it.
//! - **Resumable decoding**: [`Llm::start`] prefills and [`Llm::resume`] decodes a few tokens at a
//!   time, so one engine thread can interleave the replies of several sessions token by token.
//! - **KV cache in place**: one buffer per layer for K and V, of `max_context` positions, bound as both
//!   the graph's `past_*` input and `present_*` output; ORT's `GroupQueryAttention` writes the new
//!   positions into it, so a step copies nothing, and dropping cached positions is only a shorter
//!   `past_len`.
//! - **Context bound**: prompt plus reply never exceed `max_context` tokens (default
//!   [`DEFAULT_MAX_CONTEXT`]). When they would, the oldest turns after the system prompt are dropped,
//!   [`DROP_BLOCK`] messages at a time and with room kept for the last message whatever its length
//!   (up to [`LAST_MESSAGE_RESERVE`]): so the kept conversation, and with it the cached prefix,
//!   changes only every few turns, and a prefill of the user's first words drops the same turns as
//!   the reply to all of them (dropping one turn per call would re-prefill the whole conversation
//!   on every turn once it is full: ~3 s at 1024 tokens). A single message too long on its own
//!   keeps only its last tokens, and the system prompt at most half of the budget.
//! - **No copying**: a reply never repeats a run of [`NO_REPEAT_NGRAM`] tokens that its own text or
//!   an earlier assistant turn in the prompt already has; the token that would complete one gives
//!   way to the next best. Greedy decoding of a model this small otherwise answers every later turn
//!   with its previous reply word for word, or loops ("had had he had").
//! - **Stops** on `<|im_end|>`/end-of-text, at `max_tokens`, when the context is full, or when the
//!   `on_token` callback breaks.
//! - **Turn ending**: [`Llm::sentence_end_probability`] reads, from the logits after the user's last
//!   word, how likely the model finds a sentence end there (`.`, `?`, `!` or the end of the turn):
//!   an end-of-turn cue for transcripts Whisper left unpunctuated. It prefills the conversation up
//!   to that word in the conversation's cache, so the reply's prefill that follows reuses it.
//! - **Streaming**: `on_token` receives text deltas; a character split across tokens is held back
//!   until complete, so the deltas concatenate to exactly [`Generation::text`].
use super::{Manifest, ModelError};
use ort::session::{IoBinding, Session};
use ort::value::Tensor;
use serde::Deserialize;
use std::ops::ControlFlow;
use std::time::Instant;

/// Default bound on prompt + reply tokens (the converter's rotary tables cover 8192). Qwen2.5-0.5B's
/// KV cache takes 24.6 KB per position (25 MB at 1024) and attention cost grows with it.
pub const DEFAULT_MAX_CONTEXT: usize = 1024;
/// Conversations whose KV cache is kept at once (25 MB each at 1024 positions, allocated as
/// conversations come). Past it every turn re-prefills its whole conversation (up to ~3 s of
/// both cores): at 6 caches, 8 sessions took first-token p95 from 268 ms (6 sessions) to 1.9 s.
pub const MAX_CONVERSATIONS: usize = 8;
/// Older messages are dropped this many at a time (see the module doc).
pub const DROP_BLOCK: usize = 8;
/// Room kept for the conversation's last message when older ones are dropped, in tokens (at most a
/// quarter of the budget).
pub const LAST_MESSAGE_RESERVE: usize = 160;
/// Length of the token runs a reply may not repeat (see the module doc): long enough that common
/// phrases ("I'm not sure") stay free, short enough to stop a copied sentence at its third word.
pub const NO_REPEAT_NGRAM: usize = 4;
/// Undecodable tokens held back at most this long before their text is emitted anyway.
const MAX_PENDING_TOKENS: usize = 8;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub text: String,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Message {
        Message { role: Role::System, text: text.into() }
    }
    pub fn user(text: impl Into<String>) -> Message {
        Message { role: Role::User, text: text.into() }
    }
    pub fn assistant(text: impl Into<String>) -> Message {
        Message { role: Role::Assistant, text: text.into() }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context bound was reached.
    ContextFull,
    /// The `on_token` callback returned `ControlFlow::Break`.
    Caller,
}

/// The result of [`Llm::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The reply (special tokens removed): the concatenation of the streamed deltas.
    pub text: String,
    pub stop: Stop,
    /// Tokens in the prompt as sent to the model (after dropping turns to fit the context).
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache came from the previous call.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model in this call (`prompt_tokens - reused_tokens`).
    pub prefilled_tokens: usize,
    /// Messages of `history` left out to fit the context bound.
    pub dropped_messages: usize,
    pub generated_tokens: usize,
    /// Wall time of the prefill run (which also yields the first token).
    pub prefill_ms: f64,
    /// Mean wall time of each further decoding step.
    pub per_token_ms: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct ChatTemplate {
    turn_start: String,
    turn_end: String,
    generation_prompt: String,
    default_system: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Meta {
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    max_context: usize,
    stop_token_ids: Vec<u32>,
    chat_template: ChatTemplate,
}

/// The reply model with its tokenizer and the KV caches of the last conversations.
pub struct Llm {
    session: Session,
    tokenizer: tokenizers::Tokenizer,
    meta: Meta,
    /// Positions of the KV buffers: the bound on prompt + reply.
    max_context: usize,
    slots: Vec<Slot>,
    /// Counts slot uses (least recently used = smallest stamp).
    clock: u64,
    /// Extra token to stop on: end-of-text never belongs in a reply.
    end_of_text: Option<u32>,
    /// Tokens that end a sentence or the turn (`sentence_end_probability`).
    sentence_ends: Vec<u32>,
}

/// One conversation's KV cache.
struct Slot {
    key: u64,
    /// The KV buffers bound in place (input and output), and the `logits` output.
    binding: IoBinding,
    /// The tokens whose keys and values fill the first positions of the KV buffers.
    cached: Vec<u32>,
    used: u64,
}

/// A reply being decoded ([`Llm::start`], then [`Llm::resume`] until it is done).
pub struct Decoding {
    key: u64,
    /// The prompt and the tokens decoded so far: what the conversation's cache must hold.
    context: Vec<u32>,
    /// Where the reply starts in `context`.
    reply_from: usize,
    /// The earlier assistant turns in the prompt (message bodies): runs the reply may not copy.
    said: Vec<Vec<u32>>,
    /// The next token, not yet emitted.
    next: u32,
    max_tokens: usize,
    stream: Stream,
    steps: usize,
    decode_ms: f64,
    done: bool,
    generation: Generation,
}

impl Decoding {
    /// The reply ended (its [`Generation`] is final).
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn generation(&self) -> &Generation {
        &self.generation
    }
}

impl Llm {
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Llm, ModelError> {
        let meta: Meta = manifest.meta("llm")?;
        if meta.n_layers == 0 || meta.n_kv_heads == 0 || meta.head_dim == 0 || meta.vocab == 0 {
            return Err(ModelError::Invalid("manifest meta of `llm`: zero-sized model".into()));
        }
        let tokenizer = manifest.tokenizer("llm")?;
        let session = manifest.session("llm", "model", threads)?;
        let end_of_text = tokenizer.token_to_id("<|endoftext|>");
        let max_context = DEFAULT_MAX_CONTEXT.min(meta.max_context);
        let marks = [".", "?", "!", "Ġ.", "Ġ?", "Ġ!"].into_iter().filter_map(|t| tokenizer.token_to_id(t));
        let sentence_ends = marks.chain(meta.stop_token_ids.iter().copied()).collect();
        Ok(Llm { session, tokenizer, meta, max_context, slots: Vec::new(), clock: 0, end_of_text, sentence_ends })
    }

    /// The bound on prompt + reply tokens.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Sets the bound on prompt + reply tokens (at least 64, at most the model's own context), and
    /// reallocates the KV cache to that size.
    pub fn set_max_context(&mut self, tokens: usize) -> Result<(), ModelError> {
        self.max_context = tokens.clamp(64, self.meta.max_context.max(64));
        self.slots.clear();
        Ok(())
    }

    /// Forgets every cached prefix: the next call prefills its whole prompt.
    pub fn reset_cache(&mut self) {
        self.slots.iter_mut().for_each(|slot| slot.cached.clear());
    }

    /// The slot of conversation `key`: its own, a new one, or the least recently used one.
    fn slot(&mut self, key: u64) -> Result<usize, ModelError> {
        self.clock += 1;
        let used = self.clock;
        if let Some(i) = self.slots.iter().position(|slot| slot.key == key) {
            self.slots[i].used = used;
            return Ok(i);
        }
        if self.slots.len() < MAX_CONVERSATIONS {
            let binding = bind(&self.session, &self.meta, self.max_context)?;
            self.slots.push(Slot { key, binding, cached: Vec::new(), used });
            return Ok(self.slots.len() - 1);
        }
        let i = (0..self.slots.len()).min_by_key(|&i| self.slots[i].used).unwrap_or(0);
        let slot = &mut self.slots[i];
        (slot.key, slot.used) = (key, used);
        slot.cached.clear();
        Ok(i)
    }

    /// The default system prompt, used when `history` does not start with a system message.
    pub fn default_system(&self) -> &str {
        &self.meta.chat_template.default_system
    }

    /// Number of tokens `text` encodes to (without any template).
    pub fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        Ok(self.encode(text)?.len())
    }

    /// Generates the assistant's reply to `history`, greedily, at most `max_tokens` tokens, calling
    /// `on_token` with each piece of new text; a `ControlFlow::Break` stops generation after it.
    /// Uses conversation key 0.
    pub fn generate(
        &mut self,
        history: &[Message],
        max_tokens: usize,
        on_token: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, ModelError> {
        let mut decoding = self.start(0, history, max_tokens)?;
        self.resume(&mut decoding, usize::MAX, on_token)?;
        Ok(decoding.generation)
    }

    /// Prefills `history` in conversation `key`'s cache (the prefill yields the first token, not yet
    /// emitted); [`Llm::resume`] then decodes the reply.
    pub fn start(&mut self, key: u64, history: &[Message], max_tokens: usize) -> Result<Decoding, ModelError> {
        let max_tokens = max_tokens.clamp(1, self.max_context / 2);
        let Prompt { tokens: prompt, said, dropped: dropped_messages } =
            self.prompt(history, self.prompt_budget(max_tokens))?;
        // Reuse the cached prefix; at least one token must run to give the next token's logits.
        let (slot, reused) = self.reuse(key, &prompt, prompt.len() - 1)?;
        let mut generation = Generation {
            text: String::new(),
            stop: Stop::MaxTokens,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefilled_tokens: prompt.len() - reused,
            dropped_messages,
            generated_tokens: 0,
            prefill_ms: 0.0,
            per_token_ms: 0.0,
        };
        let t0 = Instant::now();
        let next = self.step(slot, &prompt[reused..], |logits| argmax(logits, &[]))?;
        generation.prefill_ms = ms(t0);
        let stream = Stream::default();
        Ok(Decoding {
            key,
            reply_from: prompt.len(),
            context: prompt,
            said,
            next,
            max_tokens,
            stream,
            steps: 0,
            decode_ms: 0.0,
            done: false,
            generation,
        })
    }

    /// Prefills at most `tokens` more of `history`'s prompt in conversation `key`'s cache, as
    /// [`Llm::start`] would prefill it (all but its last token, which `start` runs to get the first
    /// reply token); returns whether that is all cached. A background prefill in slices: a job
    /// waiting for the engine waits for one slice, not for a whole conversation.
    pub fn prefill(
        &mut self,
        key: u64,
        history: &[Message],
        max_tokens: usize,
        tokens: usize,
    ) -> Result<bool, ModelError> {
        let Prompt { tokens: prompt, .. } = self.prompt(history, self.prompt_budget(max_tokens))?;
        let end = prompt.len().saturating_sub(1);
        let (slot, reused) = self.reuse(key, &prompt[..end], end)?;
        let upto = end.min(reused + tokens.max(1));
        if upto > reused {
            self.step(slot, &prompt[reused..upto], |_| ())?;
        }
        Ok(upto == end)
    }

    /// The model's probability that the last message of `history` ends a sentence, or the turn,
    /// right after its text: the next token is `.`, `?`, `!` or the end of the turn. Prefills the
    /// prompt up to there in conversation `key`'s cache: a following [`Llm::start`] with the same
    /// `history` and `max_tokens` reuses it.
    pub fn sentence_end_probability(
        &mut self,
        key: u64,
        history: &[Message],
        max_tokens: usize,
    ) -> Result<f32, ModelError> {
        let t = &self.meta.chat_template;
        let suffix = self.encode(&t.turn_end)?.len() + self.encode(&t.generation_prompt)?.len();
        let Prompt { tokens: prompt, .. } = self.prompt(history, self.prompt_budget(max_tokens))?;
        let end = prompt.len().saturating_sub(suffix);
        if end < 2 {
            return Err(ModelError::Invalid("llm: no message to judge".into()));
        }
        let (slot, reused) = self.reuse(key, &prompt[..end], end - 1)?;
        let ends = self.sentence_ends.clone();
        self.step(slot, &prompt[reused..end], |logits| {
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let total: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
            ends.iter().map(|&i| (logits[i as usize] - max).exp()).sum::<f32>() / total
        })
    }

    /// Conversation `key`'s slot, its cache cut to the longest prefix of `tokens` it holds (at most
    /// `at_most` tokens), and the length of that prefix: what a call after it need not run again.
    fn reuse(&mut self, key: u64, tokens: &[u32], at_most: usize) -> Result<(usize, usize), ModelError> {
        let slot = self.slot(key)?;
        let reused = common_prefix(&self.slots[slot].cached, tokens).min(at_most);
        self.slots[slot].cached.truncate(reused);
        Ok((slot, reused))
    }

    /// The prompt's share of the context: room for at least one reply token.
    fn prompt_budget(&self, max_tokens: usize) -> usize {
        self.max_context - max_tokens.clamp(1, self.max_context / 2)
    }

    /// Decodes up to `tokens` more tokens of `decoding`, calling `on_token` with each piece of new
    /// text (a `ControlFlow::Break` ends the reply after it); returns whether the reply is done.
    /// Other conversations may run between calls; should one have taken this conversation's cache,
    /// it is prefilled again.
    pub fn resume(
        &mut self,
        decoding: &mut Decoding,
        tokens: usize,
        mut on_token: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<bool, ModelError> {
        let d = decoding;
        if d.done {
            return Ok(true);
        }
        let t0 = Instant::now();
        let slot = self.slot(d.key)?;
        let cached = &self.slots[slot].cached;
        let reused = common_prefix(cached, &d.context);
        if reused < d.context.len() || cached.len() != d.context.len() {
            self.slots[slot].cached.truncate(reused.min(d.context.len() - 1));
            let from = self.slots[slot].cached.len();
            let banned = repeats(&d.context[d.reply_from..], &d.said);
            d.next = self.step(slot, &d.context[from..], |logits| argmax(logits, &banned))?;
        }
        let mut decoded = 0;
        while decoded < tokens {
            let next = d.next;
            if self.is_stop(next) {
                (d.generation.stop, d.done) = (Stop::EndOfTurn, true);
                break;
            }
            d.generation.generated_tokens += 1;
            let flow = match d.stream.push(&self.tokenizer, next)? {
                Some(delta) => {
                    d.generation.text.push_str(&delta);
                    on_token(&delta)
                }
                None => ControlFlow::Continue(()),
            };
            if flow.is_break() {
                (d.generation.stop, d.done) = (Stop::Caller, true);
                break;
            }
            if d.generation.generated_tokens >= d.max_tokens {
                (d.generation.stop, d.done) = (Stop::MaxTokens, true);
                break;
            }
            if self.slots[slot].cached.len() >= self.max_context {
                (d.generation.stop, d.done) = (Stop::ContextFull, true);
                break;
            }
            d.context.push(next);
            let banned = repeats(&d.context[d.reply_from..], &d.said);
            d.next = self.step(slot, &[next], |logits| argmax(logits, &banned))?;
            d.steps += 1;
            decoded += 1;
        }
        d.decode_ms += ms(t0);
        if d.done {
            if let Some(rest) = d.stream.flush(&self.tokenizer)? {
                d.generation.text.push_str(&rest);
                if d.generation.stop != Stop::Caller {
                    let _ = on_token(&rest);
                }
            }
            if d.steps > 0 {
                d.generation.per_token_ms = d.decode_ms / d.steps as f64;
            }
        }
        Ok(d.done)
    }

    /// [`Llm::run`]; a failed run leaves that cache empty.
    fn step<R>(&mut self, slot: usize, tokens: &[u32], read: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
        let read = self.run(slot, tokens, read);
        if read.is_err() {
            self.slots[slot].cached.clear();
        }
        read
    }

    /// Runs `tokens` after the ones cached in `slot` and appends them to its cache; returns what
    /// `read` makes of the logits of the token after them.
    fn run<R>(&mut self, slot: usize, tokens: &[u32], read: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
        let m = &self.meta;
        let Slot { binding, cached, .. } = &mut self.slots[slot];
        let past = cached.len();
        if tokens.is_empty() || past + tokens.len() > self.max_context {
            return Err(ModelError::Invalid(format!(
                "llm: {} new tokens after {past} do not fit the context of {}",
                tokens.len(),
                self.max_context
            )));
        }
        let ids =
            Tensor::from_array(([1usize, tokens.len()], tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()))?;
        let past_len = Tensor::from_array(([1usize], vec![past as i64]))?;
        binding.bind_input("input_ids", &ids)?;
        binding.bind_input("past_len", &past_len)?;
        let out = self.session.run_binding(binding)?;
        let logits = out["logits"].try_extract_tensor::<f32>()?.1;
        if logits.len() != m.vocab {
            return Err(ModelError::Invalid(format!("llm: {} logits, expected {}", logits.len(), m.vocab)));
        }
        let read = read(logits);
        cached.extend_from_slice(tokens);
        Ok(read)
    }

    fn is_stop(&self, token: u32) -> bool {
        self.meta.stop_token_ids.contains(&token) || Some(token) == self.end_of_text
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| ModelError::Invalid(format!("llm: tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ChatML prompt of `history` within `budget` tokens, the bodies of the assistant turns it
    /// keeps, and how many messages were dropped.
    fn prompt(&self, history: &[Message], budget: usize) -> Result<Prompt, ModelError> {
        let t = &self.meta.chat_template;
        let (system_text, rest) = match history.split_first() {
            Some((first, rest)) if first.role == Role::System => (first.text.as_str(), rest),
            _ => (t.default_system.as_str(), history),
        };
        let generation_prompt = self.encode(&t.generation_prompt)?;
        let turn_end = self.encode(&t.turn_end)?;
        let turn = |role: Role, text: &str, keep: Keep| -> Result<Vec<u32>, ModelError> {
            let mut tokens = self.encode(&format!("{}{}\n", t.turn_start, role.name()))?;
            let body = self.encode(&defuse(text))?;
            let body = match keep {
                Keep::All => &body[..],
                Keep::Head(n) => &body[..n.min(body.len())],
                Keep::Tail(n) => &body[body.len().saturating_sub(n)..],
            };
            tokens.extend_from_slice(body);
            tokens.extend_from_slice(&turn_end);
            Ok(tokens)
        };
        let overhead = |role: Role| -> Result<usize, ModelError> { Ok(turn(role, "", Keep::All)?.len()) };

        let mut system = turn(Role::System, system_text, Keep::All)?;
        let half = budget / 2;
        if system.len() + generation_prompt.len() > half {
            let room = half.saturating_sub(overhead(Role::System)? + generation_prompt.len());
            system = turn(Role::System, system_text, Keep::Head(room))?;
        }
        let mut turns = rest.iter().map(|m| turn(m.role, &m.text, Keep::All)).collect::<Result<Vec<_>, _>>()?;
        let fixed = system.len() + generation_prompt.len();
        let last = turns.last().map_or(0, |t| t.len().max(LAST_MESSAGE_RESERVE.min(budget / 4)));
        let room = budget.saturating_sub(fixed + last);
        let earlier = turns.len().saturating_sub(1);
        let mut kept: usize = turns[..earlier].iter().map(Vec::len).sum();
        let mut dropped = 0;
        while dropped < earlier && (kept > room || dropped % DROP_BLOCK != 0) {
            kept -= turns[dropped].len();
            dropped += 1;
        }
        turns.drain(..dropped);
        let said = rest[dropped..]
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| self.encode(&defuse(&m.text)))
            .collect::<Result<Vec<_>, _>>()?;
        if let (Some(last), Some(message)) = (turns.last_mut(), rest.last())
            && fixed + last.len() > budget
        {
            let room = budget.saturating_sub(fixed + overhead(message.role)?);
            *last = turn(message.role, &message.text, Keep::Tail(room))?;
        }
        let mut prompt = system;
        turns.iter().for_each(|t| prompt.extend_from_slice(t));
        prompt.extend_from_slice(&generation_prompt);
        prompt.truncate(budget.max(1)); // only if the template pieces alone exceed the budget
        Ok(Prompt { tokens: prompt, said, dropped })
    }
}

/// A conversation rendered for the model.
struct Prompt {
    tokens: Vec<u32>,
    /// The bodies of the assistant turns kept: runs the reply may not copy.
    said: Vec<Vec<u32>>,
    /// Messages dropped to fit the budget.
    dropped: usize,
}

/// How much of a message body to keep.
#[derive(Clone, Copy)]
enum Keep {
    All,
    Head(usize),
    Tail(usize),
}

/// Neutralizes ChatML control-token spellings in message text (`<|` becomes `< |`).
fn defuse(text: &str) -> String {
    text.replace("<|", "< |")
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Allocates the KV buffers ([1, kv_heads, capacity, head_dim] per layer, zeroed) and binds each as
/// both `past_<k|v>_<layer>` and `present_<k|v>_<layer>`, and `logits` to CPU memory.
fn bind(session: &Session, m: &Meta, capacity: usize) -> Result<IoBinding, ModelError> {
    let mut binding = session.create_binding()?;
    for kind in ["k", "v"] {
        for layer in 0..m.n_layers {
            let mut buffer = Tensor::<f32>::new(session.allocator(), [1, m.n_kv_heads, capacity, m.head_dim])?;
            buffer.extract_tensor_mut().1.fill(0.0);
            binding.bind_input(format!("past_{kind}_{layer}"), &buffer)?;
            binding.bind_output(format!("present_{kind}_{layer}"), &mut buffer)?;
        }
    }
    binding.bind_output_to_device("logits", session.allocator().memory_info())?;
    Ok(binding)
}

/// The tokens that would make `reply` end in a run of [`NO_REPEAT_NGRAM`] tokens already in
/// `reply` or in one of `said`.
fn repeats(reply: &[u32], said: &[Vec<u32>]) -> Vec<u32> {
    let n = NO_REPEAT_NGRAM;
    if reply.len() < n - 1 {
        return Vec::new();
    }
    let tail = &reply[reply.len() + 1 - n..];
    said.iter()
        .map(Vec::as_slice)
        .chain([reply])
        .flat_map(|text| text.windows(n).filter(|w| &w[..n - 1] == tail).map(|w| w[n - 1]))
        .collect()
}

/// Index of the largest logit not `banned` (NaN never wins).
fn argmax(logits: &[f32], banned: &[u32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        if x > best.1 && !banned.contains(&(i as u32)) {
            best = (i, x);
        }
    }
    best.0 as u32
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Turns generated tokens into text deltas, holding back tokens that end inside a UTF-8 character
/// (the byte-level decoder renders those as U+FFFD).
#[derive(Default)]
struct Stream {
    pending: Vec<u32>,
}

impl Stream {
    fn push(&mut self, tokenizer: &tokenizers::Tokenizer, token: u32) -> Result<Option<String>, ModelError> {
        self.pending.push(token);
        let text = decode(tokenizer, &self.pending)?;
        if text.ends_with('\u{FFFD}') && self.pending.len() < MAX_PENDING_TOKENS {
            return Ok(None);
        }
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }

    fn flush(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Option<String>, ModelError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let text = decode(tokenizer, &self.pending)?;
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }
}

fn decode(tokenizer: &tokenizers::Tokenizer, tokens: &[u32]) -> Result<String, ModelError> {
    tokenizer.decode(tokens, true).map_err(|e| ModelError::Invalid(format!("llm: detokenizing: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_already_said_or_in_the_reply_cannot_be_completed() {
        let said = vec![vec![1, 2, 3, 4, 5], vec![9, 2, 3, 7]];
        // Too short to complete a run yet.
        assert!(repeats(&[2, 3], &said).is_empty());
        // "2 3" was followed by 4 and 7 in earlier turns, but a run needs three tokens before it.
        assert!(repeats(&[8, 2, 3], &said).is_empty());
        assert_eq!(repeats(&[1, 2, 3], &said), [4]);
        assert_eq!(repeats(&[9, 2, 3], &said), [7]);
        // The reply's own run "6 6 6 8", then "6 6 6" again.
        assert_eq!(repeats(&[6, 6, 6, 8, 6, 6, 6], &[]), [8]);
        assert_eq!(argmax(&[0.1, 0.9, 0.5, f32::NAN], &[]), 1);
        assert_eq!(argmax(&[0.1, 0.9, 0.5, f32::NAN], &[1]), 2);
    }
}
