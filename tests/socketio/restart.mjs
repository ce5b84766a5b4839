// (b) Recovery across `kill -9` of the broker and a restart on the same
// data and port: the recovery token is sealed with a key kept in the data
// directory, so the restarted broker honours it.
import { assert, collect, connect, ok, once, run, startBroker, until, sleep, env, kill9 } from "./lib.mjs";

const range = (n) => [...Array(n).keys()];

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
    const pub2 = await connect(addr);
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
});
