//! Tests of the `text_embed` model.
use crate::manifest;
use parley_server::models::speaker::cosine;
use parley_server::models::text_embed::TextEmbedder;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// One embedder shared by the tests of this module (loaded once).
fn embedder() -> MutexGuard<'static, TextEmbedder> {
    static EMBEDDER: OnceLock<Mutex<TextEmbedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            let start = Instant::now();
            let embedder = TextEmbedder::load(manifest(), 2).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("text-embed: loaded in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
            Mutex::new(embedder)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn paraphrase_is_closer_than_an_unrelated_sentence() {
    let mut embedder = embedder();
    let query = embedder.embed("how do I kill a stuck process").unwrap();
    let near = embedder.embed("terminate a hung program").unwrap();
    let far = embedder.embed("bake a chocolate cake").unwrap();
    let (near_cos, far_cos) = (cosine(&query, &near), cosine(&query, &far));
    eprintln!("cos(query, paraphrase) {near_cos:.3}, cos(query, unrelated) {far_cos:.3}");
    assert!(near_cos > far_cos + 0.2, "paraphrase {near_cos:.3} vs unrelated {far_cos:.3}");
    for e in [&query, &near, &far] {
        assert_eq!(e.len(), 384);
        assert!((norm(e) - 1.0).abs() < 1e-4, "norm {}", norm(e));
    }
}

#[test]
fn batch_gives_the_single_results() {
    let texts =
        ["short", "a noticeably longer sentence, so that the short ones are padded", "", "I'm going to hurt you"];
    let mut embedder = embedder();
    let batch = embedder.embed_batch(&texts).unwrap();
    assert_eq!(batch.len(), texts.len());
    for (text, from_batch) in texts.iter().zip(&batch) {
        let single = embedder.embed(text).unwrap();
        let diff = single.iter().zip(from_batch).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{text:?}: batch differs from single by {diff:e}");
    }
    assert!(embedder.embed_batch(&[]).unwrap().is_empty());
}

#[test]
fn empty_odd_and_very_long_text_are_fine() {
    let long = "the quick brown fox jumps over the lazy dog ".repeat(2000);
    let mut embedder = embedder();
    for text in ["", "   ", "\u{0}\u{7}", "🙂🙂🙂", "日本語のテキスト", long.as_str()] {
        let e = embedder.embed(text).unwrap_or_else(|e| panic!("{:?}: {e}", &text[..text.len().min(20)]));
        assert_eq!(e.len(), 384);
        assert!((norm(&e) - 1.0).abs() < 1e-4, "norm {}", norm(&e));
    }
    // Only the first 256 word pieces count: a long text equals its own prefix.
    let prefix = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let (a, b) = (embedder.embed(&long).unwrap(), embedder.embed(&prefix).unwrap());
    assert!(cosine(&a, &b) > 0.9999, "long text vs its 256-piece prefix: {:.5}", cosine(&a, &b));
}
