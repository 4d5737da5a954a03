// Drives the web app in headless Chromium for tests/web/test_browser.py (playwright-core,
// Debian's /usr/bin/chromium: no browser is downloaded). One JSON object per line on stdout.
//
//   node web/tests/browser.mjs '{"url": ..., "appId": ..., "password": ..., "appName": ...,
//                               "vectors": "tests/data/vectors/sas.json", "screenshot": ...,
//                               "expectError": false}'
// With expectError, the pairing must end in an error: the step "pairError" says which.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const args = JSON.parse(process.argv[2]);
const say = (step, data = {}) => process.stdout.write(JSON.stringify({ step, ...data }) + "\n");
const TIMEOUT_MS = 20000;

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "mqtt-pairing-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const logs = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(args.url);
  await page.waitForSelector("body[data-ready=true]");
  // What the page took from the link (the test adds mqtt_url, app_id and prefix to it).
  say("loaded", {
    mqttUrl: await page.inputValue("#mqtt-url"),
    appId: await page.inputValue("#app-id"),
    prefix: await page.inputValue("#prefix"),
    code: await page.inputValue("#code"),
  });

  // The SAS vectors, computed by the page's own WebCrypto code.
  const vectors = JSON.parse(fs.readFileSync(args.vectors, "utf-8"));
  const computed = await page.evaluate(async (cases) => {
    const sas = window.mqttPairingSas;
    const hex = (h) => Uint8Array.from(h.match(/../g), (b) => parseInt(b, 16));
    const out = [];
    for (const c of cases) {
      const runner = await sas.importKeyPair(hex(c.runner_private_key), hex(c.runner_public_key_raw));
      const app = await sas.importKeyPair(hex(c.app_private_key), hex(c.app_public_key_raw));
      const appNonce = hex(c.app_nonce);
      const runnerNonce = sas.readNonce(c.runner_message);
      const atRunner = await sas.deriveSessionSecrets(runner, app.raw, c.session_id, "runner", appNonce, runnerNonce);
      const atApp = await sas.deriveSessionSecrets(app, runner.raw, c.session_id, "app", appNonce, runnerNonce);
      const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      out.push({
        words: atApp.words,
        digits: atApp.digits,
        runnerWords: atRunner.words,
        sessionKey: toHex(atApp.sessionKey),
        keyId: await sas.keyId(runner.raw),
        runnerNonce: toHex(runnerNonce),
        appCommitmentField: await sas.commitPublicKey(app.raw, appNonce, await sas.keyId(runner.raw)),
        appMessage: sas.revealData(app.raw, appNonce),
      });
    }
    return out;
  }, vectors.derivations);
  say("vectors", { computed });

  await page.fill("#app-id", args.appId);
  await page.fill("#password", args.password);
  await page.fill("#app-name", args.appName);
  await page.click("#connect-button");
  await page.waitForSelector("#status.connected");
  say("connected");

  await page.click("#pair-button");
  await page.waitForSelector("#sas:not([hidden]), #e2e-none:not([hidden]), #pair-error:not([hidden])");
  const error = await page.locator("#pair-error").isVisible() ? await page.textContent("#pair-error") : null;
  if (args.expectError) {
    // The pairing must fail (e.g. a low-order runner key): report what the page says.
    say("pairError", { error, logs });
  } else {
    if (error) throw new Error(`pairing failed: ${error}`);
    await page.waitForSelector(`#session-list li`);
    const paired = {
      sasShown: await page.locator("#sas").isVisible(),
      sessionId: await page.textContent("#session-id"),
      words: (await page.textContent("#sas-words")).split(" "),
      digits: await page.textContent("#sas-digits"),
      runner: await page.textContent("#runner-label"),
    };
    await page.screenshot({ path: args.screenshot, fullPage: true });
    say("paired", paired);

    await page.click(`#session-list li[data-session-id="${paired.sessionId}"] button.unpair`);
    await page.waitForSelector("#no-sessions:not([hidden])");
    say("unpaired", { logs });
  }
} catch (err) {
  process.stderr.write(`page console:\n${logs.join("\n")}\n`); // what the page said
  throw err;
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
