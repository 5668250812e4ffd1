//! Whole sessions: a real server (echo pipeline, frame mode) on loopback, fed arbitrary message
//! sequences over a real WebSocket on either endpoint. No input may panic the server (libFuzzer
//! aborts on a panic in any thread) or leave it unable to serve the next session; every session
//! ends when the client closes.
//!
//! Input: one byte choosing the endpoint (even: `/v1/voice`, odd: `/v1/realtime`), then messages,
//! each a kind byte, a length byte and that many payload bytes. Kinds: text, binary, ping, a v1
//! audio frame (a valid header before the payload, which the Opus decoder gets), a Realtime
//! `input_audio_buffer.append` of the payload.
#![no_main]
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use parley_protocol::FrameHeader;
use parley_server::config::{Config, EchoMode};
use parley_server::conversation::echo::EchoPipeline;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

struct Harness {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let addr = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut config = Config { max_sessions: 1024, ..Config::default() };
            // Frame mode: every audio message goes through the Opus decoder (packet mode would
            // send it back undecoded).
            config.echo.mode = EchoMode::Frame;
            let pipeline = Arc::new(EchoPipeline::new(config.echo.clone()));
            let metrics = Default::default();
            tokio::spawn(parley_server::run_with_pipeline(
                listener,
                config,
                pipeline,
                metrics,
                std::future::pending::<()>(),
            ));
            addr
        });
        Harness { runtime, addr }
    })
}

fn messages(mut data: &[u8], seq: &mut u32) -> Vec<Message> {
    let mut out = Vec::new();
    while let [kind, len, rest @ ..] = data {
        let (payload, tail) = rest.split_at((*len as usize).min(rest.len()));
        data = tail;
        out.push(match kind % 5 {
            0 => Message::text(String::from_utf8_lossy(payload).into_owned()),
            1 => Message::binary(payload.to_vec()),
            2 => Message::Ping(payload.to_vec().into()),
            3 => {
                *seq += 1;
                let header = FrameHeader::audio(*seq, u64::from(*seq) * 20_000);
                Message::binary(header.encode(payload))
            }
            _ => {
                let audio = base64::engine::general_purpose::STANDARD.encode(payload);
                Message::text(format!(r#"{{"type":"input_audio_buffer.append","audio":"{audio}"}}"#))
            }
        });
    }
    out
}

async fn session(addr: SocketAddr, data: &[u8]) {
    let Some((endpoint, rest)) = data.split_first() else { return };
    let path = if endpoint % 2 == 0 { "/v1/voice" } else { "/v1/realtime?model=parley" };
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.expect("a session opens");
    let mut seq = 0;
    for message in messages(rest, &mut seq) {
        if ws.send(message).await.is_err() {
            break;
        }
    }
    // The client closes; the server answers and ends the session (or had closed it already).
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    harness.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), session(harness.addr, data))
            .await
            .expect("the session ends within 10 s of the client's close");
    });
});
