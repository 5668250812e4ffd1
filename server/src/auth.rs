//! Who may use the server: API keys from the configuration (stored as their SHA-256, never in the
//! clear), short-lived client secrets minted with one for browsers (signed with HMAC-SHA256, so
//! every instance sharing `token_secret` accepts them, with no shared state), and each key's
//! session cap and connection rate limit.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of a client secret (as OpenAI's ephemeral keys).
pub const SECRET_PREFIX: &str = "ek_";
/// Prefix of the API keys `parley-server new-key` makes.
const KEY_PREFIX: &str = "pk_";
/// Client secret lifetimes a client may ask for, in seconds (OpenAI's bounds), and the default.
pub const SECRET_TTL_S: std::ops::RangeInclusive<u64> = 10..=7200;
pub const DEFAULT_SECRET_TTL_S: u64 = 600;

/// The `[auth]` section of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The API keys; none: every request is served without one (only allowed on loopback unless
    /// `allow_anonymous`).
    pub keys: Vec<KeyConfig>,
    /// Serve without keys on a non-loopback address.
    pub allow_anonymous: bool,
    /// Hex (at least 32 bytes) signing client secrets. Set the same one on every instance behind
    /// a load balancer; without it each process makes its own, and its secrets work only there.
    pub token_secret: Option<String>,
}

/// One API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Named in logs, metrics and the safety audit log (the key itself never is).
    pub id: String,
    /// SHA-256 of the key, hex (`parley-server new-key` prints both).
    pub sha256: String,
    /// Sessions open at once with this key (its client secrets included); none: the server's cap.
    pub max_sessions: Option<usize>,
    /// New sessions per minute with this key (a token bucket of this size); none: no limit.
    pub connections_per_minute: Option<u32>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Authentication is off.
    Anonymous,
    /// The id of the key presented, or of the key that minted the client secret presented.
    Key(Arc<str>),
}

impl Identity {
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::Key(id) => Some(id),
        }
    }
}

/// Why a request is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this server needs an API key or client secret (Authorization: Bearer …)")]
    Missing,
    #[error("the API key or client secret is not valid")]
    Invalid,
    #[error("the client secret has expired")]
    Expired,
    #[error("key {0} has {1} sessions open, its limit")]
    KeySessions(Arc<str>, usize),
    #[error("key {0} opened sessions too fast; retry later")]
    RateLimited(Arc<str>, u64),
}

impl Denied {
    /// The HTTP status: 401 for credentials, 429 for limits.
    pub fn status(&self) -> &'static str {
        match self {
            Denied::Missing | Denied::Invalid | Denied::Expired => "401 Unauthorized",
            Denied::KeySessions(..) | Denied::RateLimited(..) => "429 Too Many Requests",
        }
    }

    /// The OpenAI-style error code.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Missing => "missing_api_key",
            Denied::Invalid => "invalid_api_key",
            Denied::Expired => "expired_client_secret",
            Denied::KeySessions(..) => "key_session_limit",
            Denied::RateLimited(..) => "rate_limit_exceeded",
        }
    }

    /// Seconds before a retry can succeed, for a limit.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Denied::RateLimited(_, s) => Some(*s),
            Denied::KeySessions(..) => Some(1),
            _ => None,
        }
    }
}

struct Key {
    id: Arc<str>,
    sha256: [u8; 32],
    max_sessions: Option<usize>,
    per_minute: Option<u32>,
}

/// One key's open sessions and connection bucket.
#[derive(Default)]
struct Usage {
    sessions: usize,
    tokens: f64,
    filled: Option<Instant>,
}

/// The configured keys, the client-secret signer and each key's usage.
pub struct Auth {
    keys: Vec<Key>,
    signer: hmac::Key,
    usage: Arc<Mutex<HashMap<Arc<str>, Usage>>>,
}

/// A session counted against its key until dropped.
pub struct KeySession {
    key: Option<Arc<str>>,
    usage: Arc<Mutex<HashMap<Arc<str>, Usage>>>,
}

