//! Transport tests: a real server with the echo pipeline (no models) on 127.0.0.1:0, real speech
//! (LibriVox clips) through the client library, and misbehaving raw clients. Each bad input must
//! get its error event or close code, be counted, and leave a concurrent healthy session alone.
use futures_util::{SinkExt, StreamExt};
use parley_client::talk::{Clip, TalkOptions};
use parley_protocol::event::CancelReason;
use parley_protocol::{ClientEvent, CloseCode, ErrorCode, FrameHeader, ServerEvent};
use parley_server::config::{Config, EchoMode};
use parley_server::conversation::echo::EchoPipeline;
use parley_server::metrics::{CloseReason, InputError};
use parley_tests::TestServer;
use parley_tests::ws::{
    FRAME, Response, Ws, encoder, expect_close, http, next_error, next_event, silence_frame, tone_frame,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Bytes, Message};

const RATE: u32 = 48_000;

async fn connect(server: &TestServer) -> Ws {
    parley_tests::ws::connect(&server.url()).await
}

/// A server with the echo pipeline.
async fn start(config: Config) -> TestServer {
    let pipeline = Arc::new(EchoPipeline::new(config.echo.clone()));
    TestServer::start(config, pipeline).await
}

fn utterance_config() -> Config {
    let mut config = Config::default();
    config.echo.mode = EchoMode::Utterance;
    config.echo.endpoint_silence_ms = 600;
    config
}

/// The first LibriVox clips at the stream rate.
fn speech(n: usize) -> Vec<Clip> {
    parley_tests::speech_clips()
        .into_iter()
        .take(n)
        .map(|clip| {
            let (samples, rate) = parley_tests::read_wav(&clip.path);
            let samples = parley_client::audio::resample(&samples, rate, RATE).unwrap();
            Clip { name: clip.path.display().to_string(), samples }
        })
        .collect()
}

/// A well-behaved session beside the misbehaving ones: streams `frames` tone frames in real time
/// and returns how many echoed frames came back.
fn healthy_session(url: String, frames: u32) -> JoinHandle<u32> {
    tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut encoder = encoder();
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        let mut received = 0;
        let mut seq = 0;
        loop {
            tokio::select! {
                // The tone, then silence (as a microphone would) until the echo is back.
                _ = ticker.tick(), if seq < frames + 400 => {
                    let message = if seq < frames { tone_frame(&mut encoder, seq) } else { silence_frame(&mut encoder, seq) };
                    ws.send(message).await.unwrap();
                    seq += 1;
                }
                // Frame echo answers each frame; utterance echo answers after the tone ends.
                message = tokio::time::timeout(Duration::from_millis(2000), ws.next()) => match message {
                    Ok(Some(Ok(Message::Binary(_)))) => received += 1,
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => panic!("healthy session ended: {other:?}"),
                    Err(_) if seq >= frames + 400 => break,
                    Err(_) => {}
                },
            }
            if seq >= frames && received + 5 >= frames {
                break;
            }
        }
        let _ = ws.close(None).await;
        received
    })
}

async fn assert_healthy(session: JoinHandle<u32>, frames: u32) {
    let received = session.await.unwrap();
    assert!(received + 5 >= frames, "healthy session got {received} of {frames} frames back");
}

/// 20 ms RMS envelope.
fn envelope(samples: &[f32]) -> Vec<f32> {
    samples.chunks(FRAME).map(|c| (c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32).sqrt()).collect()
}

/// Best Pearson correlation of two envelopes over lags 0..max_lag (b delayed against a).
fn best_correlation(a: &[f32], b: &[f32], max_lag: usize) -> f32 {
    (0..max_lag)
        .map(|lag| {
            let n = a.len().min(b.len().saturating_sub(lag));
            let (x, y) = (&a[..n], &b[lag..lag + n]);
            let (mx, my) = (x.iter().sum::<f32>() / n as f32, y.iter().sum::<f32>() / n as f32);
            let cov: f32 = x.iter().zip(y).map(|(p, q)| (p - mx) * (q - my)).sum();
            let vx: f32 = x.iter().map(|p| (p - mx).powi(2)).sum();
            let vy: f32 = y.iter().map(|q| (q - my).powi(2)).sum();
            cov / (vx * vy).sqrt().max(1e-12)
        })
        .fold(f32::MIN, f32::max)
}

/// The status line and body of the response to `request`.
async fn http_get(addr: SocketAddr, request: &str) -> (String, String) {
    let response = http(addr, request).await;
    (response.head.lines().next().unwrap_or_default().to_string(), response.body)
}

