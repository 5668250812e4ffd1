//! The conversation so far, as items with ids: what the reply model reads, and what a transport
//! may list, add, delete or cut (the Realtime API's `conversation.item.*`). Shared by the
//! session's transport and its worker; the worker writes each exchange once it is over, keeping
//! of a reply only what the user heard.
use crate::models::llm::{DROP_BLOCK, Message, Role};
use std::sync::Mutex;

/// Items kept per session (a memory bound; the reply model itself drops the oldest turns that do
/// not fit its context, and trimming here earlier would defeat its prefix cache). Past it, the
/// older half goes: a whole number of the model's drop blocks, so the turns it keeps stay put.
pub const MAX_ITEMS: usize = 64;
const _: () = assert!((MAX_ITEMS / 2).is_multiple_of(DROP_BLOCK));
/// Longest text of one item a transport may add, in bytes.
pub const MAX_ITEM_TEXT: usize = 16 * 1024;

/// The id of turn `turn`'s user item (its speech or typed text).
pub fn user_item_id(turn: u64) -> String {
    format!("item_u{turn:06}")
}

/// The id of turn `turn`'s reply item.
pub fn reply_item_id(turn: u64) -> String {
    format!("item_a{turn:06}")
}

/// One chunk of a spoken reply: its text and its audio's length.
#[derive(Debug, Clone, PartialEq)]
pub struct Spoken {
    pub text: String,
    pub audio_ms: f64,
}

/// One item of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub role: Role,
    pub text: String,
    /// A reply's chunks as spoken (empty for other items, and for text-only replies).
    pub spoken: Vec<Spoken>,
    /// Whether the item came from audio (the user's speech, or a spoken reply).
    pub audio: bool,
}

impl Item {
    pub fn new(id: String, role: Role, text: String) -> Self {
        Item { id, role, text, spoken: Vec::new(), audio: false }
    }
}

/// Why an item could not be added or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("no item with id {0:?}")]
    NotFound(String),
    #[error("an item with id {0:?} already exists")]
    Duplicate(String),
    #[error("item {0:?} has no audio to truncate")]
    NoAudio(String),
    #[error("audio_end_ms {end_ms} is past the item's {audio_ms} ms of audio")]
    PastEnd { end_ms: u64, audio_ms: u64 },
}

#[derive(Default)]
pub struct History {
    items: Mutex<Vec<Item>>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Item>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The conversation as the reply model reads it.
    pub fn messages(&self) -> Vec<Message> {
        self.lock()
            .iter()
            .filter(|i| !i.text.is_empty())
            .map(|i| Message { role: i.role, text: i.text.clone() })
            .collect()
    }

    /// The text of the latest user item, if the conversation ends with one.
    pub fn last_user_text(&self) -> Option<String> {
        self.lock().last().filter(|i| i.role == Role::User).map(|i| i.text.clone())
    }

    pub fn get(&self, id: &str) -> Option<Item> {
        self.lock().iter().find(|i| i.id == id).cloned()
    }

    /// The id of the item before `id` (`None` for the first, or an unknown id).
    pub fn previous_id(&self, id: &str) -> Option<String> {
        let items = self.lock();
        let at = items.iter().position(|i| i.id == id)?;
        at.checked_sub(1).map(|p| items[p].id.clone())
    }

    /// The id of the last item.
    pub fn last_id(&self) -> Option<String> {
        self.lock().last().map(|i| i.id.clone())
    }

    /// Adds `item` after the item `after` (`Some("root")`: first), or at the end; an existing id
    /// is refused.
    pub fn insert(&self, item: Item, after: Option<&str>) -> Result<(), HistoryError> {
        let mut items = self.lock();
        if items.iter().any(|i| i.id == item.id) {
            return Err(HistoryError::Duplicate(item.id));
        }
        let at = match after {
            None => items.len(),
            Some("root") => 0,
            Some(id) => items.iter().position(|i| i.id == id).ok_or_else(|| HistoryError::NotFound(id.into()))? + 1,
        };
        items.insert(at, item);
        if items.len() > MAX_ITEMS {
            items.drain(..MAX_ITEMS / 2);
        }
        Ok(())
    }

    /// Appends `item`, replacing an item of the same id (a turn written again).
    pub fn push(&self, item: Item) {
        let mut items = self.lock();
        items.retain(|i| i.id != item.id);
        items.push(item);
        if items.len() > MAX_ITEMS {
            items.drain(..MAX_ITEMS / 2);
        }
    }

    pub fn delete(&self, id: &str) -> Result<(), HistoryError> {
        let mut items = self.lock();
        let at = items.iter().position(|i| i.id == id).ok_or_else(|| HistoryError::NotFound(id.into()))?;
        items.remove(at);
        Ok(())
    }

