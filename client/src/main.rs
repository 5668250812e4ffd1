//! `parley`: the command-line client. `parley talk --server URL --input FILE.wav` streams each
//! file as one turn at real-time pace and writes the reply audio and a per-turn JSON report;
//! without `--input` it talks through the microphone and speaker (feature `mic`).
//! `parley eval safety --set FILE.jsonl --report OUT.json` runs a labelled prompt set against the
//! server's safety gates, as text and as synthesized speech, and scores it; `parley eval answers`
//! does the same for whether the replies are right.
//! `parley bench --sessions N --turns K --input-dir DIR --report OUT.json [--sweep 1,2,4,8]` runs
//! concurrent sessions as load and reports latency percentiles, underruns and server CPU/RSS;
//! with `--protocol realtime --server ws://HOST:PORT/v1/realtime` it measures any OpenAI
//! Realtime-compatible server the same way.
//! `parley anchor FILE.wav…` prints where each file's utterances start and end by the reference
//! end-of-speech method that voice-to-voice is measured from.
use anyhow::Context;
use clap::{Parser, Subcommand};
use parley_client::bench::{BenchOptions, Protocol};
use parley_client::eval::{EvalOptions, Mode};
use parley_client::report::Outcome;
use parley_client::talk::{Clip, TalkOptions};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "parley", version, about = "Parley voice client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a server: stream WAV files (one turn each) or the microphone.
    Talk(TalkArgs),
    /// Evaluate a running server.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Load test: N concurrent sessions of K turns each; voice-to-voice percentiles, server stages,
    /// reply underruns, drops, errors, server CPU and memory (JSON, markdown and SVG).
    Bench(BenchArgs),
    /// Print each WAV file's utterances (start and reference end of speech, ms), as the latency
    /// measurements see them.
    Anchor {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Server URL, `ws://HOST:PORT` or the endpoint's full URL (`/metrics` is read from the same
    /// host and port). Without a path: `/v1/voice`, or `/v1/realtime?model=parley` with
    /// `--protocol realtime`.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// The sessions' protocol: Parley's own (`v1`: Opus frames at `--rate`), or the OpenAI
    /// Realtime API (`realtime`: base64 PCM16 at 24 kHz; any Realtime-compatible server).
    #[arg(long, value_enum, default_value_t = Protocol::V1)]
    protocol: Protocol,
    /// Concurrent sessions (ignored with `--sweep`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    sessions: u16,
    /// Turns per session.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    turns: u16,
    /// Directory of WAV clips (sorted by name, reused cyclically; each session starts at another).
    #[arg(long)]
    input_dir: PathBuf,
    /// Where to write the JSON report; the markdown summary and SVG chart go next to it (.md, .svg).
    #[arg(long)]
    report: PathBuf,
    /// Run at each of these session counts in turn, e.g. `1,2,4,8`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    sweep: Vec<u16>,
    /// The sweep names the largest session count whose voice-to-voice p95 is within this, ms.
    #[arg(long, default_value_t = 1000.0)]
    p95_bound_ms: f64,
    /// Stream sample rate in Hz (16000, 24000 or 48000).
    #[arg(long, default_value_t = parley_protocol::DEFAULT_SAMPLE_RATE)]
    rate: u32,
    /// Silence between a turn's reply and the next clip, in ms.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u32,
    /// Session i starts i × this many ms after the run starts.
    #[arg(long, default_value_t = 500)]
    stagger_ms: u64,
    /// Give up on a reply after this many ms.
    #[arg(long, default_value_t = 20_000)]
    reply_timeout_ms: u32,
    /// Transport only (`--protocol v1`): against a server with `--pipeline echo` (`frame` or `packet` mode), every session
    /// streams the first clip's frames for `--seconds`; reports per-frame round trips and losses.
    #[arg(long)]
    transport: bool,
    /// Seconds each transport session streams.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Run a labelled JSONL set ({"id","text","expect":"block"|"allow","category"} per line), each
    /// line in a fresh session per mode, and score the safety gates.
    Safety(EvalArgs),
    /// Run a JSONL set of conversations ({"id","category","turns":[..],"expect_any":[..]} per
    /// line), each in a fresh session per mode, and score the last reply of each: accuracy per
    /// category, reply length, loops.
    Answers(EvalArgs),
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Server URL, `ws://HOST:PORT` (the `/v1/voice` path is added if missing).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// The labelled set, JSON lines.
    #[arg(long)]
    set: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    report: PathBuf,
    /// How to put each line to the server: typed text, speech synthesized with espeak-ng, or both.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Text, Mode::Audio])]
    modes: Vec<Mode>,
    /// espeak-ng voices for audio mode, rotated over the lines (see `espeak-ng --voices=en`).
    #[arg(long, value_delimiter = ',', default_values_t = parley_client::eval::DEFAULT_VOICES.map(String::from))]
    voices: Vec<String>,
    /// Sessions at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Only the first N lines of the set.
    #[arg(long)]
    limit: Option<usize>,
    /// Give up on a reply after this many ms.
    #[arg(long, default_value_t = 20_000)]
    reply_timeout_ms: u32,
}

