// End-to-end keys and the SAS with WebCrypto (docs/protocol.md, "End-to-end keys and SAS").
// X25519, SHA-256 and HKDF-SHA256 are in Chromium's, Firefox's and Safari's WebCrypto.
// Version 2, commit then reveal: the app sends commitPublicKey(...) in `pair`, waits for the
// runner's nonce (`session.message` {type: "sas.nonce"}), then reveals revealData(...).

const LABEL = new TextEncoder().encode("mqtt-pairing/sas/v2");
const PREFIX = "x25519:";
const COMMIT_PREFIX = "x25519-commit:";
let wordsPromise = null;

export function b64url(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

export function unb64url(text) {
  if (!/^[A-Za-z0-9_-]+$/.test(text)) throw new Error("not unpadded base64url");
  const raw = atob(text.replaceAll("-", "+").replaceAll("_", "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const bytes = Uint8Array.from(raw, (c) => c.charCodeAt(0));
  if (b64url(bytes) !== text) throw new Error("not the canonical base64url encoding");
  return bytes;
}

/** Parse a `public_key` field: {raw: Uint8Array(32), peer: key id or null}. Throws if not ours. */
export function parsePublicKey(text) {
  if (typeof text !== "string" || !text.startsWith(PREFIX)) throw new Error("not an x25519: key");
  const [body, ...rest] = text.slice(PREFIX.length).split(";peer=");
  const raw = unb64url(body);
  if (raw.length !== 32) throw new Error("an X25519 public key is 32 bytes");
  if (rest.length > 1 || (rest.length === 1 && !rest[0])) throw new Error("bad peer key id");
  return { raw, peer: rest.length ? rest[0] : null };
}

/** The key id: base64url of the first 16 bytes of SHA-256 of the raw public key. */
export async function keyId(raw) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", raw));
  return b64url(digest.slice(0, 16));
}

/** A fresh key pair: {privateKey: CryptoKey, raw: Uint8Array(32)}. */
export async function generateKeyPair() {
  const pair = await crypto.subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]);
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, raw };
}

/** A key pair from a 32-byte private key and its public key (test vectors only). */
export async function importKeyPair(privateRaw, publicRaw) {
  const jwk = { kty: "OKP", crv: "X25519", d: b64url(privateRaw), x: b64url(publicRaw) };
  const privateKey = await crypto.subtle.importKey("jwk", jwk, { name: "X25519" }, false, ["deriveBits"]);
  return { privateKey, raw: publicRaw };
}

export function encodePublicKey(raw, peerKeyId = null) {
  return PREFIX + b64url(raw) + (peerKeyId ? ";peer=" + peerKeyId : "");
}

/** 32 random bytes (N_A). */
export function newNonce() {
  return crypto.getRandomValues(new Uint8Array(32));
}

/** C_A = SHA-256(app public key || N_A), 32 bytes. */
export async function commitment(publicRaw, nonce) {
  if (publicRaw.length !== 32 || nonce.length !== 32) throw new Error("32-byte key and nonce");
  const both = new Uint8Array(64);
  both.set(publicRaw, 0);
  both.set(nonce, 32);
  return new Uint8Array(await crypto.subtle.digest("SHA-256", both));
}

/** The app's `public_key` field of `pair`: x25519-commit:<base64url(C_A)>[;peer=<key id>]. */
export async function commitPublicKey(publicRaw, nonce, peerKeyId = null) {
  return COMMIT_PREFIX + b64url(await commitment(publicRaw, nonce)) + (peerKeyId ? ";peer=" + peerKeyId : "");
}

/** N_R from the runner's `sas.nonce` message data; throws if malformed. */
export function readNonce(data) {
  if (!data || data.type !== "sas.nonce" || typeof data.nonce !== "string") throw new Error("not a sas.nonce");
  const nonce = unb64url(data.nonce);
  if (nonce.length !== 32) throw new Error("a nonce is 32 bytes");
  return nonce;
}

/** The `data` of the app's reveal `message`. */
export function revealData(publicRaw, nonce) {
  return { type: "sas.reveal", public_key: encodePublicKey(publicRaw), nonce: b64url(nonce) };
}

async function sasWords() {
  if (!wordsPromise) {
    wordsPromise = fetch(new URL("sas-words.txt", import.meta.url))
      .then((r) => (r.ok ? r.text() : Promise.reject(new Error(`sas-words.txt: ${r.status}`))))
      .then((text) => text.split(/\s+/).filter(Boolean));
  }
  const words = await wordsPromise;
  if (words.length !== 2048) throw new Error("sas-words.txt must hold 2048 words");
  return words;
}

/**
 * The session key and SAS, from one side.
 * @param own {privateKey, raw} this side's key pair
 * @param peerRaw the other side's raw public key
 * @param sessionId the session's id
 * @param ownRole "runner" or "app"
 * @param appNonce N_A (32 bytes), runnerNonce N_R (32 bytes)
 * @returns {sessionKey: Uint8Array(32), words: string[4], digits: string, okm: Uint8Array(40)}
 */
export async function deriveSessionSecrets(own, peerRaw, sessionId, ownRole, appNonce, runnerNonce) {
  if (!/^[\x21-\x7e]{1,64}$/.test(sessionId)) throw new Error("bad session id");
  if (appNonce.length !== 32 || runnerNonce.length !== 32) throw new Error("nonces are 32 bytes");
  const peer = await crypto.subtle.importKey("raw", peerRaw, { name: "X25519" }, false, []);
  // Chromium refuses an all-zero result (a low-order peer key) with an OperationError.
  const shared = new Uint8Array(await crypto.subtle.deriveBits({ name: "X25519", public: peer }, own.privateKey, 256));
  if (shared.every((b) => b === 0)) throw new Error("low-order peer key");
  const [runnerRaw, appRaw] = ownRole === "runner" ? [own.raw, peerRaw] : [peerRaw, own.raw];
  const sid = new TextEncoder().encode(sessionId);
  // label 0x00 session_id 0x00 runner_pk app_pk N_A N_R
  const info = new Uint8Array(LABEL.length + 1 + sid.length + 1 + 128);
  const at = LABEL.length + 2 + sid.length;
  info.set(LABEL, 0);
  info.set(sid, LABEL.length + 1);
  info.set(runnerRaw, at);
  info.set(appRaw, at + 32);
  info.set(appNonce, at + 64);
  info.set(runnerNonce, at + 96);
  const ikm = await crypto.subtle.importKey("raw", shared, "HKDF", false, ["deriveBits"]);
  const okm = new Uint8Array(
    await crypto.subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info }, ikm, 320),
  );
  let s = 0n;
  for (const b of okm.slice(32, 40)) s = (s << 8n) | BigInt(b);
  const words = await sasWords();
  const picked = [0, 1, 2, 3].map((i) => words[Number((s >> BigInt(53 - 11 * i)) & 0x7ffn)]);
  const digits = (s % 1000000n).toString().padStart(6, "0");
  return { sessionKey: okm.slice(0, 32), words: picked, digits, okm };
}
