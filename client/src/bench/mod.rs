//! `parley bench`: a load generator for voice latency. Runs N concurrent simulated sessions of K
//! turns each (optionally sweeping N), and reports voice-to-voice percentiles, the server's stage
//! breakdown, reply-audio underruns, dropped frames, errors and the server's CPU and memory, as
//! JSON, a markdown summary and a hand-drawn SVG chart.
mod output;
mod server_metrics;

use crate::report::{Accounting, Outcome};
use crate::talk::{Clip, ReceivedFrame, TalkError, TalkOptions, TalkResult};
use anyhow::Context;
pub use output::{markdown, svg, write_outputs};
use parley_protocol::{FRAME_MS, ServerEvent};
use serde::Serialize;
pub use server_metrics::{ServerUsage, fetch_metrics, histogram_quantile, metric_value, metrics_address};
use std::path::Path;
use std::time::{Duration, Instant};

/// Jitter allowance of the simulated player: a reply frame is an underrun when it arrives more
/// than this after its due time, ms.
pub const JITTER_ALLOWANCE_MS: u64 = 0;

/// The protocol the sessions speak ([`crate::talk()`] or [`crate::realtime::talk_realtime`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Parley's own (`/v1/voice`): Opus frames at the stream rate.
    #[default]
    V1,
    /// The OpenAI Realtime API (`/v1/realtime`): base64 PCM16 at 24 kHz in JSON events, for any
    /// Realtime-compatible server.
    Realtime,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V1 => "v1",
            Protocol::Realtime => "realtime",
        })
    }
}

impl Protocol {
    /// One session of this protocol.
    pub async fn talk(self, options: &TalkOptions, clips: &[Clip]) -> Result<TalkResult, TalkError> {
        match self {
            Protocol::V1 => crate::talk(options, clips).await,
            Protocol::Realtime => crate::realtime::talk_realtime(options, clips).await,
        }
    }
}

/// What load to generate.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `ws://host:port` (or a full endpoint URL); `/metrics` is read over plain HTTP from the same
    /// host and port.
    pub server: String,
    pub protocol: Protocol,
    /// Concurrent sessions of each run, in order (one entry without `--sweep`).
    pub session_counts: Vec<usize>,
    /// Turns (clips) per session.
    pub turns: usize,
    pub sample_rate: u32,
    /// Silence after each reply before the next clip, ms.
    pub pause_ms: u32,
    /// Session `i` starts `i × stagger_ms` after the run starts.
    pub stagger_ms: u64,
    pub reply_timeout_ms: u32,
    /// Voice-to-voice p95 bound of the sweep, ms.
    pub p95_bound_ms: f64,
}

/// The whole report (`--report`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub server: String,
    pub protocol: Protocol,
    pub turns_per_session: usize,
    pub jitter_allowance_ms: u64,
    pub p95_bound_ms: f64,
    /// Largest session count whose run was within the bound (see [`within_bound`]).
    pub max_sessions_within_bound: Option<usize>,
    pub runs: Vec<RunSummary>,
}

/// One run at one session count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub sessions: usize,
    /// Clips streamed: sessions × turns per session.
    pub turns: usize,
    pub wall_s: f64,
    /// Utterances expected and heard, answered, talked over, left without reply; late endpoints.
    /// The utterances of a failed session count as expected and missing.
    pub accounting: Accounting,
    /// Over every utterance expected: an utterance without a reply after its end (missing or
    /// only talked over) is infinitely late ("inf").
    pub voice_to_voice_ms: Percentiles,
    /// Server stage durations over the turns, in the order the stages first appeared.
    pub stages_ms: Vec<StageSummary>,
    pub underruns: Underruns,
    /// Gaps in the reply frames' sequence numbers.
    pub frames_dropped: u64,
    pub errors: Errors,
    pub server_usage: ServerUsage,
    /// Voice-to-voice p95 within the bound, utterances without reply counting as infinitely late.
    pub within_bound: bool,
    /// Every voice-to-voice latency measured (answered utterances), ms (the chart's data).
    pub voice_to_voice_samples_ms: Vec<f64>,
    /// Every turn: what was said and answered, and its latency with the server's stages.
    pub turn_samples: Vec<TurnSample>,
}

