// Publish and subscribe across clients, replay, presence and room events:
// what a socket.io app built on spool relies on.
import { assert, call, collect, connect, env, ok, once, room, run, spool, startBroker, until, sleep } from "./lib.mjs";
import { execFileSync } from "node:child_process";

await run({
  async "a message published by one client reaches another, under its event, with its meta"() {
    const r = room("chat");
    const [a, b] = [await connect(), await connect()];
    const sub = await ok(b, "subscribe", { room: r });
    assert.equal(sub.start, 0);
    assert.equal(sub.end, 0);
    const messages = collect(b, "message");
    const chats = collect(b, "chat");
    const p1 = await ok(a, "publish", { room: r, data: { text: "hello", n: [1, 2] } });
    assert.equal(p1.offset, 0);
    assert.equal(p1.durability, "durable", "the broker runs with --fsync always");
    const p2 = await ok(a, "publish", { room: r, event: "chat", data: "hi", key: "user-1" });
    assert.equal(p2.offset, 1);
    await until(() => messages.length === 1 && chats.length === 1, "both events");
    assert.deepEqual(messages[0].data, { text: "hello", n: [1, 2] });
    assert.equal(messages[0].meta.room, r);
    assert.equal(messages[0].meta.offset, 0);
    assert.ok(Math.abs(messages[0].meta.timestamp - Date.now()) < 60000);
    assert.equal(chats[0].data, "hi");
    assert.equal(chats[0].meta.key, "user-1");
    assert.equal(chats[0].meta.offset, 1);
    a.close(); b.close();
  },

  async "every JSON value round-trips"() {
    const r = room("json");
    const [a, b] = [await connect(), await connect()];
    await ok(b, "subscribe", { room: r });
    const got = collect(b);
    const values = [null, true, 0, -1.5, "", "ünïcødé ✓", [], {}, { nested: { deep: [1, { x: null }] } }];
    for (const data of values) await ok(a, "publish", { room: r, data });
    await until(() => got.length === values.length, "every value");
    assert.deepEqual(got.map((g) => g.data), values);
    assert.deepEqual(got.map((g) => g.meta.offset), values.map((_, i) => i));
    a.close(); b.close();
  },

  async "a new subscriber replays from earliest, an offset or a timestamp"() {
    const r = room("replay");
    const a = await connect();
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) await ok(a, "publish", { room: r, data: i });
    const all = await connect();
    const got = collect(all);
    const sub = await ok(all, "subscribe", { room: r, from: "earliest" });
    assert.deepEqual([sub.start, sub.end, sub.from], [0, 5, 0]);
    await until(() => got.length === 5, "the replay");
    assert.deepEqual(got.map((g) => g.data), [0, 1, 2, 3, 4]);
    await ok(a, "publish", { room: r, data: 5 });
    await until(() => got.length === 6, "the live message after the replay");
    assert.equal(got[5].meta.offset, 5);

    const mid = await connect();
    const some = collect(mid);
    const s2 = await ok(mid, "subscribe", { room: r, from: 3 });
    assert.equal(s2.from, 3);
    await until(() => some.length === 3, "messages 3 to 5");
    assert.deepEqual(some.map((g) => g.meta.offset), [3, 4, 5]);

    const byTime = await connect();
    const timed = collect(byTime);
    await ok(byTime, "subscribe", { room: r, from: { timestamp: t0 } });
    await until(() => timed.length === 6, "messages from the timestamp");

    const latest = await connect();
    const none = collect(latest);
    const s3 = await ok(latest, "subscribe", { room: r });
    assert.equal(s3.from, 6, "latest starts at the end");
    await sleep(200);
    assert.equal(none.length, 0);
    for (const s of [a, all, mid, byTime, latest]) s.close();
  },

  async "a live reader keeps up with a busy room"() {
    // Before, a room's live feed took one read (64 messages) per 40 ms:
    // 1 600 messages a second at most, whatever the room took, so a live
    // reader of a busier room fell behind for good (and lost what
    // retention dropped meanwhile). 16 000 messages needed 10 s then.
    const r = room("busy");
    const b = await connect();
    await ok(b, "publish", { room: r, data: "first" });
    await ok(b, "subscribe", { room: r });
    const got = collect(b);
    const n = 16000;
    const lines = Array.from({ length: n }, (_, i) => JSON.stringify(i)).join("\n") + "\n";
    const t0 = Date.now();
    execFileSync(env.bin, ["produce", r, "--server", env.server], { input: lines });
    const produced = Date.now() - t0;
    await until(() => got.length === n, `all ${n} messages live`, 7000, () => `(got ${got.length})`);
    console.log(`  ${n} produced in ${produced} ms, all delivered live ${Date.now() - t0} ms after the first`);
    assert.deepEqual(got.map((g) => g.meta.offset), Array.from({ length: n }, (_, i) => i + 1));
    b.close();
  },

  async "after unsubscribe a socket receives nothing more from the room"() {
    const r = room("unsub");
    const [a, b] = [await connect(), await connect()];
    await ok(b, "subscribe", { room: r });
    const got = collect(b);
    await ok(a, "publish", { room: r, data: 1 });
    await until(() => got.length === 1, "the first message");
    await ok(b, "unsubscribe", { room: r });
    await ok(a, "publish", { room: r, data: 2 });
    await sleep(300);
    assert.equal(got.length, 1);
    const again = await call(b, "unsubscribe", { room: r });
    assert.equal(again.error.code, "NOT_FOUND");
    a.close(); b.close();
  },

  async "a socket that stops reading holds up no other socket"() {
    const r = room("stalled");
    // A polling client that connects, joins r, and never polls again.
    const base = `http://${env.socketio}/socket.io/?EIO=4&transport=polling`;
    const opened = await (await fetch(base)).text();
    const sid = JSON.parse(opened.slice(1)).sid;
    const post = (body) => fetch(`${base}&sid=${sid}`, { method: "POST", body });
    await post("40");
    await sleep(100);
    await post(`42["subscribe",{"room":"${r}"}]`);
    await sleep(100);
    // More than its send buffer holds.
    const p = await connect();
    for (let i = 0; i < 1200; i++) {
      p.emit("publish", { room: r, data: i });
      if (i % 400 === 399) await ok(p, "publish", { room: r, data: "step" });
    }
    await sleep(500);
    // Joining r sends the stalled socket a join-room; this socket's next
    // request is answered all the same (it waited for that socket's
    // buffer, up to 30 s, before).
    const a = await connect();
    await ok(a, "subscribe", { room: r, from: "latest" });
    await ok(a, "publish", { room: r, data: "still served" });
    await ok(a, "unsubscribe", { room: r });
    await ok(a, "publish", { room: room("elsewhere"), data: 1 });
    p.close(); a.close();
  },

  async "room members see join-room and leave-room"() {
    const r = room("presence");
    const [a, b] = [await connect(), await connect()];
    // a's own join-room may follow the reply to its subscribe.
    const own = once(a, "join-room");
    await ok(a, "subscribe", { room: r });
    assert.equal((await own)[1], a.id);
    const joined = once(a, "join-room");
    await ok(b, "subscribe", { room: r });
    assert.deepEqual((await joined).slice(0, 2), [r, b.id]);
    // A subscribe that moves b's position in the room is no new join.
    const again = collect(a, "join-room");
    await ok(b, "subscribe", { room: r, from: "earliest" });
    await sleep(300);
    assert.deepEqual(again, [], "no join-room for a socket already in the room");
    const left = once(a, "leave-room");
    const id = b.id;
    b.close();
    assert.deepEqual((await left).slice(0, 2), [r, id]);
    a.close();
  },

  async "sockets in $rooms see create-room and delete-room"() {
    const r = room("created");
    const w = await connect();
    await ok(w, "subscribe", { room: "$rooms" });
    const created = once(w, "create-room");
    const a = await connect();
    await ok(a, "publish", { room: r, data: 1 });
    assert.deepEqual((await created)[0], r);
    const deleted = once(w, "delete-room");
    spool("topic", "delete", r);
    assert.deepEqual((await deleted)[0], r);
    const other = room("admin");
    const created2 = once(w, "create-room");
    spool("topic", "create", other);
    assert.deepEqual((await created2)[0], other);
    w.close(); a.close();
  },

  async "a re-subscribe moves the room: nothing from the old position comes after its reply"() {
    const r = room("moved");
    const p = await connect();
    for (let i = 0; i < 300; i++) await ok(p, "publish", { room: r, data: i });
    const s = await connect(undefined, { transports: ["websocket"] });
    let replied = false;
    const seen = [];
    s.on("message", (data, meta) => seen.push({ data, offset: meta.offset, afterReply: replied }));
    await ok(s, "subscribe", { room: r, from: "earliest" });
    await ok(s, "subscribe", { room: r, from: "latest" });
    replied = true;
    await ok(p, "publish", { room: r, data: "new" });
    await until(() => seen.some((m) => m.data === "new"), "the new message");
    const late = seen.filter((m) => m.afterReply && m.data !== "new");
    assert.deepEqual(late, [], "old messages after the move's reply");
    assert.equal(seen.filter((m) => m.data === "new").length, 1);
    p.close(); s.close();
  },

  async "an unsubscribe ends the room at once: nothing of it after the reply"() {
    const r = room("left");
    const p = await connect();
    // In steps well under a socket's 1024 queued packets.
    for (let i = 0; i < 5000; i++) {
      p.emit("publish", { room: r, data: i });
      if (i % 500 === 499) await ok(p, "publish", { room: r, data: "step" });
    }
    for (let round = 0; round < 20; round++) {
      const s = await connect(undefined, { transports: ["websocket"] });
      let replied = false;
      const late = [];
      s.on("message", (data) => { if (replied) late.push(data); });
      await ok(s, "subscribe", { room: r, from: "earliest" });
      await sleep(round % 10);
      await ok(s, "unsubscribe", { room: r });
      replied = true;
      await sleep(100);
      assert.deepEqual(late, [], `round ${round}: messages after the unsubscribe`);
      s.close();
    }
    p.close();
  },

  async "a room's reader is told at once when the room is deleted, and leaves it"() {
    const r = room("doomed");
    const a = await connect();
    const lists = collect(a, "rooms");
    const joins = collect(a, "join-room");
    await ok(a, "subscribe", { room: r });
    await ok(a, "publish", { room: r, data: 1 });
    await until(() => lists.length === 1, "the rooms event of the subscribe");
    const ended = once(a, "error");
    spool("topic", "delete", r);
    const [{ error }] = await ended;
    assert.equal(error.code, "NOT_FOUND", JSON.stringify(error));
    assert.ok(error.message.includes(r), error.message);
    // Out of the room, as after an unsubscribe: a rooms event without it,
    // and no join-room when another socket joins the room made again.
    await until(() => lists.length === 2, "a rooms event without the room");
    assert.deepEqual(lists[1].data, []);
    const b = await connect();
    await ok(b, "subscribe", { room: r });
    await ok(b, "publish", { room: r, data: 2 });
    await sleep(200);
    assert.deepEqual(joins.map((j) => j.data), [r], "only its own join, before the delete");
    await call(a, "unsubscribe", { room: r }).then((reply) =>
      assert.equal(reply.error?.code, "NOT_FOUND", JSON.stringify(reply)));
    a.close(); b.close();
  },

  async "websocket sockets hold a connection slot while open: max_connections_per_ip, spool_connections_open"() {
    const broker = await startBroker(env.data + "-limits", "127.0.0.1:0", ["--max-connections-per-ip", "2"]);
    try {
      const opts = { transports: ["websocket"], reconnection: false };
      const a = await connect(broker.socketio, opts);
      const b = await connect(broker.socketio, opts);
      const scrape = async () => (await fetch(`http://${broker.metrics}/metrics`)).text();
      const open = (n) => new RegExp(`spool_connections_open\\{listener="socketio"\\} ${n}\\n`);
      let text = "";
      const deadline = Date.now() + 10000;
      while (!open(2).test(text = await scrape())) {
        assert.ok(Date.now() < deadline, "two sockets open: " + text.match(/spool_connections_open.*socketio.*/));
        await sleep(20);
      }
      await assert.rejects(connect(broker.socketio, opts), "a third socket from the same address is refused");
      a.close();
      // The slot is free once the broker has seen the close.
      while (!open(1).test(text = await scrape())) {
        assert.ok(Date.now() < deadline + 10000, "a's slot freed: " + text.match(/spool_connections_open.*socketio.*/));
        await sleep(20);
      }
      const c = await connect(broker.socketio, opts);
      assert.equal(c.connected, true, "a freed slot takes a new socket");
      b.close(); c.close();
    } finally {
      broker.proc.kill("SIGKILL");
    }
  },

  async "both transports work: polling only and websocket only"() {
    const r = room("transports");
    const poll = await connect(undefined, { transports: ["polling"] });
    const ws = await connect(undefined, { transports: ["websocket"] });
    assert.equal(poll.io.engine.transport.name, "polling");
    assert.equal(ws.io.engine.transport.name, "websocket");
    await ok(poll, "subscribe", { room: r });
    await ok(ws, "subscribe", { room: r });
    const [gp, gw] = [collect(poll), collect(ws)];
    await ok(ws, "publish", { room: r, data: "from ws" });
    await ok(poll, "publish", { room: r, data: "from polling" });
    await until(() => gp.length === 2 && gw.length === 2, "both on both");
    assert.deepEqual(gp.map((g) => g.data), ["from ws", "from polling"]);
    assert.deepEqual(gw.map((g) => g.data), ["from ws", "from polling"]);
    poll.close(); ws.close();
  },
});
