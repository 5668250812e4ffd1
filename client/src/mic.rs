//! Live talk through the microphone and speaker (cpal). The audio callbacks only move samples
//! through SPSC rings (ringbuf): no lock, allocation or logging there; the speaker callback fills
//! silence on underrun and counts it. Everything else (Opus, resampling, the socket) runs on the
//! async side.
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use futures_util::{SinkExt, StreamExt};
use parley_protocol::event::SessionUpdate;
use parley_protocol::resample::{ResampleError, Resampler};
use parley_protocol::{ClientEvent, FRAME_MS, FrameHeader, MAX_OPUS_PACKET_BYTES, ServerEvent, frame_samples};
use ringbuf::HeapRb;
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Device ring capacity, in seconds of audio.
const RING_SECONDS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum MicError {
    #[error("audio device: {0}")]
    Device(String),
    #[error(transparent)]
    Resample(#[from] ResampleError),
    #[error("WebSocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
}

fn device_err(e: impl std::fmt::Display) -> MicError {
    MicError::Device(e.to_string())
}

/// Counters the callbacks update.
#[derive(Default)]
struct Xruns {
    mic_overflow: AtomicU64,
    speaker_underrun: AtomicU64,
    /// Set on `reply.cancelled`: the speaker callback drops what it holds.
    flush: AtomicBool,
}

/// Talks to `server` live until Ctrl-C.
/// The input callback: mixes interleaved frames to mono into the ring; samples that do not fit
/// are dropped and counted. No lock, allocation or logging.
fn capture(data: &[f32], channels: usize, ring: &mut impl Producer<Item = f32>, xruns: &Xruns) {
    for frame in data.chunks(channels) {
        let mono = frame.iter().sum::<f32>() / channels as f32;
        if ring.try_push(mono).is_err() {
            xruns.mic_overflow.fetch_add(1, Relaxed);
        }
    }
}

/// The output callback: fills every channel of each frame from the ring, with silence (counted)
/// on underrun; drops everything buffered when a cancelled reply asked for a flush.
fn play(data: &mut [f32], channels: usize, ring: &mut impl Consumer<Item = f32>, xruns: &Xruns) {
    if xruns.flush.swap(false, Relaxed) {
        ring.clear();
    }
    for frame in data.chunks_mut(channels) {
        let sample = ring.try_pop().unwrap_or_else(|| {
            xruns.speaker_underrun.fetch_add(1, Relaxed);
            0.0
        });
        frame.fill(sample);
    }
}

pub async fn talk_live(server: &str, rate: u32) -> anyhow::Result<()> {
    Ok(run(server, rate).await?)
}

async fn run(server: &str, rate: u32) -> Result<(), MicError> {
    let host = cpal::default_host();
    let input = host.default_input_device().ok_or_else(|| device_err("no input device"))?;
    let output = host.default_output_device().ok_or_else(|| device_err("no output device"))?;
    let in_config: cpal::StreamConfig = input.default_input_config().map_err(device_err)?.into();
    let out_config: cpal::StreamConfig = output.default_output_config().map_err(device_err)?.into();
    let xruns = Arc::new(Xruns::default());

    let (mut mic_tx, mut mic_rx) = HeapRb::<f32>::new(in_config.sample_rate as usize * RING_SECONDS).split();
    let (mut spk_tx, mut spk_rx) = HeapRb::<f32>::new(out_config.sample_rate as usize * RING_SECONDS).split();
    let in_channels = in_config.channels as usize;
    let out_channels = out_config.channels as usize;
    let x = xruns.clone();
    let mic_stream = input
        .build_input_stream::<f32, _, _>(
            in_config,
            move |data: &[f32], _| capture(data, in_channels, &mut mic_tx, &x),
            |_| {},
            None,
        )
        .map_err(device_err)?;
    let x = xruns.clone();
    let spk_stream = output
        .build_output_stream::<f32, _, _>(
            out_config,
            move |data: &mut [f32], _| play(data, out_channels, &mut spk_rx, &x),
            |_| {},
            None,
        )
        .map_err(device_err)?;
    mic_stream.play().map_err(device_err)?;
    spk_stream.play().map_err(device_err)?;

    let url = crate::endpoint_url(server);
    let mut ws = crate::connect(&url).await.map_err(Box::new)?;
    let update = ClientEvent::SessionUpdate {
        session: SessionUpdate { input_sample_rate: Some(rate), output_sample_rate: Some(rate) },
    };
    ws.send(Message::text(update.to_json())).await.map_err(Box::new)?;
    let frame = frame_samples(rate);
    let mut up = Resampler::new(in_config.sample_rate, rate)?;
    let mut down = Resampler::new(rate, out_config.sample_rate)?;
    let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
    let mut decoder = opus::Decoder::new(rate, opus::Channels::Mono)?;
    let mut captured = vec![0f32; in_config.sample_rate as usize];
    let mut pending: Vec<f32> = Vec::with_capacity(rate as usize);
    let mut decoded = vec![0f32; frame];
    let mut playback: Vec<f32> = Vec::with_capacity(out_config.sample_rate as usize);
    let mut packet = vec![0u8; MAX_OPUS_PACKET_BYTES];
    let mut ticker = tokio::time::interval(Duration::from_millis(FRAME_MS as u64));
    let start = Instant::now();
    let mut seq = 0u32;
    eprintln!("talking to {url}: speak; Ctrl-C ends");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick() => {
                let n = mic_rx.pop_slice(&mut captured);
                up.process(&captured[..n], &mut pending)?;
                let whole = pending.len() / frame * frame;
                for chunk in pending[..whole].chunks(frame) {
                    let len = encoder.encode_float(chunk, &mut packet)?;
                    let message = FrameHeader::audio(seq, start.elapsed().as_micros() as u64).encode(&packet[..len]);
                    ws.send(Message::Binary(Bytes::from(message))).await.map_err(Box::new)?;
                    seq = seq.wrapping_add(1);
                }
                pending.drain(..whole);
            }
            message = ws.next() => match message {
                None => break,
                Some(Err(e)) => return Err(Box::new(e).into()),
                Some(Ok(Message::Binary(data))) => {
                    if let Ok((_, payload)) = FrameHeader::decode(&data) {
                        let n = decoder.decode_float(payload, &mut decoded, false)?;
                        playback.clear();
                        down.process(&decoded[..n], &mut playback)?;
                        spk_tx.push_slice(&playback);
                    }
                }
                Some(Ok(Message::Text(text))) => match ServerEvent::parse(text.as_str()) {
                    Ok(ServerEvent::ReplyCancelled { .. }) => xruns.flush.store(true, Relaxed),
                    Ok(ServerEvent::TranscriptionCompleted { transcript, .. }) => eprintln!("you: {transcript}"),
                    Ok(ServerEvent::ResponseTextDone { text, .. }) => eprintln!("parley: {text}"),
                    Ok(ServerEvent::Error { error }) => eprintln!("server error: {:?}: {}", error.code, error.message),
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("server closed the session: {frame:?}");
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = ws.close(None).await;
    eprintln!(
        "mic overflow {} samples, speaker underrun {} samples, speaker buffered {}",
        xruns.mic_overflow.load(Relaxed),
        xruns.speaker_underrun.load(Relaxed),
        spk_tx.occupied_len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_mixes_to_mono_and_counts_overflow() {
        let (mut tx, mut rx) = HeapRb::<f32>::new(2).split();
        let xruns = Xruns::default();
        capture(&[0.2, 0.4, -1.0, 1.0, 0.5, 0.5], 2, &mut tx, &xruns);
        let first = rx.try_pop().unwrap();
        assert!((first - 0.3).abs() < 1e-6, "{first}");
        assert_eq!(rx.try_pop(), Some(0.0));
        assert_eq!(xruns.mic_overflow.load(Relaxed), 1);
    }

    #[test]
    fn play_fills_every_channel_silence_on_underrun_and_flushes() {
        let (mut tx, mut rx) = HeapRb::<f32>::new(8).split();
        let xruns = Xruns::default();
        tx.push_slice(&[0.5]);
        let mut out = [9.0f32; 4];
        play(&mut out, 2, &mut rx, &xruns);
        assert_eq!(out, [0.5, 0.5, 0.0, 0.0]);
        assert_eq!(xruns.speaker_underrun.load(Relaxed), 1);
        tx.push_slice(&[0.7, 0.7]);
        xruns.flush.store(true, Relaxed);
        play(&mut out, 2, &mut rx, &xruns);
        assert_eq!(out, [0.0; 4], "a flush drops what was buffered");
    }
}
