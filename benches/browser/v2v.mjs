// The page's voice-to-voice in headless Chromium, clip by clip: each WAV (padded with sox to 1 s of
// silence before and 7 s after, at 48 kHz) is the fake microphone of a fresh browser talking to
// the page of a running server, hands-free; every answered turn's figures are printed as one JSON
// line, then the percentiles. The page measures from the server's end of speech (`audio_end_ms`,
// mapped onto its capture clock) to the first reply sample its player played.
//   PARLEY_NODE_MODULES=$(scripts/browser node-modules) \
//     node benches/browser/v2v.mjs http://127.0.0.1:8080/ [--protocol v1|realtime] CLIP.wav…
import { execFileSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { open, view, withBrowser } from "../../tests/browser/driver.mjs";

const LEAD_S = 1;
const TAIL_S = 7;
const args = process.argv.slice(2);
const base = args.shift();
const protocol = args[0] === "--protocol" ? (args.shift(), args.shift()) : null;
const url = protocol ? `${base}?protocol=${protocol}` : base;
const scratch = mkdtempSync(path.join(tmpdir(), "parley-v2v-"));

function percentile(values, p) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null;
}

const rows = [];
for (const clip of args) {
  const wav = path.join(scratch, path.basename(clip));
  execFileSync("sox", ["-G", clip, "-r", "48000", "-c", "1", "-b", "16", wav, "pad", `${LEAD_S}`, `${TAIL_S}`]);
  const seconds = Number(execFileSync("soxi", ["-D", wav]).toString());
  await withBrowser(wav, async (b) => {
    const page = await open(b, url);
    await page.click("#connect");
    await page.waitForTimeout(seconds * 1000);
    const v = await view(page);
    for (const t of v.turns.filter((t) => t.v2vMs !== undefined)) {
      const server = Math.round(t.totalMs);
      const row = { clip: path.basename(clip), turn: t.turn, heard: t.heard, v2v_ms: t.v2vMs, server_ms: server, page_ms: t.v2vMs - server };
      rows.push(row);
      console.log(JSON.stringify(row));
    }
    if (v.turns.length === 0) console.log(JSON.stringify({ clip: path.basename(clip), error: "no turn", alert: v.errors }));
  });
}
const summary = (key) => ({ p50: percentile(rows.map((r) => r[key]), 50), p95: percentile(rows.map((r) => r[key]), 95) });
const totals = { v2v_ms: summary("v2v_ms"), server_ms: summary("server_ms"), page_and_network_ms: summary("page_ms") };
console.log(JSON.stringify({ turns: rows.length, protocol: protocol ?? "auto", ...totals }));