/// One turn of one session, for reading a run turn by turn.
#[derive(Debug, Clone, Serialize)]
pub struct TurnSample {
    pub session: usize,
    pub input: String,
    pub server_turn: u64,
    pub outcome: Outcome,
    pub talked_over_ms: Option<f64>,
    pub endpoint_after_ms: Option<f64>,
    pub transcript: String,
    pub reply_text: String,
    pub latency_ms: crate::report::Latency,
    /// This turn's reply frames that reached a real-time player late.
    pub underruns: Underruns,
}

/// Nearest-rank percentiles; `None` without samples. An infinite value is written "inf".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Values measured (finite).
    pub count: usize,
    /// Values that count as infinitely late (no measurement).
    pub failures: usize,
    #[serde(serialize_with = "finite_or_inf")]
    pub p50: Option<f64>,
    #[serde(serialize_with = "finite_or_inf")]
    pub p95: Option<f64>,
    #[serde(serialize_with = "finite_or_inf")]
    pub p99: Option<f64>,
    #[serde(serialize_with = "finite_or_inf")]
    pub max: Option<f64>,
}

fn finite_or_inf<S: serde::Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) if v.is_infinite() => serializer.serialize_str("inf"),
        Some(v) => serializer.serialize_f64(*v),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageSummary {
    pub stage: String,
    pub count: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
}

/// Stalls of a real-time player: a reply frame not there when the player needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Underruns {
    /// Reply frames checked.
    pub frames: usize,
    /// Stalls: frames that arrived after their due time (+ the jitter allowance). The player then
    /// plays on from that frame, so one slip of the stream is one stall, not one per later frame.
    pub count: usize,
    /// Silence the stalls inserted, ms.
    pub late_ms: f64,
    /// The longest stall, ms.
    pub max_late_ms: f64,
    /// Where the longest stall came: ms of its reply's audio before the late frame.
    pub max_late_at_ms: f64,
}

impl std::ops::AddAssign for Underruns {
    fn add_assign(&mut self, other: Self) {
        self.frames += other.frames;
        self.count += other.count;
        self.late_ms += other.late_ms;
        if other.max_late_ms > self.max_late_ms {
            self.max_late_ms = other.max_late_ms;
            self.max_late_at_ms = other.max_late_at_ms;
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Errors {
    /// Sessions that failed (could not connect, transport error, closed abnormally).
    pub failed_sessions: usize,
    /// Close codes other than 1000 sent by the server.
    pub abnormal_closes: Vec<u16>,
    /// `error` events received by the sessions that finished.
    pub error_events: usize,
    /// Distinct error messages.
    pub messages: Vec<String>,
}

impl Errors {
    pub fn total(&self) -> usize {
        self.failed_sessions + self.error_events
    }
}

/// The nearest-rank percentile `p` (0–1) of sorted values: always a measured value (unlike
/// [`crate::eval::percentile`], which interpolates), and well defined with infinite values.
pub fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64 - 1e-9).ceil() as usize; // 1e-9: 0.95 × 20 may round above 19
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub(crate) fn sorted(values: &[f64]) -> Vec<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values
}

impl Percentiles {
    /// Of `values`, with `failures` more values that are infinitely late.
    pub fn of(values: &[f64], failures: usize) -> Self {
        let mut s = sorted(values);
        s.extend(std::iter::repeat_n(f64::INFINITY, failures));
        Self {
            count: values.len(),
            failures,
            p50: nearest_rank(&s, 0.5),
            p95: nearest_rank(&s, 0.95),
            p99: nearest_rank(&s, 0.99),
            max: s.last().copied(),
        }
    }
}

/// Median and p95 of each stage's duration; stages in the order they first appear.
pub fn stage_summaries(stages: &[(String, f64)]) -> Vec<StageSummary> {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in stages {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let s = sorted(&stages.iter().filter(|(n, _)| n == name).map(|(_, ms)| *ms).collect::<Vec<_>>());
            StageSummary {
                stage: name.to_string(),
                count: s.len(),
                median_ms: nearest_rank(&s, 0.5).unwrap_or_default(),
                p95_ms: nearest_rank(&s, 0.95).unwrap_or_default(),
            }
        })
        .collect()
}

