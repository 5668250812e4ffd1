#!/usr/bin/env python3
"""Scenario client for Parley's OpenAI Realtime endpoint (GA event set), driven by the real SDK.

    PY tests/realtime/sdk_check.py --url ws://127.0.0.1:PORT/v1 --speech WAV [--speech WAV2] \
        --events-out FILE.jsonl [--api-key KEY] [--case NAME ...]

PY is a venv from `scripts/realtime-sdk python 1|3` (openai 1.109.1 or 3.63.0); the script works with
both. Every case opens its own connection with `openai.AsyncOpenAI(websocket_base_url=URL)` and
`client.realtime.connect(model="parley")` (the SDK appends /realtime?model=parley to URL), except
`beta_header`, which uses the `websockets` library directly to send what the SDK never does.

Every event received is validated strictly, from its raw JSON, against the SDK's own union:
`pydantic.TypeAdapter(openai.types.realtime.RealtimeServerEvent).validate_json(raw, strict=True)`
(pydantic's strict mode: no coercion, so "300" is no integer); a validation error fails the case,
naming the event and the failing model's errors. The SDK's own lenient parse_event must not raise
either. Events whose type starts with
`parley.` are Parley's extensions: recorded, not validated. Every raw event is written to
--events-out as {"case": NAME, "sdk": OPENAI_VERSION, "event": EVENT} (one a line), which
tests/realtime/pipecat_check.py then feeds to Pipecat's parser.

The first --speech clip is used by spoken_turn_20ms and manual_commit, the last one (WAV2 when
given) by spoken_turn_100ms and barge_in_truncate. A clip is any PCM16 WAV (Parley's are 16 kHz
mono); it is mixed to mono and resampled to the API's 24 kHz by linear interpolation.

Prints one line per case, `PASS name [(notes)]` or `FAIL name: reason`, then exactly
`N passed, M failed`; exits 1 when any case failed (2 on bad arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import sys
import time
import typing
import wave
from array import array
from collections.abc import Callable
from typing import Any

import openai
import pydantic
import websockets
from openai.types.realtime import RealtimeServerEvent

RATE = 24000  # the API's pcm16 rate
MODEL = "parley"
API_KEY = "parley-test"

# Timeouts (seconds). The server runs real models on 2 CPU cores: a reply takes 1-5 s.
EVENT_TIMEOUT = 30.0  # one awaited server event (other than a reply's end)
RESPONSE_TIMEOUT = 60.0  # one response, from response.create (or end of speech) to response.done
CASE_TIMEOUT = 240.0  # a whole case, whatever it waits on

STRICT = pydantic.TypeAdapter(RealtimeServerEvent)


def _member_by_type() -> dict[str, Any]:
    """The union's member model for each event `type` (to name the failing model's errors)."""
    union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], PropertyInfo]
    out: dict[str, Any] = {}
    for member in typing.get_args(union):
        for literal in typing.get_args(member.model_fields["type"].annotation):
            out[literal] = member
    return out


MEMBERS = _member_by_type()


class CaseFailure(Exception):
    pass


def short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CaseFailure(message)


def strict_validate(raw: bytes | str, event: dict) -> str | None:
    """None when `raw` validates against RealtimeServerEvent, else a readable error."""
    etype = event.get("type")
    try:
        parsed = STRICT.validate_json(raw, strict=True)
    except pydantic.ValidationError as union_error:
        member = MEMBERS.get(etype) if isinstance(etype, str) else None
        if member is None:
            return f"type {etype!r} is not a RealtimeServerEvent (event {short(event)})"
        try:
            pydantic.TypeAdapter(member).validate_json(raw, strict=True)
        except pydantic.ValidationError as member_error:
            errors = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {short(e.get('input'), 120)})"
                for e in member_error.errors()
            )
            return f"{member.__name__}: {errors}"
        return f"{short(str(union_error), 600)}"
    got = getattr(parsed, "type", None)
    if got != etype:
        return f"validated as {type(parsed).__name__} (type {got!r}), not {etype!r}"
    return None


def summarize(events: list[dict]) -> str:
    """Event types in order, runs collapsed (`a, b x12, c`), interleaved deltas counted together
    (`[x.delta x9, y.delta x9]`)."""
    runs: list[dict[str, int]] = []
    for event in events:
        etype = str(event.get("type", "?"))
        delta = etype.endswith(".delta")
        last = runs[-1] if runs else None
        same = last is not None and list(last) == [etype]
        deltas = last is not None and delta and all(k.endswith(".delta") for k in last)
        if last is not None and (same or deltas):
            last[etype] = last.get(etype, 0) + 1
        else:
            runs.append({etype: 1})
    parts = []
    for run in runs:
        items = [t if n == 1 else f"{t} x{n}" for t, n in run.items()]
        parts.append(items[0] if len(items) == 1 else "[" + ", ".join(items) + "]")
    text = ", ".join(parts) or "none"
    return text if len(text) <= 1500 else "..." + text[-1500:]


# --- audio ------------------------------------------------------------------------------------


def read_wav_24k(path: str) -> bytes:
    """A PCM16 WAV as 24 kHz mono pcm16 little-endian bytes (linear-interpolation resampling)."""
    with wave.open(path, "rb") as w:
        channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        data = w.readframes(frames)
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples, want 16-bit PCM")
    samples = array("h")
    samples.frombytes(data)
    if sys.byteorder == "big":
        samples.byteswap()
    if channels > 1:
        samples = array(
            "h", (sum(samples[i : i + channels]) // channels for i in range(0, len(samples), channels))
        )
    return pcm16_bytes(resample_linear(samples, rate, RATE))


def resample_linear(samples: array, src_rate: int, dst_rate: int) -> array:
    if src_rate == dst_rate or not samples:
        return array("h", samples)
    n_out = (len(samples) * dst_rate) // src_rate
    step = src_rate / dst_rate
    last = len(samples) - 1
    out = array("h", bytes(2 * n_out))
    for i in range(n_out):
        pos = i * step
        j = int(pos)
        if j >= last:
            out[i] = samples[last]
            continue
        frac = pos - j
        a = samples[j]
        out[i] = round(a + (samples[j + 1] - a) * frac)
    return out


def pcm16_bytes(samples: array) -> bytes:
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * int(RATE * seconds))


def chunks(pcm: bytes, ms: int) -> list[bytes]:
    size = 2 * RATE * ms // 1000
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- a connection under test -------------------------------------------------------------------


class Session:
    """One connection: a reader task validates and records every event; waits look at the history."""

    def __init__(self, name: str, recorder: Recorder):
        self.name = name
        self.recorder = recorder
        self.events: list[dict] = []
        self.problems: list[str] = []  # strict-validation failures, SDK parse failures
        self.closed: str | None = None
        self.notes: list[str] = []
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.conn: Any = None

    # reading

    def start_reader(self, recv_bytes: Callable[[], Any], parse: Callable[[bytes], Any] | None) -> None:
        self._reader = asyncio.create_task(self._read(recv_bytes, parse))

    async def _read(self, recv_bytes: Callable[[], Any], parse: Callable[[bytes], Any] | None) -> None:
        try:
            while True:
                raw = await recv_bytes()
                self.ingest(raw, parse)
        except websockets.exceptions.ConnectionClosed as e:
            self.closed = f"connection closed: {e}"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure ends the case
            self.closed = f"reading failed: {type(e).__name__}: {e}"
        finally:
            self._changed.set()

    def ingest(self, raw: bytes | str, parse: Callable[[bytes], Any] | None) -> None:
        try:
            event = json.loads(raw)
        except ValueError as e:
            self.problems.append(
                f"a frame is not JSON ({e}): {short(raw if isinstance(raw, str) else raw.decode('utf-8', 'replace'))}"
            )
            self._changed.set()
            return
        if not isinstance(event, dict):
            self.problems.append(f"a frame is not a JSON object: {short(event)}")
            self._changed.set()
            return
        self.recorder.write(self.name, event)
        etype = event.get("type")
        if not (isinstance(etype, str) and etype.startswith("parley.")):
            error = strict_validate(raw, event)
            if error:
                self.problems.append(
                    f"event #{len(self.events)} {etype!r} ({event.get('event_id')}) fails validation: {error}"
                )
            if parse is not None:
                try:
                    parse(raw)  # the SDK's own (lenient) parsing must not raise either
                except Exception as e:  # noqa: BLE001
                    self.problems.append(f"the SDK cannot parse {etype!r}: {type(e).__name__}: {e}")
        self.events.append(event)
        self._changed.set()

    async def stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass

    # waiting

    def fail_if_problems(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise CaseFailure(self.problems[0] + more)

    async def wait(
        self,
        what: str,
        predicate: Callable[[dict], bool],
        timeout: float = EVENT_TIMEOUT,
        start: int = 0,
    ) -> tuple[int, dict]:
        """The first event at index >= start matching predicate: (index, event). Fails on timeout,
        on a closed connection, or on any validation problem so far."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            self.fail_if_problems()
            for i in range(start, len(self.events)):
                if predicate(self.events[i]):
                    return i, self.events[i]
            if self.closed:
                raise CaseFailure(f"waiting for {what}: {self.closed}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaseFailure(f"no {what} within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_type(
        self, etype: str, timeout: float = EVENT_TIMEOUT, start: int = 0, **fields: Any
    ) -> tuple[int, dict]:
        def match(e: dict) -> bool:
            return e.get("type") == etype and all(e.get(k) == v for k, v in fields.items())

        what = etype + (f" with {fields}" if fields else "")
        return await self.wait(what, match, timeout, start)

    async def wait_error(self, timeout: float = EVENT_TIMEOUT, start: int = 0) -> tuple[int, dict]:
        return await self.wait_type("error", timeout, start)

    async def quiet(self, seconds: float) -> None:
        """Let events arrive for a while (validation still applies)."""
        await asyncio.sleep(seconds)
        self.fail_if_problems()

    def of_type(self, etype: str, start: int = 0, end: int | None = None) -> list[dict]:
        return [e for e in self.events[start:end] if e.get("type") == etype]

    def index_of(self, etype: str, start: int = 0, **fields: Any) -> int | None:
        for i in range(start, len(self.events)):
            e = self.events[i]
            if e.get("type") == etype and all(e.get(k) == v for k, v in fields.items()):
                return i
        return None

    # sending

    async def send(self, event: dict) -> None:
        await self.conn.send(event)

    async def stream(self, pcm: bytes, chunk_ms: int, paced: bool) -> None:
        """input_audio_buffer.append in chunk_ms pieces, paced at real time when `paced`."""
        t0 = time.monotonic()
        sent_ms = 0
        for piece in chunks(pcm, chunk_ms):
            await self.conn.input_audio_buffer.append(audio=b64(piece))
            sent_ms += len(piece) * 1000 // (2 * RATE)
            if paced:
                delay = t0 + sent_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    # checks shared by the cases

    def check_ids(self) -> None:
        """Every event_id unique and `event_`-prefixed; item ids `item_`, response ids `resp_`;
        nothing of a response after its response.done."""
        self.fail_if_problems()
        finished: set[str] = set()
        for e in self.events:
            if e.get("response_id") in finished and not str(e.get("type")).startswith("parley."):
                raise CaseFailure(f"{e.get('type')} for {e['response_id']} after its response.done")
            if e.get("type") == "response.done" and isinstance(e.get("response"), dict):
                finished.add(e["response"].get("id"))
        seen: set[str] = set()
        for i, e in enumerate(self.events):
            etype = str(e.get("type"))
            if etype.startswith("parley."):
                continue
            eid = e.get("event_id")
            check(
                isinstance(eid, str) and eid.startswith("event_"),
                f"event #{i} {etype} has event_id {eid!r}, want event_...",
            )
            check(eid not in seen, f"event_id {eid} repeats (event #{i} {etype})")
            seen.add(eid)
            for key in ("item_id", "previous_item_id"):
                value = e.get(key)
                if value is not None and etype != "error":
                    check(str(value).startswith("item_"), f"{etype}.{key} is {value!r}, want item_...")
            item = e.get("item")
            if isinstance(item, dict) and item.get("id") is not None:
                check(
                    str(item["id"]).startswith("item_"), f"{etype}.item.id is {item['id']!r}, want item_..."
                )
            if e.get("response_id") is not None:
                check(
                    str(e["response_id"]).startswith("resp_"),
                    f"{etype}.response_id is {e['response_id']!r}, want resp_...",
                )
            response = e.get("response")
            if isinstance(response, dict) and response.get("id") is not None:
                check(
                    str(response["id"]).startswith("resp_"),
                    f"{etype}.response.id is {response['id']!r}, want resp_...",
                )


class Recorder:
    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in main

    def write(self, case: str, event: dict) -> None:
        self.file.write(json.dumps({"case": case, "sdk": openai.__version__, "event": event}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- response checks ---------------------------------------------------------------------------


async def answer(s: Session, start: int, kind: str, asked: str) -> dict:
    """The first `kind` or `error` event at/after start; fails the case on an error."""
    _, event = await s.wait(f"{kind} or error", lambda e: e.get("type") in (kind, "error"), start=start)
    check(event["type"] == kind, f"{asked} got an error: {short(event.get('error'))}")
    return event


async def await_response(
    s: Session, start: int, timeout: float = RESPONSE_TIMEOUT
) -> tuple[int, dict, int, dict]:
    """The next response.created at/after start and its response.done: (i_created, created, i_done, done)."""
    i_created, created = await s.wait_type("response.created", timeout, start)
    rid = (created.get("response") or {}).get("id")
    check(isinstance(rid, str), f"response.created has no response.id: {short(created)}")
    i_done, done = await s.wait(
        "response.done for " + rid,
        lambda e: e.get("type") == "response.done" and (e.get("response") or {}).get("id") == rid,
        timeout,
        i_created,
    )
    return i_created, created, i_done, done


def check_response(s: Session, i_created: int, i_done: int, modality: str, status: str = "completed") -> dict:
    """The events of one response (response.created at i_created .. response.done at i_done):
    their order, ids and indexes. Returns facts: item_id, text/transcript, audio bytes."""
    created = s.events[i_created]
    done = s.events[i_done]
    rid = created["response"]["id"]
    check(
        created["response"].get("status") == "in_progress",
        f"response.created status is {created['response'].get('status')!r}, want in_progress",
    )
    got_status = done["response"].get("status")
    check(
        got_status == status,
        f"response.done status is {got_status!r}, want {status!r} (status_details {short(done['response'].get('status_details'))})",
    )
    if status == "completed":
        check(done["response"].get("usage") is not None, "response.done has usage null")
    window = s.events[i_created + 1 : i_done]
    for e in window:
        if str(e.get("type", "")).startswith("response.") and "response_id" in e:
            check(e["response_id"] == rid, f"{e['type']} has response_id {e['response_id']!r}, want {rid}")
    idx = lambda t: next((i for i, e in enumerate(window) if e.get("type") == t), None)
    last = lambda t: max((i for i, e in enumerate(window) if e.get("type") == t), default=None)

    i_item = idx("response.output_item.added")
    if i_item is None and status == "cancelled" and not any(e.get("response_id") == rid for e in window):
        return {
            "item_id": None,
            "text": "",
            "final": None,
            "audio_bytes": 0,
            "response_id": rid,
        }  # cancelled before any output
    check(i_item is not None, "no response.output_item.added")
    item = window[i_item]["item"]
    item_id = item.get("id")
    check(isinstance(item_id, str), f"response.output_item.added item has no id: {short(item)}")
    check(
        item.get("role") == "assistant" and item.get("type") == "message",
        f"output item is not an assistant message: {short(item)}",
    )
    check(
        window[i_item].get("output_index") == 0,
        f"response.output_item.added output_index {window[i_item].get('output_index')}, want 0",
    )

    if modality == "text":
        delta_t, done_t, field = "response.output_text.delta", "response.output_text.done", "text"
        check(idx("response.output_audio.delta") is None, "an audio delta in a text response")
        check(
            idx("response.output_audio_transcript.delta") is None,
            "an audio transcript delta in a text response",
        )
        sequence = [
            "response.output_item.added",
            "response.content_part.added",
            delta_t,
            done_t,
            "response.content_part.done",
            "response.output_item.done",
        ]
    else:
        delta_t, done_t, field = (
            "response.output_audio_transcript.delta",
            "response.output_audio_transcript.done",
            "transcript",
        )
        check(idx("response.output_text.delta") is None, "a text delta in an audio response")
        sequence = [
            "response.output_item.added",
            "response.content_part.added",
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.content_part.done",
            "response.output_item.done",
        ]
    complete = status == "completed"
    if complete:
        for t in sequence + ([delta_t, done_t] if modality == "audio" else []):
            check(idx(t) is not None, f"no {t} (got: {summarize(window)})")
        order = [idx("response.output_item.added"), idx("response.content_part.added")]
        check(order[0] < order[1], "response.content_part.added before response.output_item.added")
        firsts = [idx(delta_t)] + ([idx("response.output_audio.delta")] if modality == "audio" else [])
        check(all(order[1] < f for f in firsts), "a delta before response.content_part.added")
        check(last(delta_t) < idx(done_t), f"{delta_t} after {done_t}")
        if modality == "audio":
            check(
                last("response.output_audio.delta") < idx("response.output_audio.done"),
                "response.output_audio.delta after response.output_audio.done",
            )
            check(
                idx("response.output_audio.done") < idx("response.content_part.done"),
                "response.output_audio.done after response.content_part.done",
            )
        check(idx(done_t) < idx("response.content_part.done"), f"{done_t} after response.content_part.done")
        check(
            idx("response.content_part.done") < idx("response.output_item.done"),
            "response.content_part.done after response.output_item.done",
        )
    for e in window:
        t = e.get("type", "")
        if t in ("response.content_part.added", "response.content_part.done") or t.startswith(
            ("response.output_text.", "response.output_audio")
        ):
            check(e.get("item_id") == item_id, f"{t} has item_id {e.get('item_id')!r}, want {item_id}")
            check(e.get("output_index") == 0, f"{t} has output_index {e.get('output_index')!r}, want 0")
            check(e.get("content_index") == 0, f"{t} has content_index {e.get('content_index')!r}, want 0")
        if t == "response.output_item.done":
            check(
                e.get("item", {}).get("id") == item_id,
                f"response.output_item.done item id {e.get('item', {}).get('id')!r}, want {item_id}",
            )
            check(
                e.get("output_index") == 0,
                f"response.output_item.done output_index {e.get('output_index')!r}, want 0",
            )

    joined = "".join(e.get("delta", "") for e in window if e.get("type") == delta_t)
    final = next((e.get(field) for e in window if e.get("type") == done_t), None)
    if complete:
        check(
            joined == final,
            f"the joined {delta_t} ({short(joined, 200)!r}) differ from {done_t}.{field} ({short(final, 200)!r})",
        )
        check(bool(final and final.strip()), f"{done_t}.{field} is empty")
    audio_bytes = 0
    for e in window:
        if e.get("type") == "response.output_audio.delta":
            try:
                pcm = base64.b64decode(e.get("delta", ""), validate=True)
            except (binascii.Error, ValueError) as err:
                raise CaseFailure(f"response.output_audio.delta is not base64: {err}") from err
            check(
                len(pcm) > 0 and len(pcm) % 2 == 0,
                f"response.output_audio.delta decodes to {len(pcm)} bytes (want even, > 0)",
            )
            audio_bytes += len(pcm)
    # Nothing of this response after its response.done.
    for e in s.events[i_done + 1 :]:
        if e.get("response_id") == rid and not str(e.get("type")).startswith("parley."):
            raise CaseFailure(f"{e.get('type')} for {rid} after its response.done")
    return {
        "item_id": item_id,
        "text": joined,
        "final": final,
        "audio_bytes": audio_bytes,
        "response_id": rid,
    }


def latency_note(s: Session) -> str:
    return "parley.turn.latency: " + ("yes" if s.of_type("parley.turn.latency") else "missing")


# --- cases -------------------------------------------------------------------------------------


async def case_handshake(s: Session) -> None:
    _, created = await s.wait("the first event", lambda e: True)
    check(
        created.get("type") == "session.created",
        f"first event is {created.get('type')!r}, want session.created",
    )
    session = created.get("session") or {}
    check(session.get("type") == "realtime", f"session.type is {session.get('type')!r}, want 'realtime'")
    check(
        str(session.get("id", "")).startswith("sess_"), f"session.id is {session.get('id')!r}, want sess_..."
    )
    await s.quiet(0.3)
    s.check_ids()


async def case_session_update(s: Session) -> None:
    await s.wait_type("session.created")
    updates = [
        (
            "GA audio/pcm, turn_detection null",
            {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}},
            },
        ),
        ("GA with format 'pcm16'", {"type": "realtime", "audio": {"input": {"format": "pcm16"}}}),
        ("flat beta-style", {"input_audio_format": "pcm16", "turn_detection": {"type": "server_vad"}}),
    ]
    notes = []
    for n, (label, session) in enumerate(updates):
        start = len(s.events)
        await s.conn.session.update(session=session, event_id=f"event_client_su{n}")
        _, event = await s.wait(
            f"session.updated or error after the {label} session.update",
            lambda e: e.get("type") in ("session.updated", "error"),
            start=start,
        )
        check(
            event["type"] == "session.updated",
            f"the {label} session.update got an error: {short(event.get('error'))}",
        )
        got = event.get("session") or {}
        check(got.get("type") == "realtime", f"session.updated session.type is {got.get('type')!r}")
        audio_in = (got.get("audio") or {}).get("input") or {}
        if n == 0:
            check(
                "turn_detection" in audio_in and audio_in["turn_detection"] is None,
                f"session.updated audio.input.turn_detection is {short(audio_in.get('turn_detection', '<absent>'))}, want null",
            )
        if n == 2:
            td = audio_in.get("turn_detection")
            notes.append(
                "flat turn_detection "
                + (
                    "applied"
                    if isinstance(td, dict) and td.get("type") == "server_vad"
                    else f"not applied ({short(td, 80)})"
                )
            )
    await s.quiet(0.3)
    s.check_ids()
    s.notes.extend(notes)


USER_TEXT = {
    "type": "message",
    "role": "user",
    "content": [{"type": "input_text", "text": "What is the capital of France?"}],
}


async def case_text_turn(s: Session) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.conn.conversation.item.create(item=USER_TEXT)
    _, added = await s.wait_type("conversation.item.added", start=start)
    user_id = added["item"].get("id")
    check(
        added["item"].get("role") == "user",
        f"conversation.item.added item is not the user's: {short(added['item'])}",
    )
    await s.wait(
        "conversation.item.done for the user item",
        lambda e: e.get("type") == "conversation.item.done" and e.get("item", {}).get("id") == user_id,
        start=start,
    )
    start = len(s.events)
    await s.conn.response.create(response={"output_modalities": ["text"]})
    i_created, _, i_done, _ = await await_response(s, start)
    facts = check_response(s, i_created, i_done, "text")
    check("paris" in facts["final"].lower(), f"the reply does not mention Paris: {facts['final']!r}")
    check(not s.of_type("response.output_audio.delta"), "audio deltas in a text turn")
    await s.quiet(0.3)
    s.check_ids()


async def spoken_turn(s: Session, pcm: bytes, chunk_ms: int) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.stream(pcm + silence(1.5), chunk_ms, paced=True)
    i_started, started = await s.wait_type("input_audio_buffer.speech_started", start=start)
    i_stopped, stopped = await s.wait_type("input_audio_buffer.speech_stopped", start=i_started)
    item_id = started.get("item_id")
    check(
        stopped.get("item_id") == item_id,
        f"speech_stopped item_id {stopped.get('item_id')!r} != speech_started's {item_id!r}",
    )
    i_committed, committed = await s.wait_type("input_audio_buffer.committed", start=i_stopped)
    check(
        committed.get("item_id") == item_id,
        f"committed item_id {committed.get('item_id')!r} != speech_started's {item_id!r}",
    )
    i_added, added = await s.wait(
        "the user item's conversation.item.added",
        lambda e: e.get("type") == "conversation.item.added" and e.get("item", {}).get("id") == item_id,
        start=start,
    )
    check(
        i_added > i_committed, "the user item's conversation.item.added before input_audio_buffer.committed"
    )
    check(
        added["item"].get("role") == "user",
        f"the committed item is not a user message: {short(added['item'])}",
    )
    i_tr, tr = await s.wait_type(
        "conversation.item.input_audio_transcription.completed", RESPONSE_TIMEOUT, start
    )
    check(
        tr.get("item_id") == item_id, f"transcription.completed item_id {tr.get('item_id')!r}, want {item_id}"
    )
    check(i_tr > i_added, "transcription.completed before the user item's conversation.item.added")
    check(bool(str(tr.get("transcript", "")).strip()), "the input transcript is empty")
    i_created, _, i_done, _ = await await_response(s, i_committed)
    facts = check_response(s, i_created, i_done, "audio")
    check(i_tr < i_done, "transcription.completed after the reply's response.done")
    check(
        not s.of_type("input_audio_buffer.speech_started", i_started + 1, i_done),
        "a second speech_started during the turn",
    )
    await s.quiet(0.5)
    s.check_ids()
    s.notes.append(f"heard {short(tr['transcript'], 60)!r}")
    s.notes.append(f"{facts['audio_bytes'] / (2 * RATE):.1f} s of reply audio")
    s.notes.append(latency_note(s))


async def case_barge_in_truncate(s: Session, pcm: bytes) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.conn.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Tell me a long story about a dragon who lives in a castle."}
            ],
        }
    )
    await s.wait_type("conversation.item.added", start=start)
    start = len(s.events)
    await s.conn.response.create()
    i_created, created = await s.wait_type("response.created", RESPONSE_TIMEOUT, start)
    rid = created["response"]["id"]
    i_delta, _ = await s.wait_type(
        "response.output_audio.delta", RESPONSE_TIMEOUT, i_created, response_id=rid
    )
    await asyncio.sleep(0.1)
    speaking = asyncio.create_task(s.stream(pcm + silence(1.5), 20, paced=True))
    try:
        i_started, _ = await s.wait_type("input_audio_buffer.speech_started", start=i_delta)
        i_done, done = await s.wait(
            "the first response's response.done",
            lambda e: e.get("type") == "response.done" and e["response"].get("id") == rid,
            RESPONSE_TIMEOUT,
            i_created,
        )
        check(i_done > i_started, "the first response ended before speech_started (it was not interrupted)")
        facts = check_response(s, i_created, i_done, "audio", status="cancelled")
        reason = (done["response"].get("status_details") or {}).get("reason")
        check(
            reason == "turn_detected",
            f"the cancelled response's status_details.reason is {reason!r}, want turn_detected",
        )
        assistant_id = facts["item_id"]
        sent_transcript = facts["text"]
        start = len(s.events)
        await s.conn.conversation.item.truncate(item_id=assistant_id, content_index=0, audio_end_ms=300)
        truncated = await answer(s, start, "conversation.item.truncated", "conversation.item.truncate")
        check(
            (truncated.get("item_id"), truncated.get("content_index"), truncated.get("audio_end_ms"))
            == (assistant_id, 0, 300),
            f"conversation.item.truncated is {short(truncated)}, want item_id {assistant_id}, content_index 0, audio_end_ms 300",
        )
        start = len(s.events)
        await s.conn.conversation.item.retrieve(item_id=assistant_id)
        retrieved = await answer(s, start, "conversation.item.retrieved", "conversation.item.retrieve")
        item = retrieved.get("item") or {}
        check(item.get("id") == assistant_id, f"retrieved item id {item.get('id')!r}, want {assistant_id}")
        kept = "".join(str(c.get("transcript") or "") for c in item.get("content") or [])
        check(
            len(kept) <= len(sent_transcript),
            f"the truncated item's transcript ({len(kept)} chars) is longer than what was sent ({len(sent_transcript)} chars)",
        )
        await speaking
        # The barge-in's own turn: its reply, whatever it says.
        _, _, _, next_done = await await_response(s, i_done + 1, RESPONSE_TIMEOUT + 30)
        s.notes.append(f"kept {len(kept)}/{len(sent_transcript)} transcript chars")
        s.notes.append(f"next reply {next_done['response'].get('status')}")
    finally:
        if not speaking.done():
            speaking.cancel()
    await s.quiet(0.3)
    s.check_ids()


