//! Parley client library: connects to a Parley server, streams audio at real-time pace in 20 ms
//! Opus frames (as a microphone would, then silence), receives events and reply audio, and
//! measures each turn (client-side voice-to-voice plus the server's stage breakdown).
//!
//! # Layout
//! - [`audio`]: WAV reading/writing and resampling.
//! - [`anchor`]: the reference end of speech of a clip's utterances (the voice-to-voice anchor).
//! - [`talk`]: one session: stream clips, collect replies, per-frame round trips.
//! - [`realtime`]: the same session over the OpenAI Realtime API (`parley bench --protocol realtime`).
//! - [`report`]: the per-turn JSON report of `parley talk --report`.
//! - [`bench`]: `parley bench`: concurrent sessions as load; latency percentiles, underruns, server CPU/RSS.
//! - [`transport`]: `parley bench --transport`: many echo streams; per-frame round trips.
//! - [`eval`]: `parley eval safety`: a labelled prompt set run as text and as speech, scored.
//! - [`answers`]: `parley eval answers`: conversations run as text and as speech; are the replies right?
//! - `mic` (feature `mic`): live microphone and speaker through cpal.
pub mod anchor;
pub mod answers;
pub mod audio;
pub mod bench;
pub mod eval;
#[cfg(feature = "mic")]
pub mod mic;
pub mod realtime;
pub mod report;
pub mod talk;
pub mod transport;

pub use report::{Report, TurnReport};
pub use talk::{TalkError, TalkOptions, TalkResult, talk};

/// A connected WebSocket to a Parley server.
pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a session at a URL (see [`endpoint_url`]) or a request (a URL with headers): Nagle off,
/// so each 20 ms frame leaves at once, and a small read buffer (see
/// [`parley_protocol::WS_READ_BUFFER_BYTES`]). `wss://` trusts the Mozilla root store, and also
/// the PEM certificates in `$PARLEY_CA_FILE` when set (a private CA or a self-signed server).
pub async fn connect(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(parley_protocol::WS_READ_BUFFER_BYTES);
    let connector = match std::env::var_os("PARLEY_CA_FILE") {
        Some(_) => Some(tokio_tungstenite::Connector::Rustls(tls_config()?)),
        None => None,
    };
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector).await?;
    Ok(ws)
}

/// The TLS client settings of `wss://` (and the bench's `https://` metrics): the Mozilla roots,
/// plus the PEM certificates of `$PARLEY_CA_FILE` when set.
pub fn tls_config() -> std::io::Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>> {
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::pem::PemObject};
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(ca) = std::env::var_os("PARLEY_CA_FILE") {
        let ca = std::path::Path::new(&ca);
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: {e}", ca.display()));
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
            roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
        }
    }
    #[allow(deprecated)] // ring, as the server (see server/src/conn.rs)
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Builds the endpoint URL from `ws://host:port` or a full `ws://host:port/v1/voice`.
pub fn endpoint_url(server: &str) -> String {
    let base = server.trim_end_matches('/');
    if base.ends_with(parley_protocol::WS_PATH) {
        base.to_string()
    } else {
        format!("{base}{}", parley_protocol::WS_PATH)
    }
}