/// Underruns of a real-time player: each reply starts playing when its first frame arrives, and
/// the frame `k` sequence numbers later is due `k × 20 ms` after that; a frame later than that
/// stalls the player, which plays on from it (its schedule starts again at that frame).
/// `reply_starts` are the replies' first sequence numbers (`response.audio.started`), in order;
/// frames before the first reply are not checked.
pub fn underruns(frames: &[ReceivedFrame], reply_starts: &[u32], allowance_us: u64) -> Underruns {
    let frame_us = FRAME_MS as u64 * 1000;
    let mut out = Underruns::default();
    let mut next = 0;
    let mut current: Option<(u32, u64)> = None; // the schedule's anchor: seq, when it played
    let mut reply_start = 0;
    for frame in frames {
        while next < reply_starts.len() && frame.seq >= reply_starts[next] {
            current = Some((frame.seq, frame.received_us));
            reply_start = frame.seq;
            next += 1;
        }
        let Some((first_seq, first_us)) = current else { continue };
        let due = first_us + frame.seq.saturating_sub(first_seq) as u64 * frame_us + allowance_us;
        out.frames += 1;
        if frame.received_us > due {
            out.count += 1;
            let late_ms = (frame.received_us - due) as f64 / 1000.0;
            out.late_ms += late_ms;
            if late_ms > out.max_late_ms {
                out.max_late_ms = late_ms;
                out.max_late_at_ms = f64::from(frame.seq.saturating_sub(reply_start) * FRAME_MS);
            }
            current = Some((frame.seq, frame.received_us - allowance_us));
        }
    }
    out
}

/// [`underruns`] of each reply (frames from its first sequence number up to the next reply's).
fn underruns_per_reply(frames: &[ReceivedFrame], reply_starts: &[u32]) -> Vec<Underruns> {
    (0..reply_starts.len())
        .map(|i| {
            let end = reply_starts.get(i + 1).copied().unwrap_or(u32::MAX);
            let from = frames.partition_point(|f| f.seq < reply_starts[i]);
            let to = frames.partition_point(|f| f.seq < end);
            underruns(&frames[from..to.max(from)], &reply_starts[i..=i], JITTER_ALLOWANCE_MS * 1000)
        })
        .collect()
}

/// Voice-to-voice p95 (utterances without reply counting as infinitely late) ≤ `bound_ms`.
pub fn within_bound(voice_to_voice: &Percentiles, bound_ms: f64) -> bool {
    voice_to_voice.p95.is_some_and(|p95| p95 <= bound_ms)
}

/// The sweep's answer: the largest session count whose run was within the bound.
pub fn largest_within_bound(runs: &[RunSummary]) -> Option<usize> {
    runs.iter().filter(|r| r.within_bound).map(|r| r.sessions).max()
}

