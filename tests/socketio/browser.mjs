// The demo page in a real browser (headless Chromium through
// puppeteer-core): one page goes offline, the other publishes, the broker
// is killed with kill -9 and restarted, the first page comes back and
// shows every missed message, counted as recovered. With --auth, the page
// connects once given a token.
import puppeteer from "puppeteer-core";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { assert, run, startBroker, env, kill9 } from "./lib.mjs";

const chromium = process.env.CHROMIUM || "/usr/bin/chromium";

async function text(page, selector) {
  // Headless Chromium freezes a background tab: act on the front one.
  await page.bringToFront();
  return page.evaluate((sel) => document.querySelector(sel).textContent, selector);
}

/// Polls `selector`'s text (from Node: a background tab's own timers are
/// throttled) until `pred` holds.
async function waitText(page, selector, pred, what) {
  if (process.env.DEBUG) console.log("waiting:", what);
  const end = Date.now() + 20000;
  let last;
  while (Date.now() < end) {
    last = await text(page, selector);
    if (pred(last)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what}: ${selector} is still ${JSON.stringify(last)}`);
}

/// Headless Chromium with a fresh profile: {browser, profile}.
async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "spool-chromium-"));
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    protocolTimeout: 60000,
    userDataDir: profile,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows", "--disable-renderer-backgrounding"],
  });
  return { browser, profile };
}

async function publish(page, message) {
  await page.bringToFront();
  await page.$eval("#text", (e, m) => (e.value = m), message);
  await page.$eval("#published", (e) => (e.textContent = ""));
  await page.click("#publish");
  await waitText(page, "#published", (t) => t.startsWith('stored at'), "publish " + message);
}

await run({
  async "a page taken offline gets what it missed across a broker kill -9, shown as recovered"() {
    let broker = await startBroker(env.data, "127.0.0.1:0", ["--fsync", "always"]);
    const addr = broker.socketio;
    const { browser, profile } = await launch();
    try {
      const [a, b] = [await browser.newPage(), await browser.newPage()];
      for (const p of [a, b]) {
        await p.goto(`http://${addr}/?room=demo`);
        await waitText(p, "#status", (t) => t.startsWith('online'), "page online");
      }
      await publish(b, "before");
      await waitText(a, "#log", (t) => t.includes("before"), "page a shows the first message");
      await a.bringToFront();
      await a.click("#offline");
      await waitText(a, "#status", (t) => t === 'offline', "page a offline");
      await publish(b, "missed 1");
      await publish(b, "missed 2");

      await kill9(broker);
      await waitText(b, "#status", (t) => t !== 'online' && t !== 'online (recovered)', "page b sees the broker go");
      broker = await startBroker(env.data, addr, ["--fsync", "always"]);
      await waitText(b, "#status", (t) => t === 'online (recovered)', "page b back, recovered");
      await publish(b, "missed 3");

      await a.bringToFront();
      await a.click("#offline");
      await waitText(a, "#status", (t) => t === 'online (recovered)', "page a back, recovered");
      await waitText(a, "#recovered", (t) => t === '3', "three recovered events");
      const shown = await a.$$eval("#log li", (lis) => lis.map((li) => [Number(li.dataset.offset), li.classList.contains("recovered"), li.textContent]));
      assert.deepEqual(shown.map((s) => s[0]), [0, 1, 2, 3]);
      assert.deepEqual(shown.map((s) => s[1]), [false, true, true, true]);
      assert.ok(shown[3][2].endsWith("missed 3"), JSON.stringify(shown));
      await publish(b, "after");
      await waitText(a, "#log", (t) => t.includes("after"), "page a shows the new message");
      assert.equal(await text(a, "#recovered"), "3", "a new message is not counted as recovered");
    } finally {
      await browser.close();
      broker.proc.kill("SIGTERM");
      rmSync(profile, { recursive: true, force: true });
    }
  },

  async "with --auth the page is refused until given a token, then publishes"() {
    const dir = mkdtempSync(join(tmpdir(), "spool-auth-"));
    const created = execFileSync(env.bin, ["token", "create", "page", "--produce", "*", "--consume", "*"], { encoding: "utf8" });
    const secret = created.split("\n")[1].trim();
    const auth = join(dir, "auth.toml");
    writeFileSync(auth, created.slice(created.indexOf("[[token]]")));
    const broker = await startBroker(join(dir, "data"), "127.0.0.1:0", ["--auth", auth]);
    const { browser, profile } = await launch();
    try {
      const page = await browser.newPage();
      await page.goto(`http://${broker.socketio}/?room=demo`);
      await waitText(page, "#status", (t) => t.includes("requires a token"), "the page refused without a token");
      await page.$eval("#token", (e, t) => (e.value = t), secret);
      await page.click("#connect");
      await waitText(page, "#status", (t) => t.startsWith("online"), "page online with the token");
      await publish(page, "with a token");
      await waitText(page, "#log", (t) => t.includes("with a token"), "the page shows its message");
    } finally {
      await browser.close();
      broker.proc.kill("SIGTERM");
      rmSync(profile, { recursive: true, force: true });
      rmSync(dir, { recursive: true, force: true });
    }
  },
});
