//! Tests of the `vad` model: Silero on real speech (LibriVox) and on digital silence.
use parley_server::models::vad::{CHUNK_SAMPLES, SAMPLE_RATE, Vad, VadState};
use parley_tests::{read_16k, speech_clips};

/// Speech probability of every 512-sample chunk of `audio` (one stream, from a fresh state).
fn probabilities(vad: &mut Vad, audio: &[f32]) -> Vec<f32> {
    let mut state = VadState::new();
    audio.chunks_exact(CHUNK_SAMPLES).map(|c| vad.push(&mut state, c.try_into().unwrap()).unwrap()).collect()
}

#[test]
fn speech_is_detected_and_digital_silence_is_not() {
    let mut vad = Vad::load(crate::manifest(), 1).unwrap();
    let silence = vec![0f32; SAMPLE_RATE as usize]; // 1 s
    for clip in speech_clips().iter().take(5) {
        let speech = read_16k(&clip.path);
        let audio = [&silence[..], &speech, &silence].concat();
        let p = probabilities(&mut vad, &audio);
        let lead = silence.len() / CHUNK_SAMPLES;
        let body = &p[lead..lead + speech.len() / CHUNK_SAMPLES];
        let name = clip.path.display();
        let max_lead = p[..lead].iter().fold(0f32, |m, &x| m.max(x));
        assert!(max_lead < 0.2, "{name}: leading digital silence scored {max_lead}");
        let max = body.iter().fold(0f32, |m, &x| m.max(x));
        let voiced = body.iter().filter(|&&x| x > 0.5).count() as f32 / body.len() as f32;
        assert!(max > 0.9 && voiced > 0.4, "{name}: speech max {max}, {voiced:.2} of chunks > 0.5");
        // The model holds on for a few hundred ms after speech ends (its hangover); after 0.5 s of
        // digital silence it must have let go.
        let tail = &p[p.len() - lead / 2..];
        let max_tail = tail.iter().fold(0f32, |m, &x| m.max(x));
        assert!(max_tail < 0.2, "{name}: trailing digital silence scored {max_tail}");
    }
}

#[test]
fn batch_gives_the_same_probabilities_as_single_streams() {
    let mut vad = Vad::load(crate::manifest(), 1).unwrap();
    let clips = speech_clips();
    let mut streams: Vec<Vec<f32>> = clips.iter().take(3).map(|c| read_16k(&c.path)).collect();
    streams.push(vec![0.0; 2 * SAMPLE_RATE as usize]); // a silent stream in the same batch
    let n = streams.iter().map(|s| s.len()).min().unwrap() / CHUNK_SAMPLES;
    let single: Vec<Vec<f32>> = streams.iter().map(|s| probabilities(&mut vad, &s[..n * CHUNK_SAMPLES])).collect();

    let mut states = vec![VadState::new(); streams.len()];
    for i in 0..n {
        let chunks: Vec<&[f32; CHUNK_SAMPLES]> =
            streams.iter().map(|s| s[i * CHUNK_SAMPLES..(i + 1) * CHUNK_SAMPLES].try_into().unwrap()).collect();
        let mut refs: Vec<&mut VadState> = states.iter_mut().collect();
        let batched = vad.push_batch(&mut refs, &chunks).unwrap();
        for (s, p) in batched.iter().enumerate() {
            assert!((p - single[s][i]).abs() < 1e-4, "stream {s} chunk {i}: batch {p} vs single {}", single[s][i]);
        }
    }
    assert!(single[0].iter().any(|&p| p > 0.9), "speech stream never detected");
    assert!(single[3].iter().all(|&p| p < 0.2), "silent stream detected as speech");
}

#[test]
fn mismatched_batch_is_an_error_and_empty_batch_is_empty() {
    let mut vad = Vad::load(crate::manifest(), 1).unwrap();
    let chunk = [0f32; CHUNK_SAMPLES];
    let mut a = VadState::new();
    assert!(vad.push_batch(&mut [&mut a], &[&chunk, &chunk]).is_err());
    assert!(vad.push_batch(&mut [], &[]).unwrap().is_empty());
}

#[test]
fn reset_starts_a_fresh_stream() {
    let mut vad = Vad::load(crate::manifest(), 1).unwrap();
    let speech = read_16k(&speech_clips()[0].path);
    let chunk: &[f32; CHUNK_SAMPLES] = speech[16_000..16_000 + CHUNK_SAMPLES].try_into().unwrap();
    let mut fresh = VadState::new();
    let first = vad.push(&mut fresh, chunk).unwrap();
    let mut used = VadState::new();
    for c in speech.chunks_exact(CHUNK_SAMPLES).take(20) {
        vad.push(&mut used, c.try_into().unwrap()).unwrap();
    }
    used.reset();
    assert_eq!(vad.push(&mut used, chunk).unwrap(), first);
}