async def case_manual_commit(s: Session, pcm: bytes) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.conn.session.update(
        session={
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}},
        }
    )
    updated = await answer(s, start, "session.updated", "session.update")
    td = (
        ((updated.get("session") or {}).get("audio") or {}).get("input", {}).get("turn_detection", "<absent>")
    )
    check(td is None, f"session.updated audio.input.turn_detection is {short(td)}, want null")
    start = len(s.events)
    await s.conn.input_audio_buffer.commit(event_id="event_client_commit0")
    _, error = await s.wait(
        "error or input_audio_buffer.committed",
        lambda e: e.get("type") in ("error", "input_audio_buffer.committed"),
        start=start,
    )
    check(error["type"] == "error", "committing an empty buffer was accepted")
    check(
        error["error"].get("code") == "input_audio_buffer_commit_empty",
        f"empty commit error code is {error['error'].get('code')!r}, want input_audio_buffer_commit_empty",
    )
    check(
        error["error"].get("event_id") == "event_client_commit0",
        f"empty commit error.event_id is {error['error'].get('event_id')!r}, want event_client_commit0",
    )
    speech = pcm + silence(0.3)
    check(len(speech) * 4 // 3 < 15 * 1024 * 1024, "the clip is too long for one buffer (15 MiB of base64)")
    await s.stream(speech, 100, paced=False)
    start = len(s.events)
    await s.conn.input_audio_buffer.commit()
    _, committed = await s.wait_type("input_audio_buffer.committed", start=start)
    item_id = committed.get("item_id")
    _, added = await s.wait(
        "the user item's conversation.item.added",
        lambda e: e.get("type") == "conversation.item.added" and e.get("item", {}).get("id") == item_id,
        start=start,
    )
    check(
        added["item"].get("role") == "user",
        f"the committed item is not a user message: {short(added['item'])}",
    )
    _, tr = await s.wait(
        "transcription.completed for the committed item",
        lambda e: (
            e.get("type") == "conversation.item.input_audio_transcription.completed"
            and e.get("item_id") == item_id
        ),
        RESPONSE_TIMEOUT,
        start,
    )
    check(bool(str(tr.get("transcript", "")).strip()), "the input transcript is empty")
    start = len(s.events)
    await s.conn.response.create()
    i_created, _, i_done, _ = await await_response(s, start)
    facts = check_response(s, i_created, i_done, "audio")
    check(
        not s.of_type("input_audio_buffer.speech_started"),
        "speech_started in manual (turn_detection null) mode",
    )
    check(
        not s.of_type("input_audio_buffer.speech_stopped"),
        "speech_stopped in manual (turn_detection null) mode",
    )
    await s.stream(silence(0.1), 100, paced=False)
    start = len(s.events)
    await s.conn.input_audio_buffer.clear()
    await s.wait_type("input_audio_buffer.cleared", start=start)
    await s.quiet(0.3)
    s.check_ids()
    s.notes.append(f"heard {short(tr['transcript'], 60)!r}")
    s.notes.append(f"{facts['audio_bytes'] / (2 * RATE):.1f} s of reply audio")


async def case_bad_events(s: Session) -> None:
    await s.wait_type("session.created")
    probes = [
        ({"type": "no.such.event", "event_id": "event_client_bad1"}, None),
        ({"type": "conversation.item.create", "event_id": "event_client_bad2"}, None),
        ({"type": "response.cancel", "event_id": "event_client_bad3"}, "response_cancel_not_active"),
    ]
    for event, code in probes:
        start = len(s.events)
        await s.send(event)
        _, error = await s.wait_error(start=start)
        err = error.get("error") or {}
        check(
            err.get("event_id") == event["event_id"],
            f"the error for {event['type']} has error.event_id {err.get('event_id')!r}, want {event['event_id']}",
        )
        if code:
            check(
                err.get("code") == code,
                f"the error for {event['type']} has code {err.get('code')!r}, want {code}",
            )
    start = len(s.events)
    await s.conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
    updated = await answer(s, start, "session.updated", "session.update after the bad events")
    await s.quiet(0.3)
    s.check_ids()


async def case_metadata_echo(s: Session) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.conn.response.create(
        response={
            "output_modalities": ["text"],
            "metadata": {"topic": "test"},
            "conversation": "none",
            "instructions": "Answer in one word.",
            "input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}
            ],
        }
    )
    i_created, created, i_done, _ = await await_response(s, start)
    check(
        created["response"].get("metadata") == {"topic": "test"},
        f"response.created metadata is {short(created['response'].get('metadata'))}, want {{'topic': 'test'}}",
    )
    check_response(s, i_created, i_done, "text")
    await s.quiet(0.5)
    added = s.of_type("conversation.item.added", start)
    if added:
        raise CaseFailure(
            f"an out-of-band (conversation none) response added items to the conversation: {short(added[0])}"
        )
    s.check_ids()


