// Helpers shared by the socket.io gateway tests: they drive the real `spool`
// binary with the stock socket.io client. The Rust test `tests/socketio.rs`
// runs each file with SPOOL_BIN (the binary), SPOOL_SERVER (the native
// listener), SPOOL_SOCKETIO (the socket.io listener) and SPOOL_DATA set.
import { io } from "socket.io-client";
import { spawn, execFileSync } from "node:child_process";
import assert from "node:assert/strict";

export { assert };
export const env = {
  bin: process.env.SPOOL_BIN,
  server: process.env.SPOOL_SERVER,
  socketio: process.env.SPOOL_SOCKETIO,
  data: process.env.SPOOL_DATA,
};

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// A connected socket (rejects on connect_error).
export function connect(addr = env.socketio, opts = {}) {
  const s = io("http://" + addr, { forceNew: true, reconnectionDelay: 50, reconnectionDelayMax: 200, ...opts });
  return new Promise((resolve, reject) => {
    s.once("connect", () => resolve(s));
    s.once("connect_error", (e) => { s.close(); reject(withCause(e)); });
  });
}

/// A transport error names only "xhr poll error"; the HTTP status and the
/// request's own error (a reset, a refusal) say which side failed.
function withCause(e) {
  const xhr = e.context;
  if (e.type === "TransportError" && xhr) {
    const text = String(xhr.responseText ?? "").slice(0, 300);
    e.message += ` (status ${JSON.stringify(e.description)}, response ${JSON.stringify(text)})`;
  }
  return e;
}

/// Emits `event` with `body` and resolves with the acknowledgement.
export function call(s, event, body, ...more) {
  return new Promise((resolve, reject) => {
    s.timeout(10000).emit(event, body, ...more, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

/// Like `call`, failing unless the reply is `{ok: true}`.
export async function ok(s, event, body, ...more) {
  const reply = await call(s, event, body, ...more);
  assert.equal(reply.ok, true, `${event} ${JSON.stringify(body)}: ${JSON.stringify(reply)}`);
  return reply;
}

/// Records every `event` the socket receives as {data, meta}.
export function collect(s, event = "message") {
  const got = [];
  s.on(event, (data, meta) => got.push({ data, meta }));
  return got;
}

/// Waits until `pred()` holds; a time-out names `what` (and `state()`, if
/// given).
export async function until(pred, what, ms = 10000, state = () => "") {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} ${state()}`.trimEnd());
    await sleep(10);
  }
}

/// Waits for one `event` on `s`.
export function once(s, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("timed out waiting for " + event)), ms);
    s.once(event, (...args) => { clearTimeout(t); resolve(args); });
  });
}

/// A unique room name.
let rooms = 0;
export const room = (name) => `${name}-${process.pid}-${++rooms}`;

/// Runs `spool ARGS --server NATIVE`.
export function spool(...args) {
  return execFileSync(env.bin, [...args, "--server", env.server], { encoding: "utf8" });
}

/// Starts `spool serve` on `data` with the socket.io listener at `socketio`;
/// resolves with {proc, server, socketio, metrics} once it prints its
/// start-up lines. A given port (a restart on the one a stopped broker
/// had) may have been taken meanwhile by a process of a parallel test:
/// that start is tried again for up to 10 s.
export async function startBroker(data, socketio = "127.0.0.1:0", extra = []) {
  const end = Date.now() + 10000;
  for (;;) {
    try {
      return await startBrokerOnce(data, socketio, extra);
    } catch (e) {
      if (!e.addressInUse || Date.now() > end) throw e;
      await sleep(100);
    }
  }
}

function startBrokerOnce(data, socketio, extra) {
  // With a given port, its stderr is read to tell a port in use, and
  // passed on.
  const fixed = !socketio.endsWith(":0");
  const proc = spawn(env.bin, ["serve", "--listen", "127.0.0.1:0", "--grpc", "off", "--metrics", "127.0.0.1:0", "--socketio", socketio, "--data", data, ...extra], { stdio: ["ignore", "pipe", fixed ? "pipe" : "inherit"] });
  started.push(proc);
  let err = "";
  let starting = true;
  proc.stderr?.on("data", (chunk) => {
    if (starting) err += chunk;
    process.stderr.write(chunk);
  });
  return new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (chunk) => {
      out += chunk;
      const sio = out.match(/spool socketio listening on (\S+)/);
      const native = out.match(/listening on (\S+), data in/);
      const metrics = out.match(/spool metrics listening on (\S+)/);
      if (sio && native && metrics) {
        starting = false;
        resolve({ proc, server: native[1], socketio: sio[1], metrics: metrics[1] });
      }
    });
    // "close" comes once its stderr is read to the end, unlike "exit".
    proc.on("close", (code) => {
      const e = new Error("spool serve exited with " + code + ": " + out + err);
      e.addressInUse = err.includes(`listening for socket.io on ${socketio}`) && err.includes("in use");
      reject(e);
    });
  });
}

/// Kills `broker` with SIGKILL and waits until the process is gone, so its
/// data-directory lock and listening address are free for a restart.
export async function kill9(broker) {
  await stopWith(broker, "SIGKILL");
}

/// Stops `broker` with `signal` and waits until its process is gone.
export async function stopWith(broker, signal) {
  const proc = broker.proc;
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const gone = new Promise((resolve) => proc.once("exit", resolve));
  proc.kill(signal);
  await gone;
}

/// Brokers `startBroker` started: a failing test kills those still
/// running, which would otherwise hold the test runner's output open.
const started = [];

/// Runs the named test functions in order, printing each; exits non-zero
/// on the first failure.
export async function run(tests) {
  for (const [name, f] of Object.entries(tests)) {
    const began = Date.now();
    try {
      await f();
      console.log(`ok   ${name} (${Date.now() - began} ms)`);
    } catch (e) {
      console.error(`FAIL ${name}: ${e.stack || e}`);
      for (const proc of started) proc.kill("SIGKILL");
      process.exit(1);
    }
  }
  process.exit(0);
}
