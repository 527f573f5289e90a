"""The `h2` library's own cost of relaying one unary gRPC call, in memory: no sockets, no event loop, no proxy code.

    python tests/benchmarks/h2_floor.py --calls 5000

A client, a relay and a server are plain ``h2.connection.H2Connection`` objects handing bytes to each other.
The relay has two of them (the caller's side, server role; the upstream's side, client role) and does per call
exactly what any HTTP/2 relay must: parse the request's HEADERS and DATA, send them upstream, parse the
response's HEADERS, DATA and trailers, send them back, and acknowledge the DATA for flow control. Only the relay's
calls are timed, as CPU time of the thread (``time.thread_time_ns``: a busy machine does not inflate it); the
client's and the server's work is not counted. grpcio's real header set is used (user-agent, te, grpc-timeout,
...), so HPACK sees what it sees in the benchmark. What this prints is a floor for any relay built on `h2` in
CPython, below which no code of ours can go.
"""

from __future__ import annotations

import argparse
import json
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, ResponseReceived, StreamEnded, TrailersReceived

MESSAGE = b"\x00" + (102).to_bytes(4, "big") + b"\x0a\x64" + b"x" * 100  # a gRPC frame: a 100-byte bytes field
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/seawall.test.Echo/Unary"),
    (b":authority", b"127.0.0.1:40000"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-python-asyncio/1.68.0 grpc-c/44.0.0 (linux; chttp2)"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    (b"grpc-timeout", b"4999m"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-accept-encoding", b"identity")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def connection(client_side: bool, validate_inbound: bool = True) -> H2Connection:
    # The sidecar's settings (proxy/h2/engine.py): outbound checks and normalisation off, inbound checks on.
    config = H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=validate_inbound,
        normalize_inbound_headers=False,
    )
    conn = H2Connection(config)
    conn.initiate_connection()
    return conn


def relay_request(down: H2Connection, up: H2Connection, data: bytes, streams: dict[int, int]) -> bytes:
    for event in down.receive_data(data):
        if isinstance(event, RequestReceived):
            streams[event.stream_id] = up.get_next_available_stream_id()
            up.send_headers(streams[event.stream_id], event.headers)
        elif isinstance(event, DataReceived):
            up.send_data(streams[event.stream_id], event.data)
            down.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            up.end_stream(streams[event.stream_id])
    return up.data_to_send()


def relay_response(up: H2Connection, down: H2Connection, data: bytes, streams: dict[int, int]) -> bytes:
    back = {upstream: caller for caller, upstream in streams.items()}
    for event in up.receive_data(data):
        if isinstance(event, ResponseReceived):
            down.send_headers(back[event.stream_id], event.headers)
        elif isinstance(event, DataReceived):
            down.send_data(back[event.stream_id], event.data)
            up.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            down.send_headers(back[event.stream_id], event.headers, end_stream=True)
    return down.data_to_send()


def serve(server: H2Connection, data: bytes) -> bytes:
    for event in server.receive_data(data):
        if isinstance(event, DataReceived):
            server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            server.send_headers(event.stream_id, RESPONSE)
            server.send_data(event.stream_id, MESSAGE)
            server.send_headers(event.stream_id, TRAILERS, end_stream=True)
    return server.data_to_send()


def measure(calls: int, batch: int, check_upstream: bool = True) -> dict[str, float]:
    """``calls`` unary calls, ``batch`` at a time on each connection (multiplexed, like 50 in flight)."""
    client, down, server = connection(True), connection(False), connection(False)
    up = connection(True, validate_inbound=check_upstream)
    # The handshakes (prefaces, SETTINGS and their ACKs), untimed.
    down.receive_data(client.data_to_send())
    server.receive_data(up.data_to_send())
    client.receive_data(down.data_to_send())
    up.receive_data(server.data_to_send())
    down.receive_data(client.data_to_send())
    server.receive_data(up.data_to_send())
    relay_ns = 0
    answered = 0  # calls whose trailers reached the client: the relay really relayed
    for _ in range(calls // batch):
        streams: dict[int, int] = {}
        for _ in range(batch):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQUEST)
            client.send_data(sid, MESSAGE, end_stream=True)
        wire = client.data_to_send()
        started = time.thread_time_ns()
        wire = relay_request(down, up, wire, streams)
        relay_ns += time.thread_time_ns() - started
        wire = serve(server, wire)
        started = time.thread_time_ns()
        wire = relay_response(up, down, wire, streams)
        relay_ns += time.thread_time_ns() - started
        for event in client.receive_data(wire):
            if isinstance(event, DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived):
                answered += 1
        up.receive_data(server.data_to_send())  # window updates, untimed on both sides
        down.receive_data(client.data_to_send())
    done = calls // batch * batch
    return {"calls": done, "answered": answered, "relay_us_per_call": relay_ns / done / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=50, help="calls relayed together (in flight at once)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best (least disturbed) is printed")
    parser.add_argument("--trust-upstream", action="store_true", help="no h2 checks of the upstream's response headers")
    args = parser.parse_args()
    runs = [measure(args.calls, args.batch, not args.trust_upstream) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["relay_us_per_call"])
    print(json.dumps({**best, "runs_us": [round(r["relay_us_per_call"], 1) for r in runs]}))


if __name__ == "__main__":
    main()
