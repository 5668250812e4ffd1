"""`voice-enroll`: the enrolled identity of the preset voice, for the server's voice safety gate.

The Piper voice (role `tts`, already in `out`) speaks its own reference sentences (the first
Harvard sentences, public domain); the GE2E speaker model (role `speaker`, already in `out`) embeds
each one; the enrollment is their mean, L2-normalised. The server compares every chunk of reply
audio with it and cuts audio that deviates (see server/src/safety/voice.rs).

Output `voice-enroll/<voice>.json`: {"voice", "tts_sha256", "speaker_sha256", "sentences",
"embedding" [256], "self_cosine" (each sentence against the enrollment)}.
Needs the `tts` and `speaker` roles built first (ROLES order in provision.py).
"""
import hashlib
import json
import subprocess

import numpy as np
import onnxruntime as ort

import common
import speaker

VOICE = "en_US-joe-medium"
TTS_MODEL = f"tts/{VOICE}.onnx"
TTS_CONFIG = f"tts/{VOICE}.onnx.json"
OUT = f"voice-enroll/{VOICE}.json"

# Harvard sentences, list 1 (IEEE 1969; public domain): the voice's reference sentences.
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
]
# Held out for the check: the voice must match its enrollment on sentences it was not enrolled on.
HELD_OUT = ["Sure, I can help with that.", "The capital of France is Paris, a lovely city."]
# Other voices the check requires to be rejected (espeak-ng's own synthesis).
OTHER_VOICES = ["en-us", "en-gb+f3"]
# The gate's default threshold (server config `safety.voice_threshold`); the check asserts a margin.
THRESHOLD = 0.75


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speak(out, texts):
    """The Piper voice's audio for each text, at 16 kHz."""
    cfg = json.loads((out / TTS_CONFIG).read_text())
    session = _session(out / TTS_MODEL)
    scales = np.array([cfg["inference"][k] for k in ("noise_scale", "length_scale", "noise_w")], np.float32)
    audio = []
    for text in texts:
        ids = common.piper_ids(text, cfg)
        feeds = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64), "scales": scales}
        wav = session.run(None, feeds)[0].reshape(-1)
        audio.append(common.resample(wav, cfg["audio"]["sample_rate"], speaker.SAMPLE_RATE))
    return audio


def espeak(voice, text):
    """espeak-ng's own synthesis of `text` at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    pcm = np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32768
    return common.resample(pcm, 22050, speaker.SAMPLE_RATE)


def build(src, out):
    del src  # everything comes from the tts and speaker roles already in `out`
    embedder = speaker._session(out)
    per_sentence = np.stack([speaker.utterance_embedding(embedder, a) for a in speak(out, SENTENCES)])
    mean = per_sentence.mean(axis=0)
    mean /= np.linalg.norm(mean)
    enrollment = {
        "voice": VOICE,
        "tts_sha256": _sha256(out / TTS_MODEL),
        "speaker_sha256": _sha256(out / speaker.MODEL),
        "sentences": SENTENCES,
        "embedding": [round(float(x), 7) for x in mean],
        "self_cosine": [round(float(x), 4) for x in per_sentence @ mean],
    }
    (out / OUT).parent.mkdir(parents=True, exist_ok=True)
    (out / OUT).write_text(json.dumps(enrollment, indent=1) + "\n")
    return {"files": {"enrollment": {"file": OUT}}, "meta": {"voice": VOICE, "embedding_dim": int(mean.shape[0])}}


def check(out):
    """Held-out sentences of the voice match its enrollment; other voices and human readers do not."""
    enrollment = json.loads((out / OUT).read_text())
    for role, rel in (("tts", TTS_MODEL), ("speaker", speaker.MODEL)):
        if _sha256(out / rel) != enrollment[f"{role}_sha256"]:
            raise AssertionError(f"voice-enroll: enrolled with another {role} model than {rel}")
    e = np.array(enrollment["embedding"], np.float32)
    embedder = speaker._session(out)
    same = [float(speaker.utterance_embedding(embedder, a) @ e) for a in speak(out, HELD_OUT)]
    others = [float(speaker.utterance_embedding(embedder, espeak(v, t)) @ e) for v in OTHER_VOICES for t in HELD_OUT]
    humans = [float(speaker.utterance_embedding(embedder, common.read_wav(p)[0]) @ e) for p, _ in common.librivox_clips()]
    if min(same) < THRESHOLD + 0.05:
        raise AssertionError(f"voice-enroll: the voice's own held-out sentences score {min(same):.3f} < {THRESHOLD} + 0.05")
    if max(others + humans) > THRESHOLD - 0.05:
        raise AssertionError(f"voice-enroll: another voice scores {max(others + humans):.3f} > {THRESHOLD} - 0.05")
    return (
        f"cosine to the enrollment: own held-out sentences {min(same):.2f}..{max(same):.2f}; "
        f"espeak-ng voices ≤ {max(others):.2f}; human readers ≤ {max(humans):.2f} (gate threshold {THRESHOLD})"
    )
