//! Benchmarks of the server's per-frame audio path with real speech (a LibriVox clip at 48 kHz): Opus
//! decode and encode of one 20 ms frame, resampling one 20 ms chunk (48 → 16 kHz in, 22.05 → 48 kHz
//! out), the input ring's push and pop of one 16 kHz frame, and the whole input path (decode +
//! resample + push + pop) as the session runs it for each received frame.
use criterion::{Criterion, criterion_group, criterion_main};
use parley_server::audio::PIPELINE_RATE;
use parley_server::audio::codec::{OpusDecoder, OpusEncoder};
use parley_server::audio::resample::Resampler;
use parley_server::audio::ring::input_ring;
use parley_tests::{read_16k, speech_clips};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Frames cycled through: 1 s of speech.
const FRAMES: usize = 50;
/// One 20 ms frame at 48 kHz, 16 kHz and 22.05 kHz.
const FRAME_48K: usize = 960;
const FRAME_16K: usize = 320;
const FRAME_22K: usize = 441;
/// The largest Opus packet (`parley_protocol::MAX_OPUS_PACKET_BYTES`).
const MAX_PACKET: usize = 1275;

/// Resamples the whole of `input` and drops the resampler's delay.
fn resample(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    let mut resampler = Resampler::new(from, to).unwrap();
    let mut out = Vec::new();
    resampler.process(input, &mut out).unwrap();
    resampler.flush(&mut out).unwrap();
    out.split_off(resampler.delay())
}

fn bench(c: &mut Criterion) {
    let speech = read_16k(&speech_clips()[0].path);
    let speech48 = resample(&speech, PIPELINE_RATE, 48_000);
    let speech22 = resample(&speech, PIPELINE_RATE, 22_050);
    let frames48: Vec<&[f32]> = speech48.chunks_exact(FRAME_48K).take(FRAMES).collect();
    let frames22: Vec<&[f32]> = speech22.chunks_exact(FRAME_22K).take(FRAMES).collect();
    let frames16: Vec<&[f32]> = speech.chunks_exact(FRAME_16K).take(FRAMES).collect();
    assert_eq!((frames48.len(), frames22.len(), frames16.len()), (FRAMES, FRAMES, FRAMES), "clip shorter than 1 s");
    let mut encoder = OpusEncoder::new(48_000, 32_000, 5).unwrap();
    let mut packet = [0u8; MAX_PACKET];
    let packets: Vec<Vec<u8>> = frames48
        .iter()
        .map(|f| {
            let n = encoder.encode(f, &mut packet).unwrap();
            packet[..n].to_vec()
        })
        .collect();
    let arrived = Instant::now();

    let mut group = c.benchmark_group("audio");
    group.sample_size(50).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut decoder = OpusDecoder::new(48_000).unwrap();
    let mut pcm = vec![0f32; FRAME_48K];
    let mut i = 0;
    group.bench_function("opus_decode_48k", |b| {
        b.iter(|| {
            i = (i + 1) % FRAMES;
            decoder.decode(black_box(&packets[i]), &mut pcm).unwrap()
        })
    });
    for complexity in [5, 10] {
        let mut encoder = OpusEncoder::new(48_000, 32_000, complexity).unwrap();
        group.bench_function(format!("opus_encode_48k_c{complexity}"), |b| {
            b.iter(|| {
                i = (i + 1) % FRAMES;
                encoder.encode(black_box(frames48[i]), &mut packet).unwrap()
            })
        });
    }
    for (name, from, to, frames) in
        [("resample_48k_16k", 48_000, PIPELINE_RATE, &frames48), ("resample_22k_48k", 22_050, 48_000, &frames22)]
    {
        let mut resampler = Resampler::new(from, to).unwrap();
        let mut out = Vec::with_capacity(2 * FRAME_48K);
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % FRAMES;
                out.clear();
                resampler.process(black_box(frames[i]), &mut out).unwrap();
                out.len()
            })
        });
    }
    // The session's ring: 2 s at 16 kHz (`input_buffer_ms` default); each frame is popped right away.
    let (mut feed, mut input) = input_ring(2 * PIPELINE_RATE as usize);
    let mut popped = vec![0f32; 2 * FRAME_16K];
    let mut seq = 0u32;
    group.bench_function("ring_push_pop_16k", |b| {
        b.iter(|| {
            i = (i + 1) % FRAMES;
            seq += 1;
            feed.push(black_box(frames16[i]), seq, seq as u64 * 20_000, arrived);
            input.pop(&mut popped)
        })
    });
    let mut resampler = Resampler::new(48_000, PIPELINE_RATE).unwrap();
    let mut pcm16 = Vec::with_capacity(FRAME_48K);
    group.bench_function("input_path_48k", |b| {
        b.iter(|| {
            i = (i + 1) % FRAMES;
            seq += 1;
            let n = decoder.decode(black_box(&packets[i]), &mut pcm).unwrap();
            pcm16.clear();
            resampler.process(&pcm[..n], &mut pcm16).unwrap();
            feed.push(&pcm16, seq, seq as u64 * 20_000, arrived);
            input.pop(&mut popped)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
