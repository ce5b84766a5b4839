"""A small client of spool's gRPC endpoint (`spool.v1.Spool`).

The stubs are generated from proto/spool.proto with grpcio-tools when
`load()` is called, into a temporary directory: no generated code lives in
the repository.
"""

import atexit
import importlib
import os
import queue
import shutil
import sys
import tempfile

import grpc

PROTO_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
)

_loaded = None


def load(out_dir=None):
    """Generates spool_pb2 and spool_pb2_grpc from proto/spool.proto into
    out_dir (a fresh temporary directory when None), imports them and
    returns (spool_pb2, spool_pb2_grpc). Generates once per process."""
    global _loaded
    if _loaded is not None:
        return _loaded
    from grpc_tools import protoc

    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="spool-pb-")
        # Imported once generated: the directory goes when the process ends.
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    # grpc_tools ships the well-known protos; the include path of
    # google/protobuf is only needed if spool.proto ever imports them.
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_DIR, "spool.proto"),
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO_DIR}/spool.proto")
    sys.path.insert(0, out_dir)
    _loaded = (
        importlib.import_module("spool_pb2"),
        importlib.import_module("spool_pb2_grpc"),
    )
    return _loaded


def connect(addr):
    """A `spool.v1.Spool` stub over a plaintext channel to addr (host:port);
    `stub.channel.close()` closes the connection."""
    _, pb_grpc = load()
    channel = grpc.insecure_channel(addr)
    stub = pb_grpc.SpoolStub(channel)
    stub.channel = channel
    return stub


def position(pb, earliest=False, offset=None):
    """A Position: earliest, or an offset."""
    if offset is not None:
        return pb.Position(offset=offset)
    return pb.Position(earliest=pb.Empty())


class Consumer:
    """One `Consume` stream over a queue group: the first request is start,
    then acks and nacks go up the stream as they are called; responses
    (messages, or the confirmation of each ack and nack) come from next()."""

    _END = object()

    def __init__(self, stub, topic, group, member, max_in_flight=10, timeout=30):
        pb, _ = load()
        self._pb = pb
        self._requests = queue.Queue()
        self._requests.put(
            pb.ConsumeRequest(
                start=pb.ConsumeStart(
                    topic=topic, group=group, member=member, max_in_flight=max_in_flight
                )
            )
        )
        self._call = stub.Consume(self._request_iter(), timeout=timeout)

    def _request_iter(self):
        while True:
            request = self._requests.get()
            if request is self._END:
                return
            yield request

    def next(self):
        """The next ConsumeResponse (raises grpc.RpcError if the stream failed,
        StopIteration when it ended)."""
        return next(self._call)

    def ack(self, offsets):
        self._requests.put(self._pb.ConsumeRequest(ack=self._pb.ConsumeAck(offsets=offsets)))

    def nack(self, offsets, delay_ms=0):
        self._requests.put(
            self._pb.ConsumeRequest(
                nack=self._pb.ConsumeNack(offsets=offsets, delay_ms=delay_ms)
            )
        )

    def close(self):
        """Closes the client's side: the broker gives back what was neither
        acked nor nacked, and the stream ends with OK."""
        self._requests.put(self._END)
        for _ in self._call:
            pass

    def cancel(self):
        self._call.cancel()
