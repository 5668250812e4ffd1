//! Admission and the session's life, with the echo pipeline on 127.0.0.1:0 and raw clients: a
//! server that cannot take a session answers 503 with `Retry-After` before the upgrade (loading,
//! full, draining) and `/readyz` says why; on shutdown a turn under way finishes before its
//! session is closed with 1001 (or the drain deadline cuts it); pings keep a quiet tunnel alive
//! without counting as activity; a session's time and byte budgets close it with 4002.
use futures_util::{SinkExt, StreamExt};
use parley_client::TalkError;
use parley_protocol::{CloseCode, ErrorCode, ServerEvent};
use parley_server::config::{Config, EchoMode};
use parley_server::conversation::Pipeline;
use parley_server::conversation::echo::EchoPipeline;
use parley_server::metrics::{CloseReason, Metrics, Refusal};
use parley_tests::TestServer;
use parley_tests::ws::{WAIT, Ws, connect, encoder, expect_close, next_event, speak, tone_frame};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

async fn start(config: Config) -> TestServer {
    let pipeline = Arc::new(EchoPipeline::new(config.echo.clone()));
    TestServer::start(config, pipeline).await
}

/// Head and body of a plain GET.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let response = parley_tests::ws::http(addr, &parley_tests::ws::get(path, None)).await;
    (response.head, response.body)
}

