// (b) Recovery across `kill -9` of the broker and a restart on the same
// data and port: the recovery token is sealed with a key kept in the data
// directory, so the restarted broker honours it.
import { assert, collect, connect, ok, once, run, startBroker, until, sleep, env, kill9, stopWith } from "./lib.mjs";

const range = (n) => [...Array(n).keys()];

/// `connect`, tried again for up to 10 s while it fails.
async function connectAgain(addr) {
  const end = Date.now() + 10000;
  for (;;) {
    try {
      return await connect(addr);
    } catch (e) {
      if (Date.now() > end) throw e;
      await sleep(100);
    }
  }
}

await run({
  async "(b) kill -9 and restart: every missed message once, in order, recovered"() {
    let broker = await startBroker(env.data, "127.0.0.1:0", ["--fsync", "always"]);
    const addr = broker.socketio;
    const sub = await connect(addr);
    const pub = await connect(addr, { reconnection: false });
    await ok(sub, "subscribe", { room: "durable" });
    const got = collect(sub);
    for (let i = 0; i < 10; i++) await ok(pub, "publish", { room: "durable", data: i });
    await until(() => got.length === 10, "the first 10");
    sub.io.reconnection(false);
    await kill9(broker);
    await until(() => !sub.connected, "the client sees the broker go");
    pub.close();
    broker = await startBroker(env.data, addr, ["--fsync", "always"]);
    // The client's HTTP agent may still hold a kept-alive connection to
    // the killed broker: its first poll can fail on that; connect again.
    const pub2 = await connectAgain(addr);
    for (let i = 10; i < 30; i++) await ok(pub2, "publish", { room: "durable", data: i });
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, true, "recovered after the restart");
    await ok(pub2, "publish", { room: "durable", data: 30 });
    await until(() => got.length === 31, "all 31");
    await sleep(200);
    assert.deepEqual(got.map((g) => g.meta.offset), range(31));
    assert.deepEqual(got.map((g) => g.data), range(31));
    sub.close(); pub2.close();
    broker.proc.kill("SIGTERM");
  },

  // A graceful stop while messages flow must leave the socket in its rooms:
  // before, the stop ended each room's feed and the socket was told "its
  // topic is gone" and dropped the rooms, so after the restart it
  // recovered without them and missed everything published there.
  async "(c) SIGTERM while publishing: the rooms stay, recovered, nothing missed"() {
    const data = env.data + "-sigterm";
    let broker = await startBroker(data, "127.0.0.1:0", ["--fsync", "always"]);
    const addr = broker.socketio;
    const rooms = ["a", "b", "c", "d", "e", "f", "g", "h"];
    const sub = await connect(addr);
    const errors = collect(sub, "error");
    for (const r of rooms) await ok(sub, "subscribe", { room: r });
    const got = collect(sub);
    const pub = await connect(addr, { reconnection: false });
    const acked = Object.fromEntries(rooms.map((r) => [r, []]));
    let publishing = true;
    const publisher = (async () => {
      for (let i = 0; publishing; i++) {
        for (const r of rooms) {
          try {
            await ok(pub, "publish", { room: r, data: i });
            acked[r].push(i);
          } catch {
            return;
          }
        }
      }
    })();
    await until(() => got.length >= 60, "messages flowing");
    sub.io.reconnection(false);
    await stopWith(broker, "SIGTERM");
    publishing = false;
    await publisher;
    pub.close();
    await until(() => !sub.connected, "the client sees the broker go");
    broker = await startBroker(data, addr, ["--fsync", "always"]);
    const pub2 = await connect(addr);
    for (const r of rooms) {
      await ok(pub2, "publish", { room: r, data: -1 });
      acked[r].push(-1);
    }
    sub.io.reconnection(true);
    sub.connect();
    await once(sub, "connect");
    assert.equal(sub.recovered, true, "recovered after the restart");
    const total = rooms.reduce((n, r) => n + acked[r].length, 0);
    await until(() => got.length >= total, `all ${total} acknowledged messages`, 10000,
      () => `got ${got.length}; errors ${JSON.stringify(errors)}`);
    await sleep(200);
    for (const r of rooms) {
      // A publish stored as the broker stopped may have lost its ack: the
      // room holds every acknowledged one, once each.
      const mine = got.filter((g) => g.meta.room === r).map((g) => g.data);
      assert.deepEqual(acked[r].filter((v) => !mine.includes(v)), [], `room ${r}: nothing acknowledged missed`);
      assert.equal(new Set(mine).size, mine.length, `room ${r}: each once`);
    }
    assert.ok(!errors.some((e) => JSON.stringify(e).includes("gone")), `no room ended: ${JSON.stringify(errors)}`);
    sub.close(); pub2.close();
    // Waited for: the restarted broker's stderr comes through this
    // process, which exits after the last test.
    await stopWith(broker, "SIGTERM");
  },

  async "(d) SIGTERM with publishes in flight: each stored one is answered, each refused one is not stored"() {
    for (const transport of ["websocket", "polling"]) {
      const data = env.data + "-inflight-" + transport;
      let broker = await startBroker(data, "127.0.0.1:0", ["--fsync", "always"]);
      const pub = await connect(broker.socketio, { reconnection: false, transports: [transport] });
      const stored = [];
      const refused = [];
      let seq = 0;
      let running = true;
      // 32 publishes in flight at all times, until the connection ends.
      const one = async () => {
        while (running) {
          const v = seq++;
          let reply;
          try {
            reply = await pub.timeout(10000).emitWithAck("publish", { room: "r", data: v });
          } catch {
            // The connection ended: this one was never answered.
            refused.push(v);
            running = false;
            continue;
          }
          if (reply.ok) stored.push(v);
          else {
            assert.equal(reply.error.code, "UNAVAILABLE", JSON.stringify(reply));
            refused.push(v);
          }
        }
      };
      const publishers = Promise.all(Array.from({ length: 32 }, one));
      await until(() => stored.length >= 200, "publishes flowing");
      await stopWith(broker, "SIGTERM");
      await publishers;
      pub.close();
      broker = await startBroker(data, "127.0.0.1:0", ["--fsync", "always"]);
      const reader = await connect(broker.socketio);
      const got = collect(reader);
      const sub = await ok(reader, "subscribe", { room: "r", from: "earliest" });
      await until(() => got.length === sub.end, `the ${sub.end} stored messages`);
      const inRoom = got.map((g) => g.data).sort((a, b) => a - b);
      assert.deepEqual(inRoom, [...stored].sort((a, b) => a - b),
        `${transport}: the room holds exactly the publishes answered ok (${refused.length} refused)`);
      reader.close();
      await stopWith(broker, "SIGTERM");
    }
  },
});
