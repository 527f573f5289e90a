"""CPU per unary gRPC call served by ``H2Endpoint``: a grpc.aio client (this process, ``--inflight`` calls at
once) against an echo on the server role in a child process, whose CPU time (/proc/<pid>/stat) is measured
over ``--calls`` calls after a warm-up.

    python -m tests.benchmarks.h2_engine --calls 2000 --inflight 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import grpc

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def serve() -> None:
    from proxy.h2.engine import H2Endpoint, H2Stream, StreamReset

    async def echo(stream: H2Stream) -> None:
        try:
            body = b""
            while chunk := await stream.read():
                body += chunk
                stream.consumed(len(chunk))
            await stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
            await stream.send_data(body)
            await stream.send_trailers([(b"grpc-status", b"0")])
        except StreamReset:
            pass

    tasks: set[asyncio.Task[None]] = set()

    def on_stream(stream: H2Stream) -> None:
        task = asyncio.ensure_future(echo(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: H2Endpoint.server(on_stream), "127.0.0.1", 0)
    print(listener.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def drive(port: int, pid: int, calls: int, inflight: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/x/y", request_serializer=None, response_deserializer=None)
        message = b"m" * 100

        async def worker(n: int) -> None:
            for _ in range(n):
                await call(message, timeout=10)

        await asyncio.gather(*(worker(10) for _ in range(inflight)))  # warm-up
        cpu, wall = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(calls // inflight) for _ in range(inflight)))
        cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
    done = calls // inflight * inflight
    print(f"{done} calls, {inflight} in flight: {done / wall:.0f} calls/s, server CPU {cpu / done * 1e6:.0f} µs/call")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.serve:
        if args.uvloop:
            import uvloop

            uvloop.install()
        asyncio.run(serve())
        return
    flags = ["--uvloop"] if args.uvloop else []
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.h2_engine", "--serve", *flags], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        asyncio.run(drive(port, child.pid, args.calls, args.inflight))
    finally:
        child.terminate()
        child.wait()


if __name__ == "__main__":
    main()
