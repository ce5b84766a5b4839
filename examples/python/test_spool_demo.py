"""The Python example against the real `spool` binary (env SPOOL_BIN):
the demo's output, replay, a stream group resuming after a broker restart,
queue redelivery after a nack, and two errors.

    SPOOL_BIN=target/debug/spool python -m pytest examples/python
"""

import os
import signal
import subprocess
import sys

import grpc
import pytest

import spool_client

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10


class Broker:
    """`spool serve` on free ports with data in `data`; start() again after
    stop() is a restart on the same data."""

    def __init__(self, data, log):
        self.data = data
        self.log = log
        self.proc = None
        self.grpc_addr = None

    def start(self):
        binary = os.environ.get("SPOOL_BIN")
        if not binary:
            pytest.fail("set SPOOL_BIN to the spool binary, e.g. target/debug/spool")
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [binary, "serve", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
             "--socketio", "off",
             "--listen", "127.0.0.1:0",
             "--data", str(self.data)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        first = self.proc.stdout.readline().decode()
        second = self.proc.stdout.readline().decode()
        assert first.startswith("spool ") and " listening on " in first, first
        prefix = "spool grpc listening on "
        assert second.startswith(prefix), f"second start-up line: {second!r}"
        self.grpc_addr = second[len(prefix):].strip()
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None

    def restart(self):
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The generated messages, from proto/spool.proto, in a temp dir."""
    pb2, _ = spool_client.load(str(tmp_path_factory.mktemp("generated")))
    return pb2


@pytest.fixture
def broker(tmp_path, pb):
    b = Broker(tmp_path / "data", tmp_path / "spool.log").start()
    yield b
    b.stop()


@pytest.fixture
def stub(broker):
    """A client of `broker`, closed before the broker stops (an open
    connection would hold up its graceful stop)."""
    s = spool_client.connect(broker.grpc_addr)
    yield s
    s.channel.close()


def produce(stub, pb, topic, values):
    return stub.Produce(
        pb.ProduceRequest(topic=topic, messages=[pb.NewMessage(value=v.encode()) for v in values]),
        timeout=TIMEOUT,
    )


def test_demo_produces_replays_and_consumes(broker, stub, pb):
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "spool_demo.py"), "--server", broker.grpc_addr],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["0", "1", "2"], out.stdout
    assert lines[3:6] == ["replayed 0 hello 1", "replayed 1 hello 2", "replayed 2 hello 3"]
    consumed = sorted(l for l in lines if l.startswith("consumed "))
    assert consumed == [f"consumed {i} hello {i + 1} (delivery 1)" for i in range(3)]
    assert sorted(l for l in lines if l.startswith("acked ")) == ["acked 0", "acked 1", "acked 2"]

    # The group completed all three: nothing pending, nothing left.
    info = stub.DescribeGroup(pb.DescribeGroupRequest(topic="demo", group="demo-workers"), timeout=TIMEOUT)
    assert (info.pending, info.lag) == (0, 0)


def test_replay_reads_from_any_offset(broker, stub, pb):
    produce(stub, pb, "replay", ["a", "b", "c", "d"])
    whole = stub.Fetch(pb.FetchRequest(topic="replay", **{"from": spool_client.position(pb)}), timeout=TIMEOUT)
    assert [(m.offset, m.value) for m in whole.messages] == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]
    assert (whole.next_offset, whole.end_offset) == (4, 4)
    part = stub.Fetch(
        pb.FetchRequest(topic="replay", max_messages=2, **{"from": spool_client.position(pb, offset=1)}),
        timeout=TIMEOUT,
    )
    assert [m.value for m in part.messages] == [b"b", b"c"]
    assert part.next_offset == 3


def test_stream_group_resumes_after_a_broker_restart(broker, stub, pb):
    produce(stub, pb, "audit-log", ["one", "two", "three", "four"])
    stub.CreateGroup(pb.CreateGroupRequest(topic="audit-log", group="audit", mode=pb.STREAM), timeout=TIMEOUT)
    first = stub.Fetch(pb.FetchRequest(topic="audit-log", group="audit", max_messages=2), timeout=TIMEOUT)
    assert [m.value for m in first.messages] == [b"one", b"two"]
    stub.Commit(pb.CommitRequest(topic="audit-log", group="audit", offset=first.next_offset), timeout=TIMEOUT)

    stub.channel.close()
    broker.restart()  # same data, new ports
    after = spool_client.connect(broker.grpc_addr)
    try:
        info = after.DescribeGroup(pb.DescribeGroupRequest(topic="audit-log", group="audit"), timeout=TIMEOUT)
        assert (info.mode, info.committed) == (pb.STREAM, 2)
        rest = after.Fetch(pb.FetchRequest(topic="audit-log", group="audit"), timeout=TIMEOUT)
        assert [(m.offset, m.value) for m in rest.messages] == [(2, b"three"), (3, b"four")]
    finally:
        after.channel.close()


def test_queue_redelivers_after_a_nack(broker, stub, pb):
    produce(stub, pb, "jobs", ["job"])
    stub.CreateGroup(pb.CreateGroupRequest(topic="jobs", group="workers", mode=pb.QUEUE), timeout=TIMEOUT)
    consumer = spool_client.Consumer(stub, "jobs", "workers", member="w1", max_in_flight=1)
    try:
        first = consumer.next()
        assert [(m.offset, m.value, m.delivery) for m in first.messages] == [(0, b"job", 1)]
        consumer.nack([0])
        # The nack's confirmation, and the message again (its second delivery).
        nacked, again = None, []
        while nacked is None or not again:
            response = consumer.next()
            if response.nacked:
                nacked = response
            again += [(m.offset, m.value, m.delivery) for m in response.messages]
        assert (list(nacked.nacked), nacked.requeued) == ([0], 1)
        assert again == [(0, b"job", 2)]
        consumer.ack([0])
        acked = consumer.next()
        assert list(acked.acked) == [0]
    finally:
        consumer.close()
    info = stub.DescribeGroup(pb.DescribeGroupRequest(topic="jobs", group="workers"), timeout=TIMEOUT)
    assert (info.pending, info.lag) == (0, 0)


def test_unknown_topic_is_not_found(broker, stub, pb):
    with pytest.raises(grpc.RpcError) as err:
        stub.DescribeTopic(pb.DescribeTopicRequest(name="no-such-topic"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-topic" in err.value.details()


def test_oversized_message_is_invalid_argument_naming_the_limit(broker, stub, pb):
    topic = stub.CreateTopic(pb.CreateTopicRequest(name="big"), timeout=TIMEOUT)
    limit = topic.max_message_bytes
    assert limit > 0
    with pytest.raises(grpc.RpcError) as err:
        stub.Produce(
            pb.ProduceRequest(topic="big", messages=[pb.NewMessage(value=b"x" * (limit + 1))]),
            timeout=TIMEOUT,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_message_bytes" in err.value.details(), err.value.details()
    # Nothing was written.
    info = stub.DescribeTopic(pb.DescribeTopicRequest(name="big"), timeout=TIMEOUT)
    assert info.end_offset == 0
