// The page: connects, streams the microphone, plays replies, and shows each turn live (what was
// heard, what Parley says, voice-to-voice with the server's stages, safety decisions).
import { AudioGraph, openMicrophone, opusAvailable } from "./audio.js";
import { RealtimeLink, V1Link } from "./link.js";

const $ = (id) => document.getElementById(id);

/** The server's latency marks, in plain words (docs/latency.md). */
const STAGES = {
  endpoint: "end of turn",
  asr_final: "recognition",
  input_safe: "input check",
  first_token: "first word",
  first_chunk_safe: "output check",
  first_audio: "synthesis",
  first_audio_safe: "voice check",
  endpoint_confirmed: "turn confirmed",
  first_frame_sent: "sent",
};

const CANCELLED = {
  barge_in: "Interrupted: you spoke",
  client_cancel: "Stopped",
  safety: "Stopped by a safety check",
};

/** Errors worth telling the user about, in plain words (others are counted, not shown). */
const ERRORS = {
  server_full: (m) => `The server is full: ${m}. Try again in a moment.`,
  shutting_down: () => "The server is shutting down.",
  idle_timeout: () => "The session was closed after a long silence.",
  busy: () => "The server was too busy to answer that turn. Please say it again.",
  internal: (m) => `The server failed: ${m}`,
  unsupported: (m) => `Not supported here: ${m}`,
  codec: (m) => m,
};

const session = {
  link: null,
  graph: null,
  firstFrame: null,
  mode: "hands-free",
  muted: false,
  talking: false,
  turns: new Map(),
  stopping: false,
};

/** What the page shows, for scripts and the browser test to read. */
const view = { state: "idle", protocol: null, turns: [], stats: {}, errors: [], framesSent: 0 };
window.parley = view;