/// Waits (15 s at most) until `condition` holds.
async fn wait_for(what: &str, condition: impl FnMut() -> bool) {
    parley_tests::wait_until(what, Duration::from_secs(15), condition).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_echo_returns_the_speech_with_sequence_and_timestamps() {
    let server = start(Config::default()).await;
    let clips = speech(1);
    let options = TalkOptions { server: server.url(), pause_ms: 600, wait_for_reply: false, ..TalkOptions::default() };
    let result = parley_client::talk(&options, &clips).await.unwrap();

    assert_eq!(result.report.pipeline, "echo");
    assert!(
        result.frames.len() + 10 >= result.sent_us.len(),
        "{} of {} frames echoed",
        result.frames.len(),
        result.sent_us.len()
    );
    assert_eq!(result.seq_gaps, 0);
    for (i, frame) in result.frames.iter().enumerate() {
        assert_eq!(frame.seq, i as u32, "server frames are numbered 0, 1, 2, …");
    }
    // Each echoed frame carries the timestamp of a frame the client sent, in order, and arrives after it.
    let sent: std::collections::HashSet<u64> = result.sent_us.iter().copied().collect();
    let stamped: Vec<_> = result.frames.iter().filter(|f| f.timestamp_us > 0).collect();
    assert!(stamped.len() + 10 >= result.frames.len());
    for pair in stamped.windows(2) {
        assert!(pair[0].timestamp_us <= pair[1].timestamp_us);
    }
    for frame in &stamped {
        assert!(sent.contains(&frame.timestamp_us), "timestamp {} was never sent", frame.timestamp_us);
        assert!(frame.received_us > frame.timestamp_us);
    }
    // The reply is the speech: its energy envelope follows the input's.
    let correlation = best_correlation(&envelope(&clips[0].samples), &envelope(&result.reply_audio), 25);
    assert!(correlation > 0.8, "envelope correlation {correlation}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_echo_returns_every_frame_as_sent() {
    let mut config = Config::default();
    config.echo.mode = EchoMode::Packet;
    let server = start(config).await;
    let clips = speech(1);
    let options = TalkOptions { server: server.url(), pause_ms: 600, wait_for_reply: false, ..TalkOptions::default() };
    let result = parley_client::talk(&options, &clips).await.unwrap();
    // Nothing is decoded or re-encoded: every frame comes back, in order, with the client's own
    // header (the last may still be in flight when the client closes).
    let (echoed, sent) = (result.frames.len(), result.sent_us.len());
    assert!(echoed <= sent && echoed + 1 >= sent, "{echoed} of {sent} frames echoed");
    assert_eq!(result.seq_gaps, 0);
    // The server timed each echo's turnaround (read → written).
    let timed = server.metrics.echo_turnaround_seconds.count();
    assert!(timed >= echoed as u64 && timed <= sent as u64, "{timed} turnarounds for {echoed} echoes");
    let sent_at: std::collections::HashSet<u64> = result.sent_us.iter().copied().collect();
    for pair in result.frames.windows(2) {
        assert!(pair[0].seq < pair[1].seq && pair[0].timestamp_us <= pair[1].timestamp_us, "{pair:?}");
    }
    for frame in &result.frames {
        assert!(sent_at.contains(&frame.timestamp_us), "timestamp {} was never sent", frame.timestamp_us);
        assert!(frame.received_us > frame.timestamp_us);
    }
    let correlation = best_correlation(&envelope(&clips[0].samples), &envelope(&result.reply_audio), 25);
    assert!(correlation > 0.8, "envelope correlation {correlation}");
    // A gap is reported as in the decoding modes, and frames out of order are refused.
    let mut ws = connect(&server).await;
    let mut encoder = encoder();
    ws.send(tone_frame(&mut encoder, 5)).await.unwrap();
    ws.send(tone_frame(&mut encoder, 3)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::FrameOutOfOrder);
    ws.send(tone_frame(&mut encoder, 8)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::FramesLost);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utterance_echo_reports_turns_with_latency() {
    let server = start(utterance_config()).await;
    let clips = speech(2);
    let options = TalkOptions { server: server.url(), pause_ms: 300, ..TalkOptions::default() };
    let result = parley_client::talk(&options, &clips).await.unwrap();
    let report = &result.report;
    assert_eq!(report.turns.len(), 2);
    assert_eq!((report.accounting.utterances, report.accounting.answered), (2, 2), "{report:?}");
    for (i, (turn, clip)) in report.turns.iter().zip(&clips).enumerate() {
        assert_eq!((turn.outcome, turn.utterance), (parley_client::report::Outcome::Answered, Some(i)), "{turn:?}");
        let clip_ms = clip.samples.len() as u64 * 1000 / RATE as u64;
        assert!(turn.reply_audio_ms > clip_ms / 3, "reply {} ms for a {clip_ms} ms clip", turn.reply_audio_ms);
        let latency = &turn.latency_ms;
        assert!(latency.voice_to_voice.is_some_and(|v| v > 0.0), "{latency:?}");
        let stages: Vec<&str> = latency.server_marks.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(stages, ["speech_end", "endpoint", "first_audio", "first_frame_sent"]);
        assert!(latency.server_total.is_some_and(|t| t > 0.0));
    }
    let metrics = server.metrics.render();
    assert!(
        metrics.contains("parley_turn_seconds_count 2") || metrics.contains("parley_turn_seconds_count 3"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_during_a_reply_cancels_it() {
    let server = start(utterance_config()).await;
    let mut clips = speech(3);
    clips.remove(1);
    // The second clip starts while the first one's echo is playing.
    let options = TalkOptions { server: server.url(), pause_ms: 1200, wait_for_reply: false, ..TalkOptions::default() };
    let result = parley_client::talk(&options, &clips).await.unwrap();
    let cancelled = result.events.iter().find_map(|(_, e)| match e {
        ServerEvent::ReplyCancelled { turn, reason, played_ms, sent_ms } => {
            Some((*turn, *reason, *played_ms, *sent_ms))
        }
        _ => None,
    });
    let (turn, reason, played, sent) = cancelled.expect("a reply.cancelled event");
    assert_eq!(turn, 1);
    assert_eq!(reason, CancelReason::BargeIn);
    assert!(played <= sent && sent > 0, "played {played} ms, sent {sent} ms");
    assert!(!result.report.turns[0].cancelled.is_empty());
    assert!(server.metrics.replies_cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_on_the_same_port() {
    let server = start(Config::default()).await;
    let (status, body) = http_get(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (status, body) = http_get(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("# TYPE parley_sessions_active gauge"), "{body}");
    assert!(body.contains("parley_stage_seconds_bucket{stage=\"endpoint\",le=\"+Inf\"} 0"));
    assert_eq!(http_get(server.addr, "GET /nope HTTP/1.1\r\n\r\n").await.0, "HTTP/1.1 404 Not Found");
    assert_eq!(http_get(server.addr, "POST /healthz HTTP/1.1\r\n\r\n").await.0, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(http_get(server.addr, "GET /v1/voice HTTP/1.1\r\n\r\n").await.0, "HTTP/1.1 426 Upgrade Required");
    assert_eq!(http_get(server.addr, "BLAH\r\n\r\n").await.0, "HTTP/1.1 400 Bad Request");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_at_the_root_with_a_strict_policy() {
    let server = start(Config::default()).await;
    let Response { head, body, .. } = http(server.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    for header in
        ["Content-Type: text/html", "Content-Security-Policy: default-src 'self'", "X-Content-Type-Options: nosniff"]
    {
        assert!(head.contains(header), "{header} missing in {head}");
    }
    assert!(body.contains("<script type=\"module\" src=\"/app.js\">"), "{body}");
    let (status, body) = http_get(server.addr, "GET /worklets.js HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("registerProcessor(\"player\""), "{body}");
    assert_eq!(http_get(server.addr, "GET /../Cargo.toml HTTP/1.1\r\n\r\n").await.0, "HTTP/1.1 404 Not Found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_events_and_the_session_goes_on() {
    let server = start(Config::default()).await;
    let healthy = healthy_session(server.url(), 100);
    let mut ws = connect(&server).await;
    assert!(matches!(next_event(&mut ws).await, ServerEvent::SessionCreated { .. }));
    let mut encoder = encoder();

    ws.send(Message::Binary(Bytes::from_static(b"\x09garbage, not a frame"))).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadFrame);
    ws.send(Message::Binary(Bytes::from_static(b"\x01\x01"))).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadFrame);
    // A valid header carrying a packet that is not one 20 ms Opus frame (a 10 ms TOC byte).
    ws.send(Message::Binary(Bytes::from(FrameHeader::audio(0, 0).encode(&[18 << 3, 1, 2, 3])))).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadAudio);
    ws.send(Message::text(r#"{"type":"input_audio_buffer.append","audio":"..."}"#)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::UnknownEvent);
    ws.send(Message::text("{definitely not json")).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::InvalidJson);
    ws.send(Message::text(r#"{"type":"session.update","session":{"input_sample_rate":44100}}"#)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::InvalidEvent);
    // Frames out of order: 5 is accepted, 3 is dropped, a gap to 8 is concealed.
    ws.send(tone_frame(&mut encoder, 5)).await.unwrap();
    ws.send(tone_frame(&mut encoder, 3)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::FrameOutOfOrder);
    ws.send(tone_frame(&mut encoder, 8)).await.unwrap();
    assert_eq!(next_error(&mut ws).await, ErrorCode::FramesLost);
    // Still served: typed text is echoed, audio comes back.
    ws.send(Message::text(ClientEvent::ConversationItemCreate { text: "still there?".into() }.to_json()))
        .await
        .unwrap();
    loop {
        if let ServerEvent::ResponseTextDone { text, .. } = next_event(&mut ws).await {
            assert_eq!(text, "still there?");
            break;
        }
    }
    let m = &server.metrics;
    assert_eq!(m.input_errors(InputError::BadFrame), 2);
    assert_eq!(m.input_errors(InputError::BadAudio), 1);
    assert_eq!(m.input_errors(InputError::UnknownEvent), 1);
    assert_eq!(m.input_errors(InputError::InvalidJson), 1);
    assert_eq!(m.input_errors(InputError::OutOfOrder), 1);
    assert_eq!(m.frames_lost.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_healthy(healthy, 100).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_bad_messages_close_with_1008() {
    let config = Config { max_consecutive_errors: 5, ..Config::default() };
    let server = start(config).await;
    let mut ws = connect(&server).await;
    for _ in 0..5 {
        ws.send(Message::Binary(Bytes::from_static(b"junk"))).await.unwrap();
    }
    let (code, _, errors) = expect_close(&mut ws).await;
    assert_eq!(code, CloseCode::PolicyViolation.code());
    assert_eq!(errors.len(), 5);
    wait_for("the session to end", || server.metrics.sessions_closed(CloseReason::TooManyErrors) == 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_closes_with_1009() {
    let config = Config { max_message_bytes: 4096, ..Config::default() };
    let server = start(config).await;
    let healthy = healthy_session(server.url(), 75);
    let mut ws = connect(&server).await;
    ws.send(Message::text(format!(r#"{{"type":"conversation.item.create","text":"{}"}}"#, "a".repeat(10_000))))
        .await
        .unwrap();
    let (code, reason, errors) = expect_close(&mut ws).await;
    assert_eq!(code, CloseCode::MessageTooBig.code());
    assert!(reason.contains("4096"), "{reason}");
    assert_eq!(errors, [ErrorCode::MessageTooBig]);
    assert_eq!(server.metrics.input_errors(InputError::MessageTooBig), 1);
    assert_healthy(healthy, 75).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_others_go_on() {
    let config =
        Config { write_timeout_ms: 500, socket_send_buffer: Some(4096), opus_bitrate: 256_000, ..Config::default() };
    let server = start(config).await;
    let healthy = healthy_session(server.url(), 150);

    // A client with a tiny receive window that sends loud noise in real time and never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(server.url(), stream).await.unwrap();
    let (mut sink, stream) = ws.split();
    let mut encoder = encoder();
    encoder.set_bitrate(opus::Bitrate::Bits(256_000)).unwrap();
    let mut noise = 12345u32;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for seq in 0..1500u32 {
        ticker.tick().await;
        let pcm: Vec<f32> = (0..FRAME)
            .map(|_| {
                noise = noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (noise >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect();
        let packet = encoder.encode_vec_float(&pcm, 1275).unwrap();
        let message = Message::Binary(Bytes::from(FrameHeader::audio(seq, 0).encode(&packet)));
        if sink.send(message).await.is_err() || server.metrics.sessions_closed(CloseReason::SlowConsumer) == 1 {
            break;
        }
    }
    drop(stream);
    // The client's send can fail (the server closed the socket) just before the close is counted.
    wait_for("the slow reader to be closed", || server.metrics.sessions_closed(CloseReason::SlowConsumer) == 1).await;
    assert_healthy(healthy, 150).await;
    wait_for("sessions to end", || server.metrics.sessions_active.load(std::sync::atomic::Ordering::Relaxed) == 0)
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_reply_is_counted_and_harmless() {
    let server = start(utterance_config()).await;
    let healthy = healthy_session(server.url(), 150);
    let clip = speech(1).remove(0);
    let mut ws = connect(&server).await;
    let mut encoder = encoder();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let silence = vec![0.0f32; FRAME];
    let mut seq = 0u32;
    // Speak, then silence until the reply starts; then vanish without a close frame.
    'outer: loop {
        ticker.tick().await;
        let begin = seq as usize * FRAME;
        let pcm = clip.samples.get(begin..begin + FRAME).unwrap_or(&silence);
        let packet = encoder.encode_vec_float(pcm, 1275).unwrap();
        ws.send(Message::Binary(Bytes::from(FrameHeader::audio(seq, 0).encode(&packet)))).await.unwrap();
        seq += 1;
        assert!(seq < 2000, "no reply started");
        while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(1), ws.next()).await {
            if let Message::Text(text) = message
                && let Ok(ServerEvent::ResponseAudioStarted { .. }) = ServerEvent::parse(text.as_str())
            {
                break 'outer;
            }
        }
    }
    drop(ws);
    wait_for("the session to end", || server.metrics.sessions_closed(CloseReason::ClientGone) == 1).await;
    assert_healthy(healthy, 150).await;
    wait_for("sessions to end", || server.metrics.sessions_active.load(std::sync::atomic::Ordering::Relaxed) == 0)
        .await;
    server.stop().await;
}