/// Summarizes the sessions of one run (server usage and wall time are filled in by the caller).
/// `expected[i]`: the utterances in session `i`'s clips (counted as missing if it failed).
pub fn summarize(
    turns_per_session: usize,
    expected: &[usize],
    outcomes: &[Result<TalkResult, TalkError>],
) -> RunSummary {
    let mut run =
        RunSummary { sessions: outcomes.len(), turns: outcomes.len() * turns_per_session, ..Default::default() };
    let mut stages = Vec::new();
    for (session, outcome) in outcomes.iter().enumerate() {
        let result = match outcome {
            Ok(result) => result,
            Err(error) => {
                let lost = expected.get(session).copied().unwrap_or_default();
                run.accounting += Accounting { utterances: lost, missing_replies: lost, ..Accounting::default() };
                run.errors.failed_sessions += 1;
                if let TalkError::Closed { code, .. } = error {
                    run.errors.abnormal_closes.push(*code);
                }
                run.errors.messages.push(error.to_string());
                continue;
            }
        };
        let mut reply_starts = Vec::new();
        let mut reply_turns = Vec::new();
        for (_, event) in &result.events {
            match event {
                ServerEvent::ResponseAudioStarted { turn, first_seq } => {
                    reply_starts.push(*first_seq);
                    reply_turns.push(*turn);
                }
                ServerEvent::Error { error } => {
                    run.errors.error_events += 1;
                    run.errors.messages.push(format!("{:?}: {}", error.code, error.message));
                }
                _ => {}
            }
        }
        let per_reply = underruns_per_reply(&result.frames, &reply_starts);
        run.accounting += result.report.accounting;
        for turn in &result.report.turns {
            run.voice_to_voice_samples_ms.extend(turn.latency_ms.voice_to_voice);
            stages.extend(turn.latency_ms.server_stages.iter().cloned());
            let mut late = Underruns::default();
            for (reply, _) in reply_turns.iter().enumerate().filter(|(_, t)| **t == turn.server_turn) {
                late += per_reply[reply];
            }
            run.turn_samples.push(TurnSample {
                session,
                input: turn.input.clone(),
                server_turn: turn.server_turn,
                outcome: turn.outcome,
                talked_over_ms: turn.talked_over_ms,
                endpoint_after_ms: turn.endpoint_after_ms,
                transcript: turn.transcript.clone(),
                reply_text: turn.reply_text.clone(),
                latency_ms: turn.latency_ms.clone(),
                underruns: late,
            });
        }
        for late in per_reply {
            run.underruns += late;
        }
        run.frames_dropped += u64::from(result.seq_gaps);
    }
    run.errors.messages.sort();
    run.errors.messages.dedup();
    run.voice_to_voice_ms = Percentiles::of(&run.voice_to_voice_samples_ms, run.accounting.missing_replies);
    run.stages_ms = stage_summaries(&stages);
    run
}

/// Reads every `*.wav` in `dir`, sorted by name, resampled to `rate`.
pub fn load_clips(dir: &Path, rate: u32) -> anyhow::Result<Vec<Clip>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")))
        .collect();
    paths.sort();
    anyhow::ensure!(!paths.is_empty(), "no .wav files in {}", dir.display());
    paths
        .iter()
        .map(|path| {
            let (samples, from) = crate::audio::read_wav(path)?;
            let samples = crate::audio::resample(&samples, from, rate)?;
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            Ok(Clip { name, samples })
        })
        .collect()
}

