// Binary data: socket.io binary attachments are stored as they are and
// come back as binary, on both transports.
import { assert, collect, connect, ok, room, run, until } from "./lib.mjs";

await run({
  async "binary data round-trips over websocket and polling"() {
    for (const transports of [["websocket"], ["polling"]]) {
      const r = room("bin");
      const [a, b] = [await connect(undefined, { transports }), await connect(undefined, { transports })];
      await ok(b, "subscribe", { room: r });
      const got = collect(b, "blob");
      const payloads = [Buffer.from([0, 1, 2, 255]), Buffer.alloc(0), Buffer.alloc(200_000, 7), Buffer.from("not json {")];
      for (const data of payloads) {
        const reply = await ok(a, "publish", { room: r, event: "blob", data });
        assert.equal(typeof reply.offset, "number");
      }
      await until(() => got.length === payloads.length, "every binary message");
      got.forEach((g, i) => {
        assert.ok(Buffer.isBuffer(g.data), `${transports}: message ${i} is binary`);
        assert.ok(g.data.equals(payloads[i]), `${transports}: message ${i} is the same bytes`);
      });
      a.close(); b.close();
    }
  },

  async "a text message published elsewhere arrives as a string"() {
    const r = room("plain");
    const b = await connect();
    await ok(b, "subscribe", { room: r });
    const got = collect(b);
    const { spool } = await import("./lib.mjs");
    spool("produce", r, "plain text, not JSON");
    spool("produce", r, "{\"json\": true}");
    await until(() => got.length === 2, "both");
    assert.equal(got[0].data, "plain text, not JSON");
    assert.deepEqual(got[1].data, { json: true });
    b.close();
  },
});
