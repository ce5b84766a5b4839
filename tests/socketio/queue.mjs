// Queue mode: competing consumers with acknowledgement callbacks,
// redelivery of what is not acknowledged, and dead letters.
import { assert, collect, connect, env, ok, room, run, spool, until, sleep } from "./lib.mjs";

/// Records queue deliveries as {data, meta, ack}.
function deliveries(s, event = "message") {
  const got = [];
  s.on(event, (data, meta, ack) => got.push({ data, meta, ack }));
  return got;
}

await run({
  async "each message goes to one member, and an acked message is not delivered again"() {
    const r = room("jobs");
    const [p, a, b] = [await connect(), await connect(), await connect()];
    const sa = await ok(a, "subscribe", { room: r, group: "workers", mode: "queue" });
    assert.equal(sa.mode, "queue");
    await ok(b, "subscribe", { room: r, group: "workers", mode: "queue" });
    const [ga, gb] = [deliveries(a), deliveries(b)];
    for (let i = 0; i < 20; i++) await ok(p, "publish", { room: r, data: i });
    await until(() => ga.length + gb.length === 20, "20 deliveries");
    const seen = [...ga, ...gb].map((d) => d.data).sort((x, y) => x - y);
    assert.deepEqual(seen, [...Array(20).keys()], "each message once");
    assert.ok(ga.length > 0 && gb.length > 0, `both members get work (${ga.length}/${gb.length})`);
    for (const d of [...ga, ...gb]) {
      assert.equal(typeof d.ack, "function", "a queue delivery carries an ack callback");
      assert.equal(d.meta.group, "workers");
      assert.equal(d.meta.delivery, 1);
      d.ack();
    }
    await sleep(500);
    assert.equal(ga.length + gb.length, 20, "nothing comes again once acked");
    const described = JSON.parse(spool("group", "describe", r, "workers", "--format", "json"));
    assert.ok(JSON.stringify(described).includes("20"), "the group completed all 20: " + JSON.stringify(described));
    for (const s of [p, a, b]) s.close();
  },

  async "a queue group deleted under a member ends its pushes with an error naming the group"() {
    const r = room("gone");
    const [p, a] = [await connect(), await connect()];
    await ok(a, "subscribe", { room: r, group: "workers", mode: "queue" });
    const errors = collect(a, "error");
    await ok(p, "publish", { room: r, data: 1 });
    spool("group", "delete", r, "workers");
    await ok(p, "publish", { room: r, data: 2 });
    await until(() => errors.length > 0, "an error event");
    const message = JSON.stringify(errors[0].data);
    assert.ok(message.includes(`room ${r}, queue group workers:`) && message.includes("NOT_FOUND"), message);
    for (const s of [p, a]) s.close();
  },

  async "a message not acked within ack_timeout_ms is delivered again"() {
    const r = room("retry");
    spool("topic", "create", r, "--ack-timeout-ms", "3000");
    // A websocket from the start: an upgrade from polling under way could
    // hold the redelivery's ack back past the lease.
    const [p, c] = [await connect(), await connect(env.socketio, { transports: ["websocket"] })];
    const got = [];
    // The redelivery is acked at once: a late ack would let a third come.
    c.on("message", (data, meta, ack) => {
      got.push({ data, meta });
      if (meta.delivery === 2) ack();
    });
    await ok(c, "subscribe", { room: r, group: "g", mode: "queue" });
    await ok(p, "publish", { room: r, data: "job" });
    await until(() => got.length === 1, "the first delivery");
    await until(() => got.length === 2, "the redelivery", 20000);
    assert.equal(got[1].meta.offset, got[0].meta.offset);
    assert.equal(got[1].meta.delivery, 2);
    // Longer than ack_timeout_ms: unacked, it would have come a third time.
    await sleep(4500);
    assert.equal(got.length, 2, "acked: not delivered again");
    p.close(); c.close();
  },

  async "a callback called after its lease ran out still acknowledges the message"() {
    // As an ack of any offset does natively: a late callback is not lost,
    // so a slow consumer's message does not come back again and again.
    const r = room("late");
    spool("topic", "create", r, "--ack-timeout-ms", "1000");
    const [p, c] = [await connect(), await connect(env.socketio, { transports: ["websocket"] })];
    const got = [];
    c.on("message", (data, meta, ack) => got.push({ meta, ack }));
    await ok(c, "subscribe", { room: r, group: "g", mode: "queue" });
    await ok(p, "publish", { room: r, data: "slow job" });
    await until(() => got.length === 2, "the first delivery and its redelivery", 20000);
    assert.equal(got[1].meta.delivery, 2);
    got[0].ack();
    // Past the second lease: had the late call done nothing, a third
    // delivery would come.
    await sleep(2500);
    assert.equal(got.length, 2, `acked by the late callback: ${JSON.stringify(got.map((g) => g.meta))}`);
    const described = spool("group", "describe", r, "g");
    // Committed past it, nothing pending, no lag.
    assert.match(described, /^g\s+queue\s+1\s+0\s+0\s/m, described);
    p.close(); c.close();
  },

  async "a callback does nothing to a group made again under its name"() {
    // Its offsets were another group's: the new one has not seen them.
    const r = room("again");
    // Long enough that the redelivery's lease outlasts the steps below: were
    // it to run out, the member's pushes would end, and its callbacks with
    // them, before they are called.
    spool("topic", "create", r, "--ack-timeout-ms", "5000");
    const [p, c, d] = [await connect(), await connect(env.socketio, { transports: ["websocket"] }), await connect()];
    const got = [];
    c.on("message", (data, meta, ack) => got.push({ meta, ack }));
    // A window of one: the member's pushes learn of the deletion only at
    // their next read, so its callbacks are still there.
    await ok(c, "subscribe", { room: r, group: "g", mode: "queue", maxInFlight: 1 });
    await ok(p, "publish", { room: r, data: "job" });
    await ok(p, "publish", { room: r, data: "next" });
    // A late callback (delivery 1) and a pending one (delivery 2).
    await until(() => got.length === 2, "the first delivery and its redelivery", 20000);
    spool("group", "delete", r, "g");
    // The group again, with a member that holds what it leases.
    const held = deliveries(d);
    await ok(d, "subscribe", { room: r, group: "g", mode: "queue" });
    await until(() => held.length === 2, "the new group's deliveries");
    for (const g of got) g.ack();
    await sleep(500);
    const described = spool("group", "describe", r, "g");
    // Nothing committed: both messages are still the new group's to do.
    assert.match(described, /^g\s+queue\s+0\s+\d+\s+2\s/m, described);
    for (const s of [p, c, d]) s.close();
  },

  async "a member that goes away gives its messages to the others"() {
    const r = room("handover");
    const [p, a] = [await connect(), await connect()];
    await ok(a, "subscribe", { room: r, group: "g", mode: "queue", maxInFlight: 5 });
    const ga = deliveries(a);
    for (let i = 0; i < 5; i++) await ok(p, "publish", { room: r, data: i });
    await until(() => ga.length === 5, "5 deliveries to a");
    a.close();
    const b = await connect();
    // Set up first: the messages wait, and may come in the reply's batch.
    const gb = deliveries(b);
    await ok(b, "subscribe", { room: r, group: "g", mode: "queue" });
    await until(() => gb.length === 5, "the same 5 to b");
    assert.deepEqual(gb.map((d) => d.data).sort(), [0, 1, 2, 3, 4]);
    gb.forEach((d) => d.ack());
    p.close(); b.close();
  },

  async "queue deliveries come after the subscribe reply, never before it"() {
    // Messages wait before the subscribe. The order is taken where the
    // client reads each packet: the reply's callback and the handler run
    // in arrival order (a promise's continuation may run later).
    const p = await connect();
    for (let round = 0; round < 20; round++) {
      const r = room("waiting");
      for (let i = 0; i < 3; i++) await ok(p, "publish", { room: r, data: i });
      const c = await connect();
      const order = [];
      c.on("message", (data, meta, ack) => { order.push(data); ack(); });
      const reply = await new Promise((resolve, reject) => {
        c.timeout(10000).emit("subscribe", { room: r, group: "g", mode: "queue" }, (err, res) => {
          order.push("reply");
          return err ? reject(err) : resolve(res);
        });
      });
      assert.equal(reply.ok, true, JSON.stringify(reply));
      await until(() => order.length === 4, `round ${round}: the 3 waiting messages`);
      assert.equal(order[0], "reply", `round ${round}: ${JSON.stringify(order)}`);
      c.close();
    }
    p.close();
  },

  async "a member that leaves at any moment gives back everything it was leased, at once"() {
    const r = room("churn");
    spool("topic", "create", r, "--ack-timeout-ms", "60000");
    const [p, steady] = [await connect(), await connect()];
    const done = [];
    steady.on("message", (data, meta, ack) => { done.push(data); ack(); });
    await ok(steady, "subscribe", { room: r, group: "g", mode: "queue" });
    let sent = 0;
    for (let round = 0; round < 20; round++) {
      const m = await connect();
      m.on("message", (data, meta, ack) => ack());
      await ok(m, "subscribe", { room: r, group: "g", mode: "queue" });
      for (let i = 0; i < 30; i++) p.emit("publish", { room: r, data: sent++ });
      await sleep(round % 8);
      if (round % 2) m.close();
      else await ok(m, "unsubscribe", { room: r, group: "g" });
      m.close();
    }
    await ok(p, "publish", { room: r, data: sent++ });
    // Long before the 60 s lease: nothing is left leased to a gone member.
    await until(() => {
      const g = JSON.parse(spool("group", "describe", r, "g", "--format", "json"));
      return g.pending === 0 && g.lag === 0;
    }, "every message completed", 20000);
    p.close(); steady.close();
  },

  async "subscribing to a queue group again starts afresh: no more than maxInFlight outstanding"() {
    const r = room("again");
    const [p, s] = [await connect(), await connect()];
    const got = deliveries(s);
    await ok(s, "subscribe", { room: r, group: "g", mode: "queue", maxInFlight: 3 });
    for (let i = 0; i < 20; i++) await ok(p, "publish", { room: r, data: i });
    await until(() => got.length === 3, "three deliveries");
    await ok(s, "subscribe", { room: r, group: "g", mode: "queue", maxInFlight: 3 });
    // The first three went back at once: they are what comes next, again,
    // and no more than three are outstanding.
    await until(() => got.length === 6, "three more deliveries");
    await sleep(300);
    assert.equal(got.length, 6, "no more than maxInFlight outstanding");
    assert.deepEqual(got.slice(3).map((d) => [d.data, d.meta.delivery]), [[0, 2], [1, 2], [2, 2]]);
    p.close(); s.close();
  },

  async "after max_deliveries a message goes to the dead-letter room"() {
    const r = room("poison");
    spool("topic", "create", r, "--ack-timeout-ms", "200", "--max-deliveries", "2");
    const [p, c, dl] = [await connect(), await connect(), await connect()];
    await ok(c, "subscribe", { room: r, group: "g", mode: "queue" });
    const got = deliveries(c);
    await ok(p, "publish", { room: r, data: "poison" });
    await until(() => got.length === 2, "two deliveries");
    await until(() => {
      try { return JSON.parse(spool("topic", "describe", r + ".dlq", "--format", "json")) !== null; } catch { return false; }
    }, "the dead-letter topic");
    const dead = collect(dl);
    await ok(dl, "subscribe", { room: r + ".dlq", from: "earliest" });
    await until(() => dead.length === 1, "the dead letter");
    assert.equal(dead[0].data, "poison");
    await sleep(500);
    assert.equal(got.length, 2, "no third delivery");
    for (const s of [p, c, dl]) s.close();
  },
});
