//! End-to-end voice tests: the real server with the voice pipeline (all models) on
//! 127.0.0.1:0, real speech streamed through the client library at real-time pace.
//! Needs a provisioned model cache (`models/provision.sh`).
use parley_client::talk::{Clip, TalkOptions, TalkResult};
use parley_protocol::ServerEvent;
use parley_protocol::event::CancelReason;
use parley_server::config::Config;
use parley_server::models::Manifest;
use parley_server::pipeline::voice::{VoiceConfig, VoicePipeline};
use parley_tests::{TestServer, espeak, read_wav, speech_clips, word_errors};
use std::sync::{Arc, OnceLock};

/// Stream rate of the test client (the protocol's default).
const RATE: u32 = 48_000;

/// The models, loaded once for the whole test binary and shared by every test's server.
fn pipeline() -> Arc<VoicePipeline> {
    static PIPELINE: OnceLock<Arc<VoicePipeline>> = OnceLock::new();
    PIPELINE
        .get_or_init(|| {
            let manifest = Manifest::load_default().unwrap_or_else(|e| panic!("{e}"));
            Arc::new(VoicePipeline::load(manifest, VoiceConfig::default()).unwrap_or_else(|e| panic!("{e}")))
        })
        .clone()
}

async fn server() -> TestServer {
    let pipeline = tokio::task::spawn_blocking(pipeline).await.unwrap();
    TestServer::start(Config::default(), pipeline).await
}

fn clip(name: &str, samples: &[f32], rate: u32) -> Clip {
    Clip { name: name.into(), samples: parley_client::audio::resample(samples, rate, RATE).unwrap() }
}

fn options(server: &TestServer) -> TalkOptions {
    // Generous: on 2 shared cores a reply can take seconds; tests check behaviour, not speed.
    TalkOptions {
        server: server.url(),
        reply_timeout_ms: 90_000,
        turn_start_timeout_ms: 10_000,
        ..TalkOptions::default()
    }
}

/// Transcribes reply audio (at `RATE`) with the server's own ASR engine.
async fn transcribe(audio: &[f32]) -> String {
    let audio16 = parley_client::audio::resample(audio, RATE, 16_000).unwrap();
    let engines = pipeline().engines().clone();
    let transcript = engines.asr.run(parley_server::engine::Priority::Low, move |asr| asr.transcribe(&audio16)).await;
    transcript.unwrap().unwrap().text
}

/// `text` spoken by the Piper voice, and its sample rate.
async fn piper(text: &str) -> (Vec<f32>, u32) {
    let engines = pipeline().engines().clone();
    let text = text.to_string();
    let audio = engines.tts.run(parley_server::engine::Priority::Low, move |tts| tts.synthesize(&text)).await;
    (audio.unwrap().unwrap(), engines.tts_rate)
}

/// The body of a plain HTTP GET to the test server.
async fn http_get(server: &TestServer, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn events(result: &TalkResult) -> impl Iterator<Item = &ServerEvent> {
    result.events.iter().map(|(_, e)| e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librivox_question_is_transcribed_and_answered_aloud() {
    let server = server().await;
    let reference = &speech_clips()[1]; // "he was not an ill disposed young man"
    let (samples, rate) = read_wav(&reference.path);
    let result = parley_client::talk(&options(&server), &[clip("librivox", &samples, rate)]).await.unwrap();
    let turn = &result.report.turns[0];
    let (errors, words) = word_errors(&reference.transcript, &turn.transcript);
    assert!(errors * 10 <= words * 4, "transcript {:?} vs {:?}", turn.transcript, reference.transcript);
    assert!(turn.reply_text.chars().any(char::is_alphabetic), "reply text {:?}", turn.reply_text);
    assert!(turn.reply_audio_ms > 300, "reply audio {} ms", turn.reply_audio_ms);
    // The reply is real speech: our own ASR hears English words in it.
    let heard = transcribe(&result.reply_audio).await;
    let heard_words = parley_tests::normalize_words(&heard);
    assert!(heard_words.len() >= 2, "reply audio transcribed as {heard:?} (reply text {:?})", turn.reply_text);
    // The server reported the stage breakdown.
    let stages: Vec<&str> = turn.latency_ms.server_marks.iter().map(|(s, _)| s.as_str()).collect();
    for stage in ["speech_end", "endpoint", "asr_final", "first_token", "first_audio", "first_frame_sent"] {
        assert!(stages.contains(&stage), "missing stage {stage} in {stages:?}");
    }
    assert!(turn.latency_ms.voice_to_voice.is_some_and(|ms| ms > 0.0));
    // The turn is in the metrics, with the engines' refused-job counters.
    let metrics = http_get(&server, "/metrics").await;
    assert!(metrics.contains("parley_turn_seconds_count 1"), "{metrics}");
    assert!(metrics.contains("parley_engine_jobs_refused_total{engine=\"llm\"} 0"), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_turn_remembers_the_first() {
    let server = server().await;
    // Spoken by the server's own voice: espeak-ng's "dog called Max" is heard as "uncalled mix".
    let (first, rate) = piper("I have a dog called Max.").await;
    let (second, _) = piper("What is my dog called?").await;
    let clips = [clip("dog", &first, rate), clip("question", &second, rate)];
    let result = parley_client::talk(&options(&server), &clips).await.unwrap();
    assert_eq!(result.report.turns.len(), 2);
    let answer = &result.report.turns[1];
    assert!(result.report.turns[0].transcript.to_lowercase().contains("max"), "heard {:?}", result.report.turns[0]);
    assert!(answer.transcript.to_lowercase().contains("dog"), "heard {:?}", answer.transcript);
    // Only the first turn names the dog: the answer can know it only from the history.
    assert!(
        answer.reply_text.to_lowercase().contains("max"),
        "second reply {:?} forgot the dog's name",
        answer.reply_text
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_a_reply_cancels_it() {
    let server = server().await;
    let (story, rate) = espeak("en-us", "Please tell me a long story about a brave knight and a dragon.");
    let (stop, _) = espeak("en-us", "Stop, tell me about the weather instead.");
    let clips = [clip("story", &story, rate), clip("stop", &stop, rate)];
    let options = TalkOptions { barge_in_ms: Some(600), ..options(&server) };
    let result = parley_client::talk(&options, &clips).await.unwrap();
    let cancelled = events(&result).find_map(|e| match e {
        ServerEvent::ReplyCancelled { turn: 1, reason, played_ms, sent_ms } => Some((*reason, *played_ms, *sent_ms)),
        _ => None,
    });
    let (reason, played, sent) = cancelled.expect("the first reply is cancelled");
    assert_eq!(reason, CancelReason::BargeIn);
    assert!(played <= sent, "played {played} ms of {sent} ms sent");
    // The cancelled reply's audio stopped: far less than a full reply was sent.
    let done_turn1 = events(&result).any(|e| matches!(e, ServerEvent::ResponseAudioDone { turn: 1, .. }));
    assert!(!done_turn1, "a cancelled reply must not finish");
    // The second turn was heard and answered.
    assert!(result.report.turns[1].transcript.to_lowercase().contains("weather"), "{:?}", result.report.turns[1]);
    server.stop().await;
}