async def case_client_item_id(s: Session) -> None:
    await s.wait_type("session.created")
    item_id = "item_client0001"
    start = len(s.events)
    await s.conn.conversation.item.create(
        item={
            "id": item_id,
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Remember the number seven."}],
        }
    )
    added = await answer(s, start, "conversation.item.added", "conversation.item.create")
    check(
        added["item"].get("id") == item_id,
        f"conversation.item.added item id {added['item'].get('id')!r}, want {item_id}",
    )
    start = len(s.events)
    await s.conn.conversation.item.retrieve(item_id=item_id)
    retrieved = await answer(s, start, "conversation.item.retrieved", "conversation.item.retrieve")
    check(
        retrieved["item"].get("id") == item_id,
        f"retrieved item id {retrieved['item'].get('id')!r}, want {item_id}",
    )
    start = len(s.events)
    await s.conn.conversation.item.delete(item_id=item_id)
    deleted = await answer(s, start, "conversation.item.deleted", "conversation.item.delete")
    check(
        deleted.get("item_id") == item_id,
        f"conversation.item.deleted item_id {deleted.get('item_id')!r}, want {item_id}",
    )
    await s.quiet(0.3)
    s.check_ids()


async def case_active_response(s: Session) -> None:
    await s.wait_type("session.created")
    start = len(s.events)
    await s.conn.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Tell me a long story about a dragon."}],
        }
    )
    await s.wait_type("conversation.item.added", start=start)
    start = len(s.events)
    await s.conn.response.create(event_id="event_client_rc1")
    await s.conn.response.create(event_id="event_client_rc2")
    _, error = await s.wait_error(RESPONSE_TIMEOUT, start)
    err = error.get("error") or {}
    check(
        err.get("code") == "conversation_already_has_active_response",
        f"the second response.create got code {err.get('code')!r}, want conversation_already_has_active_response",
    )
    check(
        err.get("event_id") == "event_client_rc2",
        f"its error.event_id is {err.get('event_id')!r}, want event_client_rc2",
    )
    i_created, created = await s.wait_type("response.created", RESPONSE_TIMEOUT, start)
    rid = created["response"]["id"]
    check(len(s.of_type("response.created", start)) == 1, "two responses were created")
    await s.conn.response.cancel()
    i_done, done = await s.wait(
        "response.done for " + rid,
        lambda e: e.get("type") == "response.done" and e["response"].get("id") == rid,
        RESPONSE_TIMEOUT,
        i_created,
    )
    check_response(s, i_created, i_done, "audio", status="cancelled")
    reason = (done["response"].get("status_details") or {}).get("reason")
    check(reason == "client_cancelled", f"status_details.reason is {reason!r}, want client_cancelled")
    await s.quiet(0.5)
    check(len(s.of_type("response.created", start)) == 1, "a second response was created")
    s.check_ids()


