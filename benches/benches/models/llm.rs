//! Benchmarks of the `llm` model: prefill of a ~40-token prompt, and decoding.
use crate::manifest;
use criterion::Criterion;
use parley_server::models::llm::{Llm, Message};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

const SYSTEM: &str = "You are a helpful voice assistant. Answer in one short sentence.";
const QUESTION: &str = "Can you tell me a fun fact about the ocean, please?";
const DECODE_TOKENS: usize = 16;

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("llm");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));
    for threads in [1, 2] {
        let mut llm = Llm::load(manifest(), threads).unwrap_or_else(|e| panic!("{e}"));
        let history = [Message::system(SYSTEM), Message::user(QUESTION)];
        // Prefill of the whole ~40-token prompt (cache reset) and its first token.
        group.bench_function(format!("prefill_40_tokens/{threads}t"), |b| {
            b.iter(|| {
                llm.reset_cache();
                llm.generate(&history, 1, |_| ControlFlow::Continue(())).unwrap()
            })
        });
        // Per-token decoding: the mean step time of a reply, after a prefill that is not counted.
        group.bench_function(format!("decode_per_token/{threads}t"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    llm.reset_cache();
                    let t = Instant::now();
                    let g = llm.generate(&history, DECODE_TOKENS + 1, |_| ControlFlow::Continue(())).unwrap();
                    let steps = g.generated_tokens.saturating_sub(1).max(1) as u32;
                    total += t.elapsed().saturating_sub(Duration::from_secs_f64(g.prefill_ms / 1000.0)) / steps;
                }
                total
            })
        });
        // A follow-up turn whose conversation so far is cached: only the new turn is prefilled.
        let first = llm.generate(&history, 40, |_| ControlFlow::Continue(())).unwrap();
        let so_far = [Message::system(SYSTEM), Message::user(QUESTION), Message::assistant(first.text)];
        let mut follow_up = so_far.to_vec();
        follow_up.push(Message::user("Tell me another one."));
        group.bench_function(format!("cached_turn_prefill/{threads}t"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    llm.reset_cache();
                    llm.generate(&so_far, 1, |_| ControlFlow::Continue(())).unwrap();
                    let t = Instant::now();
                    let g = llm.generate(&follow_up, 1, |_| ControlFlow::Continue(())).unwrap();
                    total += t.elapsed();
                    assert!(g.reused_tokens > g.prefilled_tokens, "{g:?}");
                }
                total
            })
        });
    }
    group.finish();
}