/// One run: `sessions` concurrent staggered sessions, each starting at a different clip.
pub async fn run_load(options: &BenchOptions, clips: &[Clip], sessions: usize) -> RunSummary {
    let before = fetch_metrics(&options.server).await;
    let start = Instant::now();
    let mut expected = Vec::with_capacity(sessions);
    let handles: Vec<_> = (0..sessions)
        .map(|i| {
            let talk_options = TalkOptions {
                server: options.server.clone(),
                sample_rate: options.sample_rate,
                pause_ms: options.pause_ms,
                reply_timeout_ms: options.reply_timeout_ms,
                ..TalkOptions::default()
            };
            let session_clips: Vec<Clip> = (0..options.turns).map(|t| clips[(i + t) % clips.len()].clone()).collect();
            let (rate, protocol) = (options.sample_rate, options.protocol);
            expected.push(session_clips.iter().map(|c| crate::anchor::utterances(&c.samples, rate).len()).sum());
            let delay = Duration::from_millis(options.stagger_ms * i as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                protocol.talk(&talk_options, &session_clips).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(sessions);
    for handle in handles {
        outcomes.push(handle.await.unwrap_or_else(|e| Err(TalkError::Protocol(format!("session task: {e}")))));
    }
    let wall_s = start.elapsed().as_secs_f64();
    let after = fetch_metrics(&options.server).await;
    let mut run = summarize(options.turns, &expected, &outcomes);
    run.wall_s = wall_s;
    run.server_usage = ServerUsage::from_metrics(before.as_deref(), after.as_deref(), wall_s);
    run.within_bound = within_bound(&run.voice_to_voice_ms, options.p95_bound_ms);
    run
}

/// Every run of the sweep, in order.
pub async fn run_bench(options: &BenchOptions, clips: &[Clip]) -> BenchReport {
    let mut runs = Vec::new();
    for &sessions in &options.session_counts {
        eprintln!("bench: {sessions} session(s) × {} turn(s)…", options.turns);
        runs.push(run_load(options, clips, sessions).await);
    }
    BenchReport {
        server: options.server.clone(),
        protocol: options.protocol,
        turns_per_session: options.turns,
        jitter_allowance_ms: JITTER_ALLOWANCE_MS,
        p95_bound_ms: options.p95_bound_ms,
        max_sessions_within_bound: largest_within_bound(&runs),
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u32, received_ms: u64) -> ReceivedFrame {
        ReceivedFrame { seq, timestamp_us: 0, received_us: received_ms * 1000 }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::of(&values, 0);
        assert_eq!((p.count, p.p50, p.p95, p.p99, p.max), (100, Some(50.0), Some(95.0), Some(99.0), Some(100.0)));
        // Failures are infinitely late: 5 in 100 leave p95 finite, 6 do not; "inf" in the JSON.
        let values: Vec<f64> = (1..=95).map(f64::from).collect();
        assert_eq!(Percentiles::of(&values, 5).p95, Some(95.0));
        let p = Percentiles::of(&values[1..], 6);
        assert_eq!((p.count, p.failures, p.p50, p.p95), (94, 6, Some(51.0), Some(f64::INFINITY)));
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!((json["p95"].as_str(), json["p50"].as_f64()), (Some("inf"), Some(51.0)));
        assert_eq!(nearest_rank(&[7.0], 0.95), Some(7.0));
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 0.0), Some(1.0));
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0, f64::INFINITY], 0.75), Some(3.0));
        assert_eq!(Percentiles::of(&[], 0), Percentiles::default());
    }

    #[test]
    fn stages_are_summarized_in_first_seen_order() {
        let stages: Vec<(String, f64)> =
            [("endpoint", 300.0), ("asr_final", 40.0), ("endpoint", 100.0), ("endpoint", 200.0)]
                .map(|(s, ms)| (s.to_string(), ms))
                .into();
        let summary = stage_summaries(&stages);
        assert_eq!(summary.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(), ["endpoint", "asr_final"]);
        assert_eq!((summary[0].count, summary[0].median_ms, summary[0].p95_ms), (3, 200.0, 300.0));
    }

    #[test]
    fn late_reply_frames_are_underruns() {
        // Reply 1 starts at seq 10 (t = 1000 ms): seq 11 due 1020, seq 12 due 1040 but stalls the
        // player 10 ms, so seq 13 is due 1070 and seq 14 at 1090 (both in time).
        // Reply 2 starts at seq 15, arriving late by the old schedule but on its own first frame.
        let frames = [
            frame(3, 500),
            frame(10, 1000),
            frame(11, 1005),
            frame(12, 1050),
            frame(13, 1070),
            frame(14, 1120),
            frame(15, 5000),
        ];
        let u = underruns(&frames, &[10, 15], 0);
        assert_eq!(u, Underruns { frames: 6, count: 2, late_ms: 40.0, max_late_ms: 30.0, max_late_at_ms: 80.0 });
        // An allowance absorbs lateness up to it.
        assert_eq!(underruns(&frames, &[10, 15], 40_000).count, 0);
        assert_eq!(underruns(&frames, &[10, 15], 10_000).count, 1);
        // A lost first frame: the player starts at the first frame that arrived.
        assert_eq!(
            underruns(&[frame(21, 100), frame(22, 120)], &[20], 0),
            Underruns { frames: 2, count: 0, late_ms: 0.0, max_late_ms: 0.0, max_late_at_ms: 0.0 }
        );
        assert_eq!(underruns(&frames, &[], 0).frames, 0);
        // Per reply: the late frames are reply 1's; together they are the whole run's.
        let per_reply = underruns_per_reply(&frames, &[10, 15]);
        assert_eq!(
            per_reply[0],
            Underruns { frames: 5, count: 2, late_ms: 40.0, max_late_ms: 30.0, max_late_at_ms: 80.0 }
        );
        assert_eq!((per_reply[1].frames, per_reply[1].count), (1, 0));
    }

    #[test]
    fn frames_sent_ahead_in_bursts_are_not_underruns() {
        // A server that sends faster than real time (a Realtime delta of several frames, all
        // arriving together): every frame is there before it is due.
        let mut frames: Vec<ReceivedFrame> = (0..10).map(|seq| frame(seq, 1000)).collect();
        frames.extend((10..20).map(|seq| frame(seq, 1100)));
        frames.extend((20..25).map(|seq| frame(seq, 1390)));
        assert_eq!(underruns(&frames, &[0], 0), Underruns { frames: 25, ..Underruns::default() });
        // Behind schedule after a burst: seq 25 is due at 1500, arrives at 1530.
        frames.push(frame(25, 1530));
        let late = underruns(&frames, &[0], 0);
        assert_eq!((late.count, late.max_late_ms, late.max_late_at_ms), (1, 30.0, 500.0));
    }

    #[test]
    fn the_sweep_names_the_largest_session_count_within_the_bound() {
        let within = |values: &[f64], failures| within_bound(&Percentiles::of(values, failures), 1000.0);
        assert!(within(&[500.0; 20], 0));
        assert!(!within(&[500.0, 1500.0], 0));
        // One utterance in 20 without reply is within p95; two are not.
        assert!(within(&[500.0; 19], 1));
        assert!(!within(&[500.0; 18], 2));
        assert!(!within(&[], 0));
        let run = |sessions, within_bound| RunSummary { sessions, within_bound, ..Default::default() };
        assert_eq!(largest_within_bound(&[run(1, true), run(2, true), run(4, false), run(8, false)]), Some(2));
        assert_eq!(largest_within_bound(&[run(1, false)]), None);
    }

    #[test]
    fn sessions_are_summarized_with_failures_and_errors() {
        use crate::report::{Latency, TurnReport};
        let turn = |server_turn, v2v: Option<f64>| TurnReport {
            server_turn,
            latency_ms: Latency {
                voice_to_voice: v2v,
                server_stages: vec![("endpoint".into(), 300.0)],
                ..Latency::default()
            },
            ..TurnReport::default()
        };
        let mut ok = TalkResult::default();
        ok.report.turns = vec![turn(1, Some(800.0)), turn(2, None)];
        ok.report.accounting =
            Accounting { utterances: 2, server_turns: 2, answered: 1, missing_replies: 1, ..Default::default() };
        ok.seq_gaps = 1;
        ok.frames = vec![frame(0, 100), frame(1, 200)];
        ok.events = vec![
            (90_000, ServerEvent::ResponseAudioStarted { turn: 1, first_seq: 0 }),
            (95_000, ServerEvent::error(parley_protocol::ErrorCode::Busy, "queue full")),
        ];
        let closed = Err(TalkError::Closed { code: 1013, reason: "full".into() });
        let run = summarize(2, &[2, 3], &[Ok(ok), closed]);
        assert_eq!((run.sessions, run.turns, run.accounting.utterances, run.accounting.missing_replies), (2, 4, 5, 4));
        // One answered utterance, four infinitely late.
        assert_eq!((run.voice_to_voice_ms.count, run.voice_to_voice_ms.p50), (1, Some(f64::INFINITY)));
        assert_eq!(run.turn_samples[0].underruns.count, 1);
        assert_eq!(
            (run.errors.failed_sessions, run.errors.error_events, run.errors.abnormal_closes.clone()),
            (1, 1, vec![1013])
        );
        assert_eq!(
            run.underruns,
            Underruns { frames: 2, count: 1, late_ms: 80.0, max_late_ms: 80.0, max_late_at_ms: 20.0 }
        );
        assert_eq!(run.frames_dropped, 1);
        assert_eq!(run.stages_ms[0].count, 2);
    }
}
