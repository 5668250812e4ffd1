//! Per-frame transport overhead against a server running the echo pipeline in frame mode:
//! N concurrent real-time streams, each frame's round trip = arrival − the send time the echoed
//! header carries. Prints p50/p99/max.
//!
//! ```sh
//! cargo run --release -p parley-server -- --pipeline echo --echo-mode frame --max-sessions 200 &
//! cargo run --release -p parley-client --example echo_overhead -- ws://127.0.0.1:8080 100 10
//! ```
use parley_client::talk::{Clip, TalkOptions};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "ws://127.0.0.1:8080".into());
    let streams: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let seconds: usize = args.next().map_or(Ok(10), |s| s.parse())?;
    let rate = 48_000;
    // A 440 Hz tone with a 2 Hz on/off envelope: speech-like level changes.
    let samples: Vec<f32> = (0..rate * seconds)
        .map(|i| {
            let t = i as f32 / rate as f32;
            (t * 440.0 * std::f32::consts::TAU).sin() * if (t * 2.0).fract() < 0.6 { 0.3 } else { 0.01 }
        })
        .collect();
    let clip = Clip { name: "tone".into(), samples };
    let options = TalkOptions { server, pause_ms: 200, wait_for_reply: false, ..TalkOptions::default() };
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (options, clip) = (options.clone(), clip.clone());
        tasks.push(tokio::spawn(async move { parley_client::talk(&options, &[clip]).await }));
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let mut rtts = Vec::new();
    let (mut sent, mut received, mut gaps) = (0, 0, 0);
    for task in tasks {
        let result = task.await??;
        sent += result.sent_us.len();
        received += result.frames.len();
        gaps += result.seq_gaps;
        rtts.extend(result.frame_round_trips_us());
    }
    rtts.sort_unstable();
    let pct = |p: f64| rtts.get(((rtts.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "streams {streams}: frames sent {sent}, echoed {received}, seq gaps {gaps}; round trip ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
