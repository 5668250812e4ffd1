"""`speaker`: Resemblyzer's GE2E voice encoder (`Resemblyzer==0.1.4`) as ONNX, with its mel front end inside.

The checkpoint `resemblyzer/pretrained.pt` is a legacy torch pickle, read by `legacy_pt` without torch.
Network: mel power spectrogram (n_fft 400, hop 160, 40 slaney mels, not log) → 3-layer LSTM(40→256)
→ last hidden state → Linear(256→256) → ReLU → L2 normalisation.

Graph `ge2e.onnx`: `wav` f32 [B, samples] @16 kHz → `embedding` f32 [B, 256].
The graph frames `wav` without padding (frame t covers samples [160 t, 160 t + 400)), so one partial
utterance of 160 frames is `segment_samples` = 159 * 160 + 400 = 25 840 samples. The caller reproduces
Resemblyzer's `embed_utterance` by cutting these segments out of the utterance after reflect-padding it
by n_fft / 2 = 200 samples at each end (librosa's `center=True`), so every frame sees the same samples
as in Resemblyzer; `utterance_segments` below is the reference for that, and the Rust `SpeakerEmbedder`
does the same using `meta`. Two differences from Resemblyzer's defaults: segments start every 80 frames
(50 % overlap; Resemblyzer's rate 1.3/s gives 77), and its webrtcvad silence trimming is left out.
"""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import common
import legacy_pt

SAMPLE_RATE = 16000
N_FFT = 400
FRAME_HOP = 160
N_MELS = 40
HIDDEN = 256
LAYERS = 3
SEGMENT_FRAMES = 160  # 1.6 s partial utterances
SEGMENT_STEP_FRAMES = 80  # 50 % overlap (Resemblyzer's default rate of 1.3 segments/s gives 77)
SEGMENT_SAMPLES = (SEGMENT_FRAMES - 1) * FRAME_HOP + N_FFT
MIN_COVERAGE = 0.75  # keep a last, zero-padded segment only if the audio covers this much of it
TARGET_DBFS = -30.0  # volume is raised to this, never lowered

MODEL = "speaker/ge2e.onnx"
CHECKPOINT = "resemblyzer/pretrained.pt"


def load_weights(src):
    return legacy_pt.load(src / CHECKPOINT)["model_state"]


def build_graph(weights):
    g = common.Graph()
    # Power spectrum as a strided convolution with the DFT basis: [B, 2 * bins, frames].
    wav = g.op("Unsqueeze", ["wav", g.const(np.array([1], np.int64))])
    spec = g.op("Conv", [wav, g.const(common.dft_basis(N_FFT))], strides=[FRAME_HOP])
    power = g.op("Mul", [spec, spec])
    # mel = fb @ re^2 + fb @ im^2 = [fb fb] @ [re^2; im^2]: [B, 40, frames].
    fb = common.mel_filters(SAMPLE_RATE, N_FFT, N_MELS)
    mel = g.op("MatMul", [g.const(np.concatenate([fb, fb], axis=1)), power])
    x = g.op("Transpose", [mel], perm=[2, 0, 1])  # [frames, B, 40], as the ONNX LSTM wants

    # The checkpoint's tensors are stored under their own names and layouts (check() reads them back);
    # the gate reordering below is constant-folded by ONNX Runtime at load.
    def onnx_gates(name):
        """torch LSTM gate blocks (input, forget, cell, output) → ONNX order (input, output, forget, cell)."""
        i, f, c, o = g.op_multi("Split", [g.const(weights[name], name=name)], 4, axis=0)
        return g.op("Concat", [i, o, f, c], axis=0)

    axis_0 = g.const(np.array([0], np.int64))
    for layer in range(LAYERS):
        w = g.op("Unsqueeze", [onnx_gates(f"lstm.weight_ih_l{layer}"), axis_0])
        r = g.op("Unsqueeze", [onnx_gates(f"lstm.weight_hh_l{layer}"), axis_0])
        b = g.op("Concat", [onnx_gates(f"lstm.bias_ih_l{layer}"), onnx_gates(f"lstm.bias_hh_l{layer}")], axis=0)
        b = g.op("Unsqueeze", [b, axis_0])
        y, y_last = g.op_multi("LSTM", [x, w, r, b], 2, hidden_size=HIDDEN)
        x = g.op("Squeeze", [y, g.const(np.array([1], np.int64))])  # [frames, B, 256]
    hidden = g.op("Squeeze", [y_last, axis_0])  # [B, 256]
    linear = g.op("Gemm", [hidden, *(g.const(weights[n], name=n) for n in ("linear.weight", "linear.bias"))], transB=1)
    embed = g.op("Relu", [linear])
    norm = g.op("ReduceL2", [embed], axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const(np.array(1e-12, np.float32))])  # an all-zero vector stays zero
    g.op("Div", [embed, norm], out="embedding")
    return g


def build(src, out):
    weights = load_weights(src)
    build_graph(weights).save(
        out / MODEL,
        "resemblyzer_ge2e",
        [common.tensor("wav", ["batch", "samples"])],
        [common.tensor("embedding", ["batch", HIDDEN])],
        metadata={"source": "PyPI Resemblyzer 0.1.4, resemblyzer/pretrained.pt (Apache-2.0)"},
    )
    return {
        "files": {"model": {"file": MODEL, "inputs": ["wav"], "outputs": ["embedding"]}},
        "meta": {
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "frame_hop": FRAME_HOP,
            "segment_frames": SEGMENT_FRAMES,
            "segment_samples": SEGMENT_SAMPLES,
            "segment_step_frames": SEGMENT_STEP_FRAMES,
            "min_coverage": MIN_COVERAGE,
            "target_dbfs": TARGET_DBFS,
            "embedding_dim": HIDDEN,
        },
    }


