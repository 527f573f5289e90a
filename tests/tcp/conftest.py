"""Real servers for the L4 tests: scripted asyncio TCP servers, a Redis server and a PostgreSQL cluster.

Every server a test starts is stopped in a ``finally``; all of them listen on 127.0.0.1 only.

The in-process relay tests run twice, on asyncio's loop and on uvloop (which ``sidecar run`` uses): the two
differ in details a byte relay depends on (uvloop ignores ``pause_reading`` inside ``connection_made``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support.sidecar import free_port, write_policy

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOPS


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(serve: Serve) -> AsyncIterator[tuple[asyncio.Server, int]]:
    """An asyncio TCP server on a free loopback port running ``serve`` per connection."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            handlers.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield server, port
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo with back-pressure: stop reading while the way back is full."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def tcp_policy(tmp_path: Path, name: str, targets: list[str], **overrides: Any) -> tuple[Path, int]:
    listen = free_port()
    upstream: dict[str, Any] = {"protocol": "tcp", "listen": f"127.0.0.1:{listen}", "targets": targets}
    upstream.update(overrides)
    return write_policy(tmp_path / "policy.yaml", {name: upstream}), listen


def fresh(admin: str, path: str, timeout: float = 5.0) -> bytes:
    """GET an admin report that reflects the data plane *now*.

    The admin server may answer from a report published up to a few hundred ms ago when the data plane's loop
    is slow to respond (``x-seawall-report: cached``); a test checking what just happened asks again.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(admin + path, timeout=5) as response:
                body: bytes = response.read()
                cached = response.headers.get("x-seawall-report") == "cached"
        except urllib.error.HTTPError as exc:  # /health answers 503 when unhealthy, with the same body
            body = exc.read()
            cached = exc.headers.get("x-seawall-report") == "cached"
        if not cached:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: only cached reports for {timeout}s")
        time.sleep(0.02)


def admin_json(admin: str, path: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(fresh(admin, path))
    return body


def metric(admin: str, name: str, **labels: str) -> float:
    """One sample from the sidecar's /metrics, matched on name and labels in any order (0 when absent)."""
    text = fresh(admin, "/metrics").decode()
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


def seconds_open(admin: str, name: str) -> float:
    """From the breaker's own transition log: time from its last opening to its last closing."""
    transitions = admin_json(admin, "/breakers")[name]["recent_transitions"]

    def last(to_state: str) -> datetime.datetime:
        at = next(t["at"] for t in transitions if t["to"] == to_state)  # newest first
        return datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))

    return (last("closed") - last("open")).total_seconds()


def poll(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Synchronous wait with a deadline (for subprocess tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


# -- Redis ---------------------------------------------------------------------------------------------------


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) that a test can stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        poll(self._answers, 10.0, "redis-server ready")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- PostgreSQL ----------------------------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway cluster (trust auth, loopback only), run as a non-root user when the tests run as root."""

    def __init__(self, bindir: Path, datadir: Path, socketdir: Path, as_user: list[str]) -> None:
        self.bindir = bindir
        self.datadir = datadir
        self.socketdir = socketdir
        self.as_user = as_user
        self.port = free_port()

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        subprocess.run(
            [*self.as_user, *args], check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = f"-k {self.socketdir} -p {self.port} -h 127.0.0.1 -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.socketdir / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ],
            check=False,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresCluster]:
    # initdb on PATH first; otherwise where Debian's ``postgresql`` package puts it (not on PATH there).
    on_path = shutil.which("initdb")
    bindirs = [str(Path(on_path).parent)] if on_path else sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        pytest.skip("PostgreSQL server binaries are not installed")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="seawall-pg-"))
    try:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: hand the directory to the ``postgres`` system user.
            shutil.chown(base, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        cluster = PostgresCluster(Path(bindirs[-1]), base / "data", base, as_user)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