function setStatus(state, text) {
  view.state = state;
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function showAlert(text) {
  const alert = $("alert");
  alert.textContent = text;
  alert.hidden = !text;
}

function setControls(live) {
  for (const id of ["talk", "mute", "stop"]) $(id).disabled = !live;
  $("connect").textContent = live ? "Hang up" : session.link === null && view.state !== "idle" ? "Reconnect" : "Start talking";
  $("connect").classList.toggle("primary", !live);
}

async function connect() {
  showAlert("");
  setStatus("connecting", "Connecting…");
  $("connect").disabled = true;
  try {
    const forced = new URLSearchParams(location.search).get("protocol");
    const Link = (forced ? forced === "v1" : await opusAvailable(V1Link.rate)) ? V1Link : RealtimeLink;
    const microphone = await openMicrophone().catch((error) => {
      throw new Error(microphoneProblem(error));
    });
    // The worklets load from the server: failing that, the server is not there.
    session.graph = await AudioGraph.open(microphone, Link.rate, { frame, started, stats }).catch((error) => {
      microphone.getTracks().forEach((track) => track.stop());
      throw new Error(unreachable(error.message));
    });
    session.firstFrame = null;
    session.stopping = false;
    session.link = new Link({ event, audio, closed }, $("key").value.trim());
  } catch (error) {
    hangUp();
    setStatus("failed", "Not connected");
    showAlert(error.message);
  } finally {
    $("connect").disabled = false;
  }
}

function microphoneProblem(error) {
  switch (error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone permission was denied. Allow the microphone for this site (the icon in the address bar) and press Start talking again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in and try again.";
    case "NotReadableError":
      return "The microphone is in use by another program.";
    case "InsecureContext":
      return "Browsers allow the microphone only on https:// pages or on localhost. Open this page over TLS, or on the machine running Parley.";
    default:
      return `The microphone could not be opened: ${error.message}`;
  }
}

function hangUp() {
  session.stopping = true;
  session.link?.close();
  session.graph?.close();
  session.link = null;
  session.graph = null;
  setControls(false);
}

/** A 20 ms microphone frame from the capture worklet. */
function frame(start, samples) {
  const { link, graph } = session;
  if (!link?.opened || view.protocol === null) return;
  const open = !session.muted && (session.mode === "hands-free" || session.talking);
  if (!open) samples.fill(0);
  let energy = 0;
  for (const s of samples) energy += s * s;
  $("level").value = Math.min(1, Math.sqrt(energy / samples.length) * 4);
  if (session.firstFrame === null) session.firstFrame = start;
  link.send(samples, graph.seconds(start) * 1e6);
  view.framesSent += 1;
}

function audio(turn, samples) {
  // A cancelled reply's audio still in the decoder is dropped, not played.
  if (!session.graph || turn === 0 || session.turns.get(turn)?.cancelled) return;
  session.graph.play(turn, samples);
}

/** The first sample of `turn`'s reply came out of the player: voice-to-voice on the graph clock. */
function started(turn, at, played) {
  const t = turnOf(turn);
  t.playedAtStart = played;
  const { graph } = session;
  if (t.endMs === undefined || session.firstFrame === null || !graph) return;
  const anchor = graph.seconds(session.firstFrame) + t.endMs / 1000;
  t.v2vMs = Math.round((graph.seconds(at) - anchor) * 1000);
  render(t);
}

function stats(s) {
  view.stats = { ...s };
  const seconds = (s.played / (session.graph?.rate ?? 1)).toFixed(1);
  $("playback").textContent = `Played ${seconds} s of replies${s.underruns ? `, ${s.underruns} gaps` : ""}`;
}

function event(e) {
  switch (e.kind) {
    case "ready":
      view.protocol = e.protocol;
      $("link").textContent = `Connected · ${e.protocol} · ${e.pipeline ?? "Parley"} pipeline`;
      setStatus("live", "Listening");
      setControls(true);
      return;
    case "speech_started":
      setStatus("live", "Hearing you…");
      return render(turnOf(e.turn));
    case "speech_stopped":
      setStatus("live", "Thinking…");
      turnOf(e.turn).endMs = e.endMs;
      return;
    case "transcript": {
      const t = turnOf(e.turn);
      t.heard = e.text;
      t.final = e.final;
      if (!e.final) t.partials += 1;
      return render(t);
    }
    case "reply_text": {
      const t = turnOf(e.turn);
      t.reply += e.delta;
      setStatus("live", "Speaking");
      return render(t);
    }
    case "reply_done":
      session.graph?.end();
      setStatus("live", "Listening");
      turnOf(e.turn).done = true;
      return render(turnOf(e.turn));
    case "cancelled": {
      session.graph?.flush();
      const t = turnOf(e.turn);
      t.cancelled = e.reason;
      setStatus("live", "Listening");
      return render(t);
    }
    case "safety":
      turnOf(e.turn).safety.push(e.decision);
      return render(turnOf(e.turn));
    case "latency": {
      const t = turnOf(e.turn);
      t.marks = e.marks;
      t.totalMs = e.totalMs;
      return render(t);
    }
    case "error": {
      view.errors.push(e.code);
      const words = ERRORS[e.code];
      if (words) showAlert(words(e.message ?? ""));
      return;
    }
  }
}

function unreachable(detail) {
  const why = detail ? ` (${detail})` : "";
  return `Can't reach the Parley server at ${location.host}${why}. Check that it is running, then press Reconnect.`;
}

function closed({ code, reason, opened }) {
  const wanted = session.stopping;
  hangUp();
  view.protocol = null;
  if (wanted) return setStatus("idle", "Not connected");
  setStatus("failed", "Disconnected");
  setControls(false);
  if (!opened) {
    // A browser never sees why an upgrade was refused: the server's readiness says.
    refusal().then(showAlert);
  } else if (code === 1013) {
    showAlert(`The server is full${reason ? ` (${reason})` : ""}. Press Reconnect in a moment.`);
  } else if (code === 1001) {
    showAlert("The server shut down. Press Reconnect when it is back.");
  } else if (code === 4001) {
    showAlert("The session was closed after a long silence. Press Reconnect to go on.");
  } else if (code === 4002) {
    showAlert("The session reached its time limit. Press Reconnect to start a new one.");
  } else if (code !== 1000) {
    showAlert(`Lost the connection to the server${reason ? ` (${reason})` : ""}. Press Reconnect to try again.`);
  }
}

/** Why a connection was refused before it opened, in plain words, from `/readyz`. */
async function refusal() {
  let ready;
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    ready = { ok: response.ok, ...(await response.json()) };
  } catch {
    return unreachable();
  }
  switch (ready.status) {
    case "full":
      return `The server is full (${ready.sessions} of ${ready.max_sessions} sessions in use). Press Reconnect in a moment.`;
    case "draining":
      return "The server is shutting down. Press Reconnect in a moment to reach another instance.";
    case "loading":
      return "The server is still loading its models. Press Reconnect in a moment.";
    default:
      if (ready.auth) {
        $("key-field").hidden = false;
        return $("key").value.trim()
          ? "The server did not accept the key (wrong, expired, or over its limits). Check it under Server key and press Reconnect."
          : "This server needs a key. Enter it under Server key and press Reconnect.";
      }
      return "The server refused the connection. Press Reconnect to try again.";
  }
}

/** The turn's record, made on first mention. */
function turnOf(turn) {
  let t = session.turns.get(turn);
  if (!t) {
    t = { turn, heard: "", final: false, partials: 0, reply: "", safety: [], marks: [], done: false };
    session.turns.set(turn, t);
    view.turns.push(t);
    t.el = makeTurn();
    $("turns").append(t.el.root);
    $("intro").hidden = true;
  }
  return t;
}

function element(tag, className, parent, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  parent?.append(el);
  return el;
}

function makeTurn() {
  const root = element("li", "turn");
  const you = element("p", "line you", root);
  element("span", "who", you, "You");
  const heard = element("span", "said", you);
  const parley = element("p", "line parley", root);
  element("span", "who", parley, "Parley");
  const reply = element("span", "said", parley);
  const badge = element("span", "badge", parley);
  const timing = element("div", "timing", root);
  const safety = element("ul", "safety", root);
  safety.setAttribute("aria-label", "Safety decisions");
  return { root, heard, reply, badge, timing, safety };
}