async def case_beta_header(s: Session, url: str) -> None:
    """Not the SDK: what it never sends. The beta header is refused with an error event; the
    browser-style subprotocols select `realtime`."""
    target = url.rstrip("/") + "/realtime?model=" + MODEL
    beta = Session(s.name, s.recorder)
    proto = Session(s.name, s.recorder)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "realtime=v1"}
        async with websockets.connect(target, additional_headers=headers, open_timeout=EVENT_TIMEOUT) as ws:
            beta.start_reader(lambda: ws.recv(decode=False), None)
            try:
                i_error, _ = await beta.wait_error()
                if beta.of_type("session.created", 0, i_error):
                    s.notes.append("session.created before the error")
            finally:
                await beta.stop_reader()
        beta.fail_if_problems()
        protocols = ["realtime", f"openai-insecure-api-key.{API_KEY}"]
        async with websockets.connect(target, subprotocols=protocols, open_timeout=EVENT_TIMEOUT) as ws:
            check(
                ws.subprotocol == "realtime",
                f"the server selected subprotocol {ws.subprotocol!r}, want 'realtime'",
            )
            proto.start_reader(lambda: ws.recv(decode=False), None)
            try:
                _, first = await proto.wait("the first event", lambda e: True)
                check(
                    first.get("type") == "session.created",
                    f"with subprotocols the first event is {first.get('type')!r}, want session.created",
                )
                await proto.quiet(0.3)
            finally:
                await proto.stop_reader()
        beta.check_ids()
        proto.check_ids()
    finally:
        s.events = beta.events + proto.events


