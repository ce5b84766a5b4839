// Bad input: every mistake gets an error reply naming what is wrong (or a
// connect_error during the handshake), the socket stays usable, and other
// sockets see nothing of it.
import { assert, call, collect, connect, ok, once, room, run, spool, until, sleep, env, startBroker } from "./lib.mjs";
import { io } from "socket.io-client";
import { writeFileSync } from "node:fs";

async function error(s, event, body, code, needle) {
  const reply = await call(s, event, body);
  assert.ok(reply.error, `${event} ${JSON.stringify(body)} is refused: ${JSON.stringify(reply)}`);
  assert.equal(reply.error.code, code, JSON.stringify(reply));
  assert.ok(reply.error.message.includes(needle), `"${reply.error.message}" names ${needle}`);
  assert.equal(reply.ok, undefined);
}

await run({
  async "bad requests get an error reply naming what is wrong, and nothing else changes"() {
    const r = room("calm");
    const [bad, good, watcher] = [await connect(), await connect(), await connect()];
    await ok(watcher, "subscribe", { room: r });
    const seen = collect(watcher);
    await error(bad, "publish", { room: "no/slash", data: 1 }, "INVALID_ARGUMENT", "room name");
    await error(bad, "publish", { room: "", data: 1 }, "INVALID_ARGUMENT", "room name");
    await error(bad, "publish", { room: "x".repeat(201), data: 1 }, "INVALID_ARGUMENT", "room name");
    await error(bad, "publish", { room: "$rooms", data: 1 }, "INVALID_ARGUMENT", "room name");
    await error(bad, "publish", { room: r }, "INVALID_ARGUMENT", "data is missing");
    await error(bad, "publish", { data: 1 }, "INVALID_ARGUMENT", "room is missing");
    await error(bad, "publish", { room: 5, data: 1 }, "INVALID_ARGUMENT", "room is a string");
    await error(bad, "publish", "just a string", "INVALID_ARGUMENT", "first argument is an object");
    await error(bad, "publish", { room: r, data: 1, extra: true }, "INVALID_ARGUMENT", "unknown field \"extra\"");
    await error(bad, "publish", { room: r, data: 1, event: "connect" }, "INVALID_ARGUMENT", "reserved");
    await error(bad, "publish", { room: r, data: 1, event: 7 }, "INVALID_ARGUMENT", "event is a string");
    await error(bad, "publish", { room: r, data: 1, key: {} }, "INVALID_ARGUMENT", "key is a string");
    await error(bad, "publish", { room: r, data: { nested: Buffer.from([1]) } }, "INVALID_ARGUMENT", "whole of data");
    await error(bad, "subscribe", { room: r, from: "tomorrow" }, "INVALID_ARGUMENT", "from is");
    await error(bad, "subscribe", { room: r, from: -3 }, "INVALID_ARGUMENT", "from is");
    await error(bad, "subscribe", { room: r, group: "g" }, "INVALID_ARGUMENT", "mode");
    await error(bad, "subscribe", { room: r, group: "g", mode: "fanout" }, "INVALID_ARGUMENT", "mode is");
    await error(bad, "subscribe", { room: r, group: "bad group", mode: "queue" }, "INVALID_ARGUMENT", "group name");
    await error(bad, "subscribe", { room: r, maxInFlight: 0, group: "g", mode: "queue" }, "INVALID_ARGUMENT", "maxInFlight");
    await error(bad, "unsubscribe", { room: r }, "NOT_FOUND", r);
    await error(bad, "unsubscribe", { room: "$rooms" }, "NOT_FOUND", "$rooms");
    await error(bad, "dance", { room: r }, "INVALID_ARGUMENT", "unknown event \"dance\"");
    await error(bad, "publish", { room: r, data: "x".repeat(1_100_000) }, "INVALID_ARGUMENT", "max_message_bytes");
    // One message per publish: the error says "the message", not "message 0".
    await error(bad, "publish", { room: r, data: "x".repeat(1_100_000) }, "INVALID_ARGUMENT", "the message has");
    // The socket still works, and the others never saw any of it.
    await ok(bad, "publish", { room: r, data: "fine" });
    await ok(good, "publish", { room: r, data: "also fine" });
    await until(() => seen.length === 2, "the two good messages");
    assert.deepEqual(seen.map((s) => s.data), ["fine", "also fine"]);
    for (const s of [bad, good, watcher]) s.close();
  },

  async "an event without an ack callback that fails is reported as an error event"() {
    const s = await connect();
    const err = once(s, "error");
    s.emit("publish", { room: "no/slash", data: 1 });
    const [e] = await err;
    assert.equal(e.error.code, "INVALID_ARGUMENT");
    s.close();
  },

  async "malformed packets get an error event; the socket and others go on"() {
    const r = room("garbage");
    const [s, other] = [await connect(undefined, { transports: ["websocket"] }), await connect()];
    await ok(other, "subscribe", { room: r });
    const seen = collect(other);
    const errors = collect(s, "error");
    for (const raw of ["2", "2{\"not\":\"an array\"}", "2[1,2]", "9hello", "2[\"publish\"", "51-[\"publish\",{\"room\":\"x\"}]extra", "3[]"]) {
      s.io.engine.write(raw);
    }
    // A binary attachment nothing announced.
    s.io.engine.write(Buffer.from([1, 2, 3]));
    await until(() => errors.length >= 6, "error events for the malformed packets");
    assert.ok(errors.every((e) => e.data.error.code === "INVALID_ARGUMENT"), JSON.stringify(errors));
    await ok(s, "publish", { room: r, data: "still here" });
    await until(() => seen.length === 1, "the good message");
    s.close(); other.close();
  },

  async "packets for a namespace the socket is not in are ignored"() {
    const r = room("otherns");
    const [s, other] = [await connect(undefined, { transports: ["websocket"] }), await connect()];
    await ok(s, "subscribe", { room: r });
    await ok(other, "subscribe", { room: r });
    const seen = collect(other);
    const mine = collect(s);
    const replies = {};
    s.acks[9101] = (reply) => (replies[9101] = reply);
    // An event, and a DISCONNECT, both addressed to /other: neither acts.
    s.io.engine.write(`2/other,9101["publish",{"room":"${r}","data":"not stored"}]`);
    s.io.engine.write("1/other,");
    await ok(s, "publish", { room: r, data: "stored" });
    await until(() => seen.length === 1 && mine.length === 1, "the one message, on both sockets");
    await sleep(200);
    assert.equal(seen.length, 1, JSON.stringify(seen));
    assert.equal(seen[0].data, "stored");
    assert.equal(replies[9101], undefined, "no reply to the ignored event");
    s.close(); other.close();
  },

  async "a binary packet cut short by a text packet gets its error reply; the next packet is served"() {
    const r = room("cut");
    const [s, other] = [await connect(undefined, { transports: ["websocket"] }), await connect()];
    await ok(other, "subscribe", { room: r });
    const seen = collect(other);
    const replies = {};
    for (const id of [9001, 9002]) s.acks[id] = (reply) => (replies[id] = reply);
    const announced = (id) => `51-${id}["publish",{"room":"${r}","data":{"_placeholder":true,"num":0}}]`;
    // 9001 announces an attachment; 9002 comes before it, then one
    // attachment, which is 9002's.
    s.io.engine.write(announced(9001));
    s.io.engine.write(announced(9002));
    s.io.engine.write(Buffer.from("second"));
    await until(() => replies[9001] && replies[9002], "a reply to each packet");
    assert.equal(replies[9001].error?.code, "INVALID_ARGUMENT", JSON.stringify(replies[9001]));
    assert.ok(replies[9001].error.message.includes("0 of its 1 attachments"), replies[9001].error.message);
    assert.equal(replies[9002].ok, true, JSON.stringify(replies[9002]));
    await until(() => seen.length === 1, "the second packet's message");
    assert.equal(Buffer.from(seen[0].data).toString(), "second");
    s.close(); other.close();
  },

  async "a refused binary packet's attachments get no error of their own"() {
    const r = room("refusedbin");
    const [s, other] = [await connect(undefined, { transports: ["websocket"] }), await connect()];
    await ok(other, "subscribe", { room: r });
    const seen = collect(other);
    const errors = collect(s, "error");
    const replies = {};
    for (const id of [9010, 9011]) s.acks[id] = (reply) => (replies[id] = reply);
    // A payload that does not parse, then more attachments than a packet
    // may have: each gets its error reply, and the attachments after it
    // are dropped with it.
    s.io.engine.write(`53-9010["publish",{bad`);
    for (let i = 0; i < 3; i++) s.io.engine.write(Buffer.from("x" + i));
    s.io.engine.write(`517-9011["publish",{"room":"${r}","data":1}]`);
    for (let i = 0; i < 17; i++) s.io.engine.write(Buffer.from("y" + i));
    await ok(s, "publish", { room: r, data: "after" });
    await until(() => replies[9010] && replies[9011], "a reply to each packet");
    assert.equal(replies[9010].error?.code, "INVALID_ARGUMENT", JSON.stringify(replies[9010]));
    assert.equal(replies[9011].error?.code, "INVALID_ARGUMENT", JSON.stringify(replies[9011]));
    assert.ok(replies[9011].error.message.includes("17 attachments"), replies[9011].error.message);
    await until(() => seen.length === 1, "the message published after them");
    await sleep(200);
    assert.deepEqual(errors, [], "no error event for the dropped attachments");
    assert.deepEqual(seen.map((m) => m.data), ["after"]);
    s.close(); other.close();
  },

  async "a binary acknowledgement for another namespace cut short acks nothing"() {
    const r = room("otherack");
    spool("topic", "create", r, "--ack-timeout-ms", "1000");
    const c = await connect(undefined, { transports: ["websocket"] });
    let id;
    c.io.on("packet", (p) => {
      if (p.type === 2 && p.data?.[0] === "message" && id === undefined) id = p.id;
    });
    const got = collect(c);
    await ok(c, "subscribe", { room: r, group: "g", mode: "queue" });
    await ok(c, "publish", { room: r, data: "job" });
    await until(() => got.length === 1 && id !== undefined, "the delivery and its ack id");
    // Addressed to /other and cut short by the next text packet: not an
    // ack of the delivery on /, which comes again once its lease ends.
    c.io.engine.write(`61-/other,${id}[{"_placeholder":true,"num":0}]`);
    await ok(c, "publish", { room: room("elsewhere"), data: 1 });
    await until(() => got.length === 2, "the redelivery");
    assert.equal(got[1].meta.offset, got[0].meta.offset);
    assert.equal(got[1].meta.delivery, 2);
    c.close();
  },

  async "a malformed event with an ack id gets its error reply, not an error event"() {
    const s = await connect(undefined, { transports: ["websocket"] });
    const errors = collect(s, "error");
    const replies = {};
    const ids = [9004, 9005, 9006];
    for (const id of ids) s.acks[id] = (reply) => (replies[id] = reply);
    s.io.engine.write(`29004["publish",{bad`);
    s.io.engine.write(`29005[]`);
    s.io.engine.write(`29006{"a":1}`);
    await until(() => ids.every((id) => replies[id]), "a reply to each");
    for (const id of ids) assert.equal(replies[id].error?.code, "INVALID_ARGUMENT", JSON.stringify(replies[id]));
    await sleep(100);
    assert.deepEqual(errors, [], "no error event besides");
    s.close();
  },

  async "an event with an ack id before CONNECT gets its error reply"() {
    const s = await connect(undefined, { transports: ["websocket"] });
    const replies = {};
    s.acks[9003] = (reply) => (replies[9003] = reply);
    // Leave the namespace, then emit on it by hand.
    s.io.engine.write("1");
    s.io.engine.write(`29003["publish",{"room":"x","data":1}]`);
    await until(() => replies[9003], "a reply");
    assert.equal(replies[9003].error?.code, "INVALID_ARGUMENT", JSON.stringify(replies[9003]));
    assert.ok(replies[9003].error.message.includes("before CONNECT"), replies[9003].error.message);
    s.close();
  },

  async "a socket reads at most 256 rooms, the most a recovery offset holds"() {
    const config = env.data + "-many-rooms.toml";
    writeFileSync(config, "max_subscriptions = 300\n");
    const broker = await startBroker(env.data + "-many-rooms", "127.0.0.1:0", ["--config", config]);
    try {
      const s = await connect(broker.socketio);
      const names = Array.from({ length: 257 }, (_, i) => room(`many${i}`));
      for (const r of names.slice(0, 256)) await ok(s, "subscribe", { room: r });
      await error(s, "subscribe", { room: names[256] }, "RESOURCE_EXHAUSTED", "256 rooms");
      // Moving a room it reads is no new room; a queue group is not a room.
      await ok(s, "subscribe", { room: names[0], from: "latest" });
      await ok(s, "subscribe", { room: names[256], group: "g", mode: "queue" });
      s.close();
    } finally {
      broker.proc.kill("SIGKILL");
    }
  },

  async "a message the broker's frames cannot carry is refused, as on the other transports"() {
    const config = env.data + "-small-frames.toml";
    writeFileSync(config, "max_frame_bytes = 65536\n");
    const broker = await startBroker(env.data + "-small-frames", "127.0.0.1:0", ["--config", config]);
    try {
      // 100 KB: under max_message_bytes (1 MiB), over what a native or gRPC
      // frame of 64 KiB delivers, and under what one Engine.IO request may
      // carry (the limit, base64 included, plus 64 KiB), so the gateway
      // answers it over either transport.
      for (const transports of [["polling"], ["websocket"]]) {
        const s = await connect(broker.socketio, { transports });
        await error(s, "publish", { room: "big", data: "x".repeat(100000) }, "INVALID_ARGUMENT", "max_frame_bytes");
        await ok(s, "publish", { room: "big", data: "x".repeat(1000) });
        assert.equal(s.io.engine.transport.name, transports[0]);
        s.close();
      }
    } finally {
      broker.proc.kill("SIGKILL");
    }
  },

  async "a recovery offset that does not verify starts a new session, with an error event saying why"() {
    const r = room("tamper");
    const a = await connect();
    await ok(a, "subscribe", { room: r });
    // Listening before publishing: the message may arrive before the reply.
    let offset;
    a.on("message", (d, m, token) => (offset = token));
    await ok(a, "publish", { room: r, data: 1 });
    await until(() => offset !== undefined, "an event with its offset");
    const pid = a._pid;
    a.close();
    const cases = [
      [pid, offset.slice(0, -2) + (offset.endsWith("AA") ? "BB" : "AA"), "PERMISSION_DENIED", "was not issued by this broker or was altered"],
      [pid, "not-base64!", "INVALID_ARGUMENT", "malformed"],
      [pid, "", "INVALID_ARGUMENT", "malformed"],
      [pid, 5, "INVALID_ARGUMENT", "needs a string pid and a string offset"],
      // Another socket's pid with this offset.
      ["AAAAAAAAAAAAAAAAAAAAAA", offset, "PERMISSION_DENIED", "pid does not match"],
    ];
    for (const [sentPid, bad, code, why] of cases) {
      const s = io("http://" + env.socketio, { forceNew: true, reconnection: false, autoConnect: false });
      s._pid = sentPid;
      s._lastOffset = bad;
      const errors = collect(s, "error");
      const got = collect(s);
      s.connect();
      await once(s, "connect");
      assert.equal(s.recovered, false, JSON.stringify(bad));
      assert.notEqual(s._pid, sentPid, "a new pid");
      await until(() => errors.length === 1, "the error event of " + JSON.stringify(bad));
      assert.equal(errors[0].data.error.code, code, JSON.stringify(errors[0].data));
      assert.ok(errors[0].data.error.message.includes(why), errors[0].data.error.message);
      // In no room: a message published to the token's room does not come.
      await ok(s, "publish", { room: r, data: "after" });
      await sleep(200);
      assert.deepEqual(got, [], "the new session reads no room");
      s.close();
    }
    // The valid token still recovers.
    const s = io("http://" + env.socketio, { forceNew: true, reconnection: false, autoConnect: false });
    s._pid = pid;
    s._lastOffset = offset;
    s.connect();
    await once(s, "connect");
    assert.equal(s.recovered, true);
    s.close();
  },

  async "a namespace other than / gets a connect_error"() {
    const s = io("http://" + env.socketio + "/admin", { forceNew: true, reconnection: false });
    const [e] = await once(s, "connect_error");
    assert.ok(e.message.includes("namespace /admin does not exist"), e.message);
    s.close();
  },
});
