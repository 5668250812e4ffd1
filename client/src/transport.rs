//! Transport-only load (`parley bench --transport`): N concurrent sessions against a server
//! running the echo pipeline, each sending real speech as 20 ms Opus frames at real-time pace.
//! In `frame` mode every frame comes back through the server's whole audio path (Opus decode,
//! resample, ring, pipeline, pacer, resample, Opus encode); in `packet` mode it comes back as sent
//! (the transport alone). Either way it carries its send time in its header, so the round trip of
//! each frame is what the server (and the loopback socket) adds. The frames
//! are encoded once and shared by all sessions, so the load generator itself stays cheap.
use futures_util::{SinkExt, StreamExt};
use parley_protocol::{FrameHeader, frame_samples};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// What to run.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    pub server: String,
    /// Concurrent sessions.
    pub streams: usize,
    /// Seconds each session streams.
    pub seconds: u32,
    /// Sessions are opened this many ms apart (spreads the frame phases).
    pub ramp_ms: u32,
    /// Stream rate, Hz.
    pub sample_rate: u32,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct TransportReport {
    pub streams: usize,
    pub seconds: u32,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Frames sent but never echoed back before the session ended.
    pub frames_lost: u64,
    /// Round trip per frame (send → echo received), µs: what the server's audio path and the
    /// loopback socket add (the echo answers each frame as soon as it has it).
    pub rtt_us_p50: u64,
    pub rtt_us_p99: u64,
    pub rtt_us_max: u64,
    /// The server's own turnaround per echoed packet, µs (`packet` mode: its
    /// `parley_echo_turnaround_seconds`, read from the socket → echo written), as the upper bound
    /// of the histogram bucket the percentile falls in; `None` without the server's `/metrics`.
    pub server_turnaround_us_p50: Option<u64>,
    pub server_turnaround_us_p99: Option<u64>,
    /// CPU time of the server and of this load generator per echoed frame (one message each
    /// way), µs: what a frame costs each side, whatever the run's length.
    pub server_cpu_us_per_frame: Option<f64>,
    pub generator_cpu_us_per_frame: Option<f64>,
    /// Sessions that failed to connect or ended with an error.
    pub failed_sessions: usize,
    pub errors: Vec<String>,
}

/// Per-session result.
#[derive(Default)]
struct StreamResult {
    sent: u64,
    rtts: Vec<u32>,
    error: Option<String>,
}

/// Runs the load: `packets` are Opus packets of 20 ms at the stream rate, cycled.
pub async fn run(options: &TransportOptions, packets: &[Vec<u8>]) -> TransportReport {
    let before = crate::bench::fetch_metrics(&options.server).await;
    let cpu_before = own_cpu_seconds();
    let epoch = Instant::now();
    let url = crate::endpoint_url(&options.server);
    let mut tasks = Vec::with_capacity(options.streams);
    for i in 0..options.streams {
        let url = url.clone();
        let packets = packets.to_vec();
        let (seconds, offset) = (options.seconds, i);
        tasks.push(tokio::spawn(async move { stream(&url, &packets, seconds, offset, epoch).await }));
        tokio::time::sleep(Duration::from_millis(options.ramp_ms.into())).await;
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| StreamResult { error: Some(e.to_string()), ..Default::default() }));
    }
    let mut report = report(options, &results);
    let per_frame = |cpu_s: f64| cpu_s * 1e6 / report.frames_received.max(1) as f64;
    report.generator_cpu_us_per_frame =
        own_cpu_seconds().zip(cpu_before).map(|(after, before)| per_frame(after - before));
    if let Some(after) = crate::bench::fetch_metrics(&options.server).await {
        let turnaround = |q| {
            let s = crate::bench::histogram_quantile(before.as_deref(), &after, "parley_echo_turnaround_seconds", q);
            s.filter(|s| s.is_finite()).map(|s| (s * 1e6).round() as u64)
        };
        report.server_turnaround_us_p50 = turnaround(0.5);
        report.server_turnaround_us_p99 = turnaround(0.99);
        let usage = crate::bench::ServerUsage::from_metrics(before.as_deref(), Some(&after), 1.0);
        report.server_cpu_us_per_frame = usage.cpu_seconds.map(per_frame);
    }
    report
}