async def case_client_secret(s: Session, url: str) -> None:
    """The API key mints a short-lived client secret with the SDK's client_secrets call (a
    browser's credential); the secret opens a session that holds a typed turn; a wrong key is
    refused with HTTP 401 before any upgrade."""
    minter = openai.AsyncOpenAI(api_key=API_KEY, base_url=url.replace("ws", "http", 1))
    try:
        secret = await minter.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 120},
            session={"type": "realtime", "model": MODEL},
        )
    finally:
        await minter.close()
    check(secret.value.startswith("ek_"), f"the secret {secret.value[:8]!r}… is not an ek_ key")
    check(abs(secret.expires_at - (time.time() + 120)) < 30, f"expires_at {secret.expires_at} is not in 120 s")
    check(secret.session.type == "realtime", f"the secret's session is {secret.session.type!r}")
    client = openai.AsyncOpenAI(api_key=secret.value, websocket_base_url=url)
    try:
        async with client.realtime.connect(model=MODEL) as conn:
            s.conn = conn
            s.start_reader(conn.recv_bytes, conn.parse_event)
            try:
                await case_text_turn(s)
            finally:
                await s.stop_reader()
    finally:
        await client.close()
    wrong = openai.AsyncOpenAI(api_key="pk_not_a_key", websocket_base_url=url)
    try:
        refused = None
        try:
            async with wrong.realtime.connect(model=MODEL):
                pass
        except Exception as e:  # noqa: BLE001 - the SDK surfaces the websockets library's error
            refused = e
        check(refused is not None and "401" in str(refused), f"a wrong key was not refused with 401: {refused!r}")
    finally:
        await wrong.close()
    s.notes.append(f"secret valid until {secret.expires_at}")


