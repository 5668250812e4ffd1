//! Authentication with the echo pipeline on 127.0.0.1:0 and raw clients: every endpoint but
//! liveness, readiness and the page's files needs an API key (`Authorization: Bearer`) or a
//! client secret minted with one (`POST /v1/realtime/client_secrets`, also accepted as the
//! browser subprotocol `openai-insecure-api-key.<secret>`, on any instance sharing the signing
//! secret); a missing, wrong or expired credential gets 401 before the upgrade, a key over its
//! session cap or connection rate 429 with `Retry-After`; every denial is counted.
use parley_client::TalkError;
use parley_protocol::ServerEvent;
use parley_server::auth::{AuthConfig, KeyConfig, key_sha256};
use parley_server::config::Config;
use parley_server::conversation::echo::EchoPipeline;
use parley_tests::TestServer;
use parley_tests::ws::{Response, Ws, get, http, mint, next_event};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn key(id: &str, max_sessions: Option<usize>, per_minute: Option<u32>) -> KeyConfig {
    KeyConfig {
        id: id.into(),
        sha256: key_sha256(&format!("pk_{id}")),
        max_sessions,
        connections_per_minute: per_minute,
    }
}

async fn start(token_secret: &str) -> TestServer {
    let keys = vec![key("capped", Some(1), None), key("slow", None, Some(2)), key("free", None, None)];
    let auth = AuthConfig { keys, token_secret: Some(token_secret.into()), allow_anonymous: false };
    let config = Config { auth, ..Config::default() };
    TestServer::start(config.clone(), Arc::new(EchoPipeline::new(config.echo.clone()))).await
}