/// This process's user and system CPU time, seconds: fields 14 and 15 of `/proc/self/stat`, in
/// USER_HZ (100 per second on Linux), counted from after the command name's parenthesis.
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let mut ticks = || fields.next()?.parse::<u64>().ok();
    Some((ticks()? + ticks()?) as f64 / 100.0)
}

fn report(options: &TransportOptions, results: &[StreamResult]) -> TransportReport {
    let mut rtts: Vec<f64> = results.iter().flat_map(|r| r.rtts.iter().map(|&us| f64::from(us))).collect();
    rtts.sort_by(f64::total_cmp);
    let pct = |q: f64| crate::bench::nearest_rank(&rtts, q).unwrap_or(0.0) as u64;
    let frames_sent: u64 = results.iter().map(|r| r.sent).sum();
    let frames_received = rtts.len() as u64;
    let errors: Vec<String> = results.iter().filter_map(|r| r.error.clone()).collect();
    TransportReport {
        streams: options.streams,
        seconds: options.seconds,
        frames_sent,
        frames_received,
        frames_lost: frames_sent.saturating_sub(frames_received),
        rtt_us_p50: pct(0.5),
        rtt_us_p99: pct(0.99),
        rtt_us_max: rtts.last().copied().unwrap_or(0.0) as u64,
        server_turnaround_us_p50: None,
        server_turnaround_us_p99: None,
        server_cpu_us_per_frame: None,
        generator_cpu_us_per_frame: None,
        failed_sessions: errors.len(),
        errors: errors.into_iter().take(10).collect(),
    }
}

/// One session: sends `seconds` of frames at real time, then waits briefly for the last echoes.
async fn stream(url: &str, packets: &[Vec<u8>], seconds: u32, offset: usize, epoch: Instant) -> StreamResult {
    let mut result = StreamResult::default();
    let ws = match crate::connect(url).await {
        Ok(ws) => ws,
        Err(e) => {
            result.error = Some(format!("connect: {e}"));
            return result;
        }
    };
    let (mut tx, mut rx) = ws.split();
    let frames = seconds as usize * 50;
    let sender = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        for seq in 0..frames {
            tick.tick().await;
            let sent_us = epoch.elapsed().as_micros() as u64;
            let packet = &packets[(offset + seq) % packets.len()];
            let message = FrameHeader::audio(seq as u32, sent_us).encode(packet);
            tx.send(Message::Binary(Bytes::from(message))).await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>((frames as u64, tx))
    };
    let mut rtts = Vec::with_capacity(frames);
    {
        let receiver = async {
            while let Some(message) = rx.next().await {
                match message {
                    Ok(Message::Binary(data)) => {
                        if let Ok((header, _)) = FrameHeader::decode(&data)
                            && header.timestamp_us > 0
                        {
                            let now = epoch.elapsed().as_micros() as u64;
                            rtts.push(now.saturating_sub(header.timestamp_us).min(u32::MAX as u64) as u32);
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::pin!(receiver);
        tokio::select! {
            sent = sender => match sent {
                Ok((sent, mut tx)) => {
                    result.sent = sent;
                    // The last frames' echoes: at most the pacer's lead plus scheduling.
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut receiver).await;
                    let _ = tx.send(Message::Close(None)).await;
                }
                Err(e) => result.error = Some(format!("send: {e}")),
            },
            () = &mut receiver => result.error = Some("the server closed the session early".into()),
        }
    }
    result.rtts = rtts;
    result
}

/// Pre-encodes `samples` (mono, at `rate`) into 20 ms Opus packets.
pub fn encode_packets(samples: &[f32], rate: u32) -> Result<Vec<Vec<u8>>, opus::Error> {
    let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
    let frame = frame_samples(rate);
    let mut out = Vec::new();
    let mut buffer = vec![0u8; parley_protocol::MAX_OPUS_PACKET_BYTES];
    for chunk in samples.chunks_exact(frame) {
        let n = encoder.encode_float(chunk, &mut buffer)?;
        out.push(buffer[..n].to_vec());
    }
    Ok(out)
}