/// The upgrade is refused: its HTTP status, `Retry-After` and the error code of its JSON body.
async fn refused(url: &str) -> (u16, Option<String>, String) {
    match parley_tests::ws::upgrade(url).await {
        Err(TalkError::Refused { status, retry_after, code, .. }) => (status, retry_after, code.unwrap_or_default()),
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// Streams `tone_ms` of a tone, then silence, in real time, until the socket closes.
fn talk(mut tx: futures_util::stream::SplitSink<Ws, Message>, tone_ms: u32) -> JoinHandle<()> {
    tokio::spawn(async move {
        speak(&mut tx, tone_ms.div_ceil(20), u32::MAX).await;
    })
}

/// The next event matching `want`, skipping others (and audio).
async fn until_event(rx: &mut futures_util::stream::SplitStream<Ws>, want: impl Fn(&ServerEvent) -> bool) {
    loop {
        match tokio::time::timeout(WAIT, rx.next()).await.expect("event in time") {
            Some(Ok(Message::Text(text))) if want(&ServerEvent::parse(text.as_str()).unwrap()) => return,
            Some(Ok(Message::Close(frame))) => panic!("closed while waiting: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Close code and whether `response.audio.done` came before it.
async fn close_after(rx: &mut futures_util::stream::SplitStream<Ws>) -> (u16, bool) {
    let mut done = false;
    loop {
        match tokio::time::timeout(WAIT, rx.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), done),
            Some(Ok(Message::Text(text))) => {
                done |= matches!(ServerEvent::parse(text.as_str()), Ok(ServerEvent::ResponseAudioDone { .. }))
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_503_with_retry_after_before_the_upgrade() {
    let server = start(Config { max_sessions: 1, ..Config::default() }).await;
    let (head, _) = get(server.addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut first = connect(&server.url()).await;
    assert!(matches!(next_event(&mut first).await, ServerEvent::SessionCreated { .. }));
    assert_eq!(refused(&server.url()).await, (503, Some("2".into()), "server_full".into()));
    let realtime = format!("ws://{}/v1/realtime", server.addr);
    assert_eq!(refused(&realtime).await.0, 503);
    // The client library says so in the server's words.
    let options = parley_client::TalkOptions { server: server.url(), ..Default::default() };
    let clip = parley_client::talk::Clip { name: "silence".into(), samples: vec![0.0; 4_800] };
    match parley_client::talk(&options, &[clip]).await {
        Err(parley_client::TalkError::Refused { status: 503, retry_after, message, .. }) => {
            assert_eq!(retry_after.as_deref(), Some("2"));
            assert!(message.contains("server full"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let (head, body) = get(server.addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 503") && head.contains("Retry-After: 2"), "{head}");
    assert!(body.contains("\"status\":\"full\""), "{body}");
    // Liveness is not readiness.
    assert!(get(server.addr, "/healthz").await.0.starts_with("HTTP/1.1 200"));
    // The admitted session still works.
    let mut encoder = encoder();
    for seq in 0..10 {
        first.send(tone_frame(&mut encoder, seq)).await.unwrap();
    }
    loop {
        match tokio::time::timeout(WAIT, first.next()).await.unwrap() {
            Some(Ok(Message::Binary(_))) => break,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(server.metrics.sessions_refused(Refusal::Full), 3);
    first.close(None).await.unwrap();
    let ready = Instant::now();
    while !get(server.addr, "/readyz").await.0.starts_with("HTTP/1.1 200") {
        assert!(ready.elapsed() < WAIT, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connect(&server.url()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_the_models_load() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (loaded, load) = tokio::sync::oneshot::channel::<Arc<dyn Pipeline>>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config::default();
    let server = tokio::spawn(parley_server::serve(
        listener,
        config.clone(),
        async move { Ok(load.await.unwrap()) },
        Arc::new(Metrics::default()),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("ws://{addr}/v1/voice");
    assert!(get(addr, "/healthz").await.0.starts_with("HTTP/1.1 200"));
    let (head, body) = get(addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 503") && body.contains("\"status\":\"loading\""), "{head}\n{body}");
    assert!(get(addr, "/").await.0.starts_with("HTTP/1.1 200"), "the page is served while loading");
    assert_eq!(refused(&url).await, (503, Some("2".into()), "server_loading".into()));
    loaded.send(Arc::new(EchoPipeline::new(config.echo.clone()))).ok().unwrap();
    let ready = Instant::now();
    while !get(addr, "/readyz").await.0.starts_with("HTTP/1.1 200") {
        assert!(ready.elapsed() < WAIT, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = connect(&url).await;
    assert!(matches!(next_event(&mut ws).await, ServerEvent::SessionCreated { .. }));
    drop(ws);
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap().unwrap();
}

fn utterance_config() -> Config {
    let mut config = Config::default();
    config.echo.mode = EchoMode::Utterance;
    config.echo.endpoint_silence_ms = 300;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_turn_under_way_finish_then_closes_with_1001() {
    let mut server = start(utterance_config()).await;
    let (tx, mut talking) = connect(&server.url()).await.split();
    let mut idle = connect(&server.url()).await;
    assert!(matches!(next_event(&mut idle).await, ServerEvent::SessionCreated { .. }));
    let sender = talk(tx, 1500);
    until_event(&mut talking, |e| matches!(e, ServerEvent::ResponseAudioStarted { .. })).await;
    let signalled = Instant::now();
    server.signal_shutdown();
    // The idle session goes at once; the server says it is draining and takes no new session.
    let (code, _, errors) = expect_close(&mut idle).await;
    assert_eq!((code, errors), (CloseCode::GoingAway.code(), vec![ErrorCode::ShuttingDown]));
    let (head, body) = get(server.addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 503") && body.contains("\"status\":\"draining\""), "{head}\n{body}");
    assert_eq!(refused(&server.url()).await, (503, Some("2".into()), "server_shutting_down".into()));
    // The reply under way (1.5 s of echoed tone) is played out, then the session closes.
    let (code, done) = close_after(&mut talking).await;
    assert_eq!(code, CloseCode::GoingAway.code());
    assert!(done, "the reply was cut before its end");
    assert!(signalled.elapsed() > Duration::from_millis(800), "closed after {:?}", signalled.elapsed());
    sender.abort();
    let metrics = server.metrics.clone();
    server.drained().await;
    assert_eq!(metrics.sessions_closed(CloseReason::Shutdown), 2);
    assert_eq!(metrics.sessions_refused(Refusal::Draining), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_a_long_turn() {
    let mut server = start(Config { drain_timeout_ms: 300, ..utterance_config() }).await;
    let (tx, mut rx) = connect(&server.url()).await.split();
    let sender = talk(tx, 3000);
    until_event(&mut rx, |e| matches!(e, ServerEvent::ResponseAudioStarted { .. })).await;
    let signalled = Instant::now();
    server.signal_shutdown();
    let (code, done) = close_after(&mut rx).await;
    assert_eq!(code, CloseCode::GoingAway.code());
    assert!(!done && signalled.elapsed() < Duration::from_millis(1500), "after {:?}", signalled.elapsed());
    sender.abort();
    server.drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_quiet_tunnel_alive_but_do_not_count_as_activity() {
    let server = start(Config { ping_interval_s: 1, idle_timeout_s: 3, ..Config::default() }).await;
    let mut ws = connect(&server.url()).await;
    let opened = Instant::now();
    let mut pings = 0;
    // Reading answers each ping with a pong (tungstenite does); nothing else is sent.
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time") {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(pings >= 2, "{pings} pings");
    assert_eq!(code, CloseCode::IdleTimeout.code(), "after {:?}", opened.elapsed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_past_its_time_or_byte_budget_is_closed_with_4002() {
    let server = start(Config { max_session_s: 1, ..Config::default() }).await;
    let (tx, mut rx) = connect(&server.url()).await.split();
    let sender = talk(tx, 0);
    let opened = Instant::now();
    let (code, _) = close_after(&mut rx).await;
    assert_eq!(code, CloseCode::SessionLimit.code());
    assert!(opened.elapsed() >= Duration::from_millis(900), "after {:?}", opened.elapsed());
    sender.abort();
    server.stop().await;

    let server = start(Config { max_session_bytes: 4_000, ..Config::default() }).await;
    let (tx, mut rx) = connect(&server.url()).await.split();
    let sender = talk(tx, 10_000);
    let (code, _) = close_after(&mut rx).await;
    assert_eq!(code, CloseCode::SessionLimit.code());
    sender.abort();
    let metrics = server.metrics.clone();
    server.stop().await;
    assert_eq!(metrics.sessions_closed(CloseReason::Budget), 1);
}
