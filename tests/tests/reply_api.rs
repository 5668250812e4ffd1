//! The external reply backend (`[reply] backend = "openai"`) against a real OpenAI-compatible
//! server: llama-cpp-python's, serving the embedded model's own GGUF (`scripts/llama-server`,
//! built once by `scripts/test`). Typed turns through the real Parley server; the safety gates,
//! chunking and synthesis are the embedded path's. An endpoint that accepts connections but never
//! answers gives each turn an `error` event within its timeouts, turn after turn.
use parley_client::eval::{EvalOptions, Mode, text_conversation};
use parley_protocol::ServerEvent;
use parley_protocol::event::SafetyStage;
use parley_server::config::Config;
use parley_server::conversation::voice::{VoiceConfig, VoicePipeline};
use parley_server::models::Manifest;
use parley_server::models::chat_api::{Backend, ReplyConfig};
use parley_server::safety::SafetyConfig;
use parley_tests::TestServer;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long llama-cpp-python may take to load the model and listen.
const SERVER_START: Duration = Duration::from_secs(120);

/// The llama-cpp-python server process, killed when dropped.
struct LlamaServer {
    child: Child,
    port: u16,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:`port`: the status line, or None when nothing answers.
async fn http_status(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.ok()?.ok()?;
    String::from_utf8_lossy(&response).lines().next().map(String::from)
}

/// Starts `scripts/llama-server serve` on a free port and waits until it answers `/v1/models`.
async fn llama_server() -> LlamaServer {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama-server");
    let port = free_port();
    let child = Command::new(&script)
        .args(["serve", "--port", &port.to_string(), "--verbose", "False"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let mut server = LlamaServer { child, port };
    let started = Instant::now();
    loop {
        if let Some(status) = http_status(port, "/v1/models").await {
            assert!(status.contains(" 200 "), "llama-cpp-python answered /v1/models with {status}");
            return server;
        }
        if let Ok(Some(exit)) = server.child.try_wait() {
            panic!("scripts/llama-server serve exited with {exit} (run `scripts/llama-server setup` first)");
        }
        assert!(started.elapsed() < SERVER_START, "llama-cpp-python did not listen within {SERVER_START:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn parley(reply: ReplyConfig) -> TestServer {
    let pipeline = tokio::task::spawn_blocking(move || {
        let manifest = Manifest::load_default().unwrap_or_else(|e| panic!("{e}"));
        let safety = SafetyConfig {
            audit_log: std::env::temp_dir().join(format!("parley-test-reply-audit-{}.jsonl", std::process::id())),
            ..Default::default()
        };
        Arc::new(
            VoicePipeline::load(manifest, VoiceConfig::default(), &safety, &reply).unwrap_or_else(|e| panic!("{e}")),
        )
    })
    .await
    .unwrap();
    TestServer::start(Config::default(), pipeline).await
}

fn options(server: &TestServer) -> EvalOptions {
    EvalOptions {
        server: server.url(),
        modes: vec![Mode::Text],
        voices: vec![],
        concurrency: 1,
        reply_timeout_ms: 90_000,
        sample_rate: 48_000,
    }
}

/// The reply text of each turn's events (its `response.text.done`).
fn replies(events: &[Vec<ServerEvent>]) -> Vec<String> {
    let text = |turn: &[ServerEvent]| {
        turn.iter().find_map(|e| match e {
            ServerEvent::ResponseTextDone { text, .. } => Some(text.clone()),
            _ => None,
        })
    };
    events.iter().map(|turn| text(turn).unwrap_or_default()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_from_a_real_openai_compatible_server_and_remember_the_conversation() {
    let llama = llama_server().await;
    let reply = ReplyConfig {
        backend: Backend::Openai,
        base_url: format!("http://127.0.0.1:{}/v1", llama.port),
        model: "qwen2.5-coder-0.5b-instruct".into(),
        ..Default::default()
    };
    let server = parley(reply).await;
    let texts = ["What is the capital of France?", "My dog is called Max.", "What is my dog called?"].map(String::from);
    let mut events = vec![Vec::new(); 3];
    let mut audio = false;
    text_conversation(&options(&server), &texts, &mut events, &mut audio).await.unwrap();
    let said = replies(&events);
    assert!(said[0].contains("Paris"), "{said:?}");
    // The name is only in an earlier turn: the endpoint got the conversation.
    assert!(said[2].contains("Max"), "{said:?}");
    assert!(audio, "the last reply was spoken");
    // The reply went through the output gate and the voice gate like the embedded model's.
    let gated = |stage: SafetyStage| {
        events[0].iter().any(|e| matches!(e, ServerEvent::SafetyDecision { stage: s, .. } if *s == stage))
    };
    assert!(gated(SafetyStage::Output) && gated(SafetyStage::Voice), "{:?}", events[0]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_gives_an_error_event_not_a_hang() {
    // Accepts every connection and never sends a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let reply = ReplyConfig {
        backend: Backend::Openai,
        base_url: format!("http://{addr}/v1"),
        model: "m".into(),
        first_byte_timeout_ms: 500,
        retries: 1,
        ..Default::default()
    };
    let server = parley(reply).await;
    let texts = ["What is the capital of France?".to_string()];
    for _ in 0..2 {
        let (mut events, mut audio) = (vec![Vec::new()], false);
        let started = Instant::now();
        let error = text_conversation(&options(&server), &texts, &mut events, &mut audio).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("reply endpoint") && text.contains("no response in 500 ms"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(30), "the error took {:?}", started.elapsed());
    }
    server.stop().await;
}
