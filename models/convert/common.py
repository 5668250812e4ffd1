"""Shared helpers for the converters: an ONNX graph builder, audio front-end constants, WAV I/O, WER."""
import re
import subprocess
import wave
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
    """Builds an ONNX graph node by node; names are generated, constants become initializers."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, prefix="t"):
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, array, name=None):
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, out=None, domain=None, **attrs):
        out = out or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def op_multi(self, op_type, inputs, n_out, domain=None, **attrs):
        outs = [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs

    def save(self, path, name, inputs, outputs, metadata=None, extra_opsets=()):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="parley-models")
        model.ir_version = 8
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=v)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
        return path


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def hann(n):
    """Periodic Hann window (as torch.hann_window / librosa fftbins=True)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), f)


def mel_filters(sr, n_fft, n_mels):
    """Slaney-normalised mel filterbank [n_mels, 1 + n_fft // 2], identical to librosa.filters.mel defaults."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def dft_basis(n_fft):
    """Conv kernels [2 * bins, 1, n_fft]: the Hann-windowed real and imaginary DFT rows."""
    bins = n_fft // 2 + 1
    angle = 2 * np.pi * np.outer(np.arange(bins), np.arange(n_fft)) / n_fft
    window = hann(n_fft).astype(np.float64)
    basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])
    return basis[:, None, :].astype(np.float32)


def whisper_log_mel(g, audio):
    """Whisper's log-mel front end in graph `g`: `audio` f32 [1, samples] @16 kHz -> [1, 80, samples // 160]
    (n_fft 400, hop 160, centred reflect-padded frames, the last dropped; log10 floored 8 below the
    maximum and scaled to about [-1, 1]). The power spectrum is a strided convolution with the DFT
    basis: ONNX Runtime's STFT op is a plain DFT, ~45 ms for 8 s of audio on one core."""
    n_fft, hop, n_mels = 400, 160, 80
    x = g.op("Pad", [audio, g.const(np.array([0, n_fft // 2, 0, n_fft // 2], np.int64))], mode="reflect")
    x = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    spec = g.op("Conv", [x, g.const(dft_basis(n_fft))], strides=[hop])  # [1, 2 * bins, frames + 1]
    power = g.op("Mul", [spec, spec])
    # mel = fb @ re^2 + fb @ im^2 = [fb fb] @ [re^2; im^2]: [1, 80, frames + 1]; the last is dropped
    fb = mel_filters(16000, n_fft, n_mels)
    mel = g.op("MatMul", [g.const(np.concatenate([fb, fb], axis=1)), power])
    mel = g.op("Slice", [mel, g.const(np.array([0], np.int64)), g.const(np.array([-1], np.int64)), g.const(np.array([2], np.int64))])
    log = g.op("Div", [g.op("Log", [g.op("Max", [mel, g.const(np.float32(1e-10))])]), g.const(np.float32(np.log(10.0)))])
    floor = g.op("Sub", [g.op("ReduceMax", [log], keepdims=1), g.const(np.float32(8.0))])
    log = g.op("Max", [log, floor])
    return g.op("Div", [g.op("Add", [log, g.const(np.float32(4.0))]), g.const(np.float32(4.0))])


def read_wav(path):
    """Reads a PCM16 WAV (or headerless 16 kHz PCM16 .raw) as mono float32 in [-1, 1]; returns (samples, rate)."""
    path = Path(path)
    if path.suffix == ".raw":
        return np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0, 16000
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, f"{path}: only 16-bit PCM is supported"
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        ch, sr = w.getnchannels(), w.getframerate()
    return data.reshape(-1, ch).mean(axis=1), sr


def write_wav(path, samples, sr):
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def resample(x, sr_in, sr_out):
    """Band-limited resampling by FFT (fine for offline checks, not for streaming)."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n_out) * (n_out / len(x))
    return out.astype(np.float32)


def piper_ids(text, cfg):
    """Piper input ids for `text`: espeak-ng IPA (the CLI) mapped through the voice config's
    phoneme_id_map as ^ _ (id _)* $."""
    ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", cfg["espeak"]["voice"], text], capture_output=True, text=True, check=True).stdout
    pm = cfg["phoneme_id_map"]
    ids = pm["^"] + pm["_"]
    for ch in " ".join(line.strip() for line in ipa.splitlines() if line.strip()) + ".":
        if ch in pm:
            ids = ids + pm[ch] + pm["_"]
    return ids + pm["$"]


TESTDATA = Path("/usr/share/pocketsphinx/test/data")


def librivox_clips():
    """[(wav path, reference transcript)] for the pocketsphinx-testdata LibriVox and cards clips."""
    clips = []
    for folder, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for line in (TESTDATA / folder / listing).read_text().splitlines():
            m = re.match(r"<s> (.*) </s> \((.*)\)", line.strip())
            if m:
                clips.append((TESTDATA / folder / f"{Path(m.group(2)).name}.wav", m.group(1)))
    return clips


def normalize_words(s):
    return re.sub(r"[^a-z' ]", " ", s.lower()).split()


def word_errors(ref, hyp):
    """(edit distance in words, reference length)."""
    r, h = normalize_words(ref), normalize_words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[:], i
        for j in range(1, len(h) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
    return d[len(h)], len(r)