#[derive(clap::Args, Debug)]
struct TalkArgs {
    /// Server URL, `ws://HOST:PORT` (the `/v1/voice` path is added if missing).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    server: String,
    /// Input WAV (any rate, mono or stereo); repeat for several turns.
    #[arg(long)]
    input: Vec<PathBuf>,
    /// Where to write the reply audio (WAV at the stream rate).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to write the per-turn JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Stream sample rate in Hz (16000, 24000 or 48000).
    #[arg(long, default_value_t = parley_protocol::DEFAULT_SAMPLE_RATE)]
    rate: u32,
    /// Silence between a turn's reply and the next file, in ms.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u32,
    /// Barge in: start the next input this many ms after the reply's audio starts.
    #[arg(long)]
    barge_in_ms: Option<u32>,
    /// Give up on a reply after this many ms.
    #[arg(long, default_value_t = 20_000)]
    reply_timeout_ms: u32,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Cli::parse().command {
        Command::Talk(args) => run_talk(&args),
        Command::Eval(EvalCommand::Safety(args)) => eval_safety(&args),
        Command::Eval(EvalCommand::Answers(args)) => eval_answers(&args),
        Command::Bench(args) => bench(&args),
        Command::Anchor { files } => anchor(&files),
    }
}

fn anchor(files: &[PathBuf]) -> anyhow::Result<()> {
    for path in files {
        let (samples, rate) = parley_client::audio::read_wav(path)?;
        let ms = |sample: usize| sample as f64 * 1000.0 / rate as f64;
        let found = parley_client::anchor::utterances(&samples, rate);
        let spans: Vec<String> = found.iter().map(|u| format!("{:.0}–{:.0}", ms(u.start), ms(u.end))).collect();
        println!("{}: {} utterance(s), ms: {}", path.display(), found.len(), spans.join(", "));
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(parley_protocol::is_supported_rate(args.rate), "--rate must be 16000, 24000 or 48000");
    let clips = parley_client::bench::load_clips(&args.input_dir, args.rate)?;
    let session_counts = if args.sweep.is_empty() { vec![args.sessions] } else { args.sweep.clone() };
    if args.transport {
        anyhow::ensure!(args.protocol == Protocol::V1, "--transport measures the v1 protocol only");
        return transport(args, &clips, &session_counts);
    }
    let options = BenchOptions {
        server: args.server.clone(),
        protocol: args.protocol,
        session_counts: session_counts.into_iter().map(usize::from).collect(),
        turns: args.turns.into(),
        sample_rate: args.rate,
        pause_ms: args.pause_ms,
        stagger_ms: args.stagger_ms,
        reply_timeout_ms: args.reply_timeout_ms,
        p95_bound_ms: args.p95_bound_ms,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(parley_client::bench::run_bench(&options, &clips));
    parley_client::bench::write_outputs(&report, &args.report)?;
    print!("{}", parley_client::bench::markdown(&report));
    println!("\nreport: {} (.md, .svg next to it)", args.report.display());
    Ok(())
}

/// `parley bench --transport`: echo streams at each session count; a table and a JSON report.
fn transport(args: &BenchArgs, clips: &[Clip], session_counts: &[u16]) -> anyhow::Result<()> {
    use parley_client::transport::{TransportOptions, encode_packets, run};
    let clip = clips.first().context("no clips in --input-dir")?;
    let packets = encode_packets(&clip.samples, args.rate)?;
    anyhow::ensure!(!packets.is_empty(), "the first clip is shorter than one 20 ms frame");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut reports = Vec::new();
    println!(
        "| streams | seconds | frames sent | echoed | lost | round trip p50 ms | p99 ms | max ms | server turnaround p50 ms | p99 ms | server CPU µs/frame | generator CPU µs/frame | failed sessions |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &streams in session_counts {
        let options = TransportOptions {
            server: args.server.clone(),
            streams: streams.into(),
            seconds: args.seconds,
            ramp_ms: 2,
            sample_rate: args.rate,
        };
        let r = runtime.block_on(run(&options, &packets));
        let ms = |us: u64| us as f64 / 1000.0;
        let cpu = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1}"));
        // The server's figure is a histogram bucket's upper bound.
        let bound = |us: Option<u64>| us.map_or("-".into(), |us| format!("≤ {:.2}", ms(us)));
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.streams,
            r.seconds,
            r.frames_sent,
            r.frames_received,
            r.frames_lost,
            ms(r.rtt_us_p50),
            ms(r.rtt_us_p99),
            ms(r.rtt_us_max),
            bound(r.server_turnaround_us_p50),
            bound(r.server_turnaround_us_p99),
            cpu(r.server_cpu_us_per_frame),
            cpu(r.generator_cpu_us_per_frame),
            r.failed_sessions
        );
        reports.push(r);
    }
    std::fs::write(&args.report, serde_json::to_string_pretty(&reports)? + "\n")
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!("\nreport: {}", args.report.display());
    Ok(())
}

