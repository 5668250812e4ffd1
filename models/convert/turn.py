"""`turn` role: Smart Turn v3.2 (`pipecat-ai`), an acoustic end-of-turn classifier, with its front end inside.

The model, `smart-turn-v3.2-cpu.onnx` (BSD-2-Clause, int8), is a Whisper tiny encoder with a
classification head, trained to tell a finished turn from a pause in the middle of one by how the
speech sounds (pitch, lengthening, trailing off), not by its words. Upstream feeds it the last 8 s of
16 kHz audio, zero-padded at the front, scaled to zero mean and unit variance over the whole 8 s,
as an 80 × 800 Whisper log-mel spectrogram (`pipecat/audio/turn/smart_turn/_whisper_features.py`).

Graph `smart_turn.onnx`: `audio` f32 [1, 128000] (the caller pads or cuts to the last 8 s) →
`probability` f32 [1, 1] that the turn is over. The normalisation and the log-mel spectrogram
(`common.whisper_log_mel`) are prepended to the shipped graph; `build` checks the result against the
upstream numpy features and the shipped graph on real speech.
"""
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort

import common

SAMPLE_RATE = 16000
SAMPLES = 8 * SAMPLE_RATE
SHIPPED = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
FEATURES = "pipecat/audio/turn/smart_turn/_whisper_features.py"
MODEL = "turn/smart_turn.onnx"
MAX_FEATURE_DIFF = 5e-3  # log-mel, float32 against upstream's float64 (measured 2.4e-3)
MAX_DIFF = 0.2  # probability
MIN_SEPARATION = 0.3  # mean probability, sentence ends over mid-sentence cuts (measured: 0.55)


def _front_end(g):
    """`audio` [1, SAMPLES] → `input_features` [1, 80, 800], as upstream's `do_normalize=True`."""
    mean = g.op("ReduceMean", ["audio"], keepdims=1)
    centred = g.op("Sub", ["audio", mean])
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred])], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(1e-7))])])
    mel = common.whisper_log_mel(g, g.op("Div", [centred, std]))
    g.op("Identity", [mel], out="input_features")


def build(src, out):
    shipped = onnx.load(str(src / SHIPPED))
    g = common.Graph()
    _front_end(g)
    graph = shipped.graph
    nodes = list(g.nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(g.inits)
    del graph.input[:]
    graph.input.append(common.tensor("audio", [1, SAMPLES]))
    graph.node.append(onnx.helper.make_node("Identity", [graph.output[0].name], ["probability"]))
    del graph.output[:]
    graph.output.append(common.tensor("probability", [1, 1]))
    shipped.metadata_props.add(key="source", value="PyPI pipecat-ai 1.14.0, " + SHIPPED + " (BSD-2-Clause)")
    path = out / MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(shipped, str(path))
    onnx.checker.check_model(str(path))
    _check_parity(src, out)
    return {
        "files": {"model": {"file": MODEL, "inputs": ["audio"], "outputs": ["probability"]}},
        "meta": {"sample_rate": SAMPLE_RATE, "samples": SAMPLES},
    }


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options)


def window(audio):
    """The last 8 s of `audio`, zero-padded at the front (as upstream)."""
    audio = np.asarray(audio, np.float32)[-SAMPLES:]
    return np.pad(audio, (SAMPLES - len(audio), 0))[None, :]


def _ends(trailing_ms=200):
    """(name, speech ending a LibriVox sentence + `trailing_ms` of silence, its first 60 %)."""
    for path, _ in common.librivox_clips():
        if path.parent.name != "librivox":
            continue
        wav, sr = common.read_wav(path)
        wav = common.resample(wav, sr, SAMPLE_RATE)
        end = int(np.nonzero(np.abs(wav) > 0.01)[0][-1]) + 1
        whole = np.concatenate([wav[:end], np.zeros(SAMPLE_RATE * trailing_ms // 1000, np.float32)])
        yield path.stem, whole, wav[: end * 6 // 10]


def _check_parity(src, out):
    """The front end gives upstream's features (to float32's rounding), and the wrapped graph the
    shipped graph's probability on them within the int8 model's own jitter: input noise of 1e-6
    moves it by up to 0.14 (with the features in float64, equal to upstream's to 8e-6, it still
    differed by 0.14)."""
    spec = importlib.util.spec_from_file_location("smart_turn_features", src / FEATURES)
    features = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(features)
    g = common.Graph()
    _front_end(g)
    front_end = g.save(out / "turn/front_end.onnx", "front_end", [common.tensor("audio", [1, SAMPLES])],
                       [common.tensor("input_features", [1, 80, 800])], extra_opsets=())
    front, shipped, wrapped = _session(front_end), _session(src / SHIPPED), _session(out / MODEL)
    front_end.unlink()
    worst_features = worst = 0.0
    for _, whole, part in _ends():
        for audio in (whole, part):
            x = window(audio)
            ref = features.compute_whisper_log_mel_features(x[0])[None]
            worst_features = max(worst_features, float(np.abs(front.run(None, {"audio": x})[0] - ref).max()))
            expected = shipped.run(None, {"input_features": ref})[0]
            worst = max(worst, float(np.abs(wrapped.run(None, {"audio": x})[0] - expected).max()))
    if worst_features > MAX_FEATURE_DIFF or worst > MAX_DIFF:
        raise AssertionError(f"turn: the wrapped graph differs from upstream by {worst_features:.2e} in its features "
                             f"(> {MAX_FEATURE_DIFF}) or {worst:.3f} in probability (> {MAX_DIFF})")


def check(out):
    """On real speech, sentence ends score as more finished than cuts at 60 % of the same sentences."""
    session = _session(out / MODEL)
    scores = [[float(session.run(None, {"audio": window(a)})[0].item()) for a in (whole, part)] for _, whole, part in _ends()]
    done, cut = (float(np.mean(s)) for s in zip(*scores))
    rows = " ".join(f"{a:.2f}/{b:.2f}" for a, b in scores)
    if done - cut < MIN_SEPARATION:
        raise AssertionError(f"turn: sentence ends score {done:.3f} on average, mid-sentence cuts {cut:.3f}: {rows}")
    return f"turn: sentence end / cut mid-sentence on {len(scores)} LibriVox clips: {rows}"
