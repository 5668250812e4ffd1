//! The OpenAI Realtime API endpoint (`/v1/realtime`) with the real `openai` Python SDK, at its
//! last 1.x and its latest 3.x (pinned, hashed venvs built by `scripts/realtime-sdk setup`, which
//! `scripts/test` runs), against the real server with the real models and real speech.
//! `tests/realtime/sdk_check.py` holds the cases (handshake, session updates, typed and spoken
//! turns at 20 and 100 ms appends, barge-in and truncate, manual commit, bad events, metadata,
//! client item ids, an active response, the beta header) and validates every event it receives
//! strictly with `pydantic.TypeAdapter(RealtimeServerEvent)`; `tests/realtime/pipecat_check.py`
//! then parses every recorded event with Pipecat's own strict parser. The server requires an API
//! key, and the `client_secret` case mints a browser's secret with the SDK and talks with it.
use parley_server::auth::{AuthConfig, KeyConfig, key_sha256};
use parley_server::config::Config;
use parley_tests::{TESTDATA, TestServer};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The one API key of the test's server (the SDKs connect with it, or with a client secret it
/// minted).
const API_KEY: &str = "pk_parley_realtime_test_key";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The python of the SDK venv for `major` (`1` or `3`).
fn python(major: &str) -> String {
    let out = Command::new(repo().join("scripts/realtime-sdk")).args(["python", major]).output().unwrap();
    assert!(out.status.success(), "run `scripts/realtime-sdk setup`: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `script` with `python` and `args`; panics with its output unless it passed.
fn run(python: &str, script: &str, args: &[String]) {
    let out = Command::new(python).arg(repo().join(script)).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{script} ({python}):\n{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" 0 failed") && !last.starts_with("0 passed"), "{script}: {last}");
}

/// Both SDK versions hold every case with Parley, every event validates, and Pipecat's parser
/// accepts every event Parley sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdks_and_pipecat_speak_to_parley() {
    let key =
        KeyConfig { id: "sdk".into(), sha256: key_sha256(API_KEY), max_sessions: None, connections_per_minute: None };
    let config = Config { auth: AuthConfig { keys: vec![key], ..Default::default() }, ..Default::default() };
    let server = TestServer::voice("realtime", config).await;
    let url = format!("ws://{}/v1", server.addr);
    let speech = Path::new(TESTDATA).join("librivox/sense_and_sensibility_01_austen_64kb-0890.wav");
    let question = Path::new(TESTDATA).join("cards/001.wav");
    let dir = std::env::temp_dir().join(format!("parley-realtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for major in ["1", "3"] {
        let python = python(major);
        let events = dir.join(format!("events-{major}.jsonl"));
        let args = vec![
            "--url".into(),
            url.clone(),
            "--speech".into(),
            question.display().to_string(),
            "--speech".into(),
            speech.display().to_string(),
            "--events-out".into(),
            events.display().to_string(),
            "--api-key".into(),
            API_KEY.into(),
        ];
        let check = tokio::task::spawn_blocking({
            let python = python.clone();
            move || run(&python, "tests/realtime/sdk_check.py", &args)
        });
        check.await.unwrap();
        if major == "3" {
            let pipecat = python.clone();
            let args = vec![events.display().to_string()];
            tokio::task::spawn_blocking(move || run(&pipecat, "tests/realtime/pipecat_check.py", &args)).await.unwrap();
        }
    }
    server.stop().await;
    // Every safety decision names the key its session was opened with (through a client secret
    // too), never the key itself.
    let audit = std::fs::read_to_string(parley_tests::server::audit_log("realtime")).unwrap();
    assert!(!audit.is_empty() && !audit.contains(API_KEY));
    for line in audit.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["key_id"], "sdk", "{line}");
    }
}
