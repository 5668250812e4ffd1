//! Benchmarks of the safety gates as the pipeline runs them: the input gate on a spoken-length
//! request, the output gate on a reply chunk (with the chunk before it), and the voice gate on
//! 1 s and 2 s of synthesized reply audio (its window sizes).
use crate::manifest;
use parley_server::models::text_embed::TextEmbedder;
use parley_server::models::tts::Tts;
use parley_server::safety::content::ContentClassifier;
use parley_server::safety::policy::Policy;
use parley_server::safety::voice::VoiceGate;
use std::hint::black_box;
use std::sync::Arc;

pub fn bench(c: &mut criterion::Criterion) {
    let policy = Arc::new(Policy::load(None).unwrap());
    let embedder = TextEmbedder::load(manifest(), 1).unwrap_or_else(|e| panic!("{e}"));
    let mut classifier = ContentClassifier::new(policy, embedder).unwrap();
    let mut group = c.benchmark_group("safety");
    group.sample_size(20);
    let request = "Can you tell me how to get rid of the weeds in my garden without chemicals?";
    group.bench_function("input_gate", |b| b.iter(|| classifier.judge(black_box(request), false).unwrap()));
    let chunk = "Sure, pulling them by hand after rain works well. You can also use vinegar or boiling water.";
    group.bench_function("output_gate", |b| b.iter(|| classifier.judge(black_box(chunk), true).unwrap()));

    let mut gate = VoiceGate::load(manifest(), 1, 0.75, 0.65).unwrap_or_else(|e| panic!("{e}"));
    let mut tts = Tts::load(manifest(), 2).unwrap();
    let rate = tts.sample_rate();
    let speech = tts.synthesize("The weather today is mild and sunny, with a light breeze from the west.").unwrap();
    for seconds in [1.0, 2.0] {
        let audio = &speech[..(seconds * rate as f64) as usize];
        group.bench_function(format!("voice_gate_{seconds}s"), |b| {
            b.iter(|| gate.check(black_box(audio), rate).unwrap())
        });
    }
    group.finish();
}
