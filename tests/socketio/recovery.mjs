// Recovery: a client whose connection drops gets back every message it
// missed, in order, exactly once, with `socket.recovered === true`, through
// socket.io's own pid and offset and nothing kept in server memory.
import { assert, collect, connect, ok, once, room, run, spool, until, sleep } from "./lib.mjs";

/// The offsets of `got` in `room`.
const offsets = (got, r) => got.filter((g) => g.meta.room === r).map((g) => g.meta.offset);
const range = (n) => [...Array(n).keys()];

/// Where `s`'s connection stands, for a failure's message.
function state(s) {
  const m = s.io, e = m.engine;
  return JSON.stringify({
    connected: s.connected, manager: m._readyState, reconnecting: m._reconnecting,
    attempts: m.backoff.attempts, engine: e?.readyState, transport: e?.transport?.name,
    upgrading: e?.upgrading, writeBuffer: e?.writeBuffer?.length, lastOffset: s._lastOffset,
  });
}

await run({
  async "(a) transport closed mid-stream, twice: every message once, in order"() {
    const [r1, r2] = [room("flaky-a"), room("flaky-b")];
    const pub = await connect();
    const sub = await connect();
    await ok(sub, "subscribe", { room: r1 });
    await ok(sub, "subscribe", { room: r2 });
    const got = collect(sub);
    const recoveries = [];
    sub.on("connect", () => recoveries.push(sub.recovered));
    const drops = [];
    sub.on("disconnect", (reason) => drops.push(reason));
    const n = 300;
    const publishing = (async () => {
      for (let i = 0; i < n; i++) {
        await ok(pub, "publish", { room: i % 2 ? r2 : r1, data: i });
        if (i % 20 === 0) await sleep(5);
      }
    })();
    await until(() => got.length >= 60, "some messages before the first drop");
    sub.io.engine.close();
    await until(() => recoveries.length >= 1, "the first reconnection", 10000, () => state(sub));
    await until(() => got.length >= 180, "more messages before the second drop");
    const before = recoveries.length;
    sub.io.engine.close();
    await until(() => recoveries.length > before, "the second reconnection", 10000, () => state(sub));
    await publishing;
    await until(() => got.length >= n, "all messages");
    await sleep(300);
    // At least the two drops: the transport may also drop by itself (an
    // upgrade that races a poll), and every reconnection recovers.
    assert.ok(recoveries.length >= 2 && recoveries.every((r) => r === true), `socket.recovered after each drop: ${recoveries} (${drops})`);
    assert.ok(!drops.includes("io server disconnect"), `the server disconnected it: ${drops}`);
    assert.deepEqual(offsets(got, r1), range(n / 2), "room 1: every offset once, in order");
    assert.deepEqual(offsets(got, r2), range(n / 2), "room 2: every offset once, in order");
    assert.deepEqual(got.map((g) => g.data).sort((a, b) => a - b), range(n));
    pub.close(); sub.close();
  },

  async "the system room $rooms is recovered too, and so is leaving it"() {
    const r = room("sys");
    const sub = await connect();
    const pub = await connect();
    const created = collect(sub, "create-room");
    // A room first, then $rooms: the offset after the latter's reply has it.
    await ok(sub, "subscribe", { room: r });
    await ok(pub, "publish", { room: r, data: 1 });
    await until(() => sub._lastOffset !== undefined, "an offset");
    let before = sub._lastOffset;
    await ok(sub, "subscribe", { room: "$rooms" });
    const drop = async () => {
      await until(() => sub._lastOffset !== before, "the offset after the reply");
      sub.io.reconnection(false);
      sub.io.engine.close();
      await until(() => !sub.connected, "offline");
      sub.io.reconnection(true);
      sub.connect();
      await once(sub, "connect");
      assert.equal(sub.recovered, true);
    };
    await drop();
    const made = room("made-after");
    await ok(pub, "publish", { room: made, data: 1 });
    await until(() => created.some((c) => c.data === made), "create-room after the recovery");
    // Left, then dropped: recovery does not put it back.
    before = sub._lastOffset;
    await ok(sub, "unsubscribe", { room: "$rooms" });
    await drop();
    const later = room("made-later");
    await ok(pub, "publish", { room: later, data: 1 });
    await sleep(300);
    assert.ok(!created.some((c) => c.data === later), "no create-room once $rooms was left");
    pub.close(); sub.close();
  },

  async "a recovered socket gets what it missed before anything new"() {
    const r = room("offline");
    const [pub, sub] = [await connect(), await connect()];
    await ok(sub, "subscribe", { room: r });
    const got = collect(sub);
    await ok(pub, "publish", { room: r, data: "before" });
    await until(() => got.length === 1, "the first message");
    sub.io.reconnection(false);
    sub.io.engine.close();
    await until(() => !sub.connected, "offline");
    for (let i = 0; i < 20; i++) await ok(pub, "publish", { room: r, data: "missed " + i });
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, true);
    await ok(pub, "publish", { room: r, data: "after" });
    await until(() => got.length === 22, "missed and new");
    assert.deepEqual(got.map((g) => g.data), ["before", ...range(20).map((i) => "missed " + i), "after"]);
    assert.deepEqual(offsets(got, r), range(22));
    pub.close(); sub.close();
  },

  async "(c) offline longer than socket.io's 2-minute window, on a simulated clock"() {
    // The recovery token carries no time: only retention limits recovery.
    // The client's own reconnection timer asks for 150 s; the simulated
    // clock fires it at once and the broker cannot tell the difference.
    const r = room("long");
    const pub = await connect();
    const sub = await connect(undefined, {
      reconnectionDelay: 150_000, reconnectionDelayMax: 150_000, randomizationFactor: 0,
    });
    const asked = [];
    const realTimeout = sub.io.setTimeoutFn;
    sub.io.setTimeoutFn = (fn, ms) => {
      if (ms >= 120_000) { asked.push(ms); return realTimeout(fn, 100); }
      return realTimeout(fn, ms);
    };
    await ok(sub, "subscribe", { room: r });
    const got = collect(sub);
    await ok(pub, "publish", { room: r, data: 0 });
    await until(() => got.length === 1, "the first message");
    // Waited for from before the drop: the simulated 150 s pass in 100 ms,
    // which may be over before the publishes below are.
    const reconnected = once(sub, "connect");
    sub.io.engine.close();
    for (let i = 1; i <= 10; i++) await ok(pub, "publish", { room: r, data: i });
    await reconnected;
    assert.ok(asked.length >= 1 && asked[0] >= 150_000, `the client waited 150 s on its clock: ${asked}`);
    assert.equal(sub.recovered, true, "recovered after a 150 s (simulated) disconnection");
    await until(() => got.length === 11, "all 11");
    assert.deepEqual(got.map((g) => g.data), range(11));
    pub.close(); sub.close();
  },

  async "messages past retention: recovered is false and a gap event names the lost range"() {
    const r = room("short");
    spool("topic", "create", r, "--segment-bytes", "1024", "--retention-bytes", "1024");
    const [pub, sub] = [await connect(), await connect()];
    await ok(sub, "subscribe", { room: r });
    const got = collect(sub);
    const gaps = collect(sub, "gap");
    await ok(pub, "publish", { room: r, data: "first" });
    await until(() => got.length === 1, "the first message");
    sub.io.reconnection(false);
    sub.io.engine.close();
    await until(() => !sub.connected, "offline");
    const big = "x".repeat(300);
    for (let i = 0; i < 40; i++) await ok(pub, "publish", { room: r, data: big });
    await sleep(300);
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, false, "messages were lost");
    await until(() => gaps.length === 1, "the gap event");
    const gap = gaps[0].data;
    assert.equal(gap.room, r);
    assert.equal(gap.from, 1);
    assert.ok(gap.to > 1 && gap.to <= 40, JSON.stringify(gap));
    await until(() => got.length === 1 + 41 - gap.to, "what retention kept");
    assert.deepEqual(offsets(got, r), [0, ...range(41).slice(gap.to)]);
    pub.close(); sub.close();
  },

  async "a room deleted while offline: recovered is false and a gap event says so"() {
    const r = room("gone");
    const [pub, sub] = [await connect(), await connect()];
    await ok(sub, "subscribe", { room: r });
    const gaps = collect(sub, "gap");
    await ok(pub, "publish", { room: r, data: 1 });
    await until(() => sub._lastOffset !== undefined, "an offset");
    sub.io.reconnection(false);
    sub.io.engine.close();
    await until(() => !sub.connected, "offline");
    spool("topic", "delete", r);
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, false);
    await until(() => gaps.length === 1, "the gap event");
    assert.equal(gaps[0].data.room, r);
    assert.ok(gaps[0].data.reason.includes("does not exist"), JSON.stringify(gaps[0].data));
    pub.close(); sub.close();
  },

  async "a room deleted and created again while offline: read again from its start, with a gap"() {
    const r = room("again");
    const [pub, sub] = [await connect(), await connect()];
    await ok(sub, "subscribe", { room: r });
    const got = collect(sub);
    const gaps = collect(sub, "gap");
    for (const data of ["a", "b", "c"]) await ok(pub, "publish", { room: r, data });
    await until(() => got.length === 3, "the first three");
    sub.io.reconnection(false);
    sub.io.engine.close();
    await until(() => !sub.connected, "offline");
    spool("topic", "delete", r);
    await ok(pub, "publish", { room: r, data: "new" });
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, false, "the room it read is gone");
    await until(() => gaps.length === 1, "the gap event");
    assert.deepEqual([gaps[0].data.from, gaps[0].data.to], [1, 3], JSON.stringify(gaps[0].data));
    await until(() => got.length === 4, "the message published into the new room");
    assert.equal(got[3].data, "new");
    pub.close(); sub.close();
  },
});
