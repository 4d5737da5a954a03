// The reference web app (docs/sdk.md, "Web app"): plain JavaScript, MQTT.js over WebSockets.
import mqtt from "./node_modules/mqtt/dist/mqtt.esm.js";
import * as sas from "./sas.js";

window.mqttPairingSas = sas; // for the browser test's vectors

const $ = (id) => document.getElementById(id);
const REQUEST_TIMEOUT_MS = 15000;
const E2E_TIMEOUT_MS = 10000; // how long to wait for the runner's nonce after pairing
const state = {
  client: null,
  prefix: "pairing",
  appId: "",
  waiting: new Map(),
  seen: new Set(),
  nonces: new Map(), // session_id -> {resolve} waiting for the runner's nonce, or {nonce} early
};

function setStatus(text, cls = "") {
  $("status").textContent = text;
  $("status").className = cls;
}

function uuid() {
  return crypto.randomUUID();
}

// A code typed, or a pairing link: mqtt-pairing://pair?code=…&runner=…&key=…
function parseCodeInput(text) {
  const value = text.trim();
  if (value.startsWith("mqtt-pairing:")) {
    const url = new URL(value.replace(/^mqtt-pairing:\/\//, "https://x/"));
    return { code: url.searchParams.get("code") || "", runner: url.searchParams.get("runner"), key: url.searchParams.get("key") };
  }
  return { code: value, runner: null, key: null };
}

function base() {
  return `${state.prefix}/apps/${state.appId}`;
}

function request(op, body = {}) {
  const payload = { request_id: uuid(), ...body };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      state.waiting.delete(payload.request_id);
      reject(new Error(`no reply to ${op} within ${REQUEST_TIMEOUT_MS / 1000} s`));
    }, REQUEST_TIMEOUT_MS);
    const send = () => state.client.publish(`${base()}/req/${op}`, JSON.stringify(payload), { qos: 1 });
    state.waiting.set(payload.request_id, { resolve, timer, send });
    send();
  });
}

async function call(op, body) {
  const reply = await request(op, body);
  if (!reply.ok) {
    const e = reply.error || {};
    const err = new Error(`${e.code}: ${e.message}` + (e.retry_after_s ? ` (retry after ${e.retry_after_s} s)` : ""));
    err.code = e.code;
    throw err;
  }
  return reply.result;
}

function onMessage(topic, payload) {
  let body;
  try {
    body = JSON.parse(new TextDecoder().decode(payload));
  } catch {
    return;
  }
  if (topic.endsWith("/events")) {
    if (state.seen.has(body.event_id)) return; // a copy: events may come twice
    state.seen.add(body.event_id);
    if (body.event === "session.message" && body.from === "runner" && body.data?.type === "sas.nonce") {
      onNonce(body.session_id, body.data);
      return;
    }
    if (body.event === "session.closed" || body.event === "session.opened") refreshSessions();
    return;
  }
  const pending = state.waiting.get(body.request_id);
  if (pending) {
    clearTimeout(pending.timer);
    state.waiting.delete(body.request_id);
    pending.resolve(body);
  }
}

// The runner's nonce (docs/protocol.md, "End-to-end keys and SAS"): only the first of a
// session counts; one that comes before `pair` has read its reply is kept for it.
function onNonce(sessionId, data) {
  let nonce;
  try {
    nonce = sas.readNonce(data);
  } catch {
    return;
  }
  const entry = state.nonces.get(sessionId);
  if (!entry) state.nonces.set(sessionId, { nonce });
  else if (entry.resolve && !entry.nonce) {
    entry.nonce = nonce;
    entry.resolve(nonce);
  }
}

function runnerNonce(sessionId) {
  const entry = state.nonces.get(sessionId);
  if (entry?.nonce) return Promise.resolve(entry.nonce);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), E2E_TIMEOUT_MS);
    state.nonces.set(sessionId, { resolve: (n) => (clearTimeout(timer), resolve(n)) });
  });
}

function connect() {
  const url = $("mqtt-url").value.trim();
  state.prefix = $("prefix").value.trim() || "pairing";
  state.appId = $("app-id").value.trim();
  if (state.client) state.client.end(true);
  setStatus("connecting…");
  // The app id is the username and the client id; a persistent session (clean start off,
  // a session expiry) keeps events sent while the page is closed.
  const client = mqtt.connect(url, {
    clientId: state.appId,
    username: state.appId,
    password: $("password").value,
    protocolVersion: 5,
    clean: false,
    properties: { sessionExpiryInterval: 86400 },
    reconnectPeriod: 1000,
    connectTimeout: 10000,
  });
  state.client = client;
  client.on("connect", () => {
    client.subscribe([`${base()}/res/+`, `${base()}/events`], { qos: 1 }, (err) => {
      if (err) return setStatus(`subscribe failed: ${err.message}`, "error");
      setStatus(`connected as ${state.appId}`, "connected");
      $("pair-button").disabled = false;
      $("refresh-button").disabled = false;
      for (const pending of state.waiting.values()) pending.send(); // same request_id again
      refreshSessions();
    });
  });
  client.on("reconnect", () => setStatus("reconnecting…"));
  client.on("error", (err) => setStatus(`error: ${err.message}`, "error"));
  client.on("message", onMessage);
}