impl Drop for KeySession {
    fn drop(&mut self) {
        if let Some(key) = &self.key
            && let Some(usage) = self.usage.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key)
        {
            usage.sessions = usage.sessions.saturating_sub(1);
        }
    }
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let mut keys = Vec::new();
        for key in &config.keys {
            let sha256 = decode_hex(&key.sha256)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("auth key {:?}: sha256 must be 64 hex digits", key.id))?;
            if key.id.is_empty() || keys.iter().any(|k: &Key| *k.id == *key.id) {
                return Err(format!("auth key ids must be unique and not empty ({:?})", key.id));
            }
            keys.push(Key {
                id: key.id.as_str().into(),
                sha256,
                max_sessions: key.max_sessions,
                per_minute: key.connections_per_minute,
            });
        }
        let secret = match &config.token_secret {
            Some(hex) => {
                decode_hex(hex).filter(|b| b.len() >= 32).ok_or("auth.token_secret must be at least 32 bytes of hex")?
            }
            None => random_bytes(32),
        };
        Ok(Self { keys, signer: hmac::Key::new(hmac::HMAC_SHA256, &secret), usage: Default::default() })
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Who presents `credential` (an API key or a client secret; `None`: nothing presented).
    pub fn identify(&self, credential: Option<&str>) -> Result<Identity, Denied> {
        if !self.enabled() {
            return Ok(Identity::Anonymous);
        }
        let credential = credential.filter(|c| !c.is_empty()).ok_or(Denied::Missing)?;
        if let Some(secret) = credential.strip_prefix(SECRET_PREFIX) {
            return self.verify_secret(secret, unix_now());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes());
        // Every key is compared, byte by byte to the end, so the timing tells nothing of which
        // matched (and a digest's timing would not tell the key anyway).
        let mut found = None;
        for key in &self.keys {
            let differ = digest.as_ref().iter().zip(&key.sha256).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if differ == 0 {
                found = Some(key.id.clone());
            }
        }
        found.map(Identity::Key).ok_or(Denied::Invalid)
    }

    /// Counts a new session against its key: its session cap and connection rate.
    pub fn admit(&self, identity: &Identity) -> Result<KeySession, Denied> {
        let usage = self.usage.clone();
        let Identity::Key(id) = identity else { return Ok(KeySession { key: None, usage }) };
        let key = self.keys.iter().find(|k| k.id == *id).ok_or(Denied::Invalid)?;
        let mut all = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(id.clone()).or_default();
        if let Some(max) = key.max_sessions
            && entry.sessions >= max
        {
            return Err(Denied::KeySessions(id.clone(), max));
        }
        if let Some(per_minute) = key.per_minute {
            let now = Instant::now();
            let capacity = per_minute.max(1) as f64;
            let refill = capacity / 60.0;
            let elapsed = entry.filled.map_or(f64::INFINITY, |t| now.duration_since(t).as_secs_f64());
            entry.tokens = (entry.tokens + elapsed * refill).min(capacity);
            entry.filled = Some(now);
            if entry.tokens < 1.0 {
                let wait = ((1.0 - entry.tokens) / refill).ceil() as u64;
                return Err(Denied::RateLimited(id.clone(), wait.max(1)));
            }
            entry.tokens -= 1.0;
        }
        entry.sessions += 1;
        drop(all);
        Ok(KeySession { key: Some(id.clone()), usage })
    }

    /// A client secret for `key_id`, valid for `ttl` from now: its value and expiry (Unix s).
    pub fn mint(&self, key_id: &str, ttl: Duration) -> (String, u64) {
        let expires_at = unix_now() + ttl.as_secs();
        let nonce = URL_SAFE_NO_PAD.encode(random_bytes(12));
        let payload = format!("{expires_at}.{nonce}.{key_id}");
        let tag = hmac::sign(&self.signer, payload.as_bytes());
        let value = format!(
            "{SECRET_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        );
        (value, expires_at)
    }

    fn verify_secret(&self, secret: &str, now: u64) -> Result<Identity, Denied> {
        let (payload, tag) = secret.split_once('.').ok_or(Denied::Invalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| Denied::Invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Denied::Invalid)?;
        hmac::verify(&self.signer, &payload, &tag).map_err(|_| Denied::Invalid)?;
        let payload = String::from_utf8(payload).map_err(|_| Denied::Invalid)?;
        let mut parts = payload.splitn(3, '.');
        let expires_at: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or(Denied::Invalid)?;
        let key_id = parts.nth(1).ok_or(Denied::Invalid)?;
        // A secret outlives neither its expiry nor its key.
        let key = self.keys.iter().find(|k| *k.id == *key_id).ok_or(Denied::Invalid)?;
        if now >= expires_at {
            return Err(Denied::Expired);
        }
        Ok(Identity::Key(key.id.clone()))
    }
}