# --- running -----------------------------------------------------------------------------------

CASES = [
    "handshake",
    "session_update",
    "text_turn",
    "spoken_turn_20ms",
    "spoken_turn_100ms",
    "barge_in_truncate",
    "manual_commit",
    "bad_events",
    "metadata_echo",
    "client_item_id",
    "active_response",
    "beta_header",
    "client_secret",
]


async def run_case(
    name: str, args: argparse.Namespace, clips: list[bytes], recorder: Recorder
) -> tuple[bool, str]:
    s = Session(name, recorder)
    first, last = clips[0], clips[-1]
    bodies: dict[str, Callable[[], Any]] = {
        "handshake": lambda: case_handshake(s),
        "session_update": lambda: case_session_update(s),
        "text_turn": lambda: case_text_turn(s),
        "spoken_turn_20ms": lambda: spoken_turn(s, first, 20),
        "spoken_turn_100ms": lambda: spoken_turn(s, last, 100),
        "barge_in_truncate": lambda: case_barge_in_truncate(s, last),
        "manual_commit": lambda: case_manual_commit(s, first),
        "bad_events": lambda: case_bad_events(s),
        "metadata_echo": lambda: case_metadata_echo(s),
        "client_item_id": lambda: case_client_item_id(s),
        "active_response": lambda: case_active_response(s),
    }

    async def body() -> None:
        if name == "beta_header":
            await case_beta_header(s, args.url)
            return
        if name == "client_secret":
            await case_client_secret(s, args.url)
            return
        client = openai.AsyncOpenAI(api_key=API_KEY, websocket_base_url=args.url)
        try:
            async with client.realtime.connect(model=MODEL) as conn:
                s.conn = conn
                s.start_reader(conn.recv_bytes, conn.parse_event)
                try:
                    await bodies[name]()
                    s.fail_if_problems()
                finally:
                    await s.stop_reader()
        finally:
            await client.close()

    try:
        await asyncio.wait_for(body(), args.case_timeout)
    except TimeoutError:
        return False, f"timed out after {args.case_timeout:.0f} s; events seen: {summarize(s.events)}"
    except CaseFailure as e:
        return False, f"{e}; events seen: {summarize(s.events)}"
    except Exception as e:  # noqa: BLE001 - any error fails just this case
        return False, f"{type(e).__name__}: {e}; events seen: {summarize(s.events)}"
    return True, "; ".join(s.notes)


