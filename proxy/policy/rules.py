"""Cross-field rules: what each key allows alone but that makes no sense together."""

from __future__ import annotations

import re
from collections.abc import Callable

from proxy.policy.build import ModelBuilder
from proxy.policy.grpc_rules import check_grpc_upstream
from proxy.policy.model import AdminPolicy, RetryPolicy, Timeouts, UpstreamPolicy
from proxy.policy.rates import check_upstream_rate_limit
from proxy.policy.source import Sourced, SourceReader
from proxy.policy.values import Address, format_duration


def check_upstream(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    """Cross-field rules: things each key allows alone but that make no sense together.

    A rule is skipped when one of its keys was itself invalid: it would judge the stand-in default, not what
    the operator wrote, and the key already has its own error.
    """
    reader = builder.reader
    children = node.value if isinstance(node.value, dict) else {}

    def ok(*keys: str) -> bool:
        return not any(builder.broken(f"{node.path}.{key}") for key in keys)

    def at(*keys: str) -> Sourced:
        current: Sourced = node
        for key in keys:
            inner = current.value.get(key) if isinstance(current.value, dict) else None
            if inner is None:
                return current
            current = inner
        return current

    path = node.path
    if ok("targets") and ("targets" not in children or not up.targets):
        reader.error(node, f"{path}.targets", "at least one target is required")
    for target in up.targets if ok("protocol") else ():
        wanted = "tcp" if up.protocol == "tcp" else "http"
        if target.scheme != wanted and not (wanted == "http" and target.scheme == "https"):
            example = _TARGET_EXAMPLES.get(up.protocol, "host:port")
            reader.error(
                at("targets"),
                f"{path}.targets",
                f"{target} is not a {up.protocol} target (write {example} for protocol {up.protocol})",
            )
    if "listen" not in children:
        reader.error(node, f"{path}.listen", "a listen address is required")
    check_timing(reader, path, up.timeouts, up.retry, ok, lambda *keys: at(*keys[0].split(".")))
    b = up.breaker
    if ok("breaker.slow_call_rate_threshold", "breaker.slow_call_duration") and (
        (b.slow_call_rate_threshold is None) != (b.slow_call_duration is None)
    ):
        reader.error(at("breaker"), f"{path}.breaker", "slow_call_duration and slow_call_rate_threshold go together")
    if (
        ok("outlier.max_ejection", "outlier.base_ejection")
        and up.outlier
        and (up.outlier.max_ejection < up.outlier.base_ejection)
    ):
        reader.error(
            at("outlier", "max_ejection"), f"{path}.outlier.max_ejection", "max_ejection is shorter than base_ejection"
        )
    if up.protocol == "tcp" and "fallback" in children:
        reader.error(at("fallback"), f"{path}.fallback", "a tcp upstream has no HTTP fallback answer")
    _check_tls(builder, up, node, at("tls"))
    check_upstream_rate_limit(builder, up, node)
    check_grpc_upstream(builder, up, node)


_TARGET_EXAMPLES = {
    "tcp": "host:port",
    "http": "http://host:port or https://host:port",
    "grpc": "http://host:port (h2c, prior knowledge) or https://host:port (TLS, ALPN h2)",
}


_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f:.]+")


def _check_tls(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced, tls_node: Sourced) -> None:
    """The ``tls`` block: only http upstreams originate TLS; some settings go together; verify: false is said."""
    reader, path, tls = builder.reader, node.path, up.tls
    children = node.value if isinstance(node.value, dict) else {}
    if "tls" not in children or builder.broken(f"{path}.tls"):
        return
    if up.protocol == "tcp":
        # Inherited from defaults (for the http upstreams) it is simply not used; written here it is a mistake.
        if not tls_node.path.startswith("defaults"):
            reader.error(
                tls_node,
                f"{path}.tls",
                "a tcp upstream relays bytes and does not originate TLS (the client's own TLS passes through)",
            )
        return

    def at(key: str) -> Sourced:
        inner = tls_node.value.get(key) if isinstance(tls_node.value, dict) else None
        return inner if inner is not None else tls_node

    if tls.key_file is not None and tls.cert_file is None:
        reader.error(at("key_file"), f"{path}.tls.key_file", "key_file needs cert_file (the certificate it signs)")
    if tls.server_name is not None and not _SERVER_NAME.fullmatch(tls.server_name):
        reader.error(at("server_name"), f"{path}.tls.server_name", f"not a host name: {tls.server_name!r}")
    if not tls.verify and any(t.is_tls for t in up.targets):
        reader.error(
            at("verify"),
            f"{path}.tls.verify",
            "verify: false accepts any certificate: anyone on the path can read and change this traffic",
            severity="warning",
        )


def check_timing(
    reader: SourceReader,
    path: str,
    t: Timeouts,
    retry: RetryPolicy,
    ok: Callable[..., bool],
    at: Callable[..., Sourced],
) -> None:
    """The timeout and backoff rules, for an upstream or for one of its routes (effective values).

    ``ok(*keys)``: whether the rule on these keys (``timeouts.per_try``…) is to be judged here; ``at(*keys)``: the
    node an error points at, given the keys in order of preference (the one named first is the one at fault).
    """
    if ok("retry.max_delay", "retry.base_delay") and retry.max_delay < retry.base_delay:
        reader.error(
            at("retry.max_delay", "retry.base_delay"),
            f"{path}.retry.max_delay",
            f"max_delay ({format_duration(retry.max_delay)}) is shorter than base_delay "
            f"({format_duration(retry.base_delay)})",
        )
    if ok("timeouts.per_try", "timeouts.total") and t.per_try > t.total:
        reader.error(
            at("timeouts.per_try", "timeouts.total"),
            f"{path}.timeouts.per_try",
            f"per_try ({format_duration(t.per_try)}) is longer than total ({format_duration(t.total)})",
        )
    if ok("timeouts.connect", "timeouts.per_try") and t.connect > t.per_try:
        reader.error(
            at("timeouts.connect", "timeouts.per_try"),
            f"{path}.timeouts.connect",
            f"connect ({format_duration(t.connect)}) is longer than per_try ({format_duration(t.per_try)})",
        )


def check_listens(
    builder: ModelBuilder,
    admin: AdminPolicy,
    admin_node: Sourced | None,
    upstreams: list[UpstreamPolicy],
    ups_node: Sourced | None,
    allow_non_loopback: bool,
) -> None:
    """Every listen address used once; a warning for each one reachable off this host."""
    reader = builder.reader
    listens: list[tuple[str, Address, Sourced | None]] = []
    if not builder.broken("admin.listen"):
        listen_node = admin_node.value.get("listen") if admin_node and isinstance(admin_node.value, dict) else None
        listens.append(("admin.listen", admin.listen, listen_node or admin_node))
    for u in upstreams:
        up_value = ups_node.value[u.name].value if ups_node is not None else {}
        # An absent or invalid listen already has its error; its stand-in must not collide with others.
        if "listen" in up_value and not builder.broken(f"upstreams.{u.name}.listen"):
            listens.append((f"upstreams.{u.name}.listen", u.listen, up_value["listen"]))
    seen: dict[Address, str] = {}
    for path, address, node in listens:
        other = seen.get(address)
        if other is not None:
            reader.error(node, path, f"{address} is already used by {other}")
        seen[address] = path
    for path, address, node in listens:
        if not address.is_loopback and not allow_non_loopback:
            reader.error(
                node,
                path,
                f"{address} is not a loopback address: reachable from other hosts "
                "(set allow_non_loopback: true to silence this)",
                severity="warning",
            )