/// A new random API key and its SHA-256 (hex), for the configuration.
pub fn new_key() -> (String, String) {
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(random_bytes(32)));
    let sha256 = key_sha256(&key);
    (key, sha256)
}

/// The SHA-256 of a key, hex: what `[[auth.keys]]` holds.
pub fn key_sha256(key: &str) -> String {
    encode_hex(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref())
}

/// 32 random bytes as hex, for `token_secret`.
pub fn new_token_secret() -> String {
    encode_hex(&random_bytes(32))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the system's randomness");
    bytes
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(keys: &[(&str, &str, Option<usize>, Option<u32>)]) -> Auth {
        let keys = keys
            .iter()
            .map(|(id, key, max_sessions, per_minute)| KeyConfig {
                id: id.to_string(),
                sha256: key_sha256(key),
                max_sessions: *max_sessions,
                connections_per_minute: *per_minute,
            })
            .collect();
        Auth::new(&AuthConfig { keys, ..Default::default() }).unwrap()
    }

    #[test]
    fn keys_are_matched_by_their_hash_and_secrets_by_their_signature() {
        let auth = auth(&[("a", "pk_alpha", None, None), ("b", "pk_beta", None, None)]);
        assert_eq!(auth.identify(Some("pk_beta")), Ok(Identity::Key("b".into())));
        assert_eq!(auth.identify(Some("pk_gamma")), Err(Denied::Invalid));
        assert_eq!(auth.identify(None), Err(Denied::Missing));
        let (secret, expires_at) = auth.mint("a", Duration::from_secs(60));
        assert!(secret.starts_with("ek_"));
        assert_eq!(auth.identify(Some(&secret)), Ok(Identity::Key("a".into())));
        let body = secret.strip_prefix(SECRET_PREFIX).unwrap();
        assert_eq!(auth.verify_secret(body, expires_at), Err(Denied::Expired));
        // A tampered payload (another key id) fails the signature.
        let (payload, tag) = body.split_once('.').unwrap();
        let forged = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap().replace(".a", ".b");
        let forged = format!("ek_{}.{tag}", URL_SAFE_NO_PAD.encode(forged));
        assert_eq!(auth.identify(Some(&forged)), Err(Denied::Invalid));
        // Another instance with its own random signer does not accept it.
        let other = self::auth(&[("a", "pk_alpha", None, None)]);
        assert_eq!(other.identify(Some(&secret)), Err(Denied::Invalid));
        // Without keys everything is anonymous.
        let open = Auth::new(&AuthConfig::default()).unwrap();
        assert_eq!(open.identify(Some("anything")), Ok(Identity::Anonymous));
    }

    #[test]
    fn a_key_has_a_session_cap_and_a_connection_rate() {
        let auth = auth(&[("a", "pk_a", Some(2), None), ("r", "pk_r", None, Some(3))]);
        let a = Identity::Key("a".into());
        let (one, two) = (auth.admit(&a).unwrap(), auth.admit(&a).unwrap());
        assert_eq!(auth.admit(&a).err(), Some(Denied::KeySessions("a".into(), 2)));
        drop(one);
        let _three = auth.admit(&a).unwrap();
        drop(two);
        let r = Identity::Key("r".into());
        let kept: Vec<_> = (0..3).map(|_| auth.admit(&r).unwrap()).collect();
        assert_eq!(auth.admit(&r).err(), Some(Denied::RateLimited("r".into(), 20)));
        drop(kept);
        assert!(matches!(auth.admit(&r), Err(Denied::RateLimited(..))), "closing sessions refills nothing");
    }

    #[test]
    fn new_keys_hash_as_configured() {
        let (key, sha256) = new_key();
        let config = KeyConfig { id: "x".into(), sha256, max_sessions: None, connections_per_minute: None };
        let auth = Auth::new(&AuthConfig { keys: vec![config], ..Default::default() }).unwrap();
        assert_eq!(auth.identify(Some(&key)), Ok(Identity::Key("x".into())));
        assert!(Auth::new(&AuthConfig { token_secret: Some("abcd".into()), ..Default::default() }).is_err());
        assert_eq!(new_token_secret().len(), 64);
    }
}
