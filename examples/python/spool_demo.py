#!/usr/bin/env python3
"""spool from Python over gRPC: creates topic `demo`, produces 3 messages and
prints their offsets one per line, replays them, then consumes them through
queue group `demo-workers` with one Consume stream, acking each.

    python spool_demo.py --server 127.0.0.1:7412
"""

import argparse
import sys

import grpc

import spool_client

TOPIC = "demo"
GROUP = "demo-workers"
TIMEOUT = 10  # seconds, for each unary call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:7412", help="spool's gRPC address")
    args = parser.parse_args(argv)

    pb, _ = spool_client.load()
    stub = spool_client.connect(args.server)

    # The topic and the queue group; both may exist from an earlier run.
    try:
        stub.CreateTopic(pb.CreateTopicRequest(name=TOPIC), timeout=TIMEOUT)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise

    values = [f"hello {i}" for i in range(1, 4)]
    produced = stub.Produce(
        pb.ProduceRequest(
            topic=TOPIC, messages=[pb.NewMessage(value=v.encode()) for v in values]
        ),
        timeout=TIMEOUT,
    )
    offsets = list(range(produced.first_offset, produced.last_offset + 1))
    for offset in offsets:
        print(offset)

    try:
        stub.CreateGroup(
            pb.CreateGroupRequest(
                topic=TOPIC,
                group=GROUP,
                mode=pb.QUEUE,
                start=spool_client.position(pb, offset=offsets[0]),
            ),
            timeout=TIMEOUT,
        )
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise

    # Replay: read them back from the first produced offset, no group.
    fetched = stub.Fetch(
        pb.FetchRequest(
            topic=TOPIC,
            max_messages=len(offsets),
            **{"from": spool_client.position(pb, offset=offsets[0])},
        ),
        timeout=TIMEOUT,
    )
    for m in fetched.messages:
        print(f"replayed {m.offset} {m.value.decode()}")

    # Consume through the queue group, acking each message; done once every
    # produced offset is confirmed acked (durable).
    consumer = spool_client.Consumer(stub, TOPIC, GROUP, member="demo-1")
    pending = set(offsets)
    try:
        while pending:
            response = consumer.next()
            for m in response.messages:
                print(f"consumed {m.offset} {m.value.decode()} (delivery {m.delivery})")
                consumer.ack([m.offset])
            for offset in response.acked:
                print(f"acked {offset}")
                pending.discard(offset)
    finally:
        consumer.close()
        stub.channel.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as e:
        print(f"spool_demo: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
