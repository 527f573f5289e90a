"""Slowloris load for the abuse suite, in its own process so it does not share the measuring client's CPU time.

    python -m tests.abuse.trickle PORT CONNECTIONS INTERVAL MAX_SECONDS

Opens CONNECTIONS connections, sends a request line, then one header byte per INTERVAL on each, and never
finishes the head. Prints ``ready`` once all are open, then one JSON line: how each connection ended.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def one(port: int, interval: float, until: float, ready: asyncio.Event, opened: list[int]) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    opened.append(1)
    answer = asyncio.ensure_future(reader.read(100))
    try:
        while time.monotonic() < until:
            done, _ = await asyncio.wait({answer}, timeout=interval)
            if done:
                data = answer.result()
                return {"status": data[9:12].decode(errors="replace") or "closed", "after": time.monotonic() - started}
            writer.write(b"a")
        return {"status": "still_open", "after": time.monotonic() - started}
    except ConnectionError:
        return {"status": "reset", "after": time.monotonic() - started}
    finally:
        answer.cancel()
        writer.close()


async def main(port: int, count: int, interval: float, max_seconds: float) -> None:
    until = time.monotonic() + max_seconds
    ready = asyncio.Event()
    opened: list[int] = []
    tasks = [asyncio.create_task(one(port, interval, until, ready, opened)) for _ in range(count)]
    while len(opened) < count and time.monotonic() < until:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    summary = [r if isinstance(r, dict) else {"status": type(r).__name__, "after": 0} for r in results]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
