// Driving the page in Debian's headless Chromium with playwright-core (from PARLEY_NODE_MODULES,
// `scripts/browser node-modules`), its fake microphone playing a WAV file: shared by the browser
// test (page_check.mjs) and the page's latency measurement (benches/browser/v2v.mjs).
import { createRequire } from "node:module";

const require = createRequire(`${process.env.PARLEY_NODE_MODULES}/`);
const { chromium } = require("playwright-core");

const FLAGS = [
  "--no-sandbox",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-gpu",
];

/** A fresh browser whose microphone plays `wav` once (then silence); `fakeUi`: grant the microphone;
 * `extra`: more command-line flags. */
export async function browser(wav, fakeUi = true, extra = []) {
  const media = wav
    ? ["--use-fake-device-for-media-stream", `--use-file-for-fake-audio-capture=${wav}%noloop`]
    : ["--use-fake-device-for-media-stream"];
  const args = [...FLAGS, ...media, ...(fakeUi ? ["--use-fake-ui-for-media-stream"] : []), ...extra];
  return chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args });
}

/** Runs `use(b)` with a fresh browser (microphone granted, playing `wav`; `extra` flags) and
 * closes it afterwards, whatever `use` did; returns what `use` returned. */
export async function withBrowser(wav, use, extra = []) {
  const b = await browser(wav, true, extra);
  try {
    return await use(b);
  } finally {
    await b.close();
  }
}

export async function open(b, url, init) {
  const page = await b.newPage({ viewport: { width: 1100, height: 900 } });
  page.on("pageerror", (e) => console.log(`  page error: ${e.message}`));
  if (init) await page.addInitScript(init);
  await page.goto(url);
  return page;
}

/** The page's own record (`window.parley`), without its DOM elements. */
export function view(page) {
  return page.evaluate(() => {
    const { turns, ...rest } = window.parley;
    return { ...rest, turns: turns.map(({ el, ...t }) => t) };
  });
}

/** Waits until `test(view)` holds, polling every 200 ms, up to `seconds`. */
export async function until(page, seconds, what, test) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const v = await view(page);
    if (test(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v).slice(0, 1500)}`);
    await page.waitForTimeout(200);
  }
}

export function check(condition, message) {
  if (!condition) throw new Error(message);
}

