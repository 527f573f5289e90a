"""Start a sidecar for a test: in-process (fast, same event loop) or as a real ``sidecar run`` subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.resilience.clock import ManualClock
from proxy.server import Sidecar
from tests.support.eventually import eventually_sync

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in a test run (the kernel may hand a
    just-closed port out again before the test that asked for it has bound it)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def write_policy(
    path: Path,
    upstreams: dict[str, dict[str, Any]],
    defaults: dict[str, Any] | None = None,
    admin_port: int | None = None,
    **top: Any,
) -> Path:
    """A policy file with fast test-friendly defaults (short timeouts, no jitter, no retries), overridable per test.

    Upstreams without a ``listen`` get a free loopback port.
    """
    base_defaults: dict[str, Any] = {
        "timeouts": {"connect": "500ms", "per_try": "2s", "total": "5s"},
        "breaker": {"failure_threshold": 5, "window": "60s", "open_duration": "60s"},
        "retry": {"max_retries": 0, "base_delay": "50ms", "max_delay": "200ms", "jitter": False},
    }
    for key, value in (defaults or {}).items():
        if isinstance(value, dict) and isinstance(base_defaults.get(key), dict):
            base_defaults[key] = {**base_defaults[key], **value}
        else:
            base_defaults[key] = value
    for upstream in upstreams.values():
        upstream.setdefault("listen", f"127.0.0.1:{free_port()}")  # tests name no ports of their own
    document: dict[str, Any] = {
        "admin": {"listen": f"127.0.0.1:{admin_port or free_port()}", "token_env": "SEAWALL_TEST_TOKEN"},
        "defaults": base_defaults,
        "upstreams": upstreams,
        **top,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_sidecar(policy: Path) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(policy)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop(drain_timeout=1.0)


def admin_url(sidecar: Sidecar) -> str:
    assert sidecar.config is not None
    address = sidecar.config.admin.listen
    return f"http://{address.host}:{address.port}"


def listener_url(sidecar: Sidecar, upstream: str) -> str:
    assert sidecar.config is not None
    address = sidecar.config.upstream(upstream).listen
    return f"http://{address.host}:{address.port}"


def policy_listen(policy: Path, upstream: str) -> tuple[str, int]:
    """(host, port) an upstream's listener has in a policy file."""
    listen = yaml.safe_load(policy.read_text())["upstreams"][upstream]["listen"]
    host, _, port = listen.rpartition(":")
    return host, int(port)


class SidecarProcess:
    def __init__(self, proc: subprocess.Popen[bytes], admin: str, log_path: Path) -> None:
        self.proc = proc
        self.admin = admin
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


@contextlib.contextmanager
def sidecar_process(
    policy: Path, *extra: str, env: dict[str, str] | None = None, ready_timeout: float = 15.0
) -> Iterator[SidecarProcess]:
    """``sidecar run --config policy`` as a real process; waits until /ready answers 200."""
    document = yaml.safe_load(policy.read_text())
    admin = "http://" + document["admin"]["listen"]
    log_path = policy.with_suffix(".log")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(policy), *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    handle = SidecarProcess(proc, admin, log_path)
    host, _, port = document["admin"]["listen"].rpartition(":")

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}:\n{handle.log()}")
        try:
            with socket.create_connection((host, int(port)), 0.2) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    try:
        try:
            eventually_sync(ready, timeout=ready_timeout, interval=0.05, what="sidecar /ready")
        except AssertionError as exc:
            raise RuntimeError(f"sidecar not ready in {ready_timeout}s:\n{handle.log()}") from exc
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def manual_sidecar(policy: Path, clock: ManualClock) -> AsyncIterator[Sidecar]:
    """Like ``running_sidecar``, but breaker and ejection time only moves when the test advances ``clock``."""
    sidecar = Sidecar(policy, clock=clock)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop(drain_timeout=1.0)


async def get(
    session: aiohttp.ClientSession, sidecar: Sidecar, upstream: str, path: str = "/"
) -> tuple[int, dict[str, str], str]:
    """GET through an in-process sidecar's listener: (status, headers, body)."""
    async with session.get(listener_url(sidecar, upstream) + path) as response:
        return response.status, dict(response.headers), await response.text()


def tcp_policy(tmp_path: Path, name: str, targets: list[str], **overrides: Any) -> tuple[Path, int]:
    """A policy with one ``protocol: tcp`` upstream on a free port; returns (policy path, listen port)."""
    listen = free_port()
    upstream: dict[str, Any] = {"protocol": "tcp", "listen": f"127.0.0.1:{listen}", "targets": targets}
    upstream.update(overrides)
    return write_policy(tmp_path / "policy.yaml", {name: upstream}), listen