    /// Cuts a spoken reply to what was heard by `end_ms` of its audio (the client says where its
    /// playback stopped); returns the item as it is now.
    pub fn truncate(&self, id: &str, end_ms: u64) -> Result<Item, HistoryError> {
        let mut items = self.lock();
        let item = items.iter_mut().find(|i| i.id == id).ok_or_else(|| HistoryError::NotFound(id.into()))?;
        if item.spoken.is_empty() {
            return Err(HistoryError::NoAudio(id.into()));
        }
        let audio_ms = item.spoken.iter().map(|s| s.audio_ms).sum::<f64>();
        if end_ms as f64 > audio_ms + 1.0 {
            return Err(HistoryError::PastEnd { end_ms, audio_ms: audio_ms as u64 });
        }
        item.spoken = heard(&item.spoken, end_ms as f64);
        item.text = join_text(&item.spoken);
        Ok(item.clone())
    }
}

pub fn join_text(spoken: &[Spoken]) -> String {
    spoken.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ")
}

/// The chunks of a reply the user heard by `played_ms`: those whose audio had played, the last
/// one cut in proportion to how much of it played.
pub fn heard(spoken: &[Spoken], played_ms: f64) -> Vec<Spoken> {
    let mut heard = Vec::new();
    let mut start = 0.0;
    for chunk in spoken {
        let end = start + chunk.audio_ms;
        if end <= played_ms {
            heard.push(chunk.clone());
        } else {
            let fraction = ((played_ms - start) / chunk.audio_ms).clamp(0.0, 1.0);
            let words: Vec<&str> = chunk.text.split_whitespace().collect();
            let n = (words.len() as f64 * fraction).floor() as usize;
            if n > 0 {
                heard.push(Spoken { text: words[..n].join(" "), audio_ms: (played_ms - start).max(0.0) });
            }
            break;
        }
        start = end;
    }
    heard
}

/// The reply text the user heard after a cancel at `played_ms`.
pub fn heard_text(spoken: &[Spoken], played_ms: f64) -> String {
    join_text(&heard(spoken, played_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoken(parts: &[(&str, f64)]) -> Vec<Spoken> {
        parts.iter().map(|(text, audio_ms)| Spoken { text: text.to_string(), audio_ms: *audio_ms }).collect()
    }

    #[test]
    fn history_keeps_only_what_was_played() {
        let reply = spoken(&[("Sure, the capital of France", 1000.0), ("is Paris, a lovely city.", 2000.0)]);
        assert_eq!(join_text(&reply), "Sure, the capital of France is Paris, a lovely city.");
        assert_eq!(heard_text(&reply, 0.0), "");
        assert_eq!(heard_text(&reply, 1000.0), "Sure, the capital of France");
        // Half of the second chunk: half of its words.
        assert_eq!(heard_text(&reply, 2000.0), "Sure, the capital of France is Paris,");
        assert_eq!(heard_text(&reply, 9000.0), "Sure, the capital of France is Paris, a lovely city.");
    }

    #[test]
    fn items_are_added_in_place_deleted_and_cut_to_what_was_heard() {
        let history = History::default();
        history.insert(Item::new("a".into(), Role::User, "Hi.".into()), None).unwrap();
        history.insert(Item::new("b".into(), Role::User, "Hello.".into()), Some("root")).unwrap();
        assert_eq!(history.previous_id("a").as_deref(), Some("b"));
        assert!(matches!(
            history.insert(Item::new("a".into(), Role::User, String::new()), None),
            Err(HistoryError::Duplicate(_))
        ));
        assert!(matches!(
            history.insert(Item::new("c".into(), Role::User, String::new()), Some("x")),
            Err(HistoryError::NotFound(_))
        ));
        let mut reply = Item::new("r".into(), Role::Assistant, String::new());
        reply.spoken = spoken(&[("One two three four.", 1000.0), ("Five six.", 500.0)]);
        reply.text = join_text(&reply.spoken);
        history.push(reply);
        assert!(matches!(history.truncate("a", 10), Err(HistoryError::NoAudio(_))));
        assert!(matches!(history.truncate("r", 5000), Err(HistoryError::PastEnd { .. })));
        assert_eq!(history.truncate("r", 500).unwrap().text, "One two");
        assert_eq!(history.messages().len(), 3);
        history.delete("b").unwrap();
        assert!(history.delete("b").is_err());
        assert_eq!(history.last_user_text(), None);
        assert_eq!(history.messages()[0].text, "Hi.");
    }
}
