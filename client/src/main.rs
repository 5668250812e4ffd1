//! `parley`: the command-line client. `parley talk --server URL --input FILE.wav` streams each
//! file as one turn at real-time pace and writes the reply audio and a per-turn JSON report;
//! without `--input` it talks through the microphone and speaker (feature `mic`).
use anyhow::Context;
use clap::{Parser, Subcommand};
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
    let Command::Talk(args) = Cli::parse().command;
    anyhow::ensure!(parley_protocol::is_supported_rate(args.rate), "--rate must be 16000, 24000 or 48000");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.input.is_empty() {
        return runtime.block_on(mic(&args));
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
    for (i, turn) in result.report.turns.iter().enumerate() {
        print_turn(i + 1, turn);
    }
    let json = serde_json::to_string_pretty(&result.report)?;
    match &args.report {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// A turn for people: what was heard, the reply, and where the time went.
fn print_turn(n: usize, turn: &parley_client::TurnReport) {
    println!("turn {n} ({})", turn.input);
    println!("  you said:   {}", turn.transcript);
    println!("  reply:      {}  [{} ms of audio]", turn.reply_text, turn.reply_audio_ms);
    let latency = &turn.latency_ms;
    match latency.voice_to_voice {
        Some(ms) => println!("  voice-to-voice: {ms:.0} ms"),
        None => println!("  voice-to-voice: no reply audio"),
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