fn run_talk(args: &TalkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(parley_protocol::is_supported_rate(args.rate), "--rate must be 16000, 24000 or 48000");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.input.is_empty() {
        return runtime.block_on(mic(args));
    }
    let mut clips = Vec::new();
    for path in &args.input {
        let (samples, rate) = parley_client::audio::read_wav(path)?;
        let samples = parley_client::audio::resample(&samples, rate, args.rate)?;
        clips.push(Clip { name: path.display().to_string(), samples });
    }
    let options = TalkOptions {
        server: args.server.clone(),
        sample_rate: args.rate,
        pause_ms: args.pause_ms,
        reply_timeout_ms: args.reply_timeout_ms,
        barge_in_ms: args.barge_in_ms,
        ..TalkOptions::default()
    };
    let result = runtime.block_on(parley_client::talk(&options, &clips))?;
    if let Some(path) = &args.output {
        parley_client::audio::write_wav(path, &result.reply_audio, args.rate)?;
    }
    for turn in &result.report.turns {
        print_turn(turn);
    }
    let a = &result.report.accounting;
    println!(
        "utterances {}: answered {}, talked over {}, no reply {}; server turns {}, late endpoints {}",
        a.utterances, a.answered, a.talk_overs, a.missing_replies, a.server_turns, a.late_endpoints
    );
    let json = serde_json::to_string_pretty(&result.report)?;
    match &args.report {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

impl EvalArgs {
    fn options(&self) -> EvalOptions {
        let mut modes = self.modes.clone();
        modes.sort();
        modes.dedup();
        EvalOptions {
            server: self.server.clone(),
            modes,
            voices: self.voices.clone(),
            concurrency: self.concurrency.into(),
            reply_timeout_ms: self.reply_timeout_ms,
            sample_rate: parley_protocol::DEFAULT_SAMPLE_RATE,
        }
    }

    /// Writes the JSON report and prints its table.
    fn write(&self, report: &impl serde::Serialize, table: &str) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(&self.report, json + "\n").with_context(|| format!("writing {}", self.report.display()))?;
        print!("{table}");
        println!("report: {}", self.report.display());
        Ok(())
    }
}

fn eval_safety(args: &EvalArgs) -> anyhow::Result<()> {
    let mut lines = parley_client::eval::read_set(&args.set)?;
    lines.truncate(args.limit.unwrap_or(usize::MAX));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let set = args.set.display().to_string();
    let report = runtime.block_on(parley_client::eval::run_safety(&args.options(), &set, &lines))?;
    args.write(&report, &report.table())
}

fn eval_answers(args: &EvalArgs) -> anyhow::Result<()> {
    let mut lines = parley_client::answers::read_answers(&args.set)?;
    lines.truncate(args.limit.unwrap_or(usize::MAX));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let set = args.set.display().to_string();
    let report = runtime.block_on(parley_client::answers::run_answers(&args.options(), &set, &lines))?;
    args.write(&report, &report.table())
}

/// A turn for people: what was heard, the reply, and where the time went.
fn print_turn(turn: &parley_client::TurnReport) {
    println!("turn {} ({})", turn.server_turn, turn.input);
    println!("  you said:   {}", turn.transcript);
    println!("  reply:      {}  [{} ms of audio]", turn.reply_text, turn.reply_audio_ms);
    let latency = &turn.latency_ms;
    match (turn.outcome, latency.voice_to_voice, turn.talked_over_ms) {
        (_, Some(ms), _) => println!("  voice-to-voice: {ms:.0} ms"),
        (_, None, Some(ms)) => println!("  talked over the user: the reply began {ms:.0} ms before the speech ended"),
        (Outcome::ExtraReply, ..) => println!("  a second reply to speech already answered"),
        _ => println!("  voice-to-voice: no reply audio"),
    }
    if !latency.server_stages.is_empty() {
        let stages: Vec<String> = latency.server_stages.iter().map(|(stage, ms)| format!("{stage} +{ms:.0}")).collect();
        println!("  server stages (ms): {}", stages.join(", "));
    }
    for decision in &turn.safety {
        println!("  safety: {decision}");
    }
}

#[cfg(feature = "mic")]
async fn mic(args: &TalkArgs) -> anyhow::Result<()> {
    parley_client::mic::talk_live(&args.server, args.rate).await
}

#[cfg(not(feature = "mic"))]
async fn mic(_args: &TalkArgs) -> anyhow::Result<()> {
    anyhow::bail!("no --input given and this build has no microphone support: rebuild with `--features mic`")
}
