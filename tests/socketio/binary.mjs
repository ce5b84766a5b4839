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

  async "an event name written elsewhere that a publish could not use goes out as message"() {
    // A reserved name would make the client drop the socket at it, and
    // again after every recovery: the room would be stuck for good.
    const r = room("named");
    // A websocket from the start: the upgrade from polling may drop the
    // socket by itself, which is not what this checks.
    const b = await connect(undefined, { transports: ["websocket"] });
    const got = collect(b);
    const chats = collect(b, "chat");
    const drops = [];
    b.on("disconnect", (reason) => drops.push(reason));
    await ok(b, "subscribe", { room: r });
    const { spool } = await import("./lib.mjs");
    for (const name of ["connect", "disconnect", "rooms", "error", "x".repeat(201)]) {
      spool("produce", r, "--header", `socketio-event=${name}`, JSON.stringify(name.slice(0, 10)));
    }
    spool("produce", r, "--header", "socketio-event=chat", "\"named\"");
    await ok(b, "publish", { room: r, data: "after" });
    await until(() => got.length === 6, "the five and the one after");
    assert.deepEqual(got.map((g) => g.data), ["connect", "disconnect", "rooms", "error", "xxxxxxxxxx", "after"]);
    await until(() => chats.length === 1, "the chat event");
    assert.equal(chats[0].data, "named");
    assert.deepEqual(drops, [], "the socket stayed connected");
    b.close();
  },
});
