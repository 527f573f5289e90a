"""The running sidecar: listeners, admin server, checks, live reload, graceful shutdown.

Shutdown follows uvicorn's order: stop accepting, let in-flight requests finish (up to ``drain_timeout``),
close idle client connections and upstream pools, then exit. A second SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import allocator, logs
from proxy.admin import start_admin
from proxy.grpc.server import Http2Listener, refuse_http1
from proxy.h2.limits import AbuseLimits
from proxy.http.forwarder import forward
from proxy.http.listener import ClientConnection
from proxy.metrics import ProcessStats
from proxy.policy.issues import ConfigError
from proxy.policy.loader import PolicyRead, read_policy
from proxy.policy.model import SidecarConfig, UpstreamPolicy
from proxy.policy.values import Address
from proxy.reports import LoadedFile
from proxy.resilience.clock import Clock, SystemClock
from proxy.runtime import UpstreamRuntime
from proxy.sockets import Drainable
from proxy.tcp import TcpClient
from proxy.upstream import health, tls

log = logging.getLogger("seawall.server")

WATCH_INTERVAL = 0.5  # seconds between looks at the policy file


@dataclass
class Listener:
    name: str
    address: Address
    protocol: str
    server: asyncio.Server
    connections: set[Drainable]  # what is still open, for draining


class Sidecar:
    def __init__(
        self, config_path: str | Path, clock: Clock | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config_path = str(config_path)
        self.clock = clock or SystemClock()
        self.environ = environ
        self.config: SidecarConfig | None = None
        self.loaded: LoadedFile | None = None
        self.runtimes: dict[str, UpstreamRuntime] = {}
        self.listeners: dict[str, Listener] = {}
        self.process_stats = ProcessStats()
        self.ready = False
        self.started_at = time.time()
        self.last_reload_error: list[str] = []
        self._stop_checks: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._admin_runner: Any = None
        self._stopping = False
        self._seen_digest = ""  # the file content the last load or reload attempt read
        self.tls_contexts: dict[str, tls.ClientContext] = {}  # per upstream with https targets, built per load
        # Runtimes a listener may need that are not in ``runtimes``: staged ones (a listener bound before the
        # swap) and retired ones (a removed listener still draining its in-flight requests).
        self._spare_runtimes: dict[str, UpstreamRuntime] = {}

    # -- start -----------------------------------------------------------------------------------------------

    async def start(self, policy: PolicyRead | None = None) -> None:
        """Load the policy (or take the one the caller already read) and start serving it."""
        read = policy if policy is not None else read_policy(self.config_path, self.environ)
        read, contexts = tls.checked(read)
        if read.config is None:
            raise ConfigError(read.issues)
        config = read.config
        for warning in read.warnings:
            log.warning("%s", warning, extra={"event": "config_warning"})
        await self._apply(config, contexts)
        self._seen_digest = config.sha256
        self._admin_runner = await start_admin(self, config.admin.listen)
        self._spawn(self._sweep_pools())
        self.ready = True
        log.info(
            "sidecar ready: %d upstream(s), admin on %s",
            len(config.upstreams),
            config.admin.listen,
            extra={"event": "ready", "config": self.config_path, "sha256": config.sha256},
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, config: SidecarConfig, contexts: dict[str, tls.ClientContext]) -> None:
        """Bring the running state to ``config``: bind first (so a bad address changes nothing), then swap."""
        old = self.config
        new_policies = {u.name: u for u in config.upstreams}
        to_bind = [
            u
            for u in config.upstreams
            if u.name not in self.listeners
            or self.listeners[u.name].address != u.listen
            or self.listeners[u.name].protocol != u.protocol
        ]
        # Built before binding, so a client that connects to a new listener before the swap finds a runtime.
        runtimes = {
            name: self._runtime_for(policy, config, contexts.get(name)) for name, policy in new_policies.items()
        }
        bound = await self._bind_all(to_bind, runtimes, config)
        # The swap: nothing below awaits, so no request sees half of it.
        removed = {n: self.runtimes[n] for n in self.listeners if n not in new_policies and n in self.runtimes}
        kept_rates = {id(rt.rate) for rt in runtimes.values()}
        for rt in self.runtimes.values():
            if rt.rate is not None and id(rt.rate) not in kept_rates:
                self._spawn(rt.rate.close())  # a replaced rate limit's Redis connection (requests in flight fall back)
        self.runtimes = runtimes  # new requests see the new policies from here on
        self.config = config
        for name in new_policies:
            if self._spare_runtimes.get(name) is runtimes[name]:
                del self._spare_runtimes[name]
        self._spare_runtimes.update(removed)
        self._swap_listeners(bound, new_policies, config.http.drain_timeout)
        self.tls_contexts = contexts
        self._restart_checks(old, config)
        self.loaded = LoadedFile(config.source, config.sha256, time.time())
        self.process_stats.last_reload = self.loaded.loaded_at

    def _runtime_for(
        self, policy: UpstreamPolicy, config: SidecarConfig, context: tls.ClientContext | None
    ) -> UpstreamRuntime:
        """A runtime for ``policy`` that carries over the running one's state, unless its protocol changed."""
        previous = self.runtimes.get(policy.name)
        if previous is not None and previous.policy.protocol != policy.protocol:
            previous = None
        return UpstreamRuntime(
            policy,
            self.clock,
            previous,
            idle_timeout=config.http.upstream_idle_timeout,
            max_response_head=config.http.max_response_header_bytes,
            tls=context,
        )

    async def _bind_all(
        self, to_bind: list[UpstreamPolicy], runtimes: dict[str, UpstreamRuntime], config: SidecarConfig
    ) -> dict[str, Listener]:
        """Bind every listener in ``to_bind`` or none: after an OSError the ones bound are closed and it re-raises."""
        for policy in to_bind:
            self._spare_runtimes.setdefault(policy.name, runtimes[policy.name])
        bound: dict[str, Listener] = {}
        try:
            for policy in to_bind:
                bound[policy.name] = await self._bind(policy, config)
        except OSError:
            for listener in bound.values():
                listener.server.close()
            for policy in to_bind:
                if self._spare_runtimes.get(policy.name) is runtimes[policy.name]:
                    del self._spare_runtimes[policy.name]
            raise
        return bound

    def _swap_listeners(self, bound: dict[str, Listener], names: Container[str], drain_timeout: float) -> None:
        """Serve on the new listeners; retire the ones they replace and those of upstreams no longer in ``names``."""
        for name, listener in bound.items():
            replaced = self.listeners.get(name)
            self.listeners[name] = listener
            if replaced is not None:
                self._spawn(self._retire(replaced, drain_timeout))
        for name in [n for n in self.listeners if n not in names]:
            self._spawn(self._retire(self.listeners.pop(name), drain_timeout, removed=True))

    async def _bind(self, policy: UpstreamPolicy, config: SidecarConfig) -> Listener:
        loop = asyncio.get_running_loop()
        name = policy.name
        connections: set[Drainable] = set()

        def get_runtime() -> UpstreamRuntime:
            runtime = self.runtimes.get(name)
            return runtime if runtime is not None else self._spare_runtimes[name]

        if policy.protocol == "tcp":

            def factory() -> asyncio.Protocol:
                return TcpClient(get_runtime, connections)
        else:
            http, log_requests, clock = config.http, config.logging.requests, self.clock
            # gRPC upstreams: a connection that opens with HTTP/2's preface is served as HTTP/2, call by call;
            # an HTTP/1.1 request on it is answered 505 (never forwarded: the target speaks HTTP/2 only).
            grpc = policy.protocol == "grpc"
            http2 = Http2Listener(get_runtime, log_requests, AbuseLimits()).handoff if grpc else None
            serve = refuse_http1 if grpc else forward

            def factory() -> asyncio.Protocol:
                return ClientConnection(get_runtime, http, connections, log_requests, clock, serve, http2)

        server = await loop.create_server(
            factory, policy.listen.host, policy.listen.port, reuse_address=True, backlog=2048
        )
        log.info(
            "listening for %s on %s (%s)",
            name,
            policy.listen,
            policy.protocol,
            extra={"event": "listener_started", "upstream": name, "listen": str(policy.listen)},
        )
        return Listener(name, policy.listen, policy.protocol, server, connections)

    async def _retire(self, listener: Listener, drain_timeout: float, removed: bool = False) -> None:
        """Stop accepting on a listener that was removed or moved; let its requests finish first.

        A removed upstream's runtime stays reachable (``_spare_runtimes``) until its connections are gone, then
        its pooled upstream connections are closed."""
        listener.server.close()
        for conn in list(listener.connections):
            conn.shutdown_when_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                while listener.connections:
                    await asyncio.sleep(0.05)
        for conn in list(listener.connections):
            conn.close()
        if removed and listener.name not in self.runtimes:
            runtime = self._spare_runtimes.pop(listener.name, None)
            if runtime is not None:
                runtime.close_pools()
        log.info(
            "listener for %s on %s stopped",
            listener.name,
            listener.address,
            extra={"event": "listener_stopped", "upstream": listener.name},
        )

    def _restart_checks(self, old: SidecarConfig | None, new: SidecarConfig) -> None:
        old_health = {u.name: (u.health, u.targets, u.protocol) for u in old.upstreams} if old else {}
        for upstream in new.upstreams:
            key = (upstream.health, upstream.targets, upstream.protocol)
            if upstream.name in self._stop_checks and old_health.get(upstream.name) == key:
                continue
            self._stop_check(upstream.name)
            if upstream.health is not None:
                stop = asyncio.Event()
                self._stop_checks[upstream.name] = stop
                name = upstream.name
                self._spawn(
                    health.run_checks(
                        lambda n=name: self.runtimes[n].policy,  # type: ignore[misc]
                        lambda result, n=name: self.runtimes[n].record_check(result),  # type: ignore[misc]
                        stop,
                        lambda n=name: self.runtimes[n].tls,  # type: ignore[misc]
                    )
                )
        for name in [n for n in self._stop_checks if n not in {u.name for u in new.upstreams}]:
            self._stop_check(name)

    def _stop_check(self, name: str) -> None:
        stop = self._stop_checks.pop(name, None)
        if stop is not None:
            stop.set()

    async def _sweep_pools(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = asyncio.get_running_loop().time()
            for rt in list(self.runtimes.values()):
                for pool in rt.balancer.pools():
                    pool.sweep(now)

    # -- reload ----------------------------------------------------------------------------------------------

    async def reload(self, trigger: str) -> bool:
        """Load the file again; a broken one leaves everything as it was.

        The whole file is validated before anything changes; then ``_apply`` binds new listeners before it
        swaps policies, so a reload either happens completely or not at all.
        """
        async with self._reload_lock:
            # The TLS files are read again too: a reload picks up rotated certificates and keys.
            read, contexts = tls.checked(read_policy(self.config_path, self.environ), self.tls_contexts)
            if read.digest is not None:
                self._seen_digest = read.digest  # whatever the outcome, the watcher need not act on these bytes
            for warning in read.warnings:
                log.warning("%s", warning, extra={"event": "config_warning"})
            config = read.config
            if config is None:
                return self._reject(trigger, [str(i) for i in read.errors])
            if self.config is not None and config.admin.listen != self.config.admin.listen:
                log.warning(
                    "admin.listen changed to %s: the admin server stays on %s until a restart",
                    config.admin.listen,
                    self.config.admin.listen,
                    extra={"event": "config_warning"},
                )
            try:
                await self._apply(config, contexts)
            except OSError as exc:
                self.process_stats.reloads["failure"] += 1
                self.last_reload_error = [f"cannot bind: {exc}"]
                log.error(
                    "reload rejected (%s): %s", trigger, exc, extra={"event": "reload_failed", "trigger": trigger}
                )
                return False
            self.process_stats.reloads["success"] += 1
            self.last_reload_error = []
            assert self.config is not None
            log.info(
                "policy reloaded (%s)",
                trigger,
                extra={"event": "reload", "trigger": trigger, "sha256": self.config.sha256},
            )
            return True

    def _reject(self, trigger: str, errors: list[str]) -> bool:
        """A reload that changes nothing: count it and log every error on its own line (file:line:col)."""
        self.process_stats.reloads["failure"] += 1
        self.last_reload_error = errors
        for error in errors:
            log.error("%s", error, extra={"event": "config_error", "trigger": trigger})
        log.error(
            "reload rejected (%s): keeping the running policy; %d error(s)",
            trigger,
            len(errors),
            extra={"event": "reload_failed", "trigger": trigger, "errors": errors},
        )
        return False

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when the file's content changes and has stayed the same for one more look (editors save in
        several steps: truncate, write, rename). Content, not mtime, decides: a save that changes nothing and
        a SIGHUP reload that already read these bytes trigger nothing."""
        candidate = None
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                digest = hashlib.sha256(_read(self.config_path)).hexdigest()
            except OSError:
                continue  # mid-rename: look again
            if digest == self._seen_digest:
                candidate = None
                continue
            if digest != candidate:
                candidate = digest  # changed: wait one more look for the editor to finish
                continue
            candidate = None
            await self.reload("file_changed")

    # -- stop ------------------------------------------------------------------------------------------------

    async def stop(self, drain_timeout: float | None = None) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        timeout = (
            drain_timeout if drain_timeout is not None else (self.config.http.drain_timeout if self.config else 5.0)
        )
        log.info("draining (up to %gs)", timeout, extra={"event": "draining"})
        await self._drain_clients(timeout)
        for name in list(self._stop_checks):
            self._stop_check(name)
        for task in list(self._tasks):
            task.cancel()
        for rt in self.runtimes.values():
            rt.close_pools()
            if rt.rate is not None:
                await rt.rate.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        log.info("stopped", extra={"event": "stopped"})

    async def _drain_clients(self, timeout: float) -> None:
        """Stop accepting, let in-flight http requests and gRPC calls finish for up to ``timeout`` (HTTP/2 clients
        are told GOAWAY), then close what is left."""
        for listener in self.listeners.values():
            listener.server.close()
        for listener in self.listeners.values():
            for conn in list(listener.connections):
                conn.shutdown_when_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(listener.connections for listener in self.listeners.values() if listener.protocol != "tcp"):
                    await asyncio.sleep(0.05)
        for listener in self.listeners.values():
            for conn in list(listener.connections):
                conn.close()


def _read(path: str) -> bytes:
    """The policy file's bytes. Read inline on the loop: a few KB of local file beat a thread hop."""
    return Path(path).read_bytes()


