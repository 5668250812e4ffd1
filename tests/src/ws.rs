//! Raw clients for the transport tests: one plain HTTP request; a v1 WebSocket (connect, read
//! events and the close, make Opus frames of a tone or of silence).
use futures_util::{Sink, SinkExt, StreamExt};
use parley_protocol::{ErrorCode, FrameHeader, ServerEvent};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A plain HTTP response: its status code, head (status line and headers) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `request` (a whole HTTP/1.1 request) to `addr` and reads the response to the close.
pub async fn http(addr: std::net::SocketAddr, request: &str) -> Response {
    try_http(addr, request).await.expect("the server answers")
}

/// [`http`], or `None` when the connection fails.
pub async fn try_http(addr: std::net::SocketAddr, request: &str) -> Option<Response> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Some(Response { status, head: head.to_string(), body: body.to_string() })
}

/// A GET of `path`, with `key` as its bearer token.
pub fn get(path: &str, key: Option<&str>) -> String {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n")
}

/// `POST /v1/realtime/client_secrets` with `key` and the JSON `body`.
pub fn mint(key: &str, body: &str) -> String {
    format!(
        "POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}
const RATE: u32 = 48_000;
/// Samples in one 20 ms frame at 48 kHz.
pub const FRAME: usize = 960;
/// Longest a test waits for one expected message.
pub const WAIT: Duration = Duration::from_secs(15);

/// A session for `request` (a URL, or one with headers), through the client library: the socket,
/// or its refusal (`TalkError::Refused` with the HTTP status, `Retry-After` and error code).
pub async fn upgrade(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<Ws, parley_client::TalkError> {
    let request = request.into_client_request().expect("a valid request");
    let url = request.uri().to_string();
    parley_client::connect(request).await.map_err(|e| parley_client::TalkError::connect(&url, e))
}

/// A v1 session at `url`; panics unless it opens.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// Next text event, skipping audio; panics on close or timeout.
pub async fn next_event(ws: &mut Ws) -> ServerEvent {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("event in time") {
            Some(Ok(Message::Text(text))) => return ServerEvent::parse(text.as_str()).unwrap(),
            Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Next `error` event's code, skipping others.
pub async fn next_error(ws: &mut Ws) -> ErrorCode {
    loop {
        if let ServerEvent::Error { error } = next_event(ws).await {
            return error.code;
        }
    }
}

/// Reads until the close frame; returns its code and reason and the error codes seen before it.
pub async fn expect_close(ws: &mut Ws) -> (u16, String, Vec<ErrorCode>) {
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string(), errors);
            }
            Some(Ok(Message::Text(text))) => {
                if let Ok(ServerEvent::Error { error }) = ServerEvent::parse(text.as_str()) {
                    errors.push(error.code);
                }
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

pub fn encoder() -> opus::Encoder {
    opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip).unwrap()
}

pub fn tone_frame(encoder: &mut opus::Encoder, seq: u32) -> Message {
    let pcm: Vec<f32> = (0..FRAME)
        .map(|i| ((seq as usize * FRAME + i) as f32 * 440.0 / RATE as f32 * std::f32::consts::TAU).sin() * 0.3)
        .collect();
    let packet = encoder.encode_vec_float(&pcm, 1275).unwrap();
    Message::Binary(Bytes::from(FrameHeader::audio(seq, seq as u64 * 20_000).encode(&packet)))
}

pub fn silence_frame(encoder: &mut opus::Encoder, seq: u32) -> Message {
    let packet = encoder.encode_vec_float(&[0.0; FRAME], 1275).unwrap();
    Message::Binary(Bytes::from(FrameHeader::audio(seq, seq as u64 * 20_000).encode(&packet)))
}

/// Streams `frames` 20 ms frames in real time, the first `tone_frames` a tone and the rest silence
/// (as a microphone would); `false` as soon as the socket refuses one.
pub async fn speak<S: Sink<Message> + Unpin>(sink: &mut S, tone_frames: u32, frames: u32) -> bool {
    let mut encoder = encoder();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for seq in 0..frames {
        ticker.tick().await;
        let frame = if seq < tone_frames { tone_frame(&mut encoder, seq) } else { silence_frame(&mut encoder, seq) };
        if sink.send(frame).await.is_err() {
            return false;
        }
    }
    true
}