async function pair() {
  $("pair-error").hidden = true;
  $("paired").hidden = true;
  const { code, runner, key } = parseCodeInput($("code").value);
  // Commit, then reveal: `pair` carries only SHA-256(public key || N_A).
  const own = await sas.generateKeyPair();
  const appNonce = sas.newNonce();
  const body = { code, public_key: await sas.commitPublicKey(own.raw, appNonce, key) };
  const name = $("app-name").value.trim();
  if (name) body.app_name = name;
  try {
    const result = await call("pair", body);
    const session = result.session;
    let runnerKey = null;
    try {
      runnerKey = sas.parsePublicKey(result.runner_public_key).raw;
    } catch {
      runnerKey = null;
    }
    if (key && (!runnerKey || (await sas.keyId(runnerKey)) !== key)) {
      await call("unpair", { session_id: session.session_id });
      throw new Error("the runner's key is not the one its link named: the pairing was closed");
    }
    if (runner && runner !== session.runner_id) {
      await call("unpair", { session_id: session.session_id });
      throw new Error("paired with another runner than the link named: the pairing was closed");
    }
    $("runner-label").textContent = session.runner_name ? `${session.runner_name} (${session.runner_id})` : session.runner_id;
    $("session-id").textContent = session.session_id;
    $("sas").hidden = true;
    $("e2e-none").hidden = true;
    $("paired").hidden = false;
    let secrets = null;
    if (runnerKey) {
      $("e2e-pending").hidden = false;
      // The runner's nonce, then our reveal; the SAS binds both keys and both nonces.
      const nonce = await runnerNonce(session.session_id);
      $("e2e-pending").hidden = true;
      if (nonce) {
        let derived;
        try {
          derived = await sas.deriveSessionSecrets(own, runnerKey, session.session_id, "app", appNonce, nonce);
        } catch (err) {
          // A low-order or otherwise unusable runner key: tampering, as in the SDK. Close it.
          // (Chromium's OperationError for an all-zero X25519 result has an empty message.)
          const why = err.message || err.name;
          try {
            await call("unpair", { session_id: session.session_id });
          } catch (unpairErr) {
            throw new Error(`the runner's key is unusable (${why}); closing the pairing failed: ${unpairErr.message}`);
          }
          throw new Error(`the runner's key is unusable (${why}): the pairing was closed`);
        }
        await call("message", { session_id: session.session_id, data: sas.revealData(own.raw, appNonce) });
        secrets = derived;
      }
    }
    if (secrets) {
      $("sas-words").textContent = secrets.words.join(" ");
      $("sas-digits").textContent = secrets.digits;
      $("sas").hidden = false;
    } else {
      $("e2e-none").hidden = false; // no key or no nonce from the runner: nothing to compare
    }
    $("code").value = "";
    refreshSessions();
  } catch (err) {
    $("pair-error").textContent = err.message || err.name || String(err);
    $("pair-error").hidden = false;
  }
}

async function refreshSessions() {
  if (!state.client || !state.client.connected) return;
  let sessions;
  try {
    sessions = (await call("sessions")).sessions;
  } catch (err) {
    setStatus(`sessions: ${err.message}`, "error");
    return;
  }
  const list = $("session-list");
  list.replaceChildren();
  for (const s of sessions) {
    const li = document.createElement("li");
    li.dataset.sessionId = s.session_id;
    const label = document.createElement("span");
    label.textContent = `${s.runner_name || s.runner_id} — since ${s.created_at} `;
    const button = document.createElement("button");
    button.className = "unpair";
    button.textContent = "Unpair";
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await call("unpair", { session_id: s.session_id });
      } catch (err) {
        setStatus(`unpair: ${err.message}`, "error");
      }
      refreshSessions();
    });
    li.append(label, button);
    list.append(li);
  }
  $("no-sessions").hidden = sessions.length > 0;
}

async function init() {
  const params = new URLSearchParams(location.search);
  let config = {};
  try {
    const response = await fetch("config.json");
    if (response.ok) config = await response.json();
  } catch {
    config = {};
  }
  // The broker, the topic prefix and the app id come from the page's own config.json or
  // from the person, never from a link: a link must not send the app to another broker.
  $("mqtt-url").value = config.mqtt_url || `ws://${location.hostname || "127.0.0.1"}:8083/mqtt`;
  $("prefix").value = config.prefix || "pairing";
  $("app-id").value = localStorage.getItem("mqtt-pairing.app-id") || "";
  // A pairing link opened as https://…/?code=…&runner=…&key=… fills the code field (only).
  if (params.get("code")) {
    const link = new URLSearchParams({ code: params.get("code") });
    for (const k of ["runner", "key"]) if (params.get(k)) link.set(k, params.get(k));
    $("code").value = `mqtt-pairing://pair?${link}`;
  }
  $("connect-button").addEventListener("click", () => {
    localStorage.setItem("mqtt-pairing.app-id", $("app-id").value.trim());
    connect();
  });
  $("pair-button").addEventListener("click", pair);
  $("refresh-button").addEventListener("click", refreshSessions);
  document.body.dataset.ready = "true";
}

init();