async def serve(
    config_path: str, demo: bool, watch: bool, policy: PolicyRead | None = None, give_back: bool = False
) -> int:
    loop = asyncio.get_running_loop()
    logs.throttle_accept_exhaustion(loop, log)
    demo_runner = None
    if demo:
        from proxy.demo import DEMO_HOST, DEMO_PORT, start_demo

        demo_runner = await start_demo()
        log.info("demo upstream on http://%s:%d", DEMO_HOST, DEMO_PORT, extra={"event": "demo_started"})
    sidecar = Sidecar(config_path)
    try:
        await sidecar.start(policy)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{config_path}: cannot listen: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    signals = 0

    def on_stop_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now", extra={"event": "forced_exit"})
            os._exit(1)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop_signal)
    loop.add_signal_handler(signal.SIGINT, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, lambda: sidecar._spawn(sidecar.reload("SIGHUP")))
    if watch:
        sidecar._spawn(sidecar.watch())
    if give_back:  # the raised malloc thresholds' resident free pages (proxy/allocator.py)
        sidecar._spawn(allocator.give_back())
    await stop.wait()
    await sidecar.stop()
    if demo_runner is not None:
        await demo_runner.cleanup()
    return 0


def run_command(
    config_path: str,
    demo: bool = False,
    watch: bool = True,
    log_level: str | None = None,
    malloc: allocator.Tuning | None = None,
) -> int:
    policy = read_policy(config_path)  # the one read of this start: for the log level, then to serve
    level = log_level or (policy.config.logging.level if policy.config else "info")
    logs.configure(level)
    give_back = False
    if malloc is not None:  # set before logging was (cli.py tunes malloc first)
        log.debug(malloc.note, extra={"event": "malloc"})
        give_back = malloc.applied
    try:
        import uvloop

        return uvloop.run(serve(config_path, demo, watch, policy, give_back))
    except ImportError:
        return asyncio.run(serve(config_path, demo, watch, policy, give_back))
