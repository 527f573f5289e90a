"""Loading a policy: text → sourced YAML → defaults merged per upstream → model → rules → ``SidecarConfig``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.policy.build import ModelBuilder
from proxy.policy.grpc_rules import with_grpc_defaults
from proxy.policy.issues import ConfigError, ConfigIssue
from proxy.policy.model import (
    TOP_LEVEL,
    UPSTREAM_ONLY,
    AdminPolicy,
    HttpServerPolicy,
    LoggingPolicy,
    SidecarConfig,
    UpstreamPolicy,
)
from proxy.policy.rates import check_shared_keys, without_unused_rate_limit
from proxy.policy.routes import build_routes
from proxy.policy.rules import check_listens, check_upstream
from proxy.policy.source import UNRESOLVED, Sourced, SourceReader, merge
from proxy.policy.values import UPSTREAM_NAME, did_you_mean


def load_text(
    text: str, file: str = "<string>", environ: Mapping[str, str] | None = None
) -> tuple[SidecarConfig | None, list[ConfigIssue]]:
    """Parse and validate. Returns the config (None if any error) and every issue found, errors and warnings."""
    reader = SourceReader(file, os.environ if environ is None else environ)
    root = reader.read(text)
    if root is None:
        return None, reader.issues
    builder = ModelBuilder(reader)
    if not isinstance(root.value, dict):
        reader.error(root, "", "the policy file must be a mapping with admin, defaults and upstreams")
        return None, reader.issues
    top = root.value
    for key, child in top.items():
        if key not in TOP_LEVEL:
            reader.error(child, key, f"unknown key{did_you_mean(key, TOP_LEVEL)}")

    admin = _section(builder, top, "admin", AdminPolicy)
    http = _section(builder, top, "http", HttpServerPolicy)
    logging_policy = _section(builder, top, "logging", LoggingPolicy)
    allow_non_loopback = _allow_non_loopback(reader, top)
    defaults = _defaults(reader, top)
    upstreams = _Upstreams()
    ups_node = top.get("upstreams")
    if ups_node is None or not ups_node.value:
        reader.error(ups_node or root, "upstreams", "at least one upstream is required")
    elif not isinstance(ups_node.value, dict):
        reader.error(ups_node, "upstreams", "expected a mapping of upstream name → policy")
    else:
        upstreams.build(builder, ups_node.value, defaults)

    check_shared_keys(builder, upstreams.policies, upstreams.merged)
    if admin is not None:
        check_listens(builder, admin, top.get("admin"), upstreams.policies, ups_node, allow_non_loopback)

    errors = [i for i in reader.issues if i.severity == "error"]
    if errors or admin is None or http is None or logging_policy is None:
        return None, sorted(reader.issues, key=lambda i: (i.line, i.column))
    config = SidecarConfig(
        admin=admin,
        http=http,
        logging=logging_policy,
        upstreams=tuple(upstreams.policies),
        allow_non_loopback=allow_non_loopback,
        source=file,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        positions=upstreams.positions,
    )
    return config, sorted(reader.issues, key=lambda i: (i.line, i.column))


def _section(builder: ModelBuilder, top: Mapping[str, Sourced], key: str, cls: type) -> Any:
    """A top-level section other than upstreams: its defaults when absent or empty, None when it is bad."""
    node = top.get(key)
    if node is None or node.value is None:
        return cls()
    return builder.build(cls, node)


def _allow_non_loopback(reader: SourceReader, top: Mapping[str, Sourced]) -> bool:
    node = top.get("allow_non_loopback")
    if node is None:
        return False
    if isinstance(node.value, bool):
        return node.value
    if node.value is not UNRESOLVED:
        reader.error(node, "allow_non_loopback", f"expected true or false, got {node.value!r}")
    return False


def _defaults(reader: SourceReader, top: Mapping[str, Sourced]) -> Sourced:
    """The ``defaults`` mapping every upstream inherits (empty when absent or bad), checked for per-upstream keys."""
    defaults = top.get("defaults") or Sourced({}, 0, 0, "defaults")
    if defaults.value is None:
        defaults = Sourced({}, defaults.line, defaults.column, "defaults")
    if not isinstance(defaults.value, dict):
        reader.error(defaults, "defaults", "expected a mapping of keys")
        defaults = Sourced({}, defaults.line, defaults.column, "defaults")
    for key in UPSTREAM_ONLY:
        if key in defaults.value:
            reader.error(defaults.value[key], f"defaults.{key}", f"{key} is set per upstream, not in defaults")
    return defaults


@dataclass
class _Upstreams:
    """The upstreams built so far, with the merged nodes later rules point into and where their TLS keys were."""

    policies: list[UpstreamPolicy] = dataclasses.field(default_factory=list)
    merged: dict[str, Sourced] = dataclasses.field(default_factory=dict)
    positions: dict[str, tuple[int, int, str]] = dataclasses.field(default_factory=dict)

    def build(self, builder: ModelBuilder, nodes: Mapping[str, Sourced], defaults: Sourced) -> None:
        reader = builder.reader
        for name, up_node in nodes.items():
            if not UPSTREAM_NAME.match(name):
                reader.error(up_node, up_node.path, "names are letters, digits, '-', '_' and '.' (≤ 63)")
            elif not isinstance(up_node.value, dict):
                reader.error(up_node, up_node.path, "expected a mapping of keys")
            else:
                self._add(builder, name, up_node, defaults)

    def _add(self, builder: ModelBuilder, name: str, up_node: Sourced, defaults: Sourced) -> None:
        inherited = {k: v for k, v in defaults.value.items() if k not in UPSTREAM_ONLY}
        merged = merge(Sourced(inherited, defaults.line, defaults.column, "defaults"), up_node)
        merged.path = up_node.path
        # Routes are built apart: each merges over the upstream's own timeouts and retry.
        without_routes = {k: v for k, v in merged.value.items() if k != "routes"}
        policy = builder.build(
            UpstreamPolicy, Sourced(without_routes, merged.line, merged.column, merged.path), name=name
        )
        if policy is None:
            return
        # Possibly partial (bad keys at defaults): its other rules still get checked.
        check_upstream(builder, policy, merged)
        routes = build_routes(builder, merged, policy)
        policy = with_grpc_defaults(without_unused_rate_limit(policy), merged)
        self.merged[name] = merged
        self.policies.append(dataclasses.replace(policy, routes=routes) if routes else policy)
        _tls_positions(merged, f"upstreams.{name}.tls", self.positions)


def _tls_positions(upstream: Sourced, where: str, out: dict[str, tuple[int, int, str]]) -> None:
    """Where the TLS block and its file keys were written (an upstream's own, or inherited from defaults)."""
    node = upstream.value.get("tls") if isinstance(upstream.value, dict) else None
    if node is None:
        return
    out[where] = (node.line, node.column, node.path)
    if isinstance(node.value, dict):
        for key, child in node.value.items():
            out[f"{where}.{key}"] = (child.line, child.column, child.path)


@dataclass(frozen=True, slots=True)
class PolicyRead:
    """One read of a policy file: its bytes' digest, the config (None if any error) and every issue found."""

    path: str
    digest: str | None  # sha256 of the bytes on disk; None when they could not be read
    config: SidecarConfig | None
    issues: list[ConfigIssue]
    os_error: OSError | None = None  # why the file could not be read at all

    @property
    def errors(self) -> list[ConfigIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ConfigIssue]:
        return [i for i in self.issues if i.severity == "warning"]


def read_policy(path: str | Path, environ: Mapping[str, str] | None = None) -> PolicyRead:
    """Read, decode and validate a policy file once. Never raises for a bad file: it becomes an issue."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        issue = ConfigIssue(file, 0, 0, "", f"cannot read: {exc.strerror or exc}")
        return PolicyRead(file, None, None, [issue], exc)
    digest = hashlib.sha256(data).hexdigest()
    try:
        # Bytes decoded as-is (no newline translation): line numbers match an editor, the digest the disk.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return PolicyRead(file, digest, None, [ConfigIssue(file, 0, 0, "", f"not UTF-8 text: {exc.reason}")])
    config, issues = load_text(text, file, environ)
    return PolicyRead(file, digest, config, issues)


def load_file(path: str | Path, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load a policy file or raise ``ConfigError`` with every problem in it."""
    read = read_policy(path, environ)
    if read.config is None:
        raise ConfigError(read.issues)
    return read.config