async def main_async(args: argparse.Namespace) -> int:
    clips = [read_wav_24k(path) for path in args.speech]
    recorder = Recorder(args.events_out)
    passed = failed = 0
    try:
        for name in args.case or CASES:
            ok, detail = await run_case(name, args, clips, recorder)
            if ok:
                passed += 1
                print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
            else:
                failed += 1
                print(f"FAIL {name}: {detail}", flush=True)
    finally:
        recorder.close()
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def main() -> int:
    global API_KEY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="the SDK's websocket_base_url, e.g. ws://127.0.0.1:PORT/v1"
    )
    parser.add_argument(
        "--speech",
        action="append",
        required=True,
        metavar="WAV",
        help="a PCM16 WAV clip of speech (up to two)",
    )
    parser.add_argument(
        "--events-out", required=True, metavar="FILE.jsonl", help="where every received event is written"
    )
    parser.add_argument(
        "--case",
        action="extend",
        nargs="+",
        choices=CASES,
        metavar="NAME",
        help=f"cases to run (default all: {' '.join(CASES)})",
    )
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=CASE_TIMEOUT,
        help=f"seconds a whole case may take (default {CASE_TIMEOUT:.0f})",
    )
    parser.add_argument("--api-key", default=API_KEY, help="the API key to connect with")
    args = parser.parse_args()
    API_KEY = args.api_key
    if len(args.speech) > 2:
        parser.error("at most two --speech clips")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
