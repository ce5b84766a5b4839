// TLS and tokens on the socket.io listener, with the stock client: the
// broker (started by tests/socketio.rs) has --tls-cert/--tls-key and
// --auth; SPOOL_SOCKETIO_PLAIN is a broker without TLS. Tokens: writer
// (produce orders*, consume orders), reader (consume news*), temp (consume
// *), root (everything). The reload tests rewrite the auth file and send
// the broker SIGHUP, so they come last.
import { io } from "socket.io-client";
import { readFileSync, writeFileSync } from "node:fs";
import { assert, call, collect, ok, once, room, run, until, sleep, env } from "./lib.mjs";

const ca = readFileSync(process.env.SPOOL_TLS_CA, "utf8");
const authFile = process.env.SPOOL_AUTH_FILE;
const original = readFileSync(authFile, "utf8");
const brokerPid = Number(process.env.SPOOL_BROKER_PID);
const plain = process.env.SPOOL_SOCKETIO_PLAIN;
const tokens = {
  writer: process.env.TOKEN_WRITER,
  reader: process.env.TOKEN_READER,
  temp: process.env.TOKEN_TEMP,
  root: process.env.TOKEN_ROOT,
};

function socket(token, opts = {}) {
  const auth = token === undefined ? {} : { token };
  return io("https://" + env.socketio, { forceNew: true, ca, auth, reconnectionDelay: 50, reconnectionDelayMax: 200, ...opts });
}

/// A connected socket over TLS with `token`.
function connect(token, opts = {}) {
  const s = socket(token, opts);
  return new Promise((resolve, reject) => {
    s.once("connect", () => resolve(s));
    s.once("connect_error", (e) => { s.close(); reject(e); });
  });
}

async function refused(s, event, body, code, message) {
  const reply = await call(s, event, body);
  assert.ok(reply.error, `${event} ${JSON.stringify(body)} is refused: ${JSON.stringify(reply)}`);
  assert.equal(reply.error.code, code, JSON.stringify(reply));
  assert.equal(reply.error.message, message);
}

/// Rewrites the auth file with `edit` and sends the broker SIGHUP.
function reload(edit) {
  writeFileSync(authFile, edit(readFileSync(authFile, "utf8")));
  process.kill(brokerPid, "SIGHUP");
}

/// The auth file without the token named `name`.
const without = (name) => (text) =>
  text.split("[[token]]").filter((t) => !t.includes(`name = "${name}"`)).join("[[token]]");

