//! A minimal HTTP/1.1 front door: reads one request head (and a small body), writes one response,
//! and performs the WebSocket upgrade for the voice endpoints. Every response closes the
//! connection; nothing here is a general HTTP server.
use crate::conn::Conn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Headers parsed at most.
const MAX_HEADERS: usize = 32;
/// The subprotocol prefix browsers carry a key in (the OpenAI Realtime API's convention).
pub const INSECURE_KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// A parsed request head, plus any bytes the client sent after it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (a client may send its first WebSocket frame early).
    pub rest: Vec<u8>,
}

impl Request {
    /// A header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The comma-separated values of a header, trimmed (none when it is absent).
    pub fn tokens(&self, name: &str) -> impl Iterator<Item = &str> {
        self.header(name).unwrap_or_default().split(',').map(str::trim)
    }

    /// The credential presented: `Authorization: Bearer …`, or (browsers cannot set headers on a
    /// WebSocket) the subprotocol `openai-insecure-api-key.…`.
    pub fn credential(&self) -> Option<&str> {
        if let Some(value) = self.header("authorization") {
            let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
            return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
        }
        self.tokens("sec-websocket-protocol").find_map(|p| p.strip_prefix(INSECURE_KEY_PROTOCOL))
    }

    /// Whether the request asks for a WebSocket upgrade.
    pub fn is_websocket_upgrade(&self) -> bool {
        let has_token = |name: &str, token: &str| self.tokens(name).any(|t| t.eq_ignore_ascii_case(token));
        has_token("upgrade", "websocket") && has_token("connection", "upgrade")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed before a full request head")]
    Eof,
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads and parses one request head.
pub async fn read_request(stream: &mut Conn) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse_head(&buf)? {
            return Ok(request);
        }
    }
}

/// Parses the request head at the start of `buf` (bytes after it are kept as `rest`); `None`: it
/// is not complete yet.
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(Request {
            method: request.method.unwrap_or_default().to_string(),
            path: request.path.unwrap_or_default().to_string(),
            headers: request
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
            rest: buf[len..].to_vec(),
        })),
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => Ok(None),
        Ok(httparse::Status::Partial) => Err(HttpError::TooLarge),
        Err(e) => Err(HttpError::Malformed(e.to_string())),
    }
}

/// Reads the request's body (`Content-Length` bytes, at most `max`) after its head.
pub async fn read_body(stream: &mut Conn, request: &Request, max: usize) -> Result<Vec<u8>, HttpError> {
    let length = match request.header("content-length") {
        None => 0,
        Some(v) => v.trim().parse::<usize>().map_err(|_| HttpError::Malformed("bad Content-Length".into()))?,
    };
    if length > max {
        return Err(HttpError::Malformed(format!("body larger than {max} bytes")));
    }
    let mut body = request.rest.clone();
    body.truncate(length);
    let mut chunk = [0u8; 4096];
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Eof);
        }
        body.extend_from_slice(&chunk[..n.min(length - body.len())]);
    }
    Ok(body)
}

/// Writes a complete JSON response with extra header lines and closes the write side.
pub async fn respond_json(
    stream: &mut Conn,
    status: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> std::io::Result<()> {
    respond_with(stream, status, "application/json", headers, format!("{body}\n").as_bytes()).await
}

/// Writes a complete response and closes the write side.
pub async fn respond(stream: &mut Conn, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    respond_with(stream, status, content_type, &[], body.as_bytes()).await
}

/// Writes a complete response with extra header lines (`name: value`) and closes the write side.
pub async fn respond_with(
    stream: &mut Conn,
    status: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// The `101 Switching Protocols` answer to a valid upgrade request, or the error status to send.
/// `subprotocol`: the one to accept, of those the client offered.
pub fn upgrade_response(request: &Request, subprotocol: Option<&str>) -> Result<String, &'static str> {
    if request.header("sec-websocket-version") != Some("13") {
        return Err("426 Upgrade Required");
    }
    let key = request.header("sec-websocket-key").ok_or("400 Bad Request")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let protocol = subprotocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    ))
}