function render(t) {
  const { el } = t;
  el.root.dataset.turn = t.turn;
  el.heard.textContent = t.heard || "…";
  el.heard.classList.toggle("partial", !t.final);
  el.reply.textContent = t.reply || (t.cancelled ? "" : "…");
  el.badge.textContent = t.cancelled ? CANCELLED[t.cancelled] ?? t.cancelled : "";
  el.badge.hidden = !t.cancelled;
  renderTiming(t);
  el.safety.replaceChildren(...t.safety.map(safetyChip));
}

function renderTiming(t) {
  const { timing } = t.el;
  timing.replaceChildren();
  if (t.v2vMs !== undefined) {
    const figure = element("p", "v2v", timing);
    const ms = element("strong", "", figure, `${t.v2vMs} ms`);
    ms.dataset.ms = t.v2vMs;
    element("span", "", figure, " voice to voice");
  }
  if (t.marks.length === 0) return;
  // One scale for every turn (the full bar is a second, or the turn when longer), so turns compare.
  const scale = Math.max(1000, t.totalMs);
  const bar = element("div", "stages", timing);
  bar.setAttribute("aria-hidden", "true");
  const list = element("ul", "stage-list", timing);
  list.setAttribute("aria-label", `Server stages, ${Math.round(t.totalMs)} ms in all`);
  let previous = 0;
  t.marks.forEach((mark, i) => {
    if (mark.stage === "speech_end") return;
    const ms = Math.max(0, Math.round(mark.at_ms - previous));
    previous = mark.at_ms;
    const segment = element("span", `stage s${i % 9}`, bar);
    segment.style.width = `${(100 * ms) / scale}%`;
    segment.title = `${STAGES[mark.stage] ?? mark.stage}: ${ms} ms`;
    const item = element("li", "", list);
    element("span", `swatch s${i % 9}`, item);
    item.append(`${STAGES[mark.stage] ?? mark.stage} ${ms} ms`);
  });
  if (t.v2vMs !== undefined) {
    element("li", "client", list, `page and network ${Math.max(0, Math.round(t.v2vMs - t.totalMs))} ms`);
  }
}

function safetyChip(d) {
  const chip = element("li", `chip ${d.action === "allow" ? "ok" : "stop"}`);
  const words = { allow: "allowed", refuse: "refused", block: "blocked", safe_completion: "answered safely" }[d.action];
  chip.textContent = `${d.stage} check ${words ?? d.action}`;
  if (d.rule_id) element("code", "", chip, d.rule_id);
  if (d.category && d.action !== "allow") element("span", "category", chip, d.category.replace("_", " "));
  return chip;
}

function setMode(mode) {
  session.mode = mode;
  $("talk").hidden = mode !== "push-to-talk";
}

function setMuted(muted) {
  session.muted = muted;
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").firstChild.textContent = muted ? "Unmute " : "Mute ";
}

function setTalking(talking) {
  session.talking = talking;
  $("talk").setAttribute("aria-pressed", String(talking));
}

function typing(target) {
  return target instanceof HTMLInputElement && (target.type === "text" || target.type === "password");
}

/** The key field: shown when the server needs one; filled from `#key=…` (then cleared from the
 * address bar) or from this tab's earlier entry. */
async function setUpKey() {
  const field = $("key");
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromUrl) history.replaceState(null, "", location.pathname + location.search);
  field.value = fromUrl ?? sessionStorage.getItem("parley-key") ?? "";
  field.addEventListener("change", () => sessionStorage.setItem("parley-key", field.value.trim()));
  if (fromUrl) sessionStorage.setItem("parley-key", fromUrl);
  try {
    const ready = await (await fetch("/readyz", { cache: "no-store" })).json();
    if (ready.auth) $("key-field").hidden = false;
  } catch {
    // Unreachable now: connecting will say so.
  }
}
setUpKey();

$("connect").addEventListener("click", () => (session.link ? hangUp() : connect()));
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => setMode(radio.value));
}
$("mute").addEventListener("click", () => setMuted(!session.muted));
$("stop").addEventListener("click", () => session.link?.cancel());
const talk = $("talk");
talk.addEventListener("pointerdown", () => setTalking(true));
for (const end of ["pointerup", "pointerleave", "pointercancel"]) talk.addEventListener(end, () => setTalking(false));
document.addEventListener("keydown", (e) => {
  if (typing(e.target) || e.repeat || !session.link) return;
  if (e.code === "Space" && session.mode === "push-to-talk") {
    e.preventDefault();
    setTalking(true);
  } else if (e.key === "m" || e.key === "M") {
    setMuted(!session.muted);
  } else if (e.key === "Escape") {
    session.link.cancel();
  }
});
document.addEventListener("keyup", (e) => {
  if (e.code === "Space" && session.mode === "push-to-talk") {
    e.preventDefault();
    setTalking(false);
  }
});
