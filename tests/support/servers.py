"""Real servers the tests start on loopback: scripted asyncio TCP servers, Prometheus, nginx, Redis, PostgreSQL.

Each is started by a test (or a fixture in a ``conftest.py``) and stopped in a ``finally``; all listen on
127.0.0.1 only, on free ports. A program that is not installed skips the test, or fails it on CI
(``tests.support.tools.require_tool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from tests.support.eventually import eventually_sync
from tests.support.sidecar import free_port
from tests.support.tools import missing, require_tool

# -- scripted TCP servers ------------------------------------------------------------------------------------

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


# -- waiting for HTTP servers, stopping processes ------------------------------------------------------------


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` (blocking, with a deadline) until it answers 200; fail at once if ``proc`` exits."""

    def answers() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    eventually_sync(answers, timeout=timeout, interval=0.05, what=f"{url} answering 200")


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def prometheus_server(tmp: Path, admin_port: int) -> Iterator[str]:
    """A real Prometheus on loopback scraping the sidecar's admin server every second."""
    binary = require_tool("prometheus", "Debian package `prometheus`")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: seawall-sidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{admin_port}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/-/ready", 20.0, proc)
        yield f"http://127.0.0.1:{port}"
    log.close()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}
}}
"""


@contextlib.contextmanager
def nginx_upstream(tmp: Path) -> Iterator[str]:
    """A fast upstream in its own process, so the sidecar (not the upstream) is what saturates."""
    binary = require_tool("nginx", "Debian package `nginx-light`")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
    proc = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/", 10.0, proc)
        yield f"http://127.0.0.1:{port}"


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
        eventually_sync(self._answers, timeout=10.0, what="redis-server ready")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
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


def postgres_bindir() -> Path:
    """Where ``initdb``/``pg_ctl`` are: on PATH first, else where Debian's ``postgresql`` puts them (off PATH)."""
    on_path = shutil.which("initdb")
    bindirs = [str(Path(on_path).parent)] if on_path else sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        missing("PostgreSQL server binaries are not installed (Debian package `postgresql`)")
    return Path(bindirs[-1])