/// Opens `path` with `header` set to `value`: the session, or the HTTP status and `Retry-After`
/// of its refusal.
async fn open(addr: SocketAddr, path: &str, header: Option<(&str, &str)>) -> Result<Ws, (u16, Option<String>)> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some((name, value)) = header {
        request
            .headers_mut()
            .insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    match parley_tests::ws::upgrade(request).await {
        Ok(ws) => Ok(ws),
        Err(TalkError::Refused { status, retry_after, .. }) => Err((status, retry_after)),
        Err(e) => panic!("{e}"),
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_client_secrets_gate_every_endpoint_but_health_and_the_page() {
    let server = start(SECRET).await;
    let addr = server.addr;
    // Open to all: liveness, readiness (which says auth is on) and the page.
    assert_eq!(http(addr, &get("/healthz", None)).await.status, 200);
    let Response { status, body, .. } = http(addr, &get("/readyz", None)).await;
    assert_eq!((status, body.contains("\"auth\":true")), (200, true), "{body}");
    assert_eq!(http(addr, &get("/", None)).await.status, 200);
    // Metrics and sessions need a key: none or a wrong one is 401 with a challenge.
    let Response { status, head, body } = http(addr, &get("/metrics", None)).await;
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Bearer") && body.contains("missing_api_key"), "{head}\n{body}");
    assert_eq!(http(addr, &get("/metrics", Some("pk_wrong"))).await.status, 401);
    assert_eq!(open(addr, "/v1/voice", None).await.err(), Some((401, None)));
    assert_eq!(open(addr, "/v1/voice", Some(("Authorization", "Bearer pk_wrong"))).await.err(), Some((401, None)));
    let Response { status, body: metrics, .. } = http(addr, &get("/metrics", Some("pk_free"))).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("parley_auth_denied_total{code=\"missing_api_key\"} 2"), "{metrics}");
    assert!(metrics.contains("parley_auth_denied_total{code=\"invalid_api_key\"} 2"), "{metrics}");

    // A key's session cap: the second session is 429, another key is unaffected.
    let mut first = open(addr, "/v1/voice", Some(("Authorization", &bearer("pk_capped")))).await.unwrap();
    assert!(matches!(next_event(&mut first).await, ServerEvent::SessionCreated { .. }));
    assert_eq!(
        open(addr, "/v1/voice", Some(("Authorization", &bearer("pk_capped")))).await.err(),
        Some((429, Some("1".into())))
    );
    drop(open(addr, "/v1/voice", Some(("Authorization", &bearer("pk_free")))).await.unwrap());
    drop(first);
    // A key's connection rate: two a minute, the third waits (half a minute for the next token).
    for _ in 0..2 {
        drop(open(addr, "/v1/voice", Some(("Authorization", &bearer("pk_slow")))).await.unwrap());
    }
    let (status, retry) = open(addr, "/v1/voice", Some(("Authorization", &bearer("pk_slow")))).await.unwrap_err();
    assert_eq!(status, 429);
    assert!(retry.is_some_and(|s| (25..=30).contains(&s.parse::<u64>().unwrap())));

    // A client secret, minted with a key in OpenAI's shape, opens the Realtime endpoint as a
    // bearer token or as the browser subprotocol (never echoed), on this instance and on another
    // one sharing the signing secret, but not one with its own.
    let Response { status, body, .. } =
        http(addr, &mint("pk_free", r#"{"expires_after":{"anchor":"created_at","seconds":60}}"#)).await;
    assert_eq!(status, 200, "{body}");
    let minted: serde_json::Value = serde_json::from_str(&body).unwrap();
    let secret = minted["value"].as_str().unwrap().to_string();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(secret.starts_with("ek_") && (now + 55..=now + 61).contains(&minted["expires_at"].as_u64().unwrap()));
    assert_eq!(minted["session"]["type"], "realtime");
    let realtime = "/v1/realtime?model=parley";
    drop(open(addr, realtime, Some(("Authorization", &bearer(&secret)))).await.unwrap());
    let protocols = format!("realtime, openai-insecure-api-key.{secret}");
    let (ws, response) = {
        let mut request = format!("ws://{addr}{realtime}").into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&protocols).unwrap());
        tokio_tungstenite::connect_async(request).await.unwrap()
    };
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "realtime");
    drop(ws);
    let twin = start(SECRET).await;
    drop(open(twin.addr, realtime, Some(("Authorization", &bearer(&secret)))).await.unwrap());
    let stranger = start(&SECRET.replace('0', "f")).await;
    assert_eq!(open(stranger.addr, realtime, Some(("Authorization", &bearer(&secret)))).await.err(), Some((401, None)));
    // A secret cannot mint another; a bad lifetime is a 400.
    assert_eq!(http(addr, &mint(&secret, "{}")).await.status, 403);
    assert_eq!(http(addr, &mint("pk_free", r#"{"expires_after":{"seconds":5}}"#)).await.status, 400);
    assert_eq!(http(addr, &mint("pk_free", "not json")).await.status, 400);
    assert_eq!(http(addr, &mint("pk_wrong", "{}")).await.status, 401);

    // An expired secret: 401 (the shortest lifetime is 10 s).
    let body = http(addr, &mint("pk_free", r#"{"expires_after":{"seconds":10}}"#)).await.body;
    let short: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expires_at = short["expires_at"].as_u64().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    tokio::time::sleep(Duration::from_secs(expires_at.saturating_sub(now) + 1)).await;
    let expired = bearer(short["value"].as_str().unwrap());
    assert_eq!(open(addr, realtime, Some(("Authorization", &expired))).await.err(), Some((401, None)));
    assert_eq!(server.metrics.auth_denials("expired_client_secret"), 1);
    assert_eq!(server.metrics.auth_denials("key_session_limit"), 1);
    assert_eq!(server.metrics.auth_denials("rate_limit_exceeded"), 1);
    server.stop().await;
    twin.stop().await;
    stranger.stop().await;
}

#[test]
fn listening_beyond_loopback_needs_keys_or_an_explicit_waiver() {
    let open = "listen = \"0.0.0.0:9000\"\nallow_plaintext = true\n";
    let error = Config::from_toml(open).unwrap_err().to_string();
    assert!(error.contains("auth"), "{error}");
    assert!(Config::from_toml(&format!("{open}[auth]\nallow_anonymous = true\n")).is_ok());
    let keyed = format!("{open}[[auth.keys]]\nid = \"a\"\nsha256 = \"{}\"\n", key_sha256("pk_a"));
    assert!(Config::from_toml(&keyed).is_ok());
    assert!(Config::from_toml(&format!("{open}[[auth.keys]]\nid = \"a\"\nsha256 = \"beef\"\n")).is_err());
}