await run({
  async "no token or a wrong one: connect_error UNAUTHENTICATED, and the connection closes"() {
    for (const [token, message] of [
      [undefined, "this broker requires a token: connect with auth: {token: SECRET}"],
      ["", "this broker requires a token: connect with auth: {token: SECRET}"],
      ["spool_wrong", "the token is not valid"],
    ]) {
      const s = socket(token, { reconnection: false });
      const [e] = await once(s, "connect_error");
      assert.equal(e.message, message);
      assert.equal(e.data.code, "UNAUTHENTICATED");
      await until(() => s.io.engine === undefined || s.io.engine.readyState === "closed", "the Engine.IO connection closed");
      assert.equal(s.connected, false);
      s.close();
    }
  },

  async "a valid token outside its permissions: PERMISSION_DENIED, and the socket stays connected"() {
    const s = await connect(tokens.writer);
    const r = room("orders");
    await ok(s, "publish", { room: r, data: 1 });
    await refused(s, "publish", { room: "payments", data: 1 }, "PERMISSION_DENIED", "token writer may not produce to topic payments");
    await refused(s, "subscribe", { room: r }, "PERMISSION_DENIED", `token writer may not consume from topic ${r}`);
    await refused(s, "subscribe", { room: r, group: "g", mode: "queue" }, "PERMISSION_DENIED", `token writer may not consume from topic ${r}`);
    // The same refusal without a callback is an error event.
    const err = once(s, "error");
    s.emit("publish", { room: "payments", data: 1 });
    assert.equal((await err)[0].error.code, "PERMISSION_DENIED");
    assert.equal(s.connected, true);
    await ok(s, "publish", { room: r, data: 2 });
    await ok(s, "subscribe", { room: "orders", from: "earliest" });
    await ok(s, "unsubscribe", { room: "orders" });
    s.close();
  },

  async "$rooms tells a socket only of the rooms its token may see"() {
    const w = await connect(tokens.writer);
    await ok(w, "subscribe", { room: "$rooms" });
    const created = collect(w, "create-room");
    const root = await connect(tokens.root);
    const hidden = room("payments");
    const seen = room("orders");
    await ok(root, "publish", { room: hidden, data: 1 });
    await ok(root, "publish", { room: seen, data: 1 });
    await until(() => created.some((c) => c.data === seen), "create-room of " + seen);
    await sleep(200);
    assert.deepEqual(created.map((c) => c.data), [seen]);
    w.close(); root.close();
  },

  async "TLS round trip over polling and over websocket"() {
    for (const transports of [["polling"], ["websocket"]]) {
      const r = room("orders-tls");
      const sub = await connect(tokens.root, { transports });
      const pub = await connect(tokens.writer, { transports });
      assert.equal(sub.io.engine.transport.name, transports[0]);
      await ok(sub, "subscribe", { room: r });
      const got = collect(sub);
      await ok(pub, "publish", { room: r, data: { over: transports[0] } });
      await until(() => got.length === 1, "the message over " + transports[0]);
      assert.deepEqual(got[0].data, { over: transports[0] });
      sub.close(); pub.close();
    }
  },

  async "a plaintext client on the TLS listener, and a TLS client on a plaintext one, are refused"() {
    const p = io("http://" + env.socketio, { forceNew: true, reconnection: false, transports: ["polling"], auth: { token: tokens.root } });
    await once(p, "connect_error");
    p.close();
    const t = io("https://" + plain, { forceNew: true, reconnection: false, transports: ["polling"], ca });
    await once(t, "connect_error");
    t.close();
  },

  async "a reload that narrows a token ends its room subscriptions and drops the room from its recovery"() {
    const a = room("news-a");
    const b = room("news-b");
    const root = await connect(tokens.root);
    const live = await connect(tokens.reader);
    await ok(live, "subscribe", { room: a });
    const liveGot = collect(live);
    const liveErrors = collect(live, "error");
    const away = await connect(tokens.reader);
    await ok(away, "subscribe", { room: a });
    await ok(away, "subscribe", { room: b });
    const awayGot = collect(away);
    const awayErrors = collect(away, "error");
    // A queue member of room a, holding a delivery unacknowledged.
    const q = await connect(tokens.reader);
    await ok(q, "subscribe", { room: a, group: "g", mode: "queue" });
    const held = [];
    q.on("message", (data, meta, ack) => held.push({ data, meta, ack }));
    const qErrors = collect(q, "error");
    await ok(root, "publish", { room: a, data: "a1" });
    await ok(root, "publish", { room: b, data: "b1" });
    await until(() => liveGot.length === 1 && awayGot.length === 2 && held.length === 1, "the first messages");
    // `away` drops its connection; the reader may now read news-b* only.
    away.io.reconnection(false);
    away.io.engine.close();
    await until(() => !away.connected, "away disconnected");
    reload((text) => text.replace('consume = ["news*"]', 'consume = ["news-b*"]'));
    // Publish to a until the live socket's subscription ends.
    let n = 2;
    while (liveErrors.length === 0) {
      await ok(root, "publish", { room: a, data: "a" + n++ });
      await sleep(50);
    }
    const e = liveErrors[0].data.error;
    assert.equal(e.code, "PERMISSION_DENIED");
    assert.equal(e.message, `room ${a}: token reader may not consume from topic ${a}`);
    const before = liveGot.length;
    await ok(root, "publish", { room: a, data: "after" });
    await ok(root, "publish", { room: b, data: "b2" });
    await sleep(300);
    assert.equal(liveGot.length, before, "nothing after the subscription ended");
    assert.equal(live.connected, true);
    // The queue's pushes ended too, and an acknowledgement is refused.
    await until(() => qErrors.length === 1, "the end of the queue subscription");
    assert.equal(qErrors[0].data.error.message, `room ${a}, queue group g: token reader may not consume from topic ${a}`);
    // What it held went back to the group at once (ack_timeout_ms is 30 s):
    // another member gets it, and the old callback does nothing.
    const delivered = held.length;
    const other = await connect(tokens.root);
    const otherGot = [];
    const deliveries = {};
    other.on("message", (data, meta, ack) => { otherGot.push(data); deliveries[data] = meta.delivery; ack(); });
    await ok(other, "subscribe", { room: a, group: "g", mode: "queue" });
    await until(() => otherGot.includes("a1") && otherGot.includes("after"), "the held delivery, given back, and the rest");
    // What reached the member before the reload took effect counts; what
    // it read after and never sent was given back uncounted.
    const sent = new Set(held.map((h) => h.data));
    for (const [data, delivery] of Object.entries(deliveries)) {
      assert.equal(delivery, sent.has(data) ? 2 : 1, `${data}: ${JSON.stringify(deliveries)}, sent ${[...sent]}`);
    }
    held[0].ack();
    await sleep(200);
    assert.equal(qErrors.length, 1, JSON.stringify(qErrors));
    assert.equal(held.length, delivered, "no queue delivery after the reload");
    other.close();
    assert.equal(q.connected, true);
    // `away` comes back: room a is refused with an error event, room b
    // delivers what it missed.
    away.io.reconnection(true);
    away.connect();
    await once(away, "connect");
    assert.equal(away.recovered, false);
    await until(() => awayErrors.length === 1, "the error of the dropped room");
    assert.equal(awayErrors[0].data.error.code, "PERMISSION_DENIED");
    assert.ok(awayErrors[0].data.error.message.includes(`room ${a}`), awayErrors[0].data.error.message);
    await until(() => awayGot.some((g) => g.data === "b2"), "b2 after the recovery");
    assert.ok(awayGot.slice(2).every((g) => g.meta.room === b), JSON.stringify(awayGot));
    for (const s of [root, live, away, q]) s.close();
  },

  async "a token the reload removes: its socket is disconnected at its next event or push"() {
    const r = room("temp");
    const root = await connect(tokens.root);
    const idle = await connect(tokens.temp);
    const reading = await connect(tokens.temp);
    await ok(reading, "subscribe", { room: r });
    const readingErrors = collect(reading, "error");
    // Set up before the reload, whose wait below may take 10 s itself.
    const readingGone = once(reading, "disconnect", 30000);
    const idleGone = once(idle, "disconnect", 30000);
    reload(without("temp"));
    // The next event: answered UNAUTHENTICATED, then the socket is disconnected.
    const other = room("temp-other");
    let reply;
    const end = Date.now() + 10000;
    do {
      await sleep(50);
      reply = await call(idle, "unsubscribe", { room: other });
    } while (reply.error?.code !== "UNAUTHENTICATED" && Date.now() < end);
    assert.equal(reply.error.code, "UNAUTHENTICATED", JSON.stringify(reply));
    assert.equal((await idleGone)[0], "io server disconnect");
    // The next push.
    await ok(root, "publish", { room: r, data: 2 });
    assert.equal((await readingGone)[0], "io server disconnect");
    assert.equal(readingErrors[0].data.error.code, "UNAUTHENTICATED");
    // A new socket with that token is refused.
    const again = socket(tokens.temp, { reconnection: false });
    const [e] = await once(again, "connect_error");
    assert.equal(e.data.code, "UNAUTHENTICATED");
    again.close(); root.close();
  },

  async "events in flight when the token goes: the first is answered, then one error event and one disconnect"() {
    // The token back (a test before removed it), once a socket with it connects.
    reload(() => original);
    const back = Date.now() + 10000;
    let busy;
    while (!busy) {
      try {
        busy = await connect(tokens.temp, { transports: ["websocket"], reconnection: false });
      } catch (e) {
        if (Date.now() > back) throw e;
        await sleep(100);
      }
    }
    const probe = await connect(tokens.temp);
    const errors = collect(busy, "error");
    const gone = once(busy, "disconnect", 30000);
    reload(without("temp"));
    // The reload is in force once another socket of that token is refused.
    const end = Date.now() + 10000;
    let reply;
    do {
      await sleep(50);
      reply = await call(probe, "unsubscribe", { room: room("probe") });
    } while (reply.error?.code !== "UNAUTHENTICATED" && Date.now() < end);
    assert.equal(reply.error.code, "UNAUTHENTICATED", JSON.stringify(reply));
    const r = room("inflight");
    const replies = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) => busy.timeout(10000).emitWithAck("publish", { room: r, data: i })));
    assert.equal((await gone)[0], "io server disconnect");
    await sleep(200);
    assert.equal(replies[0].status, "fulfilled", JSON.stringify(replies[0]));
    assert.equal(replies[0].value.error?.code, "UNAUTHENTICATED", JSON.stringify(replies[0]));
    for (const x of replies) {
      // Answered UNAUTHENTICATED, or cut by the disconnect: never stored.
      if (x.status === "fulfilled") assert.equal(x.value.error?.code, "UNAUTHENTICATED", JSON.stringify(x));
    }
    assert.equal(errors.length, 1, JSON.stringify(errors));
    assert.equal(errors[0].data.error.code, "UNAUTHENTICATED");
    probe.close();
  },
});
