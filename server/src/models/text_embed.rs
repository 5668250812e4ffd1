//! Sentence embedding (content safety), role `text-embed`: sentence-transformers all-MiniLM-L6-v2.
//!
//! Text is tokenized with the provisioned `tokenizer.json` (BERT word pieces, lower-cased),
//! truncated to the model's 256 word pieces (its `meta.max_tokens`, special tokens included), and
//! run through the graph, which does the mean pooling over the attention mask and the L2
//! normalisation itself. Batches are padded to their longest text.
use super::{Manifest, ModelError};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

const ROLE: &str = "text-embed";
/// Texts per graph run: bounds the attention memory of very large batches.
const MAX_BATCH: usize = 32;

#[derive(Debug, Clone, Deserialize)]
struct Meta {
    max_tokens: usize,
    embedding_dim: usize,
}

/// MiniLM sentence embedder: one ONNX Runtime session, used from one thread at a time.
pub struct TextEmbedder {
    session: Session,
    tokenizer: Tokenizer,
    dim: usize,
}

impl TextEmbedder {
    /// Loads the `text-embed` model and tokenizer with `threads` intra-op threads.
    pub fn load(manifest: &Manifest, threads: usize) -> Result<Self, ModelError> {
        let meta: Meta = manifest.meta(ROLE)?;
        if meta.max_tokens < 2 || meta.embedding_dim == 0 {
            return Err(ModelError::Invalid(format!("manifest meta of `{ROLE}` is inconsistent: {meta:?}")));
        }
        let mut tokenizer = manifest.tokenizer(ROLE)?;
        // The provisioned file already truncates; enforce the model's limit whatever it says.
        let truncation = TruncationParams { max_length: meta.max_tokens, ..TruncationParams::default() };
        if let Err(e) = tokenizer.with_truncation(Some(truncation)) {
            let path = manifest.path(ROLE, "tokenizer")?;
            return Err(ModelError::Tokenizer { path, reason: e.to_string() });
        }
        let session = manifest.session(ROLE, "model", threads)?;
        Ok(TextEmbedder { session, tokenizer, dim: meta.embedding_dim })
    }

    /// Length of the embeddings (384).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The L2-normalised embedding of one text. Empty text is fine (it embeds `[CLS] [SEP]`);
    /// text beyond 256 word pieces is ignored.
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, ModelError> {
        let mut out = self.embed_batch(&[text])?;
        out.pop().ok_or_else(|| ModelError::Invalid("text embedder returned no embedding".into()))
    }

    /// The embeddings of several texts, in order (the same values as [`TextEmbedder::embed`] on each).
    pub fn embed_batch(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(MAX_BATCH) {
            out.extend(self.run(chunk)?);
        }
        Ok(out)
    }

    fn run(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Invalid(format!("tokenizing for `{ROLE}`: {e}")))?;
        // Pad to the longest text here, whatever padding the tokenizer file asks for.
        let tokens = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; texts.len() * tokens];
        let mut mask = vec![0i64; texts.len() * tokens];
        for (row, encoding) in encodings.iter().enumerate() {
            let pairs = encoding.get_ids().iter().zip(encoding.get_attention_mask());
            for (col, (&id, &m)) in pairs.enumerate() {
                ids[row * tokens + col] = i64::from(id);
                mask[row * tokens + col] = i64::from(m);
            }
        }
        let shape = [texts.len(), tokens];
        let outputs = self.session.run(ort::inputs! {
            "input_ids" => Tensor::from_array((shape, ids))?,
            "attention_mask" => Tensor::from_array((shape, mask))?,
        })?;
        let embedding = outputs
            .get("embedding")
            .ok_or_else(|| ModelError::Invalid("text-embed graph returned no `embedding`".into()))?;
        let (_, data) = embedding.try_extract_tensor::<f32>()?;
        if data.len() != texts.len() * self.dim {
            return Err(ModelError::Invalid(format!(
                "text-embed graph returned {} values for {} texts of dimension {}",
                data.len(),
                texts.len(),
                self.dim
            )));
        }
        Ok(data.chunks_exact(self.dim).map(<[f32]>::to_vec).collect())
    }
}