# ---- reference pipeline (numpy) and parity check ----


def normalize_volume(wav):
    """Raises the level to TARGET_DBFS (never lowers it); silence stays silence."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if len(wav) else 0.0
    if rms == 0.0:
        return wav
    gain = 10 ** ((TARGET_DBFS - 20 * np.log10(rms)) / 20)
    return wav * gain if gain > 1 else wav


def segment_starts(n_samples):
    """First frames of the partial utterances (Resemblyzer's `compute_partial_slices`)."""
    n_frames = int(np.ceil((n_samples + 1) / FRAME_HOP))
    steps = max(1, n_frames - SEGMENT_FRAMES + SEGMENT_STEP_FRAMES + 1)
    starts = list(range(0, steps, SEGMENT_STEP_FRAMES))
    coverage = (n_samples - starts[-1] * FRAME_HOP) / (SEGMENT_FRAMES * FRAME_HOP)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts


def utterance_segments(wav):
    """[n, SEGMENT_SAMPLES] graph inputs for one utterance (volume-normalised inside)."""
    wav = normalize_volume(np.asarray(wav, np.float32))
    starts = segment_starts(len(wav))
    covered = starts[-1] * FRAME_HOP + SEGMENT_FRAMES * FRAME_HOP
    wav = np.pad(wav, (0, max(0, covered - len(wav))))
    wav = np.pad(wav, N_FFT // 2, mode="reflect")
    return np.stack([wav[s * FRAME_HOP : s * FRAME_HOP + SEGMENT_SAMPLES] for s in starts]).astype(np.float32)


def reference_mels(segment):
    """[frames, 40] mel power spectrogram of one segment, framed without padding (float64 FFT)."""
    n = 1 + (len(segment) - N_FFT) // FRAME_HOP
    frames = np.stack([segment[t * FRAME_HOP : t * FRAME_HOP + N_FFT] for t in range(n)]).astype(np.float64)
    power = np.abs(np.fft.rfft(frames * common.hann(N_FFT), axis=1)) ** 2
    return power @ common.mel_filters(SAMPLE_RATE, N_FFT, N_MELS).T.astype(np.float64)


def reference_embedding(weights, mels):
    """torch.nn.LSTM(40, 256, 3) + Linear + ReLU + L2, step by step in float64 (torch gate order)."""

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    x = mels
    for layer in range(LAYERS):
        w_ih, w_hh = weights[f"lstm.weight_ih_l{layer}"], weights[f"lstm.weight_hh_l{layer}"]
        bias = weights[f"lstm.bias_ih_l{layer}"] + weights[f"lstm.bias_hh_l{layer}"]
        h, c, ys = np.zeros(HIDDEN), np.zeros(HIDDEN), []
        for x_t in x:
            i, f, gate, o = np.split(w_ih @ x_t + w_hh @ h + bias, 4)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(gate)
            h = sigmoid(o) * np.tanh(c)
            ys.append(h)
        x = np.stack(ys)
    e = np.maximum(weights["linear.weight"] @ h + weights["linear.bias"], 0)
    return e / np.linalg.norm(e)


def _session(out):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(out / MODEL), options, providers=["CPUExecutionProvider"])


def utterance_embedding(session, wav):
    e = session.run(None, {"wav": utterance_segments(wav)})[0].mean(axis=0)
    return e / np.linalg.norm(e)


def check(out):
    """Parity with the numpy reference on real speech, and same-speaker > different-speaker similarity."""
    session = _session(out)
    clips = {path.stem: common.read_wav(path)[0] for path, _ in common.librivox_clips()}
    librivox = sorted(k for k in clips if not k.startswith("00"))
    cards = sorted(k for k in clips if k.startswith("00"))

    # 1) parity: two segments of one utterance in one batch, against the float64 reference.
    segments = utterance_segments(clips[librivox[0]])[:2]
    onnx_out = session.run(None, {"wav": segments})[0]
    weights = _checkpoint_from_graph(out)
    ref = np.stack([reference_embedding(weights, reference_mels(s)) for s in segments])
    diff = float(np.abs(onnx_out - ref).max())
    if diff > 1e-4:
        raise AssertionError(f"speaker: ONNX differs from the numpy reference by {diff:.2e}")

    # 2) speaker discrimination: one LibriVox reader across clips vs the cards speaker.
    emb = {k: utterance_embedding(session, clips[k]) for k in librivox + cards}
    same = [emb[a] @ emb[b] for i, a in enumerate(librivox) for b in librivox[i + 1 :]]
    cross = [emb[a] @ emb[b] for a in librivox for b in cards]
    if min(same) <= max(cross):
        raise AssertionError(f"speaker: same-reader cosine min {min(same):.3f} <= cross-speaker max {max(cross):.3f}")
    silent = utterance_embedding(session, np.zeros(SAMPLE_RATE, np.float32))
    if not np.all(np.isfinite(silent)):
        raise AssertionError("speaker: silence gives a non-finite embedding")
    return (
        f"max|onnx-ref| {diff:.1e} over {len(segments)} segments; cosine same reader "
        f"{min(same):.2f}..{max(same):.2f} > other speaker {min(cross):.2f}..{max(cross):.2f}"
    )


def _checkpoint_from_graph(out):
    """The checkpoint's tensors, read back from the graph's initializers (check() needs no wheel)."""
    model = onnx.load(str(out / MODEL))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith(("lstm.", "linear."))}
