//! End-to-end voice tests: the real server with the voice pipeline (all models) on
//! 127.0.0.1:0, real speech streamed through the client library at real-time pace.
//! Needs a provisioned model cache (`models/provision.sh`).
use parley_client::talk::{Clip, TalkOptions, TalkResult};
use parley_protocol::ServerEvent;
use parley_protocol::event::{CancelReason, SafetyAction, SafetyStage};
use parley_server::config::Config;
use parley_server::conversation::chunker::sentence_ends;
use parley_server::conversation::voice::{VoiceConfig, VoicePipeline};
use parley_server::models::Manifest;
use parley_server::models::tts::TtsBackend;
use parley_server::safety::SafetyConfig;
use parley_tests::{TestServer, espeak, read_wav, speech_clips, word_errors};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Stream rate of the test client (the protocol's default).
const RATE: u32 = 48_000;

/// The safety audit log of this test binary's servers.
fn audit_log() -> PathBuf {
    std::env::temp_dir().join(format!("parley-test-audit-{}.jsonl", std::process::id()))
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/safety").join(name)
}

fn load(voice: VoiceConfig, safety: SafetyConfig) -> Arc<VoicePipeline> {
    let manifest = Manifest::load_default().unwrap_or_else(|e| panic!("{e}"));
    Arc::new(VoicePipeline::load(manifest, voice, &safety, &Default::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// The models, loaded once for the whole test binary and shared by every test's server.
fn pipeline() -> Arc<VoicePipeline> {
    static PIPELINE: OnceLock<Arc<VoicePipeline>> = OnceLock::new();
    PIPELINE
        .get_or_init(|| load(VoiceConfig::default(), SafetyConfig { audit_log: audit_log(), ..Default::default() }))
        .clone()
}

async fn server() -> TestServer {
    let pipeline = tokio::task::spawn_blocking(pipeline).await.unwrap();
    TestServer::start(Config::default(), pipeline).await
}

/// A server with a pipeline of its own (the models loaded again), for a test whose behaviour
/// depends on the engines being idle.
async fn own_server() -> TestServer {
    let safety = SafetyConfig { audit_log: audit_log(), ..Default::default() };
    let pipeline = tokio::task::spawn_blocking(move || load(VoiceConfig::default(), safety)).await.unwrap();
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
    parley_tests::ws::http(server.addr, &parley_tests::ws::get(path, None)).await.body
}

fn eval_options(server: &TestServer) -> parley_client::eval::EvalOptions {
    parley_client::eval::EvalOptions {
        server: server.url(),
        modes: vec![],
        voices: vec![],
        concurrency: 1,
        reply_timeout_ms: 90_000,
        sample_rate: RATE,
    }
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
    // The reply started during the endpoint's silence, ahead of the endpoint, and was released.
    // (The pipeline and its counters are shared by this binary's tests: at least this turn's.)
    assert!(speculation(&server, "used").await >= 1, "{metrics}");
    assert!(stages.contains(&"endpoint_confirmed"), "{stages:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_turn_remembers_the_first() {
    let server = server().await;
    // Spoken by the server's own voice: espeak-ng's "dog called Max" is heard as "uncalled mix".
    // SmolLM2-135M (the earlier default) was sensitive to phrasing: after "I have a dog called Max." it answered "What is my
    // dog called?" with "I'm not a dog-specific AI". After "My dog is called Max." it named the dog
    // in all 24 variants of the two transcripts Whisper may give.
    let (first, rate) = piper("My dog is called Max.").await;
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
        "second reply {:?} to {:?} forgot the dog's name",
        answer.reply_text,
        answer.transcript
    );
    server.stop().await;
}

/// The `parley_speculation_total` counter for `outcome` (shared by this binary's tests).
async fn speculation(server: &TestServer, outcome: &str) -> u64 {
    let metrics = http_get(server, "/metrics").await;
    counter(&metrics, &format!("parley_speculation_total{{outcome=\"{outcome}\"}}")).unwrap_or(0)
}

/// The value of the metrics line `series` (a name and its labels), if there is one.
fn counter(metrics: &str, series: &str) -> Option<u64> {
    let prefix = format!("{series} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|n| n.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_sentence_pause_drops_the_reply_started_ahead_unseen() {
    let server = server().await;
    let stale_before = speculation(&server, "stale").await;
    // "I have a cat and" · 400 ms pause · "a dog called Max.": the pause is long enough for a
    // reply to start ahead (160 ms) and short of the endpoint (480 ms; the words trail off on
    // "and", so the sooner endpoint for finished sentences does not apply).
    let (mut speech, rate) = piper("I have a cat and").await;
    let (rest, _) = piper("a dog called Max.").await;
    let end = speech.iter().rposition(|x| x.abs() > 0.01).unwrap_or(0);
    let start = rest.iter().position(|x| x.abs() > 0.01).unwrap_or(0);
    speech.truncate(end + 1);
    speech.extend(std::iter::repeat_n(0.0, rate as usize * 400 / 1000));
    speech.extend_from_slice(&rest[start..]);
    let result = parley_client::talk(&options(&server), &[clip("paused", &speech, rate)]).await.unwrap();
    // One turn, recognised whole; nothing of the dropped reply reached the client.
    assert_eq!(result.report.turns.len(), 1);
    let transcript = result.report.turns[0].transcript.to_lowercase();
    assert!(transcript.contains("cat") && transcript.contains("max"), "heard {transcript:?}");
    let transcriptions = events(&result).filter(|e| matches!(e, ServerEvent::TranscriptionCompleted { .. })).count();
    let input_decisions =
        events(&result).filter(|e| matches!(e, ServerEvent::SafetyDecision { stage: SafetyStage::Input, .. })).count();
    assert_eq!((transcriptions, input_decisions), (1, 1), "{:?}", result.events);
    assert!(speculation(&server, "stale").await > stale_before, "no reply was started ahead in the pause");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_with_pauses_is_several_turns_each_measured_from_its_own_end() {
    let server = server().await;
    // Three human utterances in one clip, 2.5 s apart: each is its own server turn, and each
    // reply is measured from the end of the words it answers (it once read 0 ms: a reply that
    // began before the clip's end).
    let clips = speech_clips();
    let librivox = &clips[1];
    let ten = clips.iter().find(|c| c.path.ends_with("cards/001.wav")).unwrap();
    let seven = clips.iter().find(|c| c.path.ends_with("cards/003.wav")).unwrap();
    let mut speech = Vec::new();
    for (i, c) in [librivox, ten, seven].into_iter().enumerate() {
        if i > 0 {
            speech.extend(std::iter::repeat_n(0.0, 16_000 * 5 / 2));
        }
        speech.extend(parley_tests::read_16k(&c.path));
    }
    let result = parley_client::talk(&options(&server), &[clip("paused", &speech, 16_000)]).await.unwrap();
    let report = &result.report;
    assert_eq!(report.accounting.utterances, 3, "{:#?}", report.utterances);
    assert_eq!(report.accounting.answered, 3, "{:#?}", report.turns);
    let answered: Vec<_> =
        report.turns.iter().filter(|t| t.outcome == parley_client::report::Outcome::Answered).collect();
    // Whisper tiny.en hears "10 of close" for the second: each turn's own words, loosely.
    for (turn, words) in answered.iter().zip([&["young"][..], &["10", "ten"], &["7", "seven"]]) {
        assert!(turn.latency_ms.voice_to_voice.is_some_and(|ms| ms > 0.0), "{turn:?}");
        let heard = turn.transcript.to_lowercase();
        assert!(words.iter().any(|w| heard.contains(w)), "{turn:?}");
    }
    let utterances: Vec<_> = answered.iter().map(|t| t.utterance).collect();
    assert_eq!(utterances, [Some(0), Some(1), Some(2)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_turn_model_hears_an_open_ending_in_the_pause_before_the_reply() {
    // A pipeline of its own: the verdict is made ahead only while the reply model and synthesizer
    // are idle, which the other tests' turns on the shared pipeline would leave to chance.
    let server = own_server().await;
    // The cards' short answers: Whisper leaves them unpunctuated ("7 of clubs") or stops before a
    // repeat ("5" for "five five"), so the words alone leave their endings open.
    let cards: Vec<Clip> = speech_clips()
        .iter()
        .filter(|c| c.path.parent().is_some_and(|dir| dir.ends_with("cards")))
        .map(|c| {
            let (samples, rate) = read_wav(&c.path);
            clip(&c.transcript, &samples, rate)
        })
        .collect();
    let result = parley_client::talk(&options(&server), &cards).await.unwrap();
    assert_eq!(result.report.turns.len(), cards.len(), "{:?}", result.report.turns);
    let metrics = http_get(&server, "/metrics").await;
    let verdicts = |made: &str| counter(&metrics, &format!("parley_turn_verdicts_total{{made=\"{made}\"}}"));
    assert!(verdicts("ahead").is_some_and(|n| n >= 1), "{metrics}");
    assert!(verdicts("in_reply").is_some(), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_a_reply_cancels_it() {
    let server = server().await;
    let (story, rate) = espeak("en-us", "Please tell me a long story about a brave knight and a dragon.");
    let (stop, _) = espeak("en-us", "Stop, tell me about Paris instead.");
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
    assert!(result.report.turns[1].transcript.to_lowercase().contains("paris"), "{:?}", result.report.turns[1]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answers_eval_judges_the_last_reply_of_each_conversation() {
    let server = server().await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/answers/smoke.jsonl");
    let lines = parley_client::answers::read_answers(&path).unwrap();
    let options = eval_options(&server);
    let options = parley_client::eval::EvalOptions {
        modes: vec![parley_client::eval::Mode::Text, parley_client::eval::Mode::Audio],
        voices: vec!["en-us".into()],
        ..options
    };
    let report = parley_client::answers::run_answers(&options, "smoke", &lines).await.unwrap();
    let run = |id: &str, mode: &str| report.runs.iter().find(|r| r.id == id && r.mode.as_str() == mode).unwrap();
    // Every run is judged by its own reply (whether the model names Paris varies: the eval's
    // numbers say how often); typed, the dog is named from the first turn of the same session.
    for r in &report.runs {
        assert!(r.reply_words > 0 && r.error.is_none(), "{r:?}");
        let paris = parley_client::answers::contains_phrase(&r.reply_text, "paris");
        assert!(r.id != "smoke-fact" || r.correct == paris, "{r:?}");
    }
    assert!(run("smoke-follow", "text").correct, "{:#?}", report.runs);
    // Spoken: each turn heard in one session, and the last reply judged.
    let spoken = run("smoke-follow", "audio");
    assert_eq!(spoken.transcripts.len(), 2, "{spoken:?}");
    assert!(spoken.transcripts[1].to_lowercase().contains("dog"), "{spoken:?}");
    assert!(spoken.reply_words > 0, "{spoken:?}");
    assert_eq!(report.summary["text"].overall.n, 2);
    assert_eq!(report.summary["audio"].per_category.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_ends_at_the_end_of_its_second_sentence() {
    let server = server().await;
    let (mut events, mut audio) = (Vec::new(), false);
    let ask = "Please tell me a long story about a brave knight and a dragon.";
    parley_client::eval::text_turn(&eval_options(&server), ask, &mut events, &mut audio).await.unwrap();
    let reply = events.iter().find_map(|e| match e {
        ServerEvent::ResponseTextDone { text, .. } => Some(text.clone()),
        _ => None,
    });
    let reply = reply.unwrap_or_else(|| panic!("the reply finished: {events:#?}"));
    assert!(audio, "the reply was spoken");
    assert_eq!(sentence_ends(&reply), VoiceConfig::default().max_reply_sentences, "{reply:?}");
    assert!(reply.ends_with(['.', '!', '?']), "{reply:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_requests_are_refused_in_the_preset_voice_typed_or_spoken() {
    use parley_client::eval::{EvalOptions, Mode, Outcome, read_set, run_safety};
    let server = server().await;
    let set = read_set(&data("smoke.jsonl")).unwrap();
    let options = EvalOptions {
        server: server.url(),
        modes: vec![Mode::Text, Mode::Audio],
        voices: vec!["en-us".into()],
        concurrency: 2,
        reply_timeout_ms: 90_000,
        sample_rate: RATE,
    };
    let report = run_safety(&options, "smoke", &set).await.unwrap();
    assert_eq!(report.runs.len(), 2 * set.len());
    for run in &report.runs {
        assert!(
            run.passed(),
            "{} ({:?}) heard {:?}: {:?} {:?}",
            run.id,
            run.mode,
            run.transcript,
            run.outcome,
            run.decisions
        );
        // Every turn's spoken audio passed the voice gate.
        let voice_checked = run.decisions.iter().any(|d| {
            matches!(d, ServerEvent::SafetyDecision { stage: SafetyStage::Voice, action: SafetyAction::Allow, .. })
        });
        assert!(voice_checked, "{}: no voice gate decision in {:?}", run.id, run.decisions);
    }
    let policy = parley_server::safety::policy::Policy::load(None).unwrap();
    let violence = report.runs.iter().find(|r| r.id == "smoke-block-violence").unwrap();
    assert_eq!(violence.reply_text, policy.category("violence").unwrap().response, "spoken in the policy's words");
    let cited = violence.decisions.iter().find_map(|d| match d {
        ServerEvent::SafetyDecision { stage: SafetyStage::Input, action: SafetyAction::Refuse, rule_id, .. } => {
            rule_id.clone()
        }
        _ => None,
    });
    assert!(cited.as_deref().is_some_and(|r| r.starts_with("VW-")), "rule cited: {cited:?}");
    let self_harm = report.runs.iter().find(|r| r.id == "smoke-block-self-harm").unwrap();
    assert_eq!(self_harm.outcome, Outcome::SafeCompletion);
    // Every decision is in the audit log and the metrics.
    let audit = std::fs::read_to_string(audit_log()).unwrap();
    let entries: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        entries.iter().any(|e| e["stage"] == "input" && e["action"] == "refuse" && e["category"] == "violence"),
        "{audit}"
    );
    assert!(entries.iter().all(|e| e["rule_id"].is_string() && e["policy_version"].is_string()), "{audit}");
    let metrics = http_get(&server, "/metrics").await;
    assert!(
        metrics.contains("parley_safety_decisions_total{stage=\"input\",action=\"refuse\",category=\"violence\"}"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_reply_and_an_unenrolled_voice_never_reach_the_client() {
    // espeak-ng speaks instead of the enrolled voice, and a test policy makes greetings a violation.
    let pipeline = tokio::task::spawn_blocking(|| {
        let voice = VoiceConfig { tts: TtsBackend::Espeak, ..VoiceConfig::default() };
        let policy = Some(data("test-policy.toml"));
        load(voice, SafetyConfig { policy, audit_log: audit_log(), ..Default::default() })
    })
    .await
    .unwrap();
    let server = TestServer::start(Config::default(), pipeline).await;
    let (mut events, mut audio) = (Vec::new(), false);
    parley_client::eval::text_turn(&eval_options(&server), "Please greet me.", &mut events, &mut audio).await.unwrap();
    let decisions: Vec<(SafetyStage, SafetyAction, Option<String>)> = events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::SafetyDecision { stage, action, category, .. } => Some((*stage, *action, category.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(decisions[0], (SafetyStage::Input, SafetyAction::Allow, Some("greeting".into())), "{events:?}");
    let flagged = (SafetyStage::Output, SafetyAction::Refuse, Some("greeting".into()));
    assert!(decisions.contains(&flagged), "the greeting is stopped: {events:?}");
    assert!(decisions.iter().any(|d| d.1 == SafetyAction::Block && d.0 == SafetyStage::Voice), "{events:?}");
    assert!(decisions.iter().all(|d| d.0 != SafetyStage::Voice || d.1 == SafetyAction::Block), "{events:?}");
    assert!(!audio, "no audio frame may leave the server");
    let cut = events.iter().any(|e| matches!(e, ServerEvent::ReplyCancelled { reason: CancelReason::Safety, .. }));
    assert!(cut, "the turn reports the cut: {events:?}");
    let text_sent = events.iter().any(|e| matches!(e, ServerEvent::ResponseTextDelta { .. }));
    assert!(!text_sent, "no reply text goes out before its audio passed: {events:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words_are_sent_as_they_settle_while_the_user_speaks() {
    // A pipeline of its own: passes run only while the recognizer, reply model and synthesizer
    // are idle, which the other tests' turns on the shared pipeline would leave to chance (with a
    // CPU hog beside the tests, none ran in time).
    let server = own_server().await;
    let reference = &speech_clips()[0]; // 7 s: "and mister john dashwood had then leisure to consider…"
    let (samples, rate) = read_wav(&reference.path);
    let result = parley_client::talk(&options(&server), &[clip("long", &samples, rate)]).await.unwrap();
    let mut heard = String::new();
    let mut completed = None;
    for event in events(&result) {
        match event {
            ServerEvent::TranscriptionDelta { turn: 1, delta } if completed.is_none() => heard.push_str(delta),
            ServerEvent::TranscriptionCompleted { turn: 1, transcript } => completed = Some(transcript.clone()),
            _ => {}
        }
    }
    let completed = completed.expect("turn 1 is transcribed");
    assert!(!heard.trim().is_empty(), "no words were sent before the transcript of {completed:?}");
    assert!(completed.starts_with(&heard), "the partial {heard:?} is not the start of {completed:?}");
    server.stop().await;
}
