// The page in a real headless Chromium (Debian's, driven by playwright-core), hearing real speech
// from a WAV file through Chromium's fake microphone. Run by tests/tests/browser.rs, which starts
// the servers, writes the clips and passes their paths as one JSON argument:
//   {voice, echo, unreachable, keyed (needs a key): base URLs; secret: a client secret for keyed;
//    tls: {url: https://parley.test:PORT/ (echo, utterance mode), spki: its key's pin};
//    clips: {conversation, unsafe, question, ptt}: WAV paths; artifacts: a folder for screenshots}
// Prints one line per case and `N passed, M failed` last; on stdin/stdout it asks the test to stop
// the echo server (`STOP echo`, answered with a line) for the "server gone" case.
import { createInterface } from "node:readline";
import path from "node:path";
import { browser, check, open, until, view, withBrowser } from "./driver.mjs";

const config = JSON.parse(process.argv[2]);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** The page's alert once it has failed and said why (some reasons it asks the server for). */
async function failure(page, what) {
  await until(page, 15, what, (v) => v.state === "failed");
  const alert = page.locator("#alert");
  await page.waitForFunction(() => document.querySelector("#alert").textContent.trim() !== "", null, { timeout: 5000 });
  return (await alert.textContent()) ?? "";
}

const cases = {
  // Hands-free over v1 (WebCodecs Opus): a question heard (partial then final), its reply played
  // and measured, spoken over and stopped at once, then the second question answered.
  async conversation() {
    return withBrowser(config.clips.conversation, async (b) => {
      const page = await open(b, config.voice);
      await page.click("#connect");
      await until(page, 15, "the v1 link", (v) => v.protocol?.startsWith("v1"));
      const v = await until(page, 60, "two answered turns", (v) => v.turns.length >= 2 && v.turns[1].done);
      const [first, second] = v.turns;
      check(/story|knight|dragon/i.test(first.heard) && first.final, `turn 1 heard ${JSON.stringify(first.heard)}`);
      check(first.partials >= 1, `turn 1 had no partial transcript: ${JSON.stringify(first)}`);
      check(first.v2vMs > 0 && first.v2vMs < 5000, `turn 1 voice-to-voice ${first.v2vMs}`);
      check(first.cancelled === "barge_in" && !first.done, `turn 1 was not cut by the barge-in: ${first.cancelled}`);
      check(v.stats.flushed > 0, `nothing was flushed at the barge-in (${v.stats.flushed})`);
      check(second.playedAtStart === v.stats.playedAtFlush,
        `turn 1 played on after its flush: ${second.playedAtStart} != ${v.stats.playedAtFlush} samples`);
      // The barge-in utterance ("Stop, tell me about the weather instead."), heard as such; Whisper
      // tiny has heard "weather" as "whoever" through Chromium's capture under load.
      check(/^stop\b|weather/i.test(second.heard.trim()), `turn 2 heard ${JSON.stringify(second.heard)}`);
      check(second.reply.length > 0 && second.v2vMs > 0, `turn 2: ${JSON.stringify(second)}`);
      await page.waitForTimeout(300);
      const shown = await page.locator(".turn").nth(1).locator(".v2v strong").getAttribute("data-ms");
      check(Number(shown) === second.v2vMs, `the page shows ${shown}, not ${second.v2vMs}`);
      check((await page.locator(".turn").first().locator(".badge").textContent()).includes("Interrupted"), "no badge");
      check(v.stats.played > 48000, `only ${v.stats.played} samples played`);
      const shot = path.join(config.artifacts, "finished-turn.png");
      await page.screenshot({ path: shot, fullPage: true });
      return `heard ${JSON.stringify(second.heard)}, v2v ${first.v2vMs} / ${second.v2vMs} ms (server ${Math.round(
        first.totalMs)} / ${Math.round(second.totalMs)} ms), ${first.partials} partial(s), flushed ${
        v.stats.flushed} samples, played ${v.stats.played}; screenshot ${shot}`;
    });
  },

  // A spoken unsafe request: the refusal is shown with its rule, and spoken.
  async unsafe_request() {
    return withBrowser(config.clips.unsafe, async (b) => {
      const page = await open(b, config.voice);
      await page.click("#connect");
      const v = await until(page, 45, "the refusal", (v) => v.turns[0]?.done);
      const turn = v.turns[0];
      const refusal = turn.safety.find((d) => d.stage === "input" && (d.action === "refuse" || d.action === "block"));
      check(refusal && /^VW-/.test(refusal.rule_id), `heard ${JSON.stringify(turn.heard)}, no input refusal citing a VW- rule: ${JSON.stringify(turn.safety)}`);
      const chip = await page.locator(".turn .chip.stop").first().textContent();
      check(chip.includes(refusal.rule_id) && /refused|blocked/.test(chip), `chip: ${chip}`);
      check(turn.reply.length > 0 && v.stats.played > 0, "the refusal was not spoken");
      await page.screenshot({ path: path.join(config.artifacts, "refusal.png"), fullPage: true });
      return `heard ${JSON.stringify(turn.heard)}; shown "${chip.trim()}"; said ${JSON.stringify(turn.reply)}`;
    });
  },

  // Without WebCodecs the page talks pcm16 over the Realtime endpoint instead.
  async realtime_fallback() {
    return withBrowser(config.clips.question, async (b) => {
      const page = await open(b, config.voice, () => {
        delete window.AudioEncoder;
        delete window.AudioDecoder;
      });
      await page.click("#connect");
      const v = await until(page, 45, "an answered turn", (v) => v.turns[0]?.done);
      const turn = v.turns[0];
      check(v.protocol.startsWith("Realtime"), `protocol ${v.protocol}`);
      check(turn.final && turn.heard.length > 0 && turn.reply.length > 0, JSON.stringify(turn));
      check(turn.v2vMs > 0 && turn.marks.length > 3 && turn.safety.length > 0, JSON.stringify(turn));
      check(v.stats.played > 0, "no reply audio played");
      return `heard ${JSON.stringify(turn.heard)}, v2v ${turn.v2vMs} ms (server ${Math.round(turn.totalMs)} ms)`;
    });
  },

  // Push to talk: the first question is said with the button up (never heard), the second held.
  async push_to_talk() {
    return withBrowser(config.clips.ptt, async (b) => {
      const page = await open(b, config.voice);
      await page.check("input[value=push-to-talk]");
      await page.click("#connect");
      await until(page, 15, "the v1 link", (v) => v.protocol !== null);
      const started = Date.now();
      await page.waitForTimeout(4500);
      check((await view(page)).turns.length === 0, "speech was heard with the talk button up");
      await page.keyboard.down("Space");
      check((await page.locator("#talk").getAttribute("aria-pressed")) === "true", "Space did not press Talk");
      await page.waitForTimeout(Math.max(0, 9000 - (Date.now() - started)));
      await page.keyboard.up("Space");
      const v = await until(page, 45, "the held question's answer", (v) => v.turns[0]?.done);
      check(v.turns.length === 1 && v.turns[0].heard.length > 0, JSON.stringify(v.turns));
      return `one turn, heard ${JSON.stringify(v.turns[0].heard)}`;
    });
  },

  // Full, gone, unreachable, and no microphone: each said in plain words.
  async connection_problems() {
    const b = await browser(config.clips.question);
    const denied = await browser(null, false);
    try {
      const first = await open(b, config.echo);
      await first.click("#connect");
      await until(first, 15, "the first session", (v) => v.state === "live");
      const second = await open(b, config.echo);
      await second.click("#connect");
      const full = await failure(second, "the refusal");
      check(/server is full/i.test(full), `full: ${full}`);
      check((await second.locator("#connect").textContent()) === "Reconnect", "no Reconnect");
      console.log("STOP echo");
      await lines.next();
      const gone = await failure(first, "the server going away");
      check(/shut down/i.test(gone), `gone: ${gone}`);
      const nowhere = await open(b, config.unreachable).catch(() => null);
      check(nowhere === null, "a page loaded from a closed port");
      // The page still open, with its server gone: the reconnect cannot reach it.
      await first.click("#connect");
      const unreachable = await failure(first, "the failed reconnect");
      check(/can't reach/i.test(unreachable), `unreachable: ${unreachable}`);
      const mute = await open(denied, config.voice);
      await mute.click("#connect");
      const micText = await failure(mute, "the microphone refusal");
      check(/microphone permission was denied/i.test(micText), `microphone: ${micText}`);
      return `full: "${full}" | gone: "${gone}" | unreachable: "${unreachable}" | no microphone: "${micText}"`;
    } finally {
      await b.close();
      await denied.close();
    }
  },

  // Behind TLS at a name that is not localhost (a secure origin only because of TLS): the page
  // opens the microphone and talks wss://. Chromium maps the name to 127.0.0.1 and trusts the
  // test certificate by its key's pin.
  async over_tls() {
    const { hostname, port } = new URL(config.tls.url);
    const flags = [`--host-resolver-rules=MAP ${hostname} 127.0.0.1:${port}`, `--ignore-certificate-errors-spki-list=${config.tls.spki}`];
    return withBrowser(config.clips.question, async (b) => {
      const page = await open(b, config.tls.url);
      const origin = await page.evaluate(() => ({ secure: window.isSecureContext, host: location.hostname }));
      check(origin.secure && origin.host === hostname, `origin ${JSON.stringify(origin)}`);
      await page.click("#connect");
      const v = await until(page, 30, "the echo played back", (v) => v.state === "live" && v.stats.played > 0);
      return `${config.tls.url} (secure context), ${v.protocol}, ${v.stats.played} samples played`;
    }, flags);
  },

  // A server that needs a key: the page shows the key field and says so; a wrong key is refused;
  // a client secret given in `#key=` (then cleared from the address bar) opens the session.
  async key_required() {
    return withBrowser(config.clips.question, async (b) => {
      const page = await open(b, config.keyed);
      await page.locator("#key-field").waitFor({ state: "visible", timeout: 5000 });
      await page.click("#connect");
      const needed = await failure(page, "the key refusal");
      check(/needs a key/i.test(needed), `no key: ${needed}`);
      await page.fill("#key", "pk_wrong");
      await page.click("#connect");
      const wrong = await failure(page, "the wrong key's refusal");
      check(/did not accept the key/i.test(wrong), `wrong key: ${wrong}`);
      const keyed = await open(b, `${config.keyed}#key=${config.secret}`);
      check(!(await keyed.evaluate(() => location.hash)), "the key stayed in the address bar");
      await keyed.click("#connect");
      const v = await until(keyed, 15, "the keyed session", (v) => v.state === "live");
      return `no key: "${needed}" | wrong key: "${wrong}" | client secret: ${v.protocol}`;
    });
  },
};

let passed = 0;
let failed = 0;
// PARLEY_BROWSER_CASES=a,b runs only those cases (while working on the page).
const only = process.env.PARLEY_BROWSER_CASES?.split(",");
for (const [name, run] of Object.entries(cases).filter(([name]) => !only || only.includes(name))) {
  const started = Date.now();
  try {
    const detail = await run();
    passed += 1;
    console.log(`PASS ${name} (${((Date.now() - started) / 1000).toFixed(1)} s): ${detail}`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL ${name} (${((Date.now() - started) / 1000).toFixed(1)} s): ${error.stack ?? error}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
